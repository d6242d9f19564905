"""timm networks as a model source: ``--model timm:NAME?KEY=VALUE&...`` (the ``timm`` extra).

``timm:resnet50?block_args.attn_layer=cbam&drop_rate=0.1`` builds
``timm.create_model('resnet50', pretrained=False, exportable=True, block_args={'attn_layer': 'cbam'},
drop_rate=0.1, num_classes=...)``: dotted keys make nested dicts, values are read as JSON-ish scalars
(ints, floats, true/false/none, anything else a string; ``"..."`` forces a string, ``[...]`` and
``{...}`` are JSON). Never pretrained (nothing is downloaded: weights come from ``--weights``), seeded, so
that a random init rebuilds the same model; a library call with values, so rebuilding it runs no code
from a bundle. timm's pretrained config (``timm.data.resolve_model_data_config``) gives the model's
preprocessing (mean, std, crop_pct, interpolation) and its default input size.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CbamDeployError
from ..preprocessing import INTERPOLATIONS, Preprocessing
from .checkpoint import Checkpoint, apply_state_dict, infer_num_classes, read_checkpoint

PREFIX = "timm:"
INSTALL = "pip install 'cbam-deploy[timm]'"
# create_model's arguments the spec may not set: the tool decides them (or another option does)
_REFUSED = {
    "pretrained": "nothing is downloaded; pass your weights with --weights FILE",
    "checkpoint_path": "pass the checkpoint with --weights FILE (read safely, recorded in the manifest)",
    "cache_dir": "nothing is downloaded, so there is no cache to set",
    "num_classes": "set the classifier size with --num-classes (inferred from --weights when left out)",
    "device": "the model is built on the CPU; the formats decide where it runs",
    "dtype": "the model is built in float32; --precision decides the artifacts' precision",
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?\Z")


def matches(spec: str) -> bool:
    return spec.startswith(PREFIX)


@dataclass(frozen=True)
class TimmSpec:
    """A parsed ``timm:NAME?KEY=VALUE&...``: the model name (with its pretrained tag, if any) and the
    keyword arguments for ``timm.create_model``."""

    spec: str
    name: str
    kwargs: dict = field(default_factory=dict)

    def call(self, num_classes: int | None) -> str:
        """The create_model call, as text (for the manifest's notes)."""
        args = [repr(self.name), "pretrained=False"]
        args += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        if num_classes is not None:
            args.append(f"num_classes={num_classes}")
        return f"timm.create_model({', '.join(args)})"


def parse_spec(spec: str) -> TimmSpec:
    """``timm:NAME?KEY=VALUE&KEY=VALUE`` -> ``TimmSpec`` (no timm needed)."""
    if not matches(spec):
        raise CbamDeployError(f"{spec!r} is not a timm model: write timm:NAME, e.g. timm:resnet50")
    name, _, query = spec[len(PREFIX):].partition("?")
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise CbamDeployError(f"--model {spec}: name a timm model after 'timm:' (e.g. timm:resnet50; "
                              "'python -c \"import timm; print(timm.list_models())\"' lists them)")
    kwargs: dict = {}
    for item in query.split("&") if query else []:
        key, equals, text = item.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(_KEY.match(p) for p in parts):
            raise CbamDeployError(f"--model {spec}: {item!r} is not KEY=VALUE (keyword arguments are written "
                                  "timm:NAME?KEY=VALUE&KEY=VALUE, with dotted keys for nested ones: "
                                  "block_args.attn_layer=cbam)")
        if parts == ["pretrained"] and text.strip().lower() == "false":
            continue  # what is done anyway
        if parts[0] in _REFUSED:
            raise CbamDeployError(f"--model {spec}: {parts[0]} is not a model argument here: {_REFUSED[parts[0]]}")
        _put(kwargs, parts, _value(text.strip(), spec, key), spec)
    kwargs.setdefault("exportable", True)  # timm's layer choices for export (as timm's own onnx_export does)
    return TimmSpec(spec, name, kwargs)


def _put(kwargs: dict, parts: list[str], value, spec: str) -> None:
    level = kwargs
    for depth, part in enumerate(parts[:-1]):
        level = level.setdefault(part, {})
        if not isinstance(level, dict):
            raise CbamDeployError(f"--model {spec}: {'.'.join(parts[:depth + 1])} is given a value and keys below it")
    if parts[-1] in level:
        raise CbamDeployError(f"--model {spec}: {'.'.join(parts)} is given twice")
    level[parts[-1]] = value


def _value(text: str, spec: str, key: str):
    """A spec's value: true/false/none, an int, a float, "a string", [JSON], {JSON}; else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text and text[0] in "[{\"":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CbamDeployError(f"--model {spec}: the value of {key} is not valid JSON ({exc})") from None
    return text


def _timm(spec: str):
    """timm itself, or one line saying how to get it."""
    try:
        import timm  # optional heavy dependency: the timm extra
        import timm.data  # noqa: F401  (optional: resolve_model_data_config)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] not in ("timm", "torchvision"):
            raise
        missing = exc.name.split(".")[0] if exc.name else "timm"
        raise CbamDeployError(f"--model {spec} needs {missing}, which is not installed: {INSTALL}") from None
    except Exception as exc:  # e.g. a torchvision built for another torch fails at import
        raise CbamDeployError(f"--model {spec}: timm could not be imported ({type(exc).__name__}: "
                              f"{_first_line(exc)}); install torch and torchvision as one release pair, then "
                              f"{INSTALL}") from None
    return timm


def check(spec: str, stem: str = "imagenet") -> None:
    """A well-formed spec of a model timm has, with timm installed: refused in one line before any work."""
    parsed = parse_spec(spec)
    if stem != "imagenet":
        raise CbamDeployError(f"--stem is for the zoo's models; a timm model's stem is set by its own arguments "
                              f"(e.g. {PREFIX}{parsed.name}?stem_type=deep)")
    _check_name(_timm(spec), parsed)


def _check_name(timm, parsed: TimmSpec) -> None:
    arch, dot, tag = parsed.name.partition(".")
    if timm.is_model(arch):
        if dot and parsed.name not in timm.list_pretrained(f"{arch}.*"):  # the tag picks the pretrained config
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise CbamDeployError(f"--model {parsed.spec}: timm's {arch} has no pretrained tag {tag!r} (its tags: "
                                  f"{', '.join(tags) or 'none'})")
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise CbamDeployError(f"--model {parsed.spec}: timm {timm.__version__} has no model {arch!r}.{hint}")


@dataclass
class TimmModel:
    """What ``build`` made: the module and what the manifest says of it."""

    module: nn.Module
    num_classes: int | None
    input_size: int
    preprocessing: Preprocessing
    checkpoint: Checkpoint | None
    notes: list[str]


def build(spec: str, weights: str | None, num_classes: int | None, seed: int) -> TimmModel:
    """Build ``spec`` with timm (never pretrained; the init seeded with ``seed``), load ``weights`` into
    it, and read its data config."""
    parsed = parse_spec(spec)
    timm = _timm(spec)
    _check_name(timm, parsed)
    checkpoint = read_checkpoint(weights) if weights else None
    notes = []
    if checkpoint is not None and num_classes is None:
        num_classes = infer_num_classes(checkpoint.state_dict, f"{_classifier(timm, parsed.name)}.weight")
        if num_classes is not None:
            notes.append(f"num_classes={num_classes} inferred from the checkpoint's classifier")
    kwargs = {**parsed.kwargs, **({"num_classes": num_classes} if num_classes is not None else {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # without weights, the same model every time (verify rebuilds it)
        try:
            module = timm.create_model(parsed.name, pretrained=False, **kwargs)
        except CbamDeployError:
            raise
        except Exception as exc:  # timm's TypeError for an argument its model does not take, its asserts, ...
            raise CbamDeployError(_create_error(parsed, exc)) from None
    module.eval()
    if checkpoint is not None:
        apply_state_dict(module, checkpoint, spec, classifier=_classifier(timm, parsed.name),
                         cause=f"The checkpoint is of another network than {spec} (its arch: "
                               f"{checkpoint.metadata.get('arch', 'not recorded')}): set the model name and its "
                               "arguments it was trained with.")
    config = timm.data.resolve_model_data_config(module)
    preprocessing, input_size, config_notes = data_config(config)
    notes.append(f"built as {parsed.call(getattr(module, 'num_classes', num_classes))} with timm "
                 f"{timm.__version__}" + ("" if checkpoint else f", random init seeded with torch.manual_seed({seed})"))
    tag = (getattr(module, "pretrained_cfg", None) or {}).get("tag")
    notes.append(f"preprocessing from timm's pretrained config{f' ({tag})' if tag else ''}: input {input_size}, "
                 f"crop_pct {preprocessing.crop_pct}, {preprocessing.interpolation}, mean "
                 f"{list(preprocessing.mean)}, std {list(preprocessing.std)}")
    notes += config_notes
    return TimmModel(module, getattr(module, "num_classes", num_classes), input_size, preprocessing, checkpoint, notes)


def data_config(config: dict) -> tuple[Preprocessing, int, list[str]]:
    """timm's resolved data config -> (the crop preprocessing, the input side, notes on what differs)."""
    notes = []
    channels, height, width = (tuple(config.get("input_size") or (3, 224, 224)) + (224, 224))[:3]
    if channels != 3:
        raise CbamDeployError(f"the model takes {channels}-channel images; cbam-deploy exports RGB models "
                              "(leave in_chans out)")
    size = int(max(height, width))
    if height != width:
        notes.append(f"timm's input size is {height}x{width}; exported square at {size} (set --input-size)")
    interpolation = str(config.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        notes.append(f"timm's interpolation {interpolation!r} is recorded as bicubic (set --interpolation)")
        interpolation = "bicubic"
    crop_pct = config.get("crop_pct")
    crop_pct = float(crop_pct) if isinstance(crop_pct, (int, float)) and math.isfinite(crop_pct) else None
    if crop_pct is not None and not 0.1 <= crop_pct <= 1.0:
        notes.append(f"timm's crop_pct {crop_pct} is outside 0.1..1; the default is recorded (set --crop-pct)")
        crop_pct = None
    mode = config.get("crop_mode") or "center"
    if mode != "center":
        notes.append(f"timm's crop_mode {mode!r} is recorded as a centre crop (resize the shorter side, crop)")
    preprocessing = Preprocessing(mode="crop", mean=tuple(float(v) for v in config["mean"]),
                                  std=tuple(float(v) for v in config["std"]), interpolation=interpolation,
                                  crop_pct=crop_pct)
    return preprocessing, size, notes


def _classifier(timm, name: str) -> str:
    """The classifier's module name in the model's state dict (timm's pretrained config says it)."""
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    return classifier[0] if isinstance(classifier, (list, tuple)) and classifier else classifier or "fc"


def _create_error(parsed: TimmSpec, exc: Exception) -> str:
    detail = f"{type(exc).__name__}: {_first_line(exc)}" if str(exc).strip() else type(exc).__name__
    hint = ""
    if isinstance(exc, TypeError) and "attn_layer" in str(exc):
        hint = f"; a ResNet takes its attention through its blocks: {PREFIX}{parsed.name}?block_args.attn_layer=cbam"
    return f"--model {parsed.spec}: timm could not build {parsed.name} with these arguments ({detail}){hint}"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + " ..."
