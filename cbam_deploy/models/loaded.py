"""A model ready for export (``LoadedModel``) and the fingerprints that tell a rebuilt model is the same one."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..preprocessing import Preprocessing
from .checkpoint import Checkpoint
from .registry import IMAGENET_MEAN, IMAGENET_STD, get_entry
from .stats import count_parameters

INIT_SEED = 0
# a seeded init rebuilt by another CPU's torch (another ISA's vector code in the init math) may differ
# in the last bits of some weights (up to 2.5e-7 between x86-64 and aarch64): a tensor is the same when
# its change stays within INIT_RTOL of its L2 norm plus INIT_ATOL per element (root mean square), far
# above those bits and far below any real change of weights
INIT_RTOL = 1e-5
INIT_ATOL = 1e-6
SUMMARY_RULE = ("per tensor, in float64: [elements n, L2 norm, sum / sqrt(n), projection on a unit vector drawn "
                "from numpy default_rng([0, n])]; the same when every figure differs by at most "
                "rtol x norm + atol x sqrt(n)")
_FIGURE_ROUNDING = 1e-9  # figures are recorded to 10 significant digits: a smaller difference is no difference


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes): proves a rebuilt model is the same one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _direction(size: int) -> np.ndarray:
    """The seeded unit vector a tensor of ``size`` elements is projected on (the same on every machine:
    numpy's PCG64 and its uniform floats are bit-exact across platforms)."""
    direction = np.random.default_rng([INIT_SEED, size]).random(size) - 0.5
    norm = float(np.linalg.norm(direction))
    return direction / norm if norm > 0 else direction


def _tensor_figures(tensor: torch.Tensor) -> list[float]:
    values = tensor.detach().cpu().to(torch.float64).reshape(-1).numpy()
    if values.size == 0:
        return [0, 0.0, 0.0, 0.0]
    figures = (np.linalg.norm(values), values.sum() / math.sqrt(values.size), _direction(values.size) @ values)
    return [int(values.size)] + [float(f"{float(v):.10g}") for v in figures]


def state_summary(module: nn.Module) -> dict:
    """A fingerprint that tolerates the last bits: per parameter and buffer, its element count and three
    float64 figures (its L2 norm, its sum over sqrt(n), its projection on a seeded random unit vector).
    Each figure moves by at most the L2 norm of a change to the tensor, so a tensor whose figures all
    stay within the bound changed by about that much or less. Recorded beside the exact
    ``state_fingerprint`` to recognise a seeded init rebuilt by another CPU's torch; it is no proof
    against a deliberate change (the sha256 is the exact check)."""
    return {"rule": SUMMARY_RULE, "rtol": INIT_RTOL, "atol": INIT_ATOL,
            "tensors": {name: _tensor_figures(tensor) for name, tensor in sorted(module.state_dict().items())}}


@dataclass
class LoadedModel:
    """A model ready for export, with what the manifest needs to say about it."""

    module: nn.Module
    name: str
    source: str  # "zoo", "factory" or "module" (an nn.Module handed over in memory)
    num_classes: int | None
    stem: str
    default_input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    checkpoint: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)
    outputs: str | None = "logits"  # zoo: "logits" or "features" (C2..C5); factory: None, its forward decides
    factory_sha256: str | None = None  # the sha256 of the factory code that was imported
    preprocess: Preprocessing | None = None  # how its images are prepared, when not the ImageNet crop with mean/std
    spec: str | None = None  # what rebuilds it from any folder (a library's file by its absolute path), when not name
    # prepare(side, dynamic_hw): a model whose traced graph depends on its input side (a detector's anchors) made
    # ready for the side the bundle takes, before anything traces it
    prepare: Callable[..., None] | None = field(default=None, repr=False)
    labels: list[str] | None = None  # its class names, when it knows them
    input_stride: int | None = None  # input sides must be multiples of it (a detector's total stride), when known
    weights_from: str | None = None  # what its weights are, in a few words, when a library loaded them itself
    # the batch its traced graphs hold (a detector's head reshapes by the traced batch): a format that traces the
    # model over a range of batches (an ExecuTorch program's bounds) takes this one batch instead
    trace_batch: int | None = None

    def prepare_for(self, side: int, dynamic_hw: bool = False) -> None:
        """Make the model ready to be traced at ``side`` (a no-op for models whose graph does not depend on it)."""
        if self.prepare is not None:
            self.prepare(side, dynamic_hw)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.preprocess or Preprocessing(mean=tuple(self.mean), std=tuple(self.std))

    def describe(self) -> dict:
        entry = get_entry(self.name) if self.source == "zoo" else None
        info = {
            "name": self.name,
            "source": self.source,
            "family": entry.family if entry else None,
            "attention": entry.attention if entry else None,
            "stem": self.stem,
            "num_classes": self.num_classes,
            "outputs_mode": self.outputs,
            "parameters": count_parameters(self.module),
            "weights": self.checkpoint.describe() if self.checkpoint else None,
            "notes": self.notes,
        }
        if self.source == "factory":  # absolute, so that verify can rebuild it from any folder
            path, _, factory = self.name.rpartition(":")
            info["factory"] = f"{Path(path).resolve()}:{factory}"
            info["factory_sha256"] = self.factory_sha256  # what --model must match to run it again
        if self.input_stride is not None:
            info["input_stride"] = self.input_stride
        if self.trace_batch is not None:
            info["trace_batch"] = self.trace_batch
        if self.spec is not None and self.spec != self.name:
            info["spec"] = self.spec  # verify rebuilds it from here, whatever folder it runs in
        if self.source == "module":  # nothing can rebuild it: the module itself must be handed over again
            info["module_class"] = f"{type(self.module).__module__}.{type(self.module).__qualname__}"
        if self.checkpoint is None or self.source == "module":  # verify rebuilds it (or is handed it): the same?
            info["init"] = {"seed": INIT_SEED, "state_sha256": state_fingerprint(self.module),
                            "state_summary": state_summary(self.module)}
            if self.weights_from:
                info["init"]["weights"] = f"{self.weights_from}: fingerprinted"
            elif self.source in ("factory", "module"):  # whatever weights its code or its caller gave it: no seed
                info["init"]["weights"] = "the model's own (set by its code, not --weights): fingerprinted"
        return info

    @property
    def weights_label(self) -> str:
        """What the weights are, in a few words."""
        if self.checkpoint is not None:
            return str(self.checkpoint.describe().get("path"))
        if self.weights_from:
            return self.weights_from
        if self.source not in ("factory", "module"):  # the zoo's and the libraries' seeded init
            return "none (random init)"
        return f"the model's own (state sha256 {state_fingerprint(self.module)[:12]})"
