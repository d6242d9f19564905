"""OpenVINO runtime, over an IR (.xml) or an ONNX file (OpenVINO reads ONNX itself: the ``openvino``
runtime of an ONNX artifact). The inference precision is always set explicitly: on CPUs with bf16
support OpenVINO would otherwise run an "fp32" model in bf16, and a latency labelled fp32 would be wrong.
The one exception is INT8: an INT8 IR's float remainder (CBAM's gates, residual adds) runs in the
device's default precision, bf16 on CPUs that have it, which is what OpenVINO gives a user of the same
IR and 7% faster on resnet50_cbam (docs/measurements.md); ``describe()["inference_precision"]`` says which ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import CbamDeployError
from ...runners.base import Runner
from .exporter import require_openvino

_HINT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": None}  # None: the device's default
_COMPUTED = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}


def _output_name(port, index: int = 0, count: int = 1) -> str:
    """The model's name for an output port. Compiling can fuse an output op into its producer (a
    detector's final Sigmoid), and the port then carries the producer's scoped tensor name as well
    (``/Reshape_1_output_0`` beside ``output1``); ``get_any_name`` may pick either, so the plain name
    wins. A port with no name at all (an IR converted from a PyTorch module without output names, as
    Ultralytics' exporter writes it) is named as the exporters name outputs: ``output``, or ``outputN``."""
    names = sorted(port.get_names())
    if not names:
        return "output" if count == 1 else f"output{index}"
    plain = [n for n in names if not n.startswith("/")]
    return plain[0] if plain else port.get_any_name()


class OpenVINORunner(Runner):
    backend = "openvino"

    def __init__(self, xml: str | Path, device: str = "CPU", precision: str = "fp32",
                 inference_precision: str | None = None, hint: str = "LATENCY", threads: int | None = None,
                 perf_counters: bool = False) -> None:
        """``xml``: an IR's .xml, or an .onnx (read and converted by OpenVINO as it compiles)."""
        ov = require_openvino()
        self.source = "onnx" if Path(xml).suffix.lower() == ".onnx" else "ir"
        self.core = ov.Core()
        config = {"PERFORMANCE_HINT": hint}
        if inference_precision or _HINT.get(precision):
            config["INFERENCE_PRECISION_HINT"] = inference_precision or _HINT[precision]
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if perf_counters:  # per-node times of the last inference (see node_times)
            config["PERF_COUNT"] = True
        try:
            self.compiled = self.core.compile_model(str(xml), device, config)
        except RuntimeError as exc:  # an op OpenVINO cannot read or compile, a damaged file
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise CbamDeployError(f"OpenVINO cannot compile {xml}: {' '.join(lines) or exc}") from None
        if len(self.compiled.inputs) != 1 or not self.compiled.outputs:  # a file read as a model of nothing
            raise CbamDeployError(f"OpenVINO reads {xml} as a model of {len(self.compiled.inputs)} inputs and "
                                  f"{len(self.compiled.outputs)} outputs; cbam-deploy runs models of one image input")
        self.request = self.compiled.create_infer_request()
        outputs = self.compiled.outputs
        self.output_names = [_output_name(port, index, len(outputs)) for index, port in enumerate(outputs)]
        self.device = device
        self.precision = precision
        self.hint = hint
        # what OpenVINO will really compute in (it may refuse a hint the CPU cannot honour)
        self.inference_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").rstrip("'>")

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.asarray(result[port], dtype=np.float32) for name, port in zip(self.output_names, self.compiled.outputs)}

    def threads(self) -> int | None:
        try:
            return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # a device without the property
            return None

    def node_times(self) -> list[tuple[str, str, float]]:
        """(node name, node type, microseconds) of the last inference; needs ``perf_counters``."""
        return [(info.node_name, info.node_type, info.real_time.total_seconds() * 1e6)
                for info in self.request.profiling_info if info.real_time.total_seconds() > 0]

    def computed_precision(self) -> str | None:
        """What the compiled model reports as its INFERENCE_PRECISION_HINT: an f16 hint on a CPU with
        bf16 but no fp16 arithmetic (AVX-512 BF16 without AVX-512 FP16 or AMX-FP16) compiles to bf16."""
        return _COMPUTED.get(self.inference_precision)

    def describe(self) -> dict:
        return {**super().describe(), "runtime": getattr(self, "runtime", None) or "openvino", "model_source": self.source,
                "inference_precision": self.inference_precision, "performance_hint": self.hint}
