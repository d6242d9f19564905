"""OpenVINO IR artifacts (.xml + .bin), converted from the bundle's FP32 ONNX."""

from __future__ import annotations

from pathlib import Path

from ...bundle import Bundle
from ...errors import BackendUnavailable
from ...transaction import BundleUpdate
from ..base import BuildOptions, BuildOutcome, commit_artifact
from .exporter import export_ir


def build(bundle_dir: Path, precision: str, options: BuildOptions) -> BuildOutcome:
    """fp32/fp16 IR from the FP32 ONNX, committed as one transaction."""
    if precision not in ("fp32", "fp16"):
        return BuildOutcome("openvino", precision, skipped="OpenVINO INT8 IR comes from the openvino quantize recipe")
    bundle = Bundle.open(bundle_dir)
    bundle.path_of("onnx-fp32")
    with BundleUpdate(bundle_dir) as update:
        source, onnx_path = bundle.snapshot("onnx-fp32", update)
        try:
            info = export_ir(onnx_path, update.stage_artifact("openvino", precision), precision)
        except BackendUnavailable as exc:
            return BuildOutcome("openvino", precision, skipped=str(exc))
        hint = {"fp32": "f32", "fp16": "f16"}[precision]
        artifact = update.add_artifact("openvino", precision, source_sha256=source.sha256,
                                       export={**info, "inference_precision_hint": hint})
        commit_artifact(update, source.sha256)
    return BuildOutcome("openvino", precision, artifact["name"])
