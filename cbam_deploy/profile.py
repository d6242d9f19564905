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

from collections import defaultdict
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .checks import MAX_BATCH, check_int, check_output_file
from .errors import BackendUnavailable, CbamDeployError
from .formats import get as get_format
from .formats import rows
from .fsutil import atomic_path
from .results import Result
from .scopes import name_module_path


class ProfileResult(Result):
    """Per artifact (``results``), where its time goes: milliseconds per category (conv, channel gate,
    spatial gate, attention (other), layout, quantize/dequantize, other), per stage and per op type."""

    command = "profile"

    @property
    def results(self) -> list[dict]:
        return self["results"]

CATEGORIES = ("conv", "channel gate", "spatial gate", "attention (other)", "layout", "quantize/dequantize", "other")
_KIND_CATEGORY = {"channel": "channel gate", "spatial": "spatial gate", "joint": "attention (other)"}


def op_categories() -> dict[str, str]:
    """{op type: "layout" | "conv" | "quantize/dequantize"} of every format (each row's ``op_categories``)."""
    return {op: category for row in rows() for op, category in row.op_categories.items()}


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


def categorize(name: str, op_type: str, index: dict | None, ops: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(category, module path) of one profiled node; ``index``: ``gate_index`` of the artifact's gates;
    ``ops``: the format's op categories (default: every format's)."""
    path = name_module_path(name)
    category = (ops if ops is not None else op_categories()).get(op_type)
    if category == "layout":
        return "layout", path
    index = index or {"nodes": {}, "modules": []}
    kind = index["nodes"].get(name)
    if kind is None and path:
        kind = next((k for module, k in index["modules"] if path == module or path.startswith(module + ".")), None)
    if kind is not None:
        return _KIND_CATEGORY[kind], path
    return category or "other", path


def roll_up(node_times: list[tuple[str, str, float]], runs: int, index: dict | None,
            ops: dict[str, str] | None = None) -> dict:
    """Per-inference milliseconds by category, by top-level module (stage) and the slowest ops."""
    by_category: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for name, op_type, microseconds in node_times:
        category, path = categorize(name, op_type, index, ops)
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
    artifact = bundle.artifact(name)
    row = get_format(artifact.format)
    if not row.profiles:
        why = row.no_profile or "its format has no per-operator profile"
        raise CbamDeployError(f"profile cannot time {name} ({artifact.format}): {why}")
    try:
        found = bundle.found_gates(name)
        index = gate_index(found)
    except BackendUnavailable:  # times without the gates' categories
        found, index = [], None
    times, tool = row.profile(bundle.path_of(name), bundle.graph(name) if found else None, found,
                              artifact.precision, x, runs, warmup, threads)
    return {"artifact": name, "format": artifact.format, "precision": artifact.precision, "tool": tool,
            "runs": runs, "gates": len((index or {}).get("modules", [])), **roll_up(times, runs, index, row.op_categories)}


def profile_bundle(bundle_dir: str | Path, artifacts: list[str] | None = None, batch: int = 1, runs: int = 20,
                   warmup: int = 5, threads: int | None = None, plot: str | Path | None = None) -> dict:
    """Per-operator time of each artifact (default: every artifact whose format gives a profile), rolled up.
    ``plot``: where the caller will draw ``plot_profile`` (checked here, before any profiling)."""
    check_int("--batch", batch, 1, MAX_BATCH)
    check_int("--runs", runs, 1, 100000)
    check_int("--warmup", warmup, 0, 100000)
    check_int("--threads", threads, 1, allow_none=True)
    check_output_file("--plot", plot)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    bundle_dir = bundle.directory
    known = bundle.artifact_names
    unknown = [a for a in artifacts or [] if a not in known]
    if unknown:
        raise CbamDeployError(f"bundle {bundle_dir} has no artifact(s) {', '.join(unknown)}; it has {', '.join(known)}")
    chosen = artifacts or [a.name for a in bundle.artifacts if get_format(a.format).profiles]
    batch = bundle.fixed_batch or batch
    side = bundle.input.side
    x = np.random.default_rng(0).standard_normal((batch, bundle.input.channels, side, side), dtype=np.float32)
    results = []
    for name in chosen:
        results.append(_profile_one(bundle, name, x, runs, warmup, threads))
    return ProfileResult({"bundle": str(bundle_dir), "model": bundle.model.name, "batch": batch, "input": [side, side],
                          "results": results})


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
