"""The formats table: one row per artifact format, data only, read by everything that names or
serves a format.

A row says, in one place: the file extension and the companion files (every file beside the
artifact's own, so that the manifest names every file the bundle holds), the precisions its build
makes from the bundle's FP32 ONNX, the INT8 recipe that feeds it, the runtimes it prefers
(``cbam_deploy.runtimes`` says which runtimes run which format), whether its library is on this
machine (``probe``: cheap, nothing heavy imported), and its Triton fragment. The naming scheme
(``manifest``), the runtimes, the builds (``backends``), the Triton and KServe writers and the CLI's
help read this table; none of them lists formats of its own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import CbamDeployError


@dataclass(frozen=True)
class TritonFragment:
    """How Triton serves the format: the config line naming its backend, the file names in the
    model version folder, the default instance kind and the kinds that backend accepts."""

    config_line: str
    files: tuple[str, ...]
    default_kind: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class Format:
    format: str
    title: str
    extension: str
    precisions: tuple[str, ...]                     # what its build makes from the FP32 ONNX
    quantize_recipe: str | None                     # the INT8 recipe for this format (quantize --target)
    preferred_runtimes: tuple[str, ...]             # the default runtime: the first of these available
    triton: TritonFragment | None
    probe: Callable[[], str | None] = lambda: None  # None when usable here, else why not
    # the files beside the artifact's file (given its path), named relative to its folder; each is in the manifest
    companions: Callable[[Path], tuple[str, ...]] = lambda path: ()
    no_triton: str | None = None  # with triton None: the one line saying why it is not served there


def external_data_files(path) -> tuple[str, ...]:
    """The external-data files an ONNX file keeps its tensors in (a model over protobuf's 2 GB limit
    does), named relative to its folder; () for a self-contained file."""
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


def _has(module: str, missing: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(module) else missing


def _has_all(modules: tuple[str, ...], missing: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        for module in modules:
            try:
                if importlib.util.find_spec(module) is None:
                    return missing
            except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
                return missing
        return None
    return probe


FORMATS: dict[str, Format] = {f.format: f for f in (
    Format(
        format="onnx", title="ONNX (onnxruntime)", extension="onnx", precisions=("fp32", "fp16"),
        quantize_recipe="ort-cpu", preferred_runtimes=("ort-tensorrt", "ort-cuda", "ort-openvino", "ort-cpu"),
        triton=TritonFragment('platform: "onnxruntime_onnx"', ("model.onnx",), "KIND_CPU", ("KIND_CPU", "KIND_GPU")),
        probe=_has("onnxruntime", "onnxruntime is not installed: pip install onnxruntime"),
        companions=external_data_files,
    ),
    Format(
        format="openvino", title="OpenVINO IR", extension="xml", precisions=("fp32", "fp16"), quantize_recipe="openvino",
        preferred_runtimes=("openvino",),
        triton=TritonFragment('backend: "openvino"', ("model.xml", "model.bin"), "KIND_CPU", ("KIND_CPU",)),
        probe=_has("openvino", "OpenVINO is not installed: pip install 'cbam-deploy[openvino]'"),
        companions=lambda xml: (Path(xml).with_suffix(".bin").name,),  # the weights
    ),
    Format(
        format="tensorrt", title="TensorRT engine", extension="engine", precisions=("fp32", "fp16", "int8"),
        quantize_recipe="tensorrt", preferred_runtimes=("tensorrt",),
        triton=TritonFragment('platform: "tensorrt_plan"', ("model.plan",), "KIND_GPU", ("KIND_GPU",)),
        probe=_has("tensorrt", "TensorRT is not installed (and needs an NVIDIA GPU)"),
        companions=lambda engine: (Path(engine).name + ".json",),  # the metadata sidecar
    ),
    Format(
        format="ncnn", title="ncnn (pnnx)", extension="param", precisions=("fp32",), quantize_recipe="ncnn",
        preferred_runtimes=("ncnn",),
        triton=None,
        no_triton="not servable in Triton/KServe (neither has an ncnn backend): serve it with 'cbam-deploy serve'",
        probe=_has("ncnn", "ncnn is not installed: install the ncnn extra: pip install 'cbam-deploy[ncnn]'"),
        companions=lambda param: (Path(param).with_suffix(".bin").name,),  # the weights
    ),
    Format(
        # a .pte with the XNNPACK delegate, made from the PyTorch model (torch.export), not from the ONNX;
        # no Triton or KServe backend runs .pte files: not servable there (serve it with cbam-deploy serve)
        format="executorch", title="ExecuTorch program (XNNPACK)", extension="pte", precisions=("fp32", "int8"),
        quantize_recipe="executorch", preferred_runtimes=("executorch",), triton=None,
        probe=_has_all(("executorch", "torchao"), "ExecuTorch is not installed: install the executorch extra: "
                                                  "pip install 'cbam-deploy[executorch]'"),
        companions=lambda pte: (Path(pte).name + ".json",),  # the sidecar: input bounds, output names, partitions
        no_triton="ExecuTorch programs (.pte) are not servable in Triton/KServe (no backend there runs them); serve "
                  "them with 'cbam-deploy serve'",
    ),
)}


def get(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise CbamDeployError(f"unknown artifact format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def formats() -> tuple[str, ...]:
    return tuple(FORMATS)
