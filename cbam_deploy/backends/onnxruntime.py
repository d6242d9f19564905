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


def external_data_files(path) -> tuple[str, ...]:
    """The external-data files an ONNX file keeps its tensors in (a model over protobuf's 2 GB limit
    does), named relative to its folder; () for a self-contained file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        return ()
    proto = onnx.load(str(path), load_external_data=False)
    found: dict[str, None] = {}
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                if location:
                    found[location] = None
    return tuple(found)


def probe() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed: pip install onnxruntime"


BACKEND = register(Backend(
    format="onnx", title="ONNX (onnxruntime)", extension="onnx", precisions=("fp32", "fp16"), quantize_recipe="ort-cpu",
    preferred_runtimes=("ort-tensorrt", "ort-cuda", "ort-openvino", "ort-cpu"),
    triton=TritonFragment('platform: "onnxruntime_onnx"', ("model.onnx",), "KIND_CPU", ("KIND_CPU", "KIND_GPU")),
    build=build, probe=probe, companions=external_data_files,
))
