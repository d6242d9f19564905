"""A registry of named model constructors (timm's idea, without its hundreds of variants).

``create_model('resnet50_cbam', num_classes=10, stem='cifar')`` builds a model; ``list_models()``
names them. ``outputs='features'`` builds the same network as a backbone whose forward returns the
stage outputs ``{"C2", "C3", "C4", "C5"}`` (same state dict, same module names). Each entry also
carries the input defaults that export writes into the manifest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import CbamDeployError
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from . import resnet as _resnet
OUTPUTS = _resnet.OUTPUTS  # what a zoo model's forward returns: "logits" or "features" (C2..C5)


def check_outputs(outputs: object) -> str:
    """``outputs`` itself if it is 'logits' or 'features', else a CbamDeployError."""
    if not isinstance(outputs, str) or outputs not in OUTPUTS:
        raise CbamDeployError(f"outputs must be one of {', '.join(OUTPUTS)} (logits: the classifier; features: the "
                              f"stage outputs C2..C5 for a detector or FPN), got {outputs!r}")
    return outputs


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    family: str
    attention: str | None
    description: str
    stems: tuple[str, ...] = ("imagenet", "cifar")
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict = field(default_factory=dict)

    def default_input_size(self, stem: str = "imagenet") -> int:
        return 32 if stem == "cifar" else 224


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(_REGISTRY, key=_sort_key)


def _sort_key(name: str) -> tuple:
    entry = _REGISTRY[name]
    order = {None: 0, "se": 1, "cbam": 2, "bam": 3}
    digits = "".join(ch for ch in entry.family if ch.isdigit())
    return (entry.family.startswith("resnext"), entry.family.endswith("_half"), int(digits or 0), order[entry.attention])


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CbamDeployError(
            f"unknown model {name!r}.{hint} Run 'cbam-deploy models' for the list, or pass "
            "--model path/to/file.py:factory for your own network."
        ) from None


def create_model(name: str, num_classes: int = 1000, stem: str = "imagenet", outputs: str = "logits",
                 **kwargs) -> nn.Module:
    """Build a registered model in eval mode; ``outputs='features'`` for the C2..C5 backbone."""
    entry = get_entry(name)
    check_outputs(outputs)
    if stem not in entry.stems:
        raise CbamDeployError(f"model {name!r} has no {stem!r} stem; choose one of {', '.join(entry.stems)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CbamDeployError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = entry.build(num_classes=num_classes, stem=stem, outputs=outputs, **kwargs)
    return model.eval()


_ATTN_LABEL = {None: "", "se": "_se", "cbam": "_cbam", "bam": "_bam"}
_ATTN_TEXT = {None: "plain", "se": "+ SE", "cbam": "+ CBAM (official layout)", "bam": "+ BAM after stages 1-3"}


def _register_defaults() -> None:
    for depth in (18, 34, 50, 101):
        for attention in (None, "se", "cbam", "bam"):
            name = f"resnet{depth}{_ATTN_LABEL[attention]}"

            def build(depth=depth, attention=attention, **kw):
                return _resnet.resnet(depth, attention=attention, **kw)

            register_model(ModelEntry(name, build, f"resnet{depth}", attention, f"ResNet-{depth} {_ATTN_TEXT[attention]}"))
    for attention in (None, "se", "cbam"):
        name = f"resnet10_half{_ATTN_LABEL[attention]}"

        def build(attention=attention, **kw):
            return _resnet.resnet(10, attention=attention, width=32, **kw)

        register_model(ModelEntry(name, build, "resnet10_half", attention,
                                  f"ResNet-10, half width (32-256 ch) {_ATTN_TEXT[attention]}; small images"))
    for attention in (None, "se", "cbam"):
        name = f"resnext50_32x4d{_ATTN_LABEL[attention]}"

        def build(attention=attention, **kw):
            return _resnet.resnext50_32x4d(attention=attention, **kw)

        register_model(ModelEntry(name, build, "resnext50_32x4d", attention, f"ResNeXt-50 32x4d {_ATTN_TEXT[attention]}"))


_register_defaults()
