"""ONNX artifacts: the export writes the FP32 ONNX, the ort-cpu recipe the INT8 one; nothing to build."""

from __future__ import annotations

from pathlib import Path

from ..base import BuildOptions, BuildOutcome


def build(bundle_dir: Path, precision: str, options: BuildOptions) -> BuildOutcome:
    if precision == "fp32":  # the export made it
        return BuildOutcome("onnx", "fp32", "onnx-fp32")
    return BuildOutcome("onnx", precision, skipped="onnxruntime's CPU provider has no fast fp16 kernels; fp16 is built "
                        "as OpenVINO IR or a TensorRT engine")
