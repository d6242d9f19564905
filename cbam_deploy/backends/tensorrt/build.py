"""TensorRT engines, built from the FP32 ONNX (fp32/fp16) or the tensorrt Q/DQ ONNX (int8)."""

from __future__ import annotations

from pathlib import Path

from ...bundle import Bundle
from ...errors import BackendUnavailable
from ...manifest import artifact_name
from ...transaction import BundleUpdate
from ..base import BuildOptions, BuildOutcome, TensorRTOptions, commit_artifact
from .exporter import (
    Profile,
    build_engine,
    current_gpu,
    default_timing_cache,
    fp16_onnx,
    parse_version,
    plan_build,
    require_tensorrt,
)


def build(bundle_dir: Path, precision: str, options: BuildOptions) -> BuildOutcome:
    """An engine for this machine's GPU, committed with its metadata sidecar."""
    trt_options = options.trt or TensorRTOptions()
    try:
        trt = require_tensorrt()
        current_gpu()
    except BackendUnavailable as exc:
        return BuildOutcome("tensorrt", precision, skipped=str(exc))
    bundle = Bundle.open(bundle_dir)
    plan = plan_build(parse_version(trt.__version__), precision, trt_options.dla_core)
    with BundleUpdate(bundle_dir) as update:
        bundle.path_of("onnx-fp32", verify_hash=False)
        onnx_fp32 = bundle.artifact("onnx-fp32")
        if plan.onnx_variant == "qdq":
            _, source = bundle.snapshot(artifact_name("int8", "int8", "tensorrt", options.gates), update)
        else:
            _, source = bundle.snapshot("onnx-fp32", update)
            if plan.onnx_variant == "fp16":
                fp16_path = update.path(".source.fp16.onnx")  # an intermediate: never committed, never in the bundle
                fp16_onnx(source, fp16_path)
                source = fp16_path
        engine = update.stage_artifact("tensorrt", precision)
        profile = Profile(trt_options.min_batch, trt_options.opt_batch, trt_options.max_batch)
        timing_cache = Path(trt_options.timing_cache) if trt_options.timing_cache else default_timing_cache()
        metadata = build_engine(source, engine, precision, bundle.input.shape, profile, trt_options.workspace_mb,
                                timing_cache, trt_options.dla_core, bundle_dir=bundle_dir)
        artifact = update.add_artifact("tensorrt", precision, source_sha256=onnx_fp32.sha256, export=metadata)
        commit_artifact(update, onnx_fp32.sha256)
    return BuildOutcome("tensorrt", precision, artifact["name"])
