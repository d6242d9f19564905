"""The INT8 job: a bundle's FP32 ONNX + calibration data -> INT8 artifacts in the same bundle.

Each artifact's agreement with the PyTorch original (top-1 agreement, cosine) is measured on
held-out calibration-source samples and recorded with the recipe, method, gate policy and data.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from .backends.executorch.exporter import default_bounds
from .backends.executorch.recipe import quantize_pte
from .backends.ncnn.exporter import example_input, ncnn_pair
from .backends.ncnn.recipe import quantize_ncnn
from .backends.openvino.recipe import quantize_openvino
from .bundle import Bundle
from .calib.recipes import cache_key, default_cache_dir, quantize_onnx
from .calib.targets import TARGETS, WRITES, resolve
from .checks import MAX_BATCH, check_int, parse_list
from .data import check_data_source, load_calibration
from .errors import BackendUnavailable, CbamDeployError
from .fsutil import sha256_file
from .loaders import is_stand_in, open_artifact, reference_runner
from .parity import INT8_MIN_COSINE, INT8_MIN_TOP1, compare_int8
from .transaction import BundleUpdate, commit_from_source, faultpoint


def quantize_bundle(
    bundle_dir: str | Path,
    targets: list[str],
    calib_data: str,
    calib_size: int = 128,
    calib_batch: int = 8,
    method: str | None = None,
    gates: str | None = None,
    use_cache: bool = True,
    seed: int = 0,
    check_samples: int = 64,
    trust=None,
) -> dict:
    """INT8 artifacts for ``targets``, each checked against the PyTorch original (rebuilt only with
    ``trust`` for a factory model, else the FP32 ONNX stands in: ``loaders.reference_runner``)."""
    targets = validate_quantize_options(targets, calib_data, calib_size, calib_batch, method, gates)  # before any work
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.open(bundle_dir)  # a missing or damaged bundle is reported before the calibration data is read
    bundle.path_of("onnx-fp32")
    with BundleUpdate(bundle_dir) as update:
        # quantize a snapshot: a re-export that lands meanwhile cannot change the file under our feet
        fp32, fp32_path = bundle.snapshot("onnx-fp32", update)
        data = load_calibration(calib_data, bundle.input.raw, calib_size + check_samples, seed)
        data.inputs, calib_batch = bundle.fit_to_batch(data.inputs, calib_batch)
        if bundle.fixed_batch:  # calibration and check sets both whole batches
            calib_size = max(calib_batch, min(calib_size, len(data.inputs)) // calib_batch * calib_batch)
        if len(data.inputs) > calib_size:
            check = data.inputs[calib_size:]
            data.inputs = data.inputs[:calib_size]
            check_source = "held-out samples of the calibration source"
        else:
            check = data.inputs[: min(len(data.inputs), check_samples)]
            check_source = "calibration samples (source too small to hold any out)"
        check, _ = bundle.fit_to_batch(check, calib_batch)
        expected = bundle.model.gate_list  # the gates found in the PyTorch model (None: an older bundle)
        reference, reference_label = reference_runner(bundle, trust=trust)
        if "executorch" in targets and is_stand_in(reference):  # before any calibration work
            raise BackendUnavailable("the executorch recipe quantizes the PyTorch model, which is "
                                     f"{reference_label.partition('stand-in: ')[2].rstrip(')') or reference_label}")
        ref_out = reference.infer_batched(check, calib_batch)
        cache_dir = default_cache_dir() if use_cache else None
        source_sha = fp32.sha256
        results = []
        for target in targets:
            results.append(_quantize_one(update, bundle, target, method, gates, fp32_path, source_sha, data,
                                         expected, calib_batch, cache_dir, check, check_source, ref_out, reference_label,
                                         reference))
        faultpoint("quantized")

        commit_from_source(update, source_sha, "quantizing", "run quantize again")
    return {"bundle": str(bundle_dir), "artifacts": results, "calibration": data.describe(),
            "passed": all(a["parity"]["passed"] for a in results)}


def _quantize_one(update, bundle: Bundle, target: str, method: str | None, gates: str | None, fp32_path: Path,
                  source_sha: str, data, expected: list | None, calib_batch: int, cache_dir, check, check_source: str,
                  ref_out, reference_label: str, reference=None) -> dict:
    """One INT8 artifact, staged in ``update`` and checked against the reference outputs."""
    chosen_method, chosen_gates = resolve(target, method, gates)
    fmt = WRITES[target]
    out_path = update.stage_artifact(fmt, "int8", target, chosen_gates)
    started = time.perf_counter()
    if target == "executorch":  # from the PyTorch model itself (checked above: not a stand-in)
        bounds = default_bounds(list(bundle.input.shape), bundle.input.side)
        calib_batch = min(calib_batch, bounds.batch[1])
        result = quantize_pte(reference.model, out_path, data, bounds, chosen_gates, expected, chosen_method,
                              calib_batch, cache_dir / "executorch" if cache_dir else None, source_sha,
                              rewrite=bundle.cbam_opt.get("mode", "on") == "on")
        export = result.info.pop("export")
        seconds = time.perf_counter() - started
        artifact = update.add_artifact(fmt, "int8", target, chosen_gates, source_sha256=source_sha, export=export,
                                       quantization={**result.info, "seconds": round(seconds, 2)},
                                       calibration=data.describe())
        return _check_int8(update, bundle, artifact, check, check_source, calib_batch, ref_out, reference_label, data)
    if target == "ncnn":
        result_info = _quantize_ncnn(bundle, reference, reference_label, out_path, data, chosen_method, chosen_gates,
                                     expected, cache_dir)
    elif target == "openvino":
        result = quantize_openvino(fp32_path, out_path, data, chosen_method, chosen_gates, expected,
                                   cache_dir / "openvino" if cache_dir else None)
    else:
        result = quantize_onnx(fp32_path, out_path, data, target, chosen_method, chosen_gates, expected,
                               calib_batch, cache_dir)
    if target != "ncnn":
        result_info = result.info
    seconds = time.perf_counter() - started
    artifact = update.add_artifact(fmt, "int8", target, chosen_gates, source_sha256=source_sha,
                                   quantization={**result_info, "seconds": round(seconds, 2)},
                                   calibration=data.describe())
    return _check_int8(update, bundle, artifact, check, check_source, calib_batch, ref_out, reference_label, data)


def _check_int8(update, bundle: Bundle, artifact: dict, check, check_source: str, calib_batch: int, ref_out,
                reference_label: str, data) -> dict:
    """The staged INT8 artifact run on the check set against the reference outputs; its parity record."""
    staged = Bundle({**bundle.manifest, "artifacts": [artifact]}, update.staging)
    runner = open_artifact(update.staging, staged, artifact["name"])
    measured = compare_int8(ref_out, runner.infer_batched(check, calib_batch), judge_top1=bundle.model.trained,
                            kinds=bundle.output_kinds)
    artifact["parity"] = {
        "precision": "int8", "reference": reference_label, "inputs": check_source,
        "tolerance": {"min_top1_agreement": INT8_MIN_TOP1, "min_cosine_mean": INT8_MIN_COSINE}, **measured,
    }
    if data.kind == "synthetic":
        artifact["parity"]["warning"] = "synthetic calibration data: not fit for production"
    return artifact


def _quantize_ncnn(bundle: Bundle, reference, reference_label: str, out_path: Path, data, method: str, gates: str,
                   expected: list | None, cache_dir) -> dict:
    """The ncnn INT8 pair: the fp32 pair converted from the PyTorch model (pnnx traces the module, so
    the model must be rebuilt here: trusted), then ncnn's own INT8 scheme on it."""
    if reference is None or is_stand_in(reference):
        raise BackendUnavailable(f"target ncnn is converted from the PyTorch model, which is not available here: "
                                 f"{reference_label}")
    with tempfile.TemporaryDirectory(prefix="cbam-ncnn-") as tmp:
        example, second = example_input(bundle)
        conversion = ncnn_pair(reference.model, example, [o.name for o in bundle.outputs], Path(tmp), "fp32",
                               second_size=second)
        param, binary = Path(tmp) / "fp32.param", Path(tmp) / "fp32.bin"
        cache = None
        if cache_dir is not None:
            model_sha = hashlib.sha256((sha256_file(param) + sha256_file(binary)).encode()).hexdigest()
            cache = cache_dir / "ncnn" / f"{cache_key(model_sha, data, 'ncnn', method, gates)}.json"
        info = quantize_ncnn(param, binary, out_path, data, method, gates, expected, cache)
    keep = ("layers", "generic_layers", "rewrite", "input_shape_policy", "pnnx", "ncnn", "converter")
    return {**info, "conversion": {k: conversion[k] for k in keep if k in conversion}}


__all__ = ["TARGETS", "quantize_bundle"]


def validate_quantize_options(targets: str | list[str], calib_data: str, calib_size: int = 128, calib_batch: int = 8,
                              method: str | None = None, gates: str | None = None) -> list[str]:
    target_list = parse_list(targets, "--target")
    for target in target_list:
        resolve(target, method, gates)  # "unknown target ...", "unknown calibration method ...", "--gates ..."
    check_int("--calib-size", calib_size, 1)
    check_int("--calib-batch", calib_batch, 1, MAX_BATCH)
    if not calib_data:
        raise CbamDeployError("--calib-data needs a folder of images, a .npy/.npz file, or 'synthetic'")
    check_data_source("--calib-data", calib_data)
    return target_list
