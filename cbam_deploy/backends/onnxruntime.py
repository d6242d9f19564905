"""ONNX artifacts, run by onnxruntime (CPU, CUDA, TensorRT EP, OpenVINO EP) or OpenVINO."""

from __future__ import annotations

from pathlib import Path

from . import Backend, BuildOptions, TritonFragment, register


def build(bundle_dir: Path, precision: str, options: BuildOptions):
    from ..build import BuildOutcome

    if precision == "fp32":  # the export made it
        return BuildOutcome("onnx", "fp32", "onnx-fp32")
    return BuildOutcome("onnx", precision, skipped="onnxruntime's CPU provider has no fast fp16 kernels; fp16 is built "
                        "as OpenVINO IR or a TensorRT engine")


def probe() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed: pip install onnxruntime"


BACKEND = register(Backend(
    format="onnx", title="ONNX (onnxruntime)", extension="onnx", precisions=("fp32", "fp16"), quantize_recipe="ort-cpu",
    preferred_runtimes=("ort-tensorrt", "ort-cuda", "ort-openvino", "ort-cpu"),
    triton=TritonFragment('platform: "onnxruntime_onnx"', ("model.onnx",), "KIND_CPU", ("KIND_CPU", "KIND_GPU")),
    build=build, probe=probe,
))
