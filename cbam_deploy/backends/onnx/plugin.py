"""The ONNX format's row: the bundle's root artifact (the export writes the FP32 ONNX every other build
starts from), run by onnxruntime's execution providers, quantized by the ``ort-cpu`` and ``tensorrt``
Q/DQ recipes, its gates read from the graph and probed as extra outputs, profiled by onnxruntime's
profiler, served by Triton's onnxruntime backend."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ...devices import cuda_devices, has_library, has_module
from ...formats import Format, Recipe, Runtime, TritonFragment
from .diagnose import locate_divergence
from .exporter import OnnxExportOptions, check_opset, export_onnx, external_data_files
from ...gates import tail_check
from .gates import check_onnx_policy, onnx_gates, onnx_graph
from .peers import PEERS
from .recipe import quantize_onnx
from .runner import CPU_EP, ONNXRUNTIME, OnnxRuntimeRunner


@functools.lru_cache(maxsize=None)
def ort_providers() -> tuple[str, ...]:
    """The execution providers this onnxruntime has (onnxruntime imported once, when first asked)."""
    if ONNXRUNTIME.probe():
        return ()
    return tuple(ONNXRUNTIME.require().get_available_providers())


_WHEEL = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu",
          "OpenVINOExecutionProvider": "onnxruntime-openvino"}


def _probe_ort(provider: str, needs_gpu: bool = False, needs_tensorrt: bool = False):
    def probe() -> str | None:
        providers = ort_providers()
        if not providers:
            return ONNXRUNTIME.missing
        if provider not in providers:
            return (f"this onnxruntime has no {provider} (it has {', '.join(providers)}): it comes with "
                    f"{_WHEEL.get(provider, 'a build with it')}")
        if needs_gpu and cuda_devices() == 0:
            return f"{provider} needs an NVIDIA GPU and none is visible"
        if needs_tensorrt and not (has_module("tensorrt_libs") or has_module("tensorrt") or has_library("nvinfer")):
            return f"{provider} needs the TensorRT libraries (libnvinfer): pip install tensorrt"
        return None
    return probe


def _ort(providers):
    def factory(path: Path, precision: str, threads: int | None):
        return OnnxRuntimeRunner(path, providers=providers(precision, threads), threads=threads, precision=precision)
    return factory


def _cuda_options(precision: str) -> dict:
    # an "fp32" latency or parity must be fp32: the CUDA EP would otherwise use TF32 on Ampere and later
    return {"device_id": "0", **({"use_tf32": "0"} if precision == "fp32" else {})}


def _openvino_ep_options(precision: str, threads: int | None) -> dict:
    # FP32 on the CPU device, as OpenVINO's own runner pins its inference precision (never a silent bf16)
    return {"device_type": "CPU", "precision": "FP32", **({"num_of_threads": str(threads)} if threads else {})}


RUNTIMES = (
    Runtime("ort-cpu", ("onnx",), "onnxruntime, CPU execution provider", _probe_ort(CPU_EP),
            _ort(lambda precision, threads: [CPU_EP]), CPU_EP),
    Runtime("ort-cuda", ("onnx",), "onnxruntime, CUDA execution provider (onnxruntime-gpu)",
            _probe_ort("CUDAExecutionProvider", needs_gpu=True),
            _ort(lambda precision, threads: [("CUDAExecutionProvider", _cuda_options(precision)), CPU_EP]),
            "CUDAExecutionProvider"),
    Runtime("ort-tensorrt", ("onnx",), "onnxruntime, TensorRT execution provider, CUDA then CPU for what it leaves",
            _probe_ort("TensorrtExecutionProvider", needs_gpu=True, needs_tensorrt=True),
            _ort(lambda precision, threads: [("TensorrtExecutionProvider", {"device_id": "0"}),
                                             ("CUDAExecutionProvider", _cuda_options(precision)), CPU_EP]),
            "TensorrtExecutionProvider"),
    Runtime("ort-openvino", ("onnx",), "onnxruntime, OpenVINO execution provider on the CPU (onnxruntime-openvino)",
            _probe_ort("OpenVINOExecutionProvider"),
            _ort(lambda precision, threads: [("OpenVINOExecutionProvider", _openvino_ep_options(precision, threads)),
                                             CPU_EP]),
            "OpenVINOExecutionProvider"),
)


def _qdq(job):
    return quantize_onnx(job.fp32_path, job.out_path, job.data, job.recipe.target, job.method, job.gates, job.expected,
                         job.calib_batch, job.cache_dir)


class OnnxFormat(Format):
    name = "onnx"
    title = "ONNX (onnxruntime)"
    extension = "onnx"
    precisions = ("fp32", "fp16")
    int8_recipe = "ort-cpu"
    root = True
    reference_runtime = "ort-cpu"  # exactly fp32 whatever else the machine has (no TF32, no bf16)
    extra = ONNXRUNTIME
    runtimes = RUNTIMES
    preferred_runtimes = ("ort-tensorrt", "ort-cuda", "ort-openvino", "ort-cpu")
    recipes = (
        Recipe("ort-cpu", "onnx", "Q/DQ ONNX for onnxruntime on CPUs: uint8 activations, int8 per-channel weights",
               _qdq),
        Recipe("tensorrt", "onnx", "Q/DQ ONNX in TensorRT's explicit-quantization form: symmetric int8, per-channel "
                                   "weights (the TensorRT format builds its INT8 engine from it)", _qdq),
    )
    triton = TritonFragment('platform: "onnxruntime_onnx"', ("model.onnx",), "KIND_CPU", ("KIND_CPU", "KIND_GPU"))
    op_categories = {"Transpose": "layout", **dict.fromkeys(("Conv", "QLinearConv", "FusedConv", "ConvInteger"), "conv"),
                     **dict.fromkeys(("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
                                     "quantize/dequantize")}

    def companions(self, path: Path) -> tuple[str, ...]:
        return external_data_files(path)

    def skip_build(self, precision: str) -> str | None:
        if precision == "fp16":
            return ("onnxruntime's CPU provider has no fast fp16 kernels; fp16 is built as OpenVINO IR or a TensorRT "
                    "engine")
        return super().skip_build(precision)

    # the export
    def export_options(self, **options) -> OnnxExportOptions:
        made = OnnxExportOptions(**options)
        made.validate()
        return made

    def check_export_choices(self, exporter: str, opset: int) -> None:
        check_opset(exporter, opset)

    def export_root(self, module, out_path: Path, options: OnnxExportOptions) -> dict:
        return export_onnx(module, out_path, options)

    # the graph and its gates
    def read_graph(self, path: Path):
        return onnx.load(str(path))

    def gates(self, graph, expected):
        return onnx_gates(graph, expected)

    def gate_maps(self, path, graph, found, precision, x, threads=None) -> dict:
        """Each gate's sigmoid tensor as an extra output of a probe copy of the graph."""
        proto = onnx.ModelProto()
        proto.CopyFrom(graph)
        tensors = {g.name: g.sigmoid_tensor for g in found}
        existing = {o.name for o in proto.graph.output}
        for tensor in dict.fromkeys(tensors.values()):
            if tensor not in existing:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        with tempfile.TemporaryDirectory(prefix="cbam-attention-") as tmp:
            probe = Path(tmp) / "probe.onnx"
            onnx.save(proto, str(probe))
            outputs = OnnxRuntimeRunner(probe, threads=threads, precision=precision).infer(x)
        return ({gate: outputs[tensor] for gate, tensor in tensors.items() if tensor in outputs},
                {name: value for name, value in outputs.items() if name not in set(tensors.values())})

    def check_policy(self, artifact, graph, found, expected, policy) -> dict:
        return check_onnx_policy(graph, expected, policy, artifact.name, found)

    def check_output_tail(self, artifact, graph) -> dict:
        return tail_check(onnx_graph(graph), artifact.name)

    # timing and reporting
    def profile(self, path, graph, found, precision, x, runs, warmup, threads):
        with tempfile.TemporaryDirectory(prefix="cbam-profile-") as tmp:
            runner = OnnxRuntimeRunner(path, threads=threads, precision=precision, profile_dir=tmp)
            for _ in range(warmup + runs):
                runner.run(x)
            times = runner.node_times(skip_runs=warmup)
        return times, "onnxruntime profiler (CPU execution provider)"

    def first_divergence(self, module, path, x, graph=None):
        return locate_divergence(module, graph if graph is not None else self.read_graph(path),
                                 np.ascontiguousarray(x, np.float32))

    def peers(self) -> dict:
        return dict(PEERS)


FORMAT = OnnxFormat()
