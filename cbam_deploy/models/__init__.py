"""CBAM and SE layers, network families, the registry and checkpoint loading."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CbamDeployError
from .checkpoint import Checkpoint, apply_state_dict, infer_num_classes, read_checkpoint
from .custom import CodeTrust, factory_to_run, import_factory, is_factory_spec
from .layers import BAM, CBAM, ChannelGate, SpatialGate, SqueezeExcite
from .registry import IMAGENET_MEAN, IMAGENET_STD, OUTPUTS, check_outputs, create_model, get_entry, list_models
from .stats import count_gmacs, count_parameters

__all__ = [
    "BAM", "CBAM", "ChannelGate", "CodeTrust", "LoadedModel", "factory_to_run", "SpatialGate", "SqueezeExcite", "build_model",
    "OUTPUTS", "count_gmacs", "count_parameters", "create_model", "list_models", "read_checkpoint", "state_fingerprint",
    "zoo_table",
]


INIT_SEED = 0


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes): proves a rebuilt model is the same one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for export, with what the manifest needs to say about it."""

    module: nn.Module
    name: str
    source: str  # "zoo" or "factory"
    num_classes: int | None
    stem: str
    default_input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    checkpoint: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)
    outputs: str | None = "logits"  # zoo: "logits" or "features" (C2..C5); factory: None, its forward decides
    factory_sha256: str | None = None  # the sha256 of the factory code that was imported

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
        if self.checkpoint is None:  # verify rebuilds it and checks it is the same model
            info["init"] = {"seed": INIT_SEED, "state_sha256": state_fingerprint(self.module)}
        return info


def build_model(spec: str, weights: str | None = None, num_classes: int | None = None, stem: str = "imagenet",
                outputs: str | None = "logits", factory_sha256: str | None = None) -> LoadedModel:
    """A zoo name or 'file.py:factory', with optional weights; num_classes inferred from them.

    ``outputs``: 'logits' (the classifier) or 'features' (a zoo backbone returning C2..C5; it keeps the
    classifier's fc, unused, so a classification checkpoint loads unchanged). None means the default
    (a manifest written before the choice existed). A factory decides its own outputs: 'features' is refused.
    ``factory_sha256``: what a factory's code must hash to (a bundle's record), checked on the very
    bytes that are imported.
    """
    if outputs is not None:
        check_outputs(outputs)
    checkpoint = read_checkpoint(weights) if weights else None
    notes = [] if checkpoint else ["no --weights given: random (official) initialisation, parity only"]
    if is_factory_spec(spec):
        if outputs == "features":
            raise CbamDeployError(f"--outputs features is for zoo models; your factory decides its outputs ({spec}): "
                                  "return the stage outputs (a dict or tuple of tensors) from its forward instead")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)  # a random-init factory model is the same model every time too
            module, digest = import_factory(spec, num_classes, factory_sha256)
        if checkpoint:
            apply_state_dict(module, checkpoint, spec)
        return LoadedModel(module, spec, "factory", num_classes, stem, 224, checkpoint=checkpoint, notes=notes,
                           outputs=None, factory_sha256=digest)
    entry = get_entry(spec)
    if checkpoint and num_classes is None:
        num_classes = infer_num_classes(checkpoint.state_dict)
        if num_classes is not None:
            notes.append(f"num_classes={num_classes} inferred from the checkpoint's classifier")
    if num_classes is None:  # not 'or': 0 must be refused by create_model, not become 1000
        num_classes = 1000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)  # without weights, the same model every time
        module = create_model(spec, num_classes=num_classes, stem=stem, outputs=outputs or "logits")
    if checkpoint:
        apply_state_dict(module, checkpoint, spec)
    if outputs == "features":
        notes.append("outputs=features: the forward returns the stage outputs C2..C5; the classifier (fc) is kept "
                     "only so that classification checkpoints load, and is not part of the graph")
    return LoadedModel(module, spec, "zoo", num_classes, stem, entry.default_input_size(stem),
                       entry.mean, entry.std, checkpoint, notes, outputs or "logits")


def zoo_table(input_size: int = 224) -> list[dict]:
    """Every registered model with its parameter count and GFLOPs (MACs) at ``input_size``."""
    rows = []
    for name in list_models():
        entry = get_entry(name)
        with torch.device("meta"):
            model = create_model(name)
        rows.append({
            "name": name,
            "description": entry.description,
            "parameters": count_parameters(model),
            "gflops": round(count_gmacs(model, input_size), 3),
        })
    return rows
