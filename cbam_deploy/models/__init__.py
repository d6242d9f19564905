"""CBAM and SE layers, network families, the registry, checkpoint loading and the model libraries (timm, Ultralytics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import CbamDeployError
from ..preprocessing import Preprocessing
from . import ultralytics_peers, ultralytics_source
from .checkpoint import apply_state_dict, infer_num_classes, read_checkpoint
from .custom import CodeTrust, factory_to_run, import_factory, is_factory_spec
from .layers import BAM, CBAM, ChannelGate, SpatialGate, SqueezeExcite
from .libraries import LibrarySource, library, library_names, register_library, source_for
from .loaded import (_FIGURE_ROUNDING, INIT_ATOL, INIT_RTOL, INIT_SEED, LoadedModel, _tensor_figures, state_fingerprint,
                     state_summary)
from .registry import OUTPUTS, check_outputs, create_model, get_entry, list_models
from .stats import count_gmacs, count_parameters
from . import timm_source

__all__ = [
    "BAM", "CBAM", "ChannelGate", "CodeTrust", "LoadedModel", "factory_to_run", "SpatialGate", "SqueezeExcite", "build_model",
    "from_module", "LibrarySource", "library", "library_names", "register_library", "source_for",
    "OUTPUTS", "count_gmacs", "count_parameters", "create_model", "list_models", "read_checkpoint", "state_fingerprint",
    "InitMatch", "match_state_summary", "state_summary", "zoo_table",
]

register_library(replace(ultralytics_source.SOURCE, peers=ultralytics_peers.peers))  # its peers: its own exporter


@dataclass(frozen=True)
class InitMatch:
    """How a rebuilt model's state compares with a recorded ``state_summary``."""

    matched: bool
    worst: float  # the largest difference of a figure as a fraction of its tensor's bound (inf: not comparable)
    differing: int  # tensors whose figures differ by more than their recorded rounding
    tensors: int
    reason: str = ""

    def describe(self) -> str:
        if not self.matched:
            return self.reason
        return (f"seeded init matched within tolerance: {self.differing} of {self.tensors} tensors differ in their "
                f"last bits, by at most {100 * self.worst:.2g}% of the bound (rtol {INIT_RTOL:g} of the tensor's norm + "
                f"atol {INIT_ATOL:g} per element); the exact sha256 differs")


def _well_formed(figures) -> bool:
    return (isinstance(figures, list) and len(figures) == 4 and isinstance(figures[0], int)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in figures))


def match_state_summary(module: nn.Module, summary: dict | None, rtol: float = INIT_RTOL,
                        atol: float = INIT_ATOL) -> InitMatch:
    """Whether ``module``'s state matches a recorded ``state_summary``: the same tensor names and sizes,
    and every figure of every tensor within ``rtol`` x its norm + ``atol`` x sqrt(its size)."""
    recorded = summary.get("tensors") if isinstance(summary, dict) else None
    if not isinstance(recorded, dict):
        return InitMatch(False, math.inf, 0, 0, "no tolerant fingerprint recorded (a bundle exported before it existed)")
    current = {name: _tensor_figures(tensor) for name, tensor in sorted(module.state_dict().items())}
    if set(current) != set(recorded):
        extra, missing = sorted(set(current) - set(recorded)), sorted(set(recorded) - set(current))
        return InitMatch(False, math.inf, 0, len(recorded), f"the rebuilt model's tensors are not the recorded ones "
                                                              f"(new: {extra[:3]}, missing: {missing[:3]})")
    worst, differing, worst_name = 0.0, 0, ""
    for name, figures in current.items():
        ref = recorded[name]
        if not _well_formed(ref):
            return InitMatch(False, math.inf, 0, len(recorded), f"the recorded figures of {name} are damaged")
        if ref[0] != figures[0]:
            return InitMatch(False, math.inf, 0, len(recorded), f"{name} has {figures[0]} elements, {ref[0]} recorded")
        delta = max(abs(a - b) for a, b in zip(figures[1:], ref[1:]))
        bound = rtol * abs(ref[1]) + atol * math.sqrt(ref[0])
        differing += delta > _FIGURE_ROUNDING * max(abs(ref[1]), 1e-30)
        share = delta / bound if bound > 0 else (0.0 if delta == 0 else math.inf)
        if share > worst:
            worst, worst_name = share, name
    if worst > 1:
        return InitMatch(False, worst, differing, len(current),
                         f"{differing} of {len(current)} tensors differ, {worst_name} by {worst:.3g} times the bound "
                         f"(rtol {rtol:g} of its norm + atol {atol:g} per element)")
    return InitMatch(True, worst, differing, len(current))


def from_module(module: nn.Module, name: str | None = None, num_classes: int | None = None, input_size: int = 224,
                preprocess: Preprocessing | None = None, weights: str | None = None) -> LoadedModel:
    """A model handed over in memory (a notebook's ``nn.Module``), as export takes it: its weights as
    they are (or ``weights`` loaded into it), fingerprinted so that a later command can tell it is
    handed the same module again (nothing can rebuild it from the bundle alone)."""
    if not isinstance(module, nn.Module):
        raise CbamDeployError(f"the model must be an nn.Module, a zoo name or FILE.py:FACTORY, got {type(module).__name__}")
    checkpoint = read_checkpoint(weights) if weights else None
    if checkpoint:
        apply_state_dict(module, checkpoint, name or type(module).__name__)
    notes = [] if checkpoint else ["the module's own weights (no --weights): fingerprinted in the manifest"]
    return LoadedModel(module.eval(), name or type(module).__name__, "module", num_classes, "custom", input_size,
                       checkpoint=checkpoint, notes=notes, outputs=None, preprocess=preprocess)


def build_model(spec: str, weights: str | None = None, num_classes: int | None = None, stem: str = "imagenet",
                outputs: str | None = "logits", trust: CodeTrust | None = None,
                factory_sha256: str | None = None) -> LoadedModel:
    """A zoo name, 'file.py:factory' or a library's spec (``libraries``), with optional weights;
    num_classes inferred from them. ``trust``: for a library source whose files hold code.

    ``outputs``: 'logits' (the classifier) or 'features' (a zoo backbone returning C2..C5; it keeps the
    classifier's fc, unused, so a classification checkpoint loads unchanged). None means the default
    (a factory's bundle records none). A factory decides its own outputs: 'features' is refused.
    ``factory_sha256``: what a factory's code must hash to (a bundle's record), checked on the very
    bytes that are imported.
    """
    if outputs is not None:
        check_outputs(outputs)
    source = source_for(spec)
    if source is not None:  # a library builds it (timm, Ultralytics)
        if outputs == "features":
            raise CbamDeployError(f"--outputs features is for zoo models; {spec} decides its outputs through its "
                                  "library's own arguments")
        return source.build(spec, weights, num_classes, trust)
    checkpoint = read_checkpoint(weights) if weights else None
    notes = [] if checkpoint or is_factory_spec(spec) else ["no --weights given: random (official) initialisation, "
                                                             "parity only"]
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


def _build_timm(spec: str, weights: str | None = None, num_classes: int | None = None,
                trust: CodeTrust | None = None) -> LoadedModel:
    """``timm:NAME?KEY=VALUE&...`` (``timm_source``): a library call with values, so no trust is needed."""
    built = timm_source.build(spec, weights, num_classes, INIT_SEED)
    return LoadedModel(built.module, spec, "timm", built.num_classes, "imagenet", built.input_size,
                       checkpoint=built.checkpoint, notes=built.notes, outputs=None, preprocess=built.preprocessing)


register_library(LibrarySource("timm", timm_source.matches, timm_source.check, _build_timm))
