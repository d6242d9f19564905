"""The ncnn format's row: a ``.param`` + ``.bin`` pair converted by pnnx from the PyTorch model (fp32,
precision pinned at run time), INT8 by ncnn's own scheme (the ``ncnn`` recipe), its gates read from the
layer graph and probed as extra blobs; no per-layer profile from the Python bindings; not servable in
Triton or KServe."""

from __future__ import annotations

from pathlib import Path

from ...formats import Format, Recipe, Runtime, Unsupported
from .exporter import NCNN, PINNED, NcnnParam, example_input, ncnn_pair, probe, require_ncnn, require_pnnx
from ...gates import tail_check
from .gates import check_ncnn_policy, ncnn_gates, ncnn_graph
from .peers import PEERS
from .recipe import run_recipe
from .runner import NcnnRunner


def _open(path: Path, precision: str, threads: int | None):
    return NcnnRunner(path, precision=precision, threads=threads)


class NcnnFormat(Format):
    name = "ncnn"
    title = "ncnn (pnnx)"
    extension = "param"
    precisions = ("fp32",)
    int8_recipe = "ncnn"
    build_source = "pytorch"
    made_from_pytorch = "ncnn is converted from the PyTorch model"
    runtimes = (Runtime("ncnn", ("ncnn",), "ncnn (Python bindings), fp32 pinned, image by image", NCNN.probe, _open),)
    preferred_runtimes = ("ncnn",)
    recipes = (Recipe("ncnn", "ncnn", "ncnn's own INT8 scheme (ncnn2table + ncnn2int8): per-channel weight scales, one "
                                      "scale per layer input, for Convolution / InnerProduct", run_recipe,
                      methods=("minmax", "percentile"), from_pytorch=True,
                      refusal="ncnn's KL (entropy) calibration is not offered here; use minmax or percentile"),)
    no_triton = "not servable in Triton/KServe (neither has an ncnn backend): serve it with 'cbam-deploy serve'"
    no_profile = ("ncnn's Python bindings give no per-layer times (ncnn prints them only when built with "
                  "NCNN_BENCHMARK); use 'cbam-deploy bench' for its latency")

    def probe(self) -> str | None:
        return probe()

    def companions(self, path: Path) -> tuple[str, ...]:
        return (Path(path).with_suffix(".bin").name,)  # the weights

    def skip_build(self, precision: str) -> str | None:
        if precision == "fp16":
            return "ncnn is built in fp32 here; fp16 is a runtime choice of ncnn that cbam-deploy pins off"
        return super().skip_build(precision)

    def make(self, job) -> dict:
        require_ncnn()
        require_pnnx()
        example, second = example_input(job.bundle)
        names = [o.name for o in job.bundle.outputs]
        info = ncnn_pair(job.module, example, names, job.out_path.parent, job.out_path.stem, second_size=second)
        if info["generic_layers"]:
            info["generic_note"] = ("layers without an optimised (packed) ncnn kernel are left: "
                                    + ", ".join(f"{k} x{v}" for k, v in info["generic_layers"].items()))
        info["precision_pinned"] = {"weights": "fp32", "runtime": PINNED}
        if "rewrite" in info:
            job.record["cbam_opt"] = {"mode": "on", "rewrites": [info["rewrite"]]}
        return info

    # the graph and its gates
    def read_graph(self, path: Path):
        return NcnnParam.read(path).layers

    def gates(self, graph, expected):
        return ncnn_gates(graph, expected)

    def gate_maps(self, path, graph, found, precision, x, threads=None) -> dict:
        """A gate's sigmoid output is a named blob ncnn can extract."""
        tensors = {g.name: g.sigmoid_tensor for g in found}
        outputs = NcnnRunner(path, precision=precision, threads=threads,
                             extra_blobs=list(dict.fromkeys(tensors.values()))).infer(x)
        return ({gate: outputs[tensor] for gate, tensor in tensors.items() if tensor in outputs},
                {name: value for name, value in outputs.items() if name not in set(tensors.values())})

    def check_policy(self, artifact, graph, found, expected, policy) -> dict:
        return check_ncnn_policy(graph, expected, policy, artifact.name, found)  # int8_scale_term per layer

    def check_output_tail(self, artifact, graph) -> dict:
        return tail_check(ncnn_graph(graph), artifact.name)  # ncnn quantizes weighted layers only

    def profile(self, path, graph, found, precision, x, runs, warmup, threads):
        raise Unsupported(f"profile cannot time {Path(path).name}'s layers: {self.no_profile}")

    def summary(self, artifact) -> dict:
        """The ncnn-pools rewrite and the generic (unoptimised) layers left."""
        export = artifact.export or (artifact.quantization or {}).get("conversion") or {}
        rewrite = export.get("rewrite") or {}
        generic = ", ".join(f"{k} x{v}" for k, v in (export.get("generic_layers") or {}).items()) or "none"
        return {"ncnn": {"hw_pools_rewritten": rewrite.get("hw_pools"),
                         "channel_pools_rewritten": rewrite.get("channel_pools"),
                         "reductions_left": len(rewrite.get("reductions_left") or []),
                         "generic_layers": export.get("generic_layers")},
                "note": f"ncnn-pools rewrote {rewrite.get('hw_pools')} H,W and {rewrite.get('channel_pools')} channel "
                        f"pools; generic ncnn layers left: {generic}"}

    def peers(self) -> dict:
        return dict(PEERS)


FORMAT = NcnnFormat()
