"""Loading the checkpoints people have: the official attention-module format first.

Accepted: ``{'state_dict': ..., 'epoch', 'arch', 'best_prec1', 'optimizer'}`` as written by the
official ``train_imagenet.py`` (keys prefixed ``module.`` by DataParallel), ``{'model': ...}`` /
``{'model_state_dict': ...}``, or a bare state dict; ``module.`` and ``_orig_mod.`` (torch.compile)
prefixes are stripped. Always ``torch.load(weights_only=True)``: a pickle that would run code is
refused, never executed.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CbamDeployError
from ..fsutil import sha256_file

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5


@dataclass
class Checkpoint:
    """A state dict read from disk, with what was found around it."""

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    wrapper_key: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "format": f"dict['{self.wrapper_key}']" if self.wrapper_key else "bare state dict",
            "stripped_prefixes": self.stripped_prefixes,
            "metadata": self.metadata,
            "tensors": len(self.state_dict),
        }


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint safely and unwrap it to a flat state dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CbamDeployError(f"checkpoint {path} does not exist or is not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _blocked_global(str(exc))
        if blocked:
            raise CbamDeployError(
                f"refused to load {path}: it is a pickle that would import or run code ({blocked}). Only "
                "plain tensors and containers are accepted (torch.load weights_only=True). If you trust it, "
                "re-save it as a state dict: torch.save(model.state_dict(), 'weights.pth')."
            ) from None
        raise CbamDeployError(
            f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({_detail(str(exc))})"
        ) from None
    except Exception as exc:  # corrupt data makes the unpickler fail in many ways (IndexError, KeyError, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CbamDeployError(f"cannot read checkpoint {path}: corrupt or not a PyTorch file ({msg})") from None
    state, wrapper, metadata = _unwrap(raw, path)
    state, stripped = _strip_prefixes(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CbamDeployError(f"checkpoint {path} has non-tensor entries in its state dict: {_listing(bad)}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CbamDeployError(f"checkpoint {path} holds NaN or Inf values in {_listing(nonfinite)}; it is unusable")
    return Checkpoint(path, sha256_file(path), state, wrapper, stripped, metadata)


def _blocked_global(message: str) -> str | None:
    """The 'GLOBAL module.name' a weights-only unpickler refused, if that is why it failed."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip()
    return None


def _detail(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported") or "error:" in ln.lower() and not ln.startswith("Weights only"):
            return ln.replace("WeightsUnpickler error:", "").strip() or ln
    return lines[0] if lines else "unreadable"


def _unwrap(raw, path: Path) -> tuple[dict, str | None, dict]:
    if isinstance(raw, nn.Module):  # cannot happen with weights_only, kept for clarity
        raise CbamDeployError(f"{path} holds a whole pickled model; save its state_dict() instead")
    if not isinstance(raw, dict) or not raw:
        raise CbamDeployError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = raw.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            metadata = {k: _plain(v) for k, v in raw.items() if k in ("epoch", "arch", "best_prec1", "best_acc1")}
            return dict(inner), key, metadata
    if all(isinstance(k, str) for k in raw) and any(isinstance(v, torch.Tensor) for v in raw.values()):
        return dict(raw), None, {}
    raise CbamDeployError(
        f"checkpoint {path} has no state dict: expected tensors, or one of the keys "
        f"{', '.join(_WRAPPER_KEYS)}; found keys {_listing([str(k) for k in raw])}"
    )


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def _strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    stripped = []
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f" ... ({len(keys)} in all)" if len(keys) > _SHOW else f" ({len(keys)})"
    return shown + more


def infer_num_classes(state: dict[str, torch.Tensor], classifier: str = "fc.weight") -> int | None:
    weight = state.get(classifier)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def apply_state_dict(model: nn.Module, checkpoint: Checkpoint, model_name: str) -> None:
    """Load strictly, with errors that list the keys and say the likely cause."""
    expected = model.state_dict()
    state = checkpoint.state_dict
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        raise CbamDeployError(
            f"checkpoint {checkpoint.path} does not fit model {model_name!r}: {'; '.join(parts)}. "
            f"{_likely_cause(missing, unexpected)}"
        )
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:_SHOW])
        more = f" ... ({len(mismatched)} in all)" if len(mismatched) > _SHOW else ""
        hint = ""
        if any(k.startswith("fc.") for k, _, _ in mismatched):
            hint = " The classifier differs: pass --num-classes to match the checkpoint, or leave it out to infer it."
        raise CbamDeployError(
            f"checkpoint {checkpoint.path} has shapes that do not fit model {model_name!r}: {shown}{more}.{hint}"
        )
    filled = {k: state.get(k, expected[k]) for k in expected}
    model.load_state_dict(filled, strict=True)


def _likely_cause(missing: list[str], unexpected: list[str]) -> str:
    def attention_key(key: str) -> bool:
        return ".cbam." in key or ".se." in key or key.startswith("bam")

    base = [k for k in missing + unexpected if not attention_key(k)]
    if any(k.startswith("layer") for k in base):
        return "The block layout differs: most likely the wrong depth (resnet18/34/50/101) or family."
    if base:
        return "Most likely the wrong model name, or a checkpoint from another implementation."
    for tag, suffix in ((".cbam.", "_cbam"), (".se.", "_se"), ("bam", "_bam")):
        in_missing = any(tag in k for k in missing)
        in_unexpected = any(tag in k for k in unexpected)
        if in_unexpected and not in_missing:
            return f"The checkpoint has attention modules the model lacks: use the *{suffix} model."
        if in_missing and not in_unexpected:
            return f"The model expects attention modules ({suffix}) the checkpoint lacks: pick the model that matches it."
    return "Most likely the wrong model name, or a checkpoint from another implementation."
