"""The OpenVINO format's row: IR (.xml + .bin) converted from the bundle's FP32 ONNX (fp32, fp16 weights),
INT8 by NNCF (the ``openvino`` recipe), run by the OpenVINO runtime (which reads the ONNX too), its gates
read from the IR and probed as extra outputs, profiled by OpenVINO's performance counters, served by
Triton's OpenVINO backend."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ...formats import Format, Recipe, Runtime, TritonFragment
from .exporter import NNCF, OPENVINO, export_ir, require_openvino
from ...gates import tail_check
from .gates import check_openvino_policy, openvino_gates, openvino_graph
from .peers import PEERS
from .recipe import quantize_openvino
from .runner import OpenVINORunner

BF16_NOTE = ("Triton's OpenVINO backend has no f32 pin (INFERENCE_PRECISION_HINT is not one of its parameters): "
             "on a CPU with bf16 (AMX/AVX512-BF16) this IR runs in bf16; for strict fp32 there, serve the ONNX with "
             "the onnxruntime backend")


def _open(path: Path, precision: str, threads: int | None):
    return OpenVINORunner(path, precision=precision, threads=threads)


def _nncf(job):
    return quantize_openvino(job.fp32_path, job.out_path, job.data, job.method, job.gates, job.expected,
                             job.cache_dir / "openvino" if job.cache_dir else None)


class OpenVINOFormat(Format):
    name = "openvino"
    title = "OpenVINO IR"
    extension = "xml"
    precisions = ("fp32", "fp16")
    int8_recipe = "openvino"
    extra = OPENVINO
    runtimes = (Runtime("openvino", ("onnx", "openvino"), "OpenVINO runtime (reads the ONNX itself, or the IR)",
                        OPENVINO.probe, _open),)
    preferred_runtimes = ("openvino",)
    recipes = (Recipe("openvino", "openvino", "NNCF post-training quantization: an INT8 IR", _nncf,
                      methods=("minmax", "percentile"), refusal="NNCF offers no entropy calibration", requires=NNCF),)
    triton = TritonFragment('backend: "openvino"', ("model.xml", "model.bin"), "KIND_CPU", ("KIND_CPU",))
    op_categories = {**dict.fromkeys(("Reorder", "ReorderInput", "ReorderOutput", "Transpose"), "layout"),
                     **dict.fromkeys(("Convolution", "GroupConvolution", "ConvolutionBackpropData"), "conv"),
                     "FakeQuantize": "quantize/dequantize"}

    def companions(self, path: Path) -> tuple[str, ...]:
        return (Path(path).with_suffix(".bin").name,)  # the weights

    def make(self, job) -> dict:
        info = export_ir(job.source_path, job.out_path, job.precision)
        return {**info, "inference_precision_hint": {"fp32": "f32", "fp16": "f16"}[job.precision]}

    # the graph and its gates
    def read_graph(self, path: Path):
        return require_openvino().Core().read_model(str(path))

    def gates(self, graph, expected):
        return openvino_gates(graph, expected)

    def gate_maps(self, path, graph, found, precision, x, threads=None) -> dict:
        """Each gate's sigmoid as an extra output of a probe copy of the IR."""
        ov = require_openvino()
        model = graph.clone()
        by_name = {op.get_friendly_name(): op for op in model.get_ops()}
        tensors = {}
        for gate in found:
            op = by_name.get(gate.sigmoid)
            if op is not None:
                model.add_outputs([op.output(0)])
                tensors[gate.name] = op.output(0).get_any_name()
        with tempfile.TemporaryDirectory(prefix="cbam-attention-") as tmp:
            probe = Path(tmp) / "probe.xml"
            ov.save_model(model, str(probe), compress_to_fp16=False)
            outputs = OpenVINORunner(probe, precision=precision, threads=threads).infer(x)
        return ({gate: outputs[tensor] for gate, tensor in tensors.items() if tensor in outputs},
                {name: value for name, value in outputs.items() if name not in set(tensors.values())})

    def check_policy(self, artifact, graph, found, expected, policy) -> dict:
        return check_openvino_policy(graph, expected, policy, artifact.name, found)

    def check_output_tail(self, artifact, graph) -> dict:
        return tail_check(openvino_graph(graph), artifact.name)

    # timing
    def profile(self, path, graph, found, precision, x, runs, warmup, threads):
        runner = OpenVINORunner(path, precision=precision, threads=threads, perf_counters=True)
        for _ in range(warmup):
            runner.run(x)
        times = []
        for _ in range(runs):
            runner.run(x)
            times.extend(runner.node_times())
        return times, f"OpenVINO performance counters ({runner.inference_precision})"

    def peers(self) -> dict:
        return dict(PEERS)

    # Triton
    def triton_parameters(self, batched: bool, max_batch: int) -> tuple[dict, list[str]]:
        parameters = {"PERFORMANCE_HINT": "LATENCY"}
        notes = [BF16_NOTE]
        if batched and max_batch > 1:  # the backend fixes the batch at max_batch_size; smaller ones are padded
            parameters["ENABLE_BATCH_PADDING"] = "YES"
            notes.append(f"OpenVINO runs every batch padded to {max_batch}; --max-batch 1 for lowest single-request "
                         "latency")
        return parameters, notes

    def triton_sources(self, artifact) -> list[tuple[str, str]]:
        return [(artifact.path, "model.xml"), (str(Path(artifact.path).with_suffix(".bin")), "model.bin")]


FORMAT = OpenVINOFormat()
