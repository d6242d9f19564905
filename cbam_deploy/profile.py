"""``profile``: where an artifact's time goes, per operator, rolled up by the module it came from.

onnxruntime's profiler and OpenVINO's performance counters give per-node kernel times. Each node is
put in one category by the gate finder (``cbam_deploy.gates``, run on the artifact's own graph: a
node that is part of a gate, its multiply included wherever the model computes it, counts for that
gate's kind), else by its scoped name (``/layer1/layer1.0/ca/...``: inside the module that holds a
gate's parts) and its op type:

- ``layout``: reorders and transposes the engine inserted (a cost of the layout, whichever module);
- ``channel gate`` / ``spatial gate`` (CBAM's, SE's, ECA's: any gate of that kind) and
  ``attention (other)`` (BAM's joint gates);
- ``conv``: convolutions outside the gates;
- ``quantize/dequantize``: Q/DQ nodes not attributable to a module;
- ``other``: everything else (pools, adds, the classifier).

Times are per inference, averaged over ``runs`` runs after ``warmup`` runs.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from .backends.executorch.exporter import NO_PROFILE
from .backends.onnx.runner import OnnxRuntimeRunner
from .backends.openvino.runner import OpenVINORunner
from .bundle import Bundle
from .checks import MAX_BATCH, check_int, check_output_file
from .errors import CbamDeployError
from .fsutil import atomic_path
from .gates import onnx_gates, openvino_gates
from .scopes import name_module_path

CATEGORIES = ("conv", "channel gate", "spatial gate", "attention (other)", "layout", "quantize/dequantize", "other")
_KIND_CATEGORY = {"channel": "channel gate", "spatial": "spatial gate", "joint": "attention (other)"}
_LAYOUT = {"Reorder", "ReorderInput", "ReorderOutput", "Transpose"}
_CONV = {"Conv", "QLinearConv", "FusedConv", "ConvInteger", "Convolution", "GroupConvolution", "ConvolutionBackpropData"}
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "FakeQuantize"}


def gate_index(gates: list) -> dict:
    """What ``categorize`` needs to know of an artifact's gates (``gates.GraphGate`` objects, or the
    manifest's records): {"nodes": {node name: kind}, "modules": [(module, kind)], deepest first}."""
    nodes, modules = {}, {}
    for gate in gates:
        record = gate.record if hasattr(gate, "record") else gate
        for node in getattr(gate, "nodes", []):
            nodes[node] = record["kind"]
        if record.get("module"):
            modules[record["module"]] = record["kind"]
    return {"nodes": nodes, "modules": sorted(modules.items(), key=lambda m: -len(m[0]))}


def categorize(name: str, op_type: str, index: dict | None) -> tuple[str, str | None]:
    """(category, module path) of one profiled node; ``index``: ``gate_index`` of the artifact's gates."""
    path = name_module_path(name)
    if op_type in _LAYOUT:
        return "layout", path
    index = index or {"nodes": {}, "modules": []}
    kind = index["nodes"].get(name)
    if kind is None and path:
        kind = next((k for module, k in index["modules"] if path == module or path.startswith(module + ".")), None)
    if kind is not None:
        return _KIND_CATEGORY[kind], path
    if op_type in _CONV:
        return "conv", path
    if op_type in _QDQ:
        return "quantize/dequantize", path
    return "other", path


def roll_up(node_times: list[tuple[str, str, float]], runs: int, index: dict | None) -> dict:
    """Per-inference milliseconds by category, by top-level module (stage) and the slowest ops."""
    by_category: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for name, op_type, microseconds in node_times:
        category, path = categorize(name, op_type, index)
        ms = microseconds / 1000.0 / runs
        by_category[category] += ms
        by_module[".".join(path.split(".")[:2]) if path else "(unscoped)"] += ms
        by_op[(category, op_type)] += ms
    total = sum(by_category.values())
    return {
        "total_ms": total,
        "categories": [{"category": c, "ms": by_category.get(c, 0.0),
                        "share": by_category.get(c, 0.0) / total if total else 0.0} for c in CATEGORIES],
        "modules": sorted(({"module": m, "ms": t} for m, t in by_module.items()), key=lambda r: -r["ms"]),
        "top_ops": sorted(({"category": c, "op": o, "ms": t} for (c, o), t in by_op.items()), key=lambda r: -r["ms"])[:12],
    }


def _profile_one(bundle: Bundle, name: str, x: np.ndarray, runs: int, warmup: int, threads: int | None) -> dict:
    path = bundle.path_of(name)
    artifact = bundle.artifact(name)
    expected = bundle.model.gate_list
    if artifact.format == "onnx":
        index = gate_index(onnx_gates(onnx.load(str(path)), expected))
        with tempfile.TemporaryDirectory(prefix="cbam-profile-") as tmp:
            runner = OnnxRuntimeRunner(path, threads=threads, precision=artifact.precision, profile_dir=tmp)
            for _ in range(warmup + runs):
                runner.run(x)
            times = runner.node_times(skip_runs=warmup)
        tool = "onnxruntime profiler (CPU execution provider)"
    elif artifact.format == "openvino":
        runner = OpenVINORunner(path, precision=artifact.precision, threads=threads, perf_counters=True)
        index = gate_index(openvino_gates(runner.core.read_model(str(path)), expected))
        for _ in range(warmup):
            runner.run(x)
        times = []
        for _ in range(runs):
            runner.run(x)
            times.extend(runner.node_times())
        tool = f"OpenVINO performance counters ({runner.inference_precision})"
    elif artifact.format == "ncnn":
        raise CbamDeployError(f"profile cannot time {name}'s layers: ncnn's Python bindings give no per-layer times "
                              "(ncnn prints them only when built with NCNN_BENCHMARK); use 'cbam-deploy bench' for its latency")
    elif artifact.format == "executorch":
        raise CbamDeployError(f"profile covers onnx and openvino artifacts; {name} is executorch: {NO_PROFILE}")
    else:
        raise CbamDeployError(f"profile covers onnx and openvino artifacts; {name} is {artifact.format}")
    return {"artifact": name, "format": artifact.format, "precision": artifact.precision, "tool": tool,
            "runs": runs, "gates": len(index["modules"]), **roll_up(times, runs, index)}


def profile_bundle(bundle_dir: str | Path, artifacts: list[str] | None = None, batch: int = 1, runs: int = 20,
                   warmup: int = 5, threads: int | None = None, plot: str | Path | None = None) -> dict:
    """Per-operator time of each artifact (default: every onnx and openvino artifact), rolled up.
    ``plot``: where the caller will draw ``plot_profile`` (checked here, before any profiling)."""
    check_int("--batch", batch, 1, MAX_BATCH)
    check_int("--runs", runs, 1, 100000)
    check_int("--warmup", warmup, 0, 100000)
    check_int("--threads", threads, 1, allow_none=True)
    check_output_file("--plot", plot)
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.open(bundle_dir)
    known = bundle.artifact_names
    unknown = [a for a in artifacts or [] if a not in known]
    if unknown:
        raise CbamDeployError(f"bundle {bundle_dir} has no artifact(s) {', '.join(unknown)}; it has {', '.join(known)}")
    chosen = artifacts or [a.name for a in bundle.artifacts if a.format in ("onnx", "openvino")]
    batch = bundle.fixed_batch or batch
    side = bundle.input.side
    x = np.random.default_rng(0).standard_normal((batch, bundle.input.channels, side, side), dtype=np.float32)
    results = []
    for name in chosen:
        results.append(_profile_one(bundle, name, x, runs, warmup, threads))
    return {"bundle": str(bundle_dir), "model": bundle.model.name, "batch": batch, "input": [side, side],
            "results": results}


def plot_profile(result: dict, path: str | Path) -> None:
    """One horizontal stacked bar per artifact: milliseconds per category."""
    import matplotlib  # lazy: heavy, and only a --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), as pyplot requires

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(rows)))
    left = np.zeros(len(rows))
    colors = plt.get_cmap("tab10").colors
    for index, category in enumerate(CATEGORIES):
        values = np.array([next(c["ms"] for c in r["categories"] if c["category"] == category) for r in rows])
        ax.barh([r["artifact"] for r in rows], values, left=left, label=category, color=colors[index % len(colors)])
        left += values
    ax.set_xlabel("ms per inference (sum of kernel times)")
    ax.set_title(f"{result['model']}: where the time goes (batch {result['batch']})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # the whole PNG or the old file, whatever the name's suffix says
            fig.savefig(tmp, dpi=110, format="png")
    except OSError as exc:
        raise CbamDeployError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
