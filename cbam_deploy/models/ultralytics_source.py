"""Ultralytics YOLO detectors as a model source: ``--model path/to/model.yaml`` (an Ultralytics model yaml, CBAM
rows included) with optional ``--weights`` (a state dict), or ``--model path/to/best.pt`` (a trained Ultralytics
checkpoint: a pickle of the whole model, built only under ``--trust-code``), with the ``ultralytics`` extra.

The model is built by Ultralytics' own parser, with ``CBAM`` registered for it and each CBAM row's channel
argument scaled as the parser scales the other rows' (``make_divisible(min(c, max_channels) * width, 8)``), and
then prepared the way Ultralytics' exporter prepares it: BatchNorm fused, eval, every ``Detect`` head in export
mode (one output ``(B, 4 + nc, A)``: box centre x, y, width, height in input pixels, then the class
probabilities), ``C2f`` blocks splitting instead of chunking, and a dry run at the bundle's input side
(``prepare``), so that the head's anchors and strides are constants of every traced graph. The head caches
its anchors per feature shape; here they are cached per height and width only, so a trace at another batch
(a dynamic batch, a program with batch bounds) sees the same constants. A bundle with a dynamic height and
width computes them in the graph instead (``Detect.dynamic``), which the ONNX and OpenVINO formats take.

Preprocessing is YOLO's: letterbox to the input side (pad 114), RGB, 0-1 scaling, mean 0 and std 1.
Nothing is downloaded at run time: Ultralytics runs offline (``YOLO_OFFLINE``), never installs packages
(``YOLO_AUTOINSTALL``), keeps its settings under cbam-deploy's cache unless ``YOLO_CONFIG_DIR`` says otherwise,
with its hub sync and logger integrations off.

``bench --peers`` gains Ultralytics' own exporter on the same model (``ultralytics_peers``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ..errors import CbamDeployError
from ..formats import Extra
from ..fsutil import cache_root
from ..preprocessing import Preprocessing
from .checkpoint import Checkpoint, apply_state_dict, read_checkpoint
from .custom import CodeTrust
from .libraries import LibrarySource
from .loaded import LoadedModel

NAME = "ultralytics"
ULTRALYTICS = Extra("Ultralytics", ("ultralytics", "torchvision"),
                    "pip install 'cbam-deploy[ultralytics]' (torch and torchvision from one index: docs/yolo-and-timm.md)")
YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt",)
DEFAULT_INPUT_SIZE = 640  # Ultralytics' own default image size
SEED = 0  # a model without weights is the same seeded init every time (as the zoo's)
# YOLO's own preprocessing: letterbox (pad 114), RGB, pixels / 255, no mean or std
PREPROCESSING = Preprocessing(mode="letterbox", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1 / 255)
# the class-score layer of a Detect head (its last 1x1 conv on the first level): its rows are the classes
_CLASS_LAYER = re.compile(r"(^|\.)cv3\.0\.2\.weight$")
_OFF = {"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False, "raytune": False,
        "tensorboard": False, "wandb": False}


# ---------------------------------------------------------------------------------------------- the library

def _is_file_spec(spec, suffixes: tuple[str, ...]) -> bool:
    return isinstance(spec, str) and ":" not in Path(spec).name and Path(spec).suffix.lower() in suffixes


def is_yaml(spec) -> bool:
    return _is_file_spec(spec, YAML_SUFFIXES)


def is_checkpoint(spec) -> bool:
    return _is_file_spec(spec, CHECKPOINT_SUFFIXES)


def ultralytics():
    """The ``ultralytics`` package, imported offline (settings under cbam-deploy's cache, no hub sync, no
    installs, no downloads), with ``CBAM`` registered for its model-yaml parser; one line when missing."""
    os.environ["YOLO_OFFLINE"] = "1"  # no connectivity probe, no asset download, no update check
    os.environ["YOLO_AUTOINSTALL"] = "0"  # a missing requirement is reported, never pip-installed
    os.environ.setdefault("YOLO_VERBOSE", "False")  # its INFO lines would land on stdout, which --json owns
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_root() / "ultralytics"))  # not the user's settings file
    package, tasks, modules, utils = ULTRALYTICS.require_all("ultralytics", "ultralytics.nn.tasks",
                                                            "ultralytics.nn.modules", "ultralytics.utils")
    if any(utils.SETTINGS.get(key) != value for key, value in _OFF.items()):
        utils.SETTINGS.update(_OFF)
    if getattr(tasks, "CBAM", None) is None:
        tasks.CBAM = modules.CBAM  # parse_model looks a row's module up among the names tasks.py imports
    _undo_global_patches(utils)
    return package


def _undo_global_patches(utils) -> None:
    """Importing Ultralytics replaces ``PIL.Image.open`` (an unidentified image then tries to pip-install a
    HEIF plugin and ends in ModuleNotFoundError instead of PIL's own error) and ``torch.save`` (retries) for
    the whole process: the rest of cbam-deploy reads images and writes files with the originals, which
    Ultralytics' patches keep under private names."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original_open = getattr(patches, "_image_open", None)
    if original_open is not None and Image.open is getattr(patches, "image_open", None):
        Image.open = original_open
    original_save = getattr(patches, "_torch_save", None)
    if original_save is not None and torch.save is getattr(utils, "torch_save", None):
        torch.save = original_save


@contextlib.contextmanager
def _quiet():
    """Ultralytics prints to stdout (which belongs to ``--json`` output): send it to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def check_spec(spec: str, stem: str = "imagenet") -> None:
    """A model yaml or checkpoint that exists, with the library installed (nothing imported)."""
    path = Path(spec)
    if not path.is_file():
        raise CbamDeployError(f"--model {spec}: no such file (an Ultralytics model yaml or a trained checkpoint .pt)")
    missing = ULTRALYTICS.probe()
    if missing:
        raise CbamDeployError(f"--model {spec} is an Ultralytics model, and {missing}")


def needs_trust(spec: str) -> str | None:
    if is_checkpoint(spec):
        return (f"{Path(spec).name} is an Ultralytics checkpoint, a pickle of the whole model, which runs code "
                "when it is loaded")
    return None


def scale_cbam_rows(cfg: dict, cbam_class: str = "CBAM") -> dict:
    """The model dict with every CBAM row's channel argument scaled as Ultralytics' parser scales the
    other rows' (it passes the arguments of modules it does not know as written)."""
    cfg = copy.deepcopy(cfg)
    scales = cfg.get("scales")
    if scales:
        scale = cfg.get("scale") or next(iter(scales))
        cfg["scale"] = scale
        if scale not in scales:
            raise CbamDeployError(f"model scale {scale!r} is not one of the yaml's scales ({', '.join(scales)})")
        _, width, max_channels = scales[scale]
    else:
        width, max_channels = cfg.get("width_multiple", 1.0), math.inf
    for row in [*cfg.get("backbone", []), *cfg.get("head", [])]:
        if len(row) >= 4 and row[2] == cbam_class and row[3] and isinstance(row[3][0], int):
            channels = min(row[3][0], max_channels) * width
            row[3] = [int(math.ceil(channels / 8) * 8), *row[3][1:]]
    return cfg


def read_model_yaml(path: str | Path) -> dict:
    """An Ultralytics model yaml as its parser reads it (the scale guessed from a name like yolov8n-cbam.yaml)."""
    ultralytics()
    from ultralytics.nn.tasks import yaml_model_load  # lazy: the optional ultralytics extra

    try:
        with _quiet():
            cfg = yaml_model_load(path)
    except Exception as exc:
        raise CbamDeployError(f"{path} is not an Ultralytics model yaml: {_first_line(exc)}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        raise CbamDeployError(f"{path} is not an Ultralytics model yaml: it needs 'backbone' and 'head' lists of rows")
    return cfg


def checkpoint_classes(state: dict) -> int | None:
    """The class count of a Detect head's weights (its class-score layer's rows)."""
    for key, tensor in state.items():
        if _CLASS_LAYER.search(key) and isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
            return int(tensor.shape[0])
    return None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------- building

def build_from_yaml(spec: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, Checkpoint | None,
                                                                                      list[str]]:
    """Ultralytics' DetectionModel from a yaml (CBAM rows scaled), with a state dict's weights."""
    from ultralytics.nn.tasks import DetectionModel  # lazy: the optional ultralytics extra

    cfg = scale_cbam_rows(read_model_yaml(spec))
    notes = []
    checkpoint = read_checkpoint(weights) if weights else None
    classes = checkpoint_classes(checkpoint.state_dict) if checkpoint else None
    if classes is not None and num_classes is not None and classes != num_classes:
        raise CbamDeployError(f"--num-classes {num_classes}, but the head of {weights} has {classes} classes: leave "
                              "--num-classes out to take the checkpoint's")
    wanted = num_classes or classes
    if wanted is not None and wanted != cfg.get("nc"):
        notes.append(f"nc={wanted} ({'the checkpoint' if classes else '--num-classes'}) over the yaml's nc={cfg.get('nc')}")
        cfg["nc"] = wanted
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(SEED)
        try:
            model = DetectionModel(cfg, ch=3, nc=cfg.get("nc"), verbose=False)
        except Exception as exc:  # the parser raises whatever a bad row makes it raise
            raise CbamDeployError(f"Ultralytics could not build {spec}: {_first_line(exc)}") from None
    if checkpoint is not None:
        apply_state_dict(model, checkpoint, spec)
    else:
        notes.append("no --weights given: Ultralytics' own initialisation (seeded), parity only")
    return model, checkpoint, notes


def load_checkpoint_model(spec: str, weights: str | None, num_classes: int | None,
                          trust: CodeTrust | None) -> tuple[nn.Module, dict]:
    """A trained Ultralytics checkpoint (a pickle), loaded only when the user trusts it."""
    why = needs_trust(spec)
    if not (trust is not None and (trust.trust_bundle or trust.factory == spec)):
        raise CbamDeployError(f"{why}: pass --trust-code to load it (only for a file you trust), or export its "
                              "weights as a state dict and give its model yaml with --weights")
    if weights:
        raise CbamDeployError(f"--weights: {Path(spec).name} holds its own weights; give --weights with a model yaml")
    from ultralytics.nn.tasks import load_checkpoint  # lazy: the optional ultralytics extra

    try:
        with _quiet():
            model, ckpt = load_checkpoint(spec, device="cpu", fuse=False)
    except Exception as exc:
        raise CbamDeployError(f"cannot load the Ultralytics checkpoint {spec}: {_first_line(exc)}") from None
    classes = checkpoint_classes(model.state_dict())
    if num_classes is not None and classes is not None and num_classes != classes:
        raise CbamDeployError(f"--num-classes {num_classes}, but {Path(spec).name} detects {classes} classes: leave "
                              "--num-classes out")
    return model, ckpt


class SameSide(tuple):
    """A Detect head's cached feature shape, compared on its height and width only: the anchors do not
    depend on the batch, so a call (or a trace) at another batch reuses them instead of recomputing them
    inside the graph."""

    def __ne__(self, other) -> bool:
        return tuple(other)[-2:] != tuple(self)[-2:]

    def __eq__(self, other) -> bool:
        return not self.__ne__(other)

    __hash__ = tuple.__hash__


def prepare_for_export(model: nn.Module) -> nn.Module:
    """What Ultralytics' exporter does before it traces: fuse, eval, no gradients, every Detect head in
    export mode (one decoded output, boxes as xywh), C2f blocks splitting."""
    from ultralytics.nn.modules import C2f, Detect  # lazy: the optional ultralytics extra

    model = model.float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with _quiet():
        model = model.fuse(verbose=False) if hasattr(model, "fuse") else model
    heads = [m for m in model.modules() if isinstance(m, Detect)]
    if len(heads) != 1 or type(heads[0]) is not Detect:
        kinds = ", ".join(type(h).__name__ for h in heads) or "none"
        raise CbamDeployError(f"cbam-deploy exports Ultralytics detection models (one Detect head); this model's heads: "
                              f"{kinds}")
    for module in model.modules():
        if isinstance(module, Detect):
            module.dynamic = False
            module.export = True
            module.format = "onnx"
            module.xyxy = False
            module.shape = None
        elif isinstance(module, C2f):
            module.forward = module.forward_split
    model.output_kinds = {"output": "detections"}  # read by the export (outputs.py's kinds)
    return model


def prepare_for_side(model: nn.Module, side: int, dynamic_hw: bool = False) -> None:
    """Anchors and strides computed once for the input side (a dry run at batch 1), then cached per height
    and width (``SameSide``); with a dynamic height and width the head computes them in the graph."""
    from ultralytics.nn.modules import Detect  # lazy: the optional ultralytics extra

    stride = model_stride(model)
    if side % stride:
        raise CbamDeployError(f"--input-size {side}: this YOLO model takes sides that are multiples of its stride "
                              f"{stride} (e.g. {max(stride, side // stride * stride)} or {(side // stride + 1) * stride})")
    heads = [m for m in model.modules() if isinstance(m, Detect)]
    for head in heads:
        head.dynamic = bool(dynamic_hw)
        head.shape = None
    with torch.no_grad(), _quiet():
        model(torch.zeros(1, 3, side, side))
    for head in heads:
        if head.shape is not None and not dynamic_hw:
            head.shape = SameSide(head.shape)


def model_stride(model: nn.Module) -> int:
    stride = getattr(model, "stride", None)
    return int(torch.as_tensor(stride).max()) if stride is not None else 32


def build(spec: str, weights: str | None = None, num_classes: int | None = None, trust: CodeTrust | None = None):
    """The ``LoadedModel`` of an Ultralytics yaml or checkpoint, prepared for export."""
    check_spec(spec)
    ultralytics()
    notes: list[str] = []
    checkpoint = None
    input_size = DEFAULT_INPUT_SIZE
    weights_from = "none (Ultralytics' seeded initialisation)"
    if is_checkpoint(spec):
        model, ckpt = load_checkpoint_model(spec, weights, num_classes, trust)
        imgsz = (ckpt.get("train_args") or {}).get("imgsz")
        input_size = int(imgsz) if isinstance(imgsz, int) and imgsz > 0 else input_size
        weights_from = f"the trained checkpoint {Path(spec).resolve()}"
        notes.append(f"weights: the trained checkpoint {Path(spec).name} (epoch {ckpt.get('epoch')}, Ultralytics "
                     f"{ckpt.get('version')}), fingerprinted in the manifest")
    else:
        model, checkpoint, notes = build_from_yaml(spec, weights, num_classes)
    names = getattr(model, "names", None)
    module = prepare_for_export(model)
    classes = int(module.model[-1].nc)
    notes.append("prepared as Ultralytics' exporter prepares it: BatchNorm fused, Detect in export mode (one output "
                 "(batch, 4 + classes, anchors): xywh in input pixels, then class probabilities), anchors for the "
                 "input side")
    loaded = LoadedModel(module, spec, NAME, classes, "imagenet", input_size, checkpoint=checkpoint, notes=notes,
                         outputs=None, preprocess=PREPROCESSING, spec=str(Path(spec).resolve()),
                         prepare=lambda side, dynamic_hw=False: prepare_for_side(module, side, dynamic_hw),
                         input_stride=model_stride(module), weights_from=None if checkpoint else weights_from,
                         trace_batch=1)
    if isinstance(names, dict) and len(names) == classes and any(str(names[i]) != str(i) for i in sorted(names)):
        loaded.labels = [str(names[i]) for i in sorted(names)]  # its own class names (not the parser's numbers)
    return loaded


def _check(spec: str, stem: str) -> None:
    check_spec(spec, stem)


def _matches(spec) -> bool:
    return is_yaml(spec) or is_checkpoint(spec)


SOURCE = LibrarySource(NAME, _matches, _check, build, needs_trust)
