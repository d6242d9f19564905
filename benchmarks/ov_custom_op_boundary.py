"""Experiment: what a fused CBAM custom operator would pay in OpenVINO's CPU plugin before
doing any work.

An extension op runs as a "Reference" node: the plugin hands it plain-layout f32 tensors, so every
call is wrapped in layout reorders (the convolutions produce blocked/channels-last bf16 or f32) and
precision converts. This script inserts a do-nothing custom op (a copy) at the input of every CBAM
block of an INT8 IR, which is where a fused CBAM op's input would be, and measures:

* the latency with and without it (interleaved rounds, medians with 95% intervals), f32 and bf16;
* from the performance counters, the time of the copy nodes and of the Reorder/Convert nodes added.

If the boundary alone costs as much as the CBAM subgraph it would replace (profile's CBAM share),
a fused op cannot win in this plugin, however fast its kernel.

Run: python benchmarks/ov_custom_op_boundary.py BUNDLE/model.int8-openvino.xml [seconds]
"""

from __future__ import annotations

import collections
import sys
import time

import numpy as np
import openvino as ov
from openvino import Op

from cbam_deploy.benchstats import LoadMonitor, median_ci, ratio_ci


class Copy(Op):
    """Identity as an OpenVINO extension op (Python; its evaluate is a numpy copy)."""

    def __init__(self, inputs=None):
        super().__init__(self, inputs)
        if inputs:
            self.constructor_validate_and_infer_types()

    def validate_and_infer_types(self):
        self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

    def clone_with_new_inputs(self, new_inputs):
        return Copy(new_inputs)

    def get_type_name(self):
        return "CbamBoundaryCopy"

    def has_evaluate(self):
        return True

    def evaluate(self, outputs, inputs):
        outputs[0].shape = inputs[0].shape
        np.copyto(outputs[0].data, inputs[0].data)
        return True


def with_boundaries(core: ov.Core, xml: str) -> tuple[ov.Model, int]:
    model = core.read_model(xml)
    inserted = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ReduceMean" and "ChannelGate" in op.get_friendly_name():
            source = op.input(0).get_source_output()
            targets = list(source.get_target_inputs())
            copy = Copy([source])
            copy.set_friendly_name(op.get_friendly_name().rsplit("/", 2)[0] + "/boundary")
            for target in targets:
                target.replace_source_output(copy.output(0))
            inserted += 1
    return model, inserted


def counters(compiled, x, runs: int = 30) -> dict[str, float]:
    request = compiled.create_infer_request()
    totals: dict[str, float] = collections.defaultdict(float)
    for i in range(runs + 5):
        request.infer({0: x})
        if i < 5:
            continue
        for info in request.profiling_info:
            key = "boundary op" if info.node_type in ("CbamBoundaryCopy", "Reference") else info.node_type
            totals[key] += info.real_time.total_seconds() * 1e3 / runs
    return totals


def main(xml: str, seconds: float = 20.0) -> None:
    core = ov.Core()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    boundary_model, inserted = with_boundaries(core, xml)
    print(f"{inserted} CBAM blocks; OpenVINO {ov.__version__}")
    for hint in ("f32", "bf16"):
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        plain = core.compile_model(core.read_model(xml), "CPU", config)
        boundary = core.compile_model(boundary_model, "CPU", config)
        requests = {"as built": plain.create_infer_request(), "with boundary op": boundary.create_infer_request()}
        for request in requests.values():
            for _ in range(10):
                request.infer({0: x})
        times = {name: [] for name in requests}
        with LoadMonitor() as monitor:
            started = time.time()
            while time.time() - started < seconds:
                for name, request in requests.items():
                    t = time.perf_counter()
                    request.infer({0: x})
                    times[name].append((time.perf_counter() - t) * 1e3)
        load = monitor.report
        for name in requests:
            p50, low, high = median_ci(times[name])
            ratio = ratio_ci(times[name], times["as built"])
            print(f"{hint:5s} {name:17s} p50 {p50:6.2f} ms [{low:.2f}, {high:.2f}]  x{ratio[0]:.3f} "
                  f"[{ratio[1]:.3f}, {ratio[2]:.3f}]")
        print(f"      other processes {load.other_cpu * 100 if load else float('nan'):.1f}% of the CPUs")
        base = counters(core.compile_model(core.read_model(xml), "CPU", {**config, "PERF_COUNT": True}), x)
        with_op = counters(core.compile_model(boundary_model, "CPU", {**config, "PERF_COUNT": True}), x)
        for kind in ("boundary op", "Reorder", "Convert"):
            print(f"      {kind:12s} {base.get(kind, 0.0):6.3f} ms -> {with_op.get(kind, 0.0):6.3f} ms per inference")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)
