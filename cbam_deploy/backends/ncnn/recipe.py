"""The ncnn INT8 recipe: ncnn's own scheme, from the project's calibration data.

* The table (what ``ncnn2table`` writes): one scale per input blob of every Convolution /
  ConvolutionDepthWise / InnerProduct, ``127 / max|x|`` over the calibration images run through the
  fp32 pair (``minmax``; ``percentile``: the 99.999th percentile of |x|). Weight scales are per
  output channel (per group for a depthwise conv), ``127 / max|w|``, as ``ncnn2int8`` computes them.
* The fp32 pair it starts from is converted from the PyTorch model (pnnx traces the module, so the
  model must be rebuilt: only where the user trusts its code), in a temporary folder.
* The gate policy: the gate finder runs on the ncnn graph (``gates.ncnn_gates``); under
  ``--gates fp`` the layers that compute a gate (the CBAM MLP's inner products or 1x1 convs, the
  7x7 spatial conv) are left out of the table and stay fp32; under ``--gates int8`` they are in it.
  ncnn has no int8 Sigmoid or BinaryOp, so gate sigmoids and multiplies run in fp32 either way.
* The model as written is checked (``gates.check_ncnn_policy``: ``int8_scale_term`` per layer) and
  fails, with nothing written, where the policy does not hold.
* The table is cached (``cache_path``: keyed by the fp32 pair, the data, the method) as JSON.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from ...calib.recipes import RecipeResult, cache_key
from ...data import CalibrationSet
from ...errors import CbamDeployError
from ...fsutil import atomic_path, sha256_file
from .exporter import QUANTIZABLE, NcnnParam, example_input, ncnn_pair, open_net, quantize_int8, run_blobs, write_pair
from ...gates import tail_check
from .gates import check_ncnn_policy, ncnn_gates, ncnn_graph

PERCENTILE = 99.999


def activation_table(param_path: Path, bin_path: Path, data: CalibrationSet, method: str) -> dict[str, float]:
    """layer name -> its input blob's int8 scale, over ``data`` run through the fp32 pair."""
    param = NcnnParam.read(param_path)
    inputs, _ = param.blob_names()
    layers = [layer for layer in param.layers if layer.type in QUANTIZABLE]
    blobs = sorted({layer.inputs[0] for layer in layers})
    net = open_net(param_path, bin_path, None)
    seen: dict[str, list] = {b: [] for b in blobs}
    for image in data.inputs:
        values = run_blobs(net, image, inputs[0], blobs)
        data.advance(1)
        for blob, value in values.items():
            magnitude = np.abs(value).ravel()
            seen[blob].append(magnitude.max() if method == "minmax" else magnitude)
    table = {}
    for layer in layers:
        parts = seen[layer.inputs[0]]
        top = float(np.max(parts)) if method == "minmax" else float(np.percentile(np.concatenate(parts), PERCENTILE))
        table[layer.name] = 127.0 / top if top > 0 else 1.0
    return table


def _cached_table(cache_path: Path | None, param: NcnnParam) -> dict[str, float] | None:
    if cache_path is None or not cache_path.is_file():
        return None
    try:
        table = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    names = {layer.name for layer in param.layers if layer.type in QUANTIZABLE}
    if not isinstance(table, dict) or set(table) != names or not all(isinstance(v, (int, float)) for v in table.values()):
        return None  # not this model's table: calibrated again and replaced
    return table


def quantize_ncnn(param_path: Path, bin_path: Path, out_param: Path, data: CalibrationSet, method: str, gates: str,
                  expected: list[dict] | None, cache_path: Path | None = None) -> dict:
    """The INT8 pair at ``out_param`` (+ .bin) from the fp32 pair; returns the manifest's
    ``quantization`` record (with ``gate_check``)."""
    param = NcnnParam.read(param_path)
    found = ncnn_gates(param.layers, expected)
    if expected:
        missing = [g["name"] for g in expected if g["name"] not in {f.name for f in found}]
        if missing:
            raise CbamDeployError(f"gate policy: {', '.join(missing)} (found in the model) not found in the ncnn graph; "
                                  "the policy cannot be applied to it")
    gate_layers = sorted({n for g in found for n in g.record["ncnn_layers"]})
    table = _cached_table(cache_path, param)
    hit = table is not None
    if table is None:
        table = activation_table(param_path, bin_path, data, method)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path) as target:
                Path(target).write_text(json.dumps(table, sort_keys=True))
    chosen = {k: v for k, v in table.items() if gates == "int8" or k not in gate_layers}
    quantized_param, data_bytes, record = quantize_int8(param, Path(bin_path).read_bytes(), chosen)
    check = check_ncnn_policy(quantized_param.layers, expected if expected is not None else [g.record for g in found],
                              gates, "the ncnn INT8 model")
    if not check["held"]:
        raise CbamDeployError(f"gate policy --gates {gates} does not hold on the ncnn INT8 model: "
                              + "; ".join(check["broken"]))
    tail = tail_check(ncnn_graph(quantized_param.layers), "the ncnn INT8 model")  # weighted layers only: float
    if tail["held"] is False:
        raise CbamDeployError(f"the output tail is quantized in the ncnn INT8 model: {tail['broken'][0]}")
    write_pair(quantized_param, data_bytes, out_param, Path(out_param).with_suffix(".bin"))
    return {"recipe": "ncnn", "method": method, "gates": gates,
            "activations": "int8 symmetric, one scale per layer input (ncnn's bottom_blob_int8_scales)",
            "weights": "int8 symmetric, per output channel (per group for depthwise)",
            "int8_layers": len(record["quantized_layers"]), "float_gate_layers": len(gate_layers) if gates == "fp" else 0,
            "gate_layers": gate_layers, "gate_check": check, "output_tail": tail,
            "calibration_cache": {"path": str(cache_path) if cache_path else None, "hit": hit}}


def run_recipe(job) -> RecipeResult:
    """The ``ncnn`` recipe (``formats.Recipe.run``): the fp32 pair converted from the PyTorch model, then
    ncnn's own INT8 scheme on it, written at ``job.out_path`` (+ .bin)."""
    with tempfile.TemporaryDirectory(prefix="cbam-ncnn-") as tmp:
        example, second = example_input(job.bundle)
        conversion = ncnn_pair(job.module, example, [o.name for o in job.bundle.outputs], Path(tmp), "fp32",
                               second_size=second)
        param, binary = Path(tmp) / "fp32.param", Path(tmp) / "fp32.bin"
        cache = None
        if job.cache_dir is not None:
            model_sha = hashlib.sha256((sha256_file(param) + sha256_file(binary)).encode()).hexdigest()
            cache = job.cache_dir / "ncnn" / f"{cache_key(model_sha, job.data, 'ncnn', job.method, job.gates)}.json"
        info = quantize_ncnn(param, binary, job.out_path, job.data, job.method, job.gates, job.expected, cache)
    keep = ("layers", "generic_layers", "rewrite", "input_shape_policy", "pnnx", "ncnn", "converter")
    return RecipeResult(job.out_path, "ncnn", {**info, "conversion": {k: conversion[k] for k in keep if k in conversion}})
