"""A model's outputs, whatever its forward returns: a tensor, a tuple, a list or a dict (nested too).

One flattening order and one naming scheme for everyone, the same order the ONNX exporters use
(tuples and lists depth first, dicts in insertion order), so the PyTorch reference, the ONNX graph
and every runner name the same output the same way:

- a single tensor: ``logits`` when it is (batch, classes), else ``output``;
- a tuple or list: ``output0``, ``output1``, ... (nested: ``output1_0``);
- a dict: its keys (nested under a tuple: ``output0_boxes``).

Each output has a kind: ``logits`` (batch, classes): classification, judged on top-1 too;
``dense`` (batch, ...) of 3 or more dims: detection maps, segmentation, features, judged by cosine
and element-wise bounds per output; ``detections`` (batch, 4 + classes, anchors): a detector head's
decoded output (box centre x, y, width, height in input pixels, then the class probabilities, as
Ultralytics' Detect head gives it), its boxes judged in pixels against the input side and its
scores as absolute probabilities, its INT8 by the detections it keeps after NMS; ``other``:
anything else, judged by element-wise bounds.
The kind is guessed from the shape; a 2-D output that is not a classifier's (an embedding, a box
tensor) is given its kind by ``export --output-kind NAME=KIND`` or by the factory's model declaring
``output_kinds = {name: kind}``.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import CbamDeployError

_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")
OUTPUT_KINDS = ("logits", "dense", "detections", "other")


def flatten_outputs(value) -> list[tuple[str, object]]:
    """[(name, tensor)] in the exporters' order; raises on what no exporter can flatten."""
    if _is_tensor(value):
        return [("logits" if len(value.shape) == 2 else "output", value)]
    if isinstance(value, (tuple, list, dict)):
        pairs = _flatten(value, "")
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            raise CbamDeployError(f"the model's outputs have repeated names: {names}")
        if not pairs:
            raise CbamDeployError("the model's forward returned no tensor")
        return pairs
    raise CbamDeployError(f"the model's forward returned {type(value).__name__}; return a tensor, or a tuple, list "
                          "or dict of tensors")


def _flatten(value, prefix: str) -> list[tuple[str, object]]:
    if _is_tensor(value):
        return [(prefix, value)]
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
        named = [(f"{prefix}_{_SAFE.sub('_', k)}" if prefix else _SAFE.sub("_", k), v) for k, v in items]
    elif isinstance(value, (tuple, list)):
        named = [(f"{prefix}_{i}" if prefix else f"output{i}", v) for i, v in enumerate(value)]
    elif value is None:
        return []
    else:
        raise CbamDeployError(f"the model's outputs hold a {type(value).__name__}; only tensors, tuples, lists and "
                              "dicts can be exported")
    return [pair for name, v in named for pair in _flatten(v, name)]


def _is_tensor(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, (tuple, list, dict))


def output_kind(shape) -> str:
    if len(shape) == 2 and shape[1] > 1:
        return "logits"
    if len(shape) >= 3:
        return "dense"
    return "other"


def describe_outputs(pairs: list[tuple[str, object]], batch, dynamic_dims: bool = False,
                     kinds: dict[str, str] | None = None) -> list[dict]:
    """The manifest's ``outputs``: name, shape (batch symbolic or fixed; spatial dims symbolic when
    the input's H/W are), dtype, kind (``kinds`` overrides the kind guessed from the shape; every name
    in it must be an output)."""
    if kinds:
        check_output_kinds(kinds, [name for name, _ in pairs], option="output_kinds")
    described = []
    for name, tensor in pairs:
        shape = list(tensor.shape)
        symbolic = ["batch" if batch is None else batch] + [
            f"{name}_dim{i}" if dynamic_dims and i >= 2 else int(d) for i, d in enumerate(shape[1:], start=1)]
        dtype = str(tensor.dtype).replace("torch.", "")
        kind = (kinds or {}).get(name) or output_kind(shape)
        described.append({"name": name, "shape": symbolic if shape else [], "dtype": dtype, "kind": kind})
    return described


def dynamic_output_axes(outputs: list[dict]) -> dict[str, dict[int, str]]:
    """dynamic_axes for the TorchScript exporter, from the manifest's symbolic output shapes."""
    return {o["name"]: {i: d for i, d in enumerate(o["shape"]) if isinstance(d, str)} for o in outputs}


def concat_outputs(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join per-chunk output dicts along the batch axis."""
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def output_kinds(manifest_or_outputs) -> dict[str, str]:
    """{output name: kind} from a manifest (or its ``outputs`` list); ``Bundle.output_kinds`` for a bundle."""
    outputs = manifest_or_outputs["outputs"] if isinstance(manifest_or_outputs, dict) else manifest_or_outputs
    return {o["name"]: o.get("kind", "logits") for o in outputs}


def parse_output_kinds(values, option: str = "--output-kind") -> dict[str, str]:
    """``NAME=KIND`` items (or a {name: kind} dict) -> {name: kind}, each KIND one of logits, dense,
    other; one error naming the bad item, the unknown kind or the output given twice."""
    if values is None:
        return {}
    if isinstance(values, dict):
        pairs = list(values.items())
        shown = [f"{k}={v}" for k, v in pairs]
    elif isinstance(values, (list, tuple)):
        shown = list(values)
        pairs = []
        for item in values:
            name, sep, kind = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep or not name.strip() or not kind.strip():
                raise CbamDeployError(f"{option} takes NAME=KIND (KIND one of {', '.join(OUTPUT_KINDS)}), got {item!r}")
            pairs.append((name.strip(), kind.strip()))
    else:
        raise CbamDeployError(f"{option} must be a dict of output name to kind, got {type(values).__name__}")
    kinds: dict[str, str] = {}
    for (name, kind), item in zip(pairs, shown):
        if not isinstance(name, str) or not name:
            raise CbamDeployError(f"{option}: {item!r} does not name an output")
        if kind not in OUTPUT_KINDS:
            raise CbamDeployError(f"{option} {item!r}: unknown kind {kind!r}; the kinds are {', '.join(OUTPUT_KINDS)}")
        if name in kinds and kinds[name] != kind:
            raise CbamDeployError(f"{option}: output {name!r} is given two kinds ({kinds[name]}, {kind})")
        kinds[name] = kind
    return kinds


def check_output_kinds(kinds: dict[str, str], outputs: list[str], option: str = "--output-kind") -> None:
    """Every output named in ``kinds`` is one of the model's ``outputs`` (known once it has run)."""
    unknown = [name for name in kinds if name not in outputs]
    if unknown:
        raise CbamDeployError(f"{option}: no output {', '.join(repr(u) for u in unknown)}; the model's outputs are "
                              f"{', '.join(outputs)}")
