"""Loading the checkpoints people have: the official attention-module format first.

Accepted: ``{'state_dict': ..., 'epoch', 'arch', 'best_prec1', 'optimizer'}`` as written by the
official ``train_imagenet.py`` (keys prefixed ``module.`` by DataParallel), timm's ``CheckpointSaver``
files (``{'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args': argparse.Namespace, 'metric',
...}``, maybe ``'state_dict_ema'``: ``'state_dict'`` is taken), ``{'model': ...}`` /
``{'model_state_dict': ...}``, a bare state dict, or a ``.safetensors`` file; ``module.`` and
``_orig_mod.`` (torch.compile) prefixes are stripped. Always ``torch.load(weights_only=True)`` (with
``argparse.Namespace`` admitted as data for that one call, as timm's own loader does): a pickle that
would run code is refused, never executed. A safetensors file holds no code at all.
"""

from __future__ import annotations

import argparse
import io
import struct
import pickle
import pickletools
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import _weights_only_unpickler as unpickler  # private: every use is guarded, see _allowed_globals
from torch import nn

from ..errors import CbamDeployError
from ..fsutil import sha256_file

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# plain data classes a training checkpoint holds beside its tensors, admitted for the one torch.load call
# (weights_only still builds them from values: no code of the file runs): timm's CheckpointSaver 'args'
_SAFE_GLOBALS = (argparse.Namespace,)
_SAFE_GLOBAL_NAMES = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
_METADATA_KEYS = ("epoch", "arch", "best_prec1", "best_acc1", "metric", "version")
_SAFETENSORS_SUFFIX = ".safetensors"
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
    container: str = "torch"  # "torch" (torch.save) or "safetensors"
    notes: list[str] = field(default_factory=list)  # what else the file holds that was not taken

    def describe(self) -> dict:
        described = {
            "path": str(Path(self.path).resolve()),  # verify may run from another folder
            "sha256": self.sha256,
            "format": "safetensors" if self.container == "safetensors" else
                      f"dict['{self.wrapper_key}']" if self.wrapper_key else "bare state dict",
            "stripped_prefixes": self.stripped_prefixes,
            "metadata": self.metadata,
            "tensors": len(self.state_dict),
        }
        if self.notes:
            described["notes"] = self.notes
        return described


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint safely and unwrap it to a flat state dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CbamDeployError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == _SAFETENSORS_SUFFIX or _looks_like_safetensors(path):
        state, wrapper, metadata, notes, container = _read_safetensors(path), None, {}, [], "safetensors"
    else:
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(list(_SAFE_GLOBALS)):
                # torch warns about pickle protocols it does not expect; the error below says what matters
                warnings.simplefilter("ignore")
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt data makes the unpickler fail in many ways (IndexError, KeyError, ...)
            raise _load_error(path, exc) from None
        (state, wrapper, metadata), notes, container = _unwrap(raw, path), _not_taken(raw), "torch"
    state, stripped = _strip_prefixes(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CbamDeployError(f"checkpoint {path} has non-tensor entries in its state dict: {_listing(bad)}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CbamDeployError(f"checkpoint {path} holds NaN or Inf values in {_listing(nonfinite)}; it is unusable")
    return Checkpoint(path, sha256_file(path), state, wrapper, stripped, metadata, container, notes)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file opens with its JSON header's length (8 bytes, little-endian) and then '{'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors import SafetensorError  # optional: the timm extra (safetensors files)
        from safetensors.torch import load_file  # optional: the timm extra (safetensors files)
    except ModuleNotFoundError:
        raise CbamDeployError(f"checkpoint {path} is a safetensors file, and reading it needs the safetensors "
                              "package: pip install 'cbam-deploy[timm]' (or pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = _detail(str(exc)) if str(exc).strip() else type(exc).__name__
        raise CbamDeployError(f"cannot read checkpoint {path}: corrupt or truncated safetensors file ({detail})") \
            from None


def _not_taken(raw) -> list[str]:
    """What else a checkpoint holds that is a state dict too (timm's EMA weights), said beside the one taken."""
    if isinstance(raw, dict) and _is_state_dict(raw.get("state_dict_ema")) and _is_state_dict(raw.get("state_dict")):
        return ["the file also holds EMA weights ('state_dict_ema'); 'state_dict' is taken"]
    return []


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER (pre-1.6 file format)
_REFUSED = (
    "Only plain tensors and containers are accepted (torch.load weights_only=True), so nothing in it was run. "
    "If you trust the file, re-save it as a state dict: torch.save(model.state_dict(), 'weights.pth')."
)


def _load_error(path: Path, exc: Exception) -> CbamDeployError:
    """One clear message for a failed ``torch.load``, in three kinds:

    * refused: the pickle names a global (a function or class to import and call) that weights-only
      loading forbids, e.g. ``posix.system``; found by torch, or by our own static scan of the
      pickle opcodes (torch's unpickler stops earlier on pickles it cannot parse, protocol 4+);
    * not a PyTorch checkpoint: neither a torch.save zip archive nor a pickle (random bytes, an image...);
    * corrupt: it looks like one of those, but is truncated or damaged.
    """
    message = str(exc)
    blocked = _blocked_global(message) if isinstance(exc, pickle.UnpicklingError) else None
    scan = _scan_file(path)
    if blocked or scan.forbidden:
        name = ", ".join(scan.forbidden[:3]) if scan.forbidden else blocked
        return CbamDeployError(
            f"refused to load checkpoint {path}: the file asks to import/run {name}, which weights_only loading "
            f"forbids. {_REFUSED}"
        )
    detail = _detail(message) if message.strip() else type(exc).__name__
    if scan.kind == "zip":
        return CbamDeployError(f"cannot read checkpoint {path}: corrupt or truncated PyTorch archive ({detail})")
    if scan.kind == "pickle":
        if scan.legacy_torch:
            return CbamDeployError(f"cannot read checkpoint {path}: corrupt or truncated PyTorch file (legacy format; {detail})")
        if scan.complete:
            return CbamDeployError(
                f"cannot read checkpoint {path}: it is a Python pickle that weights-only loading cannot read ({detail}); "
                "save the weights with torch.save(model.state_dict(), ...)"
            )
        return CbamDeployError(f"cannot read checkpoint {path}: corrupt or truncated pickle ({scan.error or detail})")
    start = f"it starts with {scan.head!r}" if scan.head else "it is empty"
    return CbamDeployError(
        f"not a PyTorch checkpoint: {path} is neither a torch.save archive nor a pickle "
        f"({start}); pass the .pth/.pt file that torch.save wrote"
    )


@dataclass
class _Scan:
    kind: str | None = None  # "zip", "pickle" or None (neither)
    forbidden: list[str] = field(default_factory=list)
    complete: bool = False
    legacy_torch: bool = False  # opens with torch.save's legacy magic number
    error: str | None = None
    head: bytes = b""


def _scan_file(path: Path) -> _Scan:
    """Statically disassemble the checkpoint's pickle(s) (nothing is imported or run) and list the
    globals that weights-only loading would refuse."""
    scan = _Scan()
    try:
        with open(path, "rb") as fh:
            scan.head = fh.read(8)
            if scan.head.startswith(_ZIP_MAGIC):
                scan.kind = "zip"
                try:
                    with zipfile.ZipFile(path) as archive:
                        names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                        if names:
                            _scan_pickles(io.BytesIO(archive.read(names[0])), scan, limit=1)
                except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, zlib.error, KeyError, ValueError) as exc:
                    scan.error = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
                return scan
            fh.seek(0)
            # a legacy torch.save file is several pickles in a row (magic, version, sys info, object, keys)
            _scan_pickles(fh, scan, limit=5)
    except OSError as exc:
        scan.error = exc.strerror or str(exc)
    # protocol 2+ pickles (torch.save, pickle.dumps) open with PROTO n; older ones must parse whole
    framed = len(scan.head) >= 2 and scan.head[0] == 0x80 and 1 <= scan.head[1] <= 5
    scan.kind = "pickle" if framed or scan.complete else None
    return scan


def _scan_pickles(stream, scan: _Scan, limit: int) -> None:
    allowed = _allowed_globals()
    for index in range(limit):
        start = stream.tell()
        strings: list = []  # recent pushes: str for string constants, None for anything else
        memo: dict = {}
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    _note_global(scan, f"{module}.{attr}", allowed)
                elif name == "STACK_GLOBAL":
                    module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                    _note_global(scan, f"{module}.{attr}" if module and attr else "an unnamed global", allowed)
                elif name == "LONG1" and index == 0 and arg == _LEGACY_MAGIC:
                    scan.legacy_torch = True
                elif "UNICODE" in name or "STRING" in name:
                    strings.append(arg if isinstance(arg, str) else None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = strings[-1] if strings else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
                elif name not in ("PROTO", "FRAME", "MARK", "STOP"):
                    strings.append(None)
                if len(strings) > 64:
                    del strings[:-8]
        except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
            if index == 0:
                scan.error = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            return
        if index == 0:
            scan.complete = True
        if stream.tell() == start or not stream.read(1):
            return
        stream.seek(-1, io.SEEK_CUR)


def _note_global(scan: _Scan, name: str, allowed: set[str] | None) -> None:
    if allowed is not None and name in allowed:
        return
    if allowed is None and (name.split(".")[0] in ("torch", "collections", "builtins", "numpy", "_codecs")
                            or name in _SAFE_GLOBAL_NAMES):
        return  # torch's list was not available: trust only the modules weights-only loading allows
    if name not in scan.forbidden:
        scan.forbidden.append(name)


def _allowed_globals() -> set[str] | None:
    """The globals torch.load(weights_only=True) accepts (default list plus user-registered ones)."""
    try:
        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals()) | _SAFE_GLOBAL_NAMES
    except Exception:  # private API: fall back to module prefixes
        return None


def _blocked_global(message: str) -> str | None:
    """The 'GLOBAL module.name' a weights-only unpickler refused, if that is why it failed."""
    for line in message.splitlines():
        match = re.search(r"GLOBAL ([\w.]+)", line)
        if match:
            return match.group(1)
        if "Unsupported global" in line:
            return line.split("Unsupported global", 1)[1].strip(" :") or line.strip()
    return None


_TORCH_NOISE = ("Please file an issue", "Weights only load failed", "Check the documentation", "Re-running",
                "In PyTorch 2.6", "Do it only if")


def _detail(message: str) -> str:
    """The informative line of torch's error text, without its advice to file an issue."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest
    useful = [ln for ln in lines if not any(noise in ln for noise in _TORCH_NOISE)]
    first = useful[0] if useful else "unreadable"
    if len(first) > 120 and ". " in first:  # e.g. miniz: "...central directory. This is an internal error..."
        first = first.split(". ", 1)[0]
    return first


def _unwrap(raw, path: Path) -> tuple[dict, str | None, dict]:
    if isinstance(raw, nn.Module):  # cannot happen with weights_only, kept for clarity
        raise CbamDeployError(f"{path} holds a whole pickled model; save its state_dict() instead")
    if not isinstance(raw, dict) or not raw:
        raise CbamDeployError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        inner = raw.get(key)
        if _is_state_dict(inner):
            metadata = {k: _plain(v) for k, v in raw.items() if k in _METADATA_KEYS}
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


def apply_state_dict(model: nn.Module, checkpoint: Checkpoint, model_name: str, classifier: str = "fc",
                     cause: str | None = None) -> None:
    """Load strictly, with errors that list the keys and say the likely cause (``cause``: the model
    source's own words for keys that do not fit; ``classifier``: the classifier's module name)."""
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
            f"{cause or _likely_cause(missing, unexpected)}"
        )
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:_SHOW])
        more = f" ... ({len(mismatched)} in all)" if len(mismatched) > _SHOW else ""
        hint = ""
        if any(k.startswith(f"{classifier}.") for k, _, _ in mismatched):
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
