"""Bench reports: the rows of the latency table (CLI and markdown alike), the attention-overhead and
``--cbam-opt-compare`` tables, the notes on fallbacks and unstable rows, the markdown report and the
latency plot. Each takes ``bench.bench_bundle``'s result."""

from __future__ import annotations

from .cbam_opt import applied
from .errors import CbamDeployError
from .fsutil import atomic_path


COLUMNS = ("runner", "runtime", "precision", "batch", "threads", "p50 ms [95% CI]", "p90", "p99", "img/s",
           "x PyTorch [95% CI]", "stable")


_SHORT = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f16": "fp16"}


def row_cells(r: dict) -> list[str]:
    """One row of the table (CLI and markdown): medians and ratios of medians with their intervals."""
    low, high = r["p50_ci_ms"]
    ratio = (f"{r['ratio_to_pytorch']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]"
             if "ratio_to_pytorch" in r else "-")
    stable = "yes" if r["stability"]["stable"] else "NO"
    computes = _SHORT.get(r.get("inference_precision"), r.get("inference_precision"))
    precision = r["precision"] + (f" ({computes})" if computes and computes != r["precision"] else "")
    return [r["runner"], r.get("runtime") or r["backend"], precision, str(r["batch"]),
            str(r.get("threads") or "-"), f"{r['p50_ms']:.2f} [{low:.2f}, {high:.2f}]", f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}", f"{r['throughput_ips']:.1f}", ratio, stable]


OVERHEAD_COLUMNS = ("engine", "batch", "attention p50 ms", "plain p50 ms", "overhead [95% CI]", "stable")


def overhead_cells(o: dict) -> list[str]:
    return [o["engine"], str(o["batch"]), f"{o['attention_p50_ms']:.2f}", f"{o['plain_p50_ms']:.2f}",
            f"{o['overhead']:.2f} [{o['overhead_ci'][0]:.2f}, {o['overhead_ci'][1]:.2f}]", "yes" if o["stable"] else "NO"]


def compare_heading(result: dict, between: str = "/") -> tuple[str, tuple[str, ...]]:
    """Title and columns of the ``--cbam-opt-compare`` table (rows: ``overhead_cells``)."""
    mode, other = result["cbam_opt"].get("mode", "off"), result["cbam_opt_compare"]["other"]
    title = (f"--cbam-opt {mode} {between} {other} ({', '.join(applied(result['cbam_opt'])) or 'no rewrites'}), "
             "same engine, same rounds")
    return title, ("engine", "batch", f"{mode} p50 ms", f"{other} p50 ms", f"{mode}/{other} [95% CI]", "stable")


def fallback_notes(rows: list[dict]) -> list[str]:
    """Rows whose runtime ran (some) nodes elsewhere than asked (onnxruntime's silent fallback), one line each."""
    seen = {}
    for r in rows:
        if r.get("fallback"):
            seen.setdefault(r["runner"], f"{r['runner']}: {r['fallback']}")
    return list(seen.values())


def unstable_notes(rows: list[dict]) -> list[str]:
    """Why each unstable row is unstable, one line per row."""
    return [f"{r['runner']} (batch {r['batch']}): {'; '.join(r['stability']['reasons'])}"
            for r in rows if not r["stability"]["stable"]]


def _markdown_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_report(result: dict, title: str) -> str:
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()), ""]
    lines += _markdown_table(COLUMNS, [row_cells(r) for r in result["results"]])
    if result.get("overhead"):
        lines += ["", f"Attention overhead ({result['model']} / {result['overhead']['plain']}):", ""]
        lines += _markdown_table(OVERHEAD_COLUMNS, [overhead_cells(o) for o in result["overhead"]["rows"]])
    if result.get("cbam_opt_compare"):
        title, columns = compare_heading(result, "over")
        lines += ["", title + ":", ""]
        lines += _markdown_table(columns, [overhead_cells(o) for o in result["cbam_opt_compare"]["rows"]])
    fallbacks = fallback_notes(result["results"])
    if fallbacks:
        lines += ["", "Runtimes that did not run everything where asked:", ""] + [f"- {n}" for n in fallbacks]
    notes = unstable_notes(result["results"])
    if notes:
        lines += ["", "Unstable rows (not to be quoted):", ""] + [f"- {n}" for n in notes]
    made = [r for r in result["results"] if r.get("made_by")]
    if made:
        lines += ["", "How each peer was made:", ""] + [f"- {r['runner']}: {r['made_by']}" for r in made]
    return "\n".join(lines) + "\n"


def plot_latency(rows: list[dict], path, title: str) -> None:
    """Latency vs batch size, one line per runner (PNG)."""
    try:
        import matplotlib  # lazy: heavy, and only a --plot needs it
    except ImportError:
        raise CbamDeployError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg"), as pyplot requires
    import matplotlib.ticker  # lazy: with pyplot

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in dict.fromkeys(r["runner"] for r in rows):
        points = sorted((r["batch"], r["p50_ms"], *r["p50_ci_ms"]) for r in rows if r["runner"] == name)
        ax.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], marker="o", capsize=3, label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms), 95% interval")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
