"""What the commands print for people: rich tables and one-line notes (``--json`` prints the library's
result instead, with ``print_json``). Each function takes a library result and prints it."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..bundle import Bundle
from ..formats import formats
from ..results import plain
from ..report import (COLUMNS, OVERHEAD_COLUMNS, compare_heading, fallback_notes, overhead_cells, row_cells,
                      unstable_notes)

# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


def attention_cell(parity: dict | None) -> str:
    """The worst spatial gate: 'corr 0.9976 IoU 0.864'; '-' without CBAM spatial gates."""
    if not parity or parity.get("min_correlation") is None:
        return "-" if not parity or not parity.get("skipped") else "skipped"
    return f"corr {parity['min_correlation']:.4f} IoU {parity['min_top_iou']:.3f}"


def ran_cell(row: dict) -> str:
    """What the runtime says the artifact computed in: 'fp32'; 'int8 + bf16' for an INT8 artifact
    whose float operations ran in bf16; 'not reported' where the runtime does not say."""
    ran = row.get("computed_in")
    if row.get("precision") == "int8":
        return f"int8 + {ran}" if ran else "int8"
    return ran or "not reported"


def top1_cell(metrics: dict, decimals: int = 1) -> str:
    """Top-1 agreement as a percentage; a detector's INT8: the reference's detections it kept; '-' for
    models without a logits output (no top-1 there)."""
    value = metrics.get("top1_agreement")
    if value is None and "kept" in metrics:
        return f"kept {metrics['kept']}/{metrics['reference_detections']}"
    return "-" if value is None else f"{value * 100:.{decimals}f}%"


def number_cell(value, spec: str) -> str:
    """A figure, or '-' where there is none (a detector's INT8 has no cosine)."""
    return "-" if value is None else format(value, spec)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(plain(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def zoo(rows: list[dict], input_size: int) -> None:
    table = Table(title=f"cbam-deploy model zoo (GFLOPs = multiply-accumulates at {input_size}x{input_size})")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], f"{row['parameters']:,}", f"{row['gflops']:.3f}", row["description"])
    out.print(table)
    out.print("Any zoo model also takes --stem cifar (3x3 stem, no max pool). Your own network: --model file.py:factory")


def export(result: dict) -> None:
    model = result["model"]
    init = model.get("init") or {}
    weights = model["weights"]["path"] if model["weights"] else \
        f"the model's own (state sha256 {init['state_sha256'][:12]})" if init.get("weights") else "none (random init)"
    # one line each, never wrapped inside a path or a shape (a terminal folds what is longer)
    out.print(f"model   {escape(model['name'])}  classes={model['num_classes']}  params={model['parameters']:,}  "
              f"weights={escape(str(weights))}", soft_wrap=True)
    out.print(escape(f"bundle  {result['bundle']}  ({result['artifacts'][0]['size_bytes'] / 1e6:.1f} MB ONNX, opset "
                     f"{result['export']['opset']}, input {result['export']['input_shape']}, export "
                     f"{result['export']['export_seconds']:.1f}s)"), soft_wrap=True)
    gates = model.get("gates") or {}
    if gates:
        kinds = ", ".join(f"{n} {kind}" for kind, n in gates.get("kinds", {}).items() if n)
        out.print(f"gates   {kinds + ' (found by structure)' if kinds else gates.get('error') or gates.get('note')}")
    rewrites = result["export"].get("cbam_opt") or {}
    if rewrites.get("mode") == "on":
        done = ", ".join(f"{r['name']} ({r['modules']} gates{', exact' if r['exact'] else ''})" for r in rewrites["rewrites"])
        out.print(f"cbam-opt {done or rewrites.get('note', 'nothing to rewrite')}  (--cbam-opt off exports as written)")
    parity = result["parity"]
    if parity.get("passed") is None:
        out.print("parity  skipped (--no-parity)")
        return
    table = Table(title="parity: onnxruntime CPU vs PyTorch eager (fp32)")
    for column in ("batch", "HxW", "n", "max|err|", "mean|err|", "cos min", "top-1", "result"):
        table.add_column(column, justify="right")
    for case in parity["cases"]:
        table.add_row(
            str(case["batch"]), f"{case['height']}x{case['width']}", str(case["samples"]),
            f"{case.get('max_abs_err', float('nan')):.1e}", f"{case.get('mean_abs_err', float('nan')):.1e}",
            f"{case.get('cosine_min', float('nan')):.6f}", top1_cell(case, 0),
            "[green]pass[/]" if case["passed"] else f"[red]FAIL[/] {escape(case.get('reason', ''))}",
        )
    out.print(table)
    for note in model["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")


def summary(summary: dict) -> None:
    table = Table(title=f"bundle {summary['bundle']}: every artifact vs PyTorch eager (batch 1, this machine)")
    for column in ("format", "precision", "artifact", "size", "parity", "latency ms", "speed-up"):
        table.add_column(column, justify="right" if column in ("size", "latency ms", "speed-up") else "left")
    order = {"pytorch": -1, **{name: index for index, name in enumerate(formats())}}
    rows = sorted(summary["rows"], key=lambda r: (order.get(r["format"], 99), ("fp32", "fp16", "int8").index(r["precision"])))
    for row in rows:
        if row.get("skipped") or row.get("failed"):
            table.add_row(row["format"], row["precision"], "-", "-",
                          "[yellow]skipped[/]" if row.get("skipped") else "[red]FAIL[/]", "-", "-")
            continue
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "reference"}[row.get("passed")]
        unsure = " [yellow]?[/]" if row.get("stable") is False else ""  # a disturbed measurement
        latency = f"{row['latency_ms']:.2f}{unsure}" if row.get("latency_ms") else "-"
        speedup = f"{row['speedup']:.2f}x{unsure}" if row.get("speedup") else "-"
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row.get("size_bytes") else "-"
        table.add_row(row["format"], row["precision"], row["artifact"], size, verdict, latency, speedup)
    out.print(table)
    timing = summary.get("timing") or {}
    if timing.get("stable") is False:
        busy = "the machine was busy while these were timed: " if timing.get("busy") else ""
        out.print(f"[yellow]unstable timing:[/] {busy}{escape('; '.join(timing['reasons']))}. The latencies and "
                  f"speed-ups marked ? are not to be quoted; time them again on a quiet machine with "
                  f"'cbam-deploy bench {escape(summary['bundle'])} --wait-quiet 60 --retries 2'")
    for row in rows:
        if row.get("skipped"):
            out.print(f"[yellow]skipped[/] {row['format']} {row['precision']}: {escape(row['skipped'])}")
        elif row.get("failed"):
            out.print(f"[red]failed[/] {row['format']} {row['precision']}: {escape(row['failed'])}")
        elif row.get("note"):  # what the format says of the artifact (layers left generic, delegate partitions)
            out.print(f"{row['artifact']}: {escape(row['note'])}")


def verify(result: dict, runtime: str | None = None) -> None:
    under = f" (runtime {runtime})" if runtime else ""
    table = Table(title=f"verify {result['bundle']}{under} against {result['reference']}")
    for column in ("artifact", "precision", "ran in", "inputs", "max abs err", "cosine", "top-1", "attention", "result"):
        table.add_column(column)
    for row in result["results"]:
        if row.get("skipped"):
            table.add_row(row["artifact"], row["precision"], "-", "-", "-", "-", "-", "-",
                          f"[yellow]skipped[/] {escape(row['skipped'][:50])}")
            continue
        cosine = row.get("cosine_min", row.get("cosine_mean"))
        cosine = float("nan") if cosine is None else cosine
        table.add_row(row["artifact"], row["precision"], ran_cell(row), row.get("inputs", "")[:40],
                      f"{row.get('max_abs_err', 0):.2e}", f"{cosine:.5f}", top1_cell(row),
                      attention_cell(row.get("attention")),
                      "[green]pass[/]" if row["passed"] else f"[red]FAIL[/] {escape(row.get('reason', ''))}")
    out.print(table)
    for row in result["results"]:
        ran, judged = row.get("computed_in"), row.get("judged_by")
        if ran and row["precision"] != "int8" and ran != row["precision"]:
            out.print(f"{row['artifact']}: a {row['precision']} artifact that ran in {ran} (the runtime's own "
                      f"report), judged with the {judged} bounds (the looser of what it stores and what ran)")
        flat = [gate for gate, stage in ((row.get("attention") or {}).get("gates") or {}).items() if stage.get("flat")]
        if flat:
            out.print(f"[dim]{row['artifact']}: judged on cosine alone, their maps or profiles varying less than "
                      f"twice the artifact's error there: {escape(', '.join(flat))}[/]")
        divergence = row.get("first_divergence")
        if divergence:
            out.print(f"[red]{row['artifact']}[/]: first departs at module [bold]{divergence['module']}[/] "
                      f"({divergence['type']}, ONNX node {divergence['onnx_node']}): max abs error "
                      f"{divergence['max_abs_err']:.3g} > {divergence['bound']:.3g}")


def bench(result: dict, title: str) -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("runner", "runtime", "precision", "stable") else "right",
                         overflow="fold" if column == "runner" else "ellipsis")  # ARTIFACT@RUNTIME in full
    for r in result["results"]:
        table.add_row(*(escape(c) for c in row_cells(r)))
    out.print(table)
    if result.get("overhead"):
        table = Table(title=f"attention overhead: {result['model']} / {result['overhead']['plain']}, same engine, same rounds")
        for column in OVERHEAD_COLUMNS:
            table.add_column(column, justify="left" if column == "engine" else "right")
        for row in result["overhead"]["rows"]:
            table.add_row(*overhead_cells(row))
        out.print(table)
    if result.get("cbam_opt_compare"):
        title, columns = compare_heading(result)
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="left" if column == "engine" else "right")
        for row in result["cbam_opt_compare"]["rows"]:
            table.add_row(*overhead_cells(row))
        out.print(table)
    for r in result["results"]:
        if r.get("made_by"):
            out.print(f"[dim]{escape(r['runner'])}: {escape(r['made_by'])}[/]")
    out.print("machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    for note in fallback_notes(result["results"]):
        out.print(f"[yellow]fallback[/] {escape(note)}")
    for note in unstable_notes(result["results"]):
        out.print(f"[yellow]unstable[/] {escape(note)}")
    if not result["stable"]:
        out.print("[yellow]unstable measurement:[/] the rows marked NO are not to be quoted; try --wait-quiet 60 "
                  "--retries 2 on a quieter machine, or --strict to make this an error")
    for skip in result["skipped"]:
        out.print(f"[yellow]skipped[/] {skip['artifact']}: {escape(skip['reason'])}")


def profile(result: dict) -> None:
    for row in result["results"]:
        table = Table(title=f"{row['artifact']} ({row['tool']}): {row['total_ms']:.3f} ms per inference in kernels, "
                            f"batch {result['batch']}")
        for column in ("category", "ms", "share"):
            table.add_column(column, justify="left" if column == "category" else "right")
        for category in row["categories"]:
            table.add_row(category["category"], f"{category['ms']:.3f}", f"{category['share'] * 100:.1f}%")
        out.print(table)
        out.print("slowest ops: " + ", ".join(f"{o['op']} ({o['category']}) {o['ms']:.3f} ms" for o in row["top_ops"][:5]))


def quantize(result: dict) -> None:
    calib = result["calibration"]
    out.print(f"calibration  {calib['source']} ({calib['kind']}): {calib['samples']} samples, "
              f"{calib['skipped_unreadable']} unreadable skipped")
    for warning in calib.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(warning)}")
    table = Table(title="INT8 artifacts vs PyTorch FP32")
    for column in ("artifact", "recipe", "method", "gates", "size", "agreement", "cosine", "cache", "result"):
        table.add_column(column)
    for artifact in result["artifacts"]:
        quant, parity = artifact["quantization"], artifact["parity"]
        table.add_row(
            artifact["name"], quant["recipe"], quant["method"], quant["gates"], f"{artifact['size_bytes'] / 1e6:.1f} MB",
            top1_cell(parity), number_cell(parity.get("cosine_mean"), ".4f"),
            "hit" if quant["calibration_cache"].get("hit") else "-",
            "[green]pass[/]" if parity["passed"] else "[red]FAIL[/]",
        )
    out.print(table)


def evaluation(result: dict) -> None:
    """eval's table: top-1/top-5 for a classifier, mAP for a detector, one row per artifact."""
    title = f"{result['images']} images, {result['classes']} classes ({result['data']})"
    if result.get("task") == "detection":
        title += f": {result['metric']}"
        metrics = ("mAP50", "mAP50-95", "kept w/ fp32")

        def cells(row: dict) -> tuple:
            kept = row.get("detections")
            return (f"{row['map50']:.4f}", f"{row['map50_95']:.4f}",
                    f"{kept['kept']}/{kept['reference_detections']}" if kept else "-")
    else:
        metrics = ("top-1", "top-5", "agree w/ fp32")

        def cells(row: dict) -> tuple:
            return (f"{row['top1'] * 100:.2f}%", f"{row['top5'] * 100:.2f}%", f"{row.get('agreement', 1) * 100:.2f}%")
    table = Table(title=title)
    for column in ("artifact", "format", "precision", *metrics, "seconds"):
        table.add_column(column, justify="right" if column not in ("artifact", "format") else "left")
    for row in result["results"]:
        measured = ("-", "-", "-", f"skipped: {row['skipped']}") if "skipped" in row else (
            *cells(row), f"{row['seconds']:.2f}")
        table.add_row(row["artifact"], row["format"], row["precision"], *measured)
    out.print(table)


def triton(written: list[dict], output: str, triton_release: str | None = None) -> None:
    for entry in written:
        out.print(f"{entry['model']}: {entry['format']} artifact {entry['artifact']} -> {entry['path']}")
        for warning in entry.get("warnings", []):
            out.print(f"[yellow]warning:[/] {escape(warning)}")
    out.print(f"start Triton: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/{output}:/models "
              f"nvcr.io/nvidia/tritonserver:{triton_release or '<yy.mm>'}-py3 tritonserver --model-repository=/models")


def explain(result: dict) -> None:
    if result["artifacts"] and result["gates"]:
        rows = result["artifacts"]
        table = Table(title=f"attention parity vs {result['reference']}: correlation / top-10% IoU per spatial gate")
        table.add_column("gate")
        for name in rows:
            table.add_column(name, justify="right")
        for gate in result["gates"]:
            cells = [rows[n]["attention"]["gates"][gate] for n in rows]
            table.add_row(gate, *(f"{c['correlation']:.4f} / {c['top_iou']:.3f}" if c.get("found") else "[red]missing[/]"
                                  for c in cells))
        if result["classifier"]:
            table.add_row("top-1", *("agrees" if rows[n]["top1_agrees"] else "[red]differs[/]" for n in rows))
        table.add_row("attention", *("[green]pass[/]" if rows[n]["attention"]["passed"] else "[red]FAIL[/]" for n in rows))
        out.print(table)
    if result["gradcam"]:
        out.print(f"Grad-CAM: class {result['gradcam']['target']} on {result['gradcam']['layer']}")
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    for name, reason in result["skipped"].items():
        out.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}", soft_wrap=True)
    out.print(f"page: {escape(result['page'])} ({len(result['files'])} files in {escape(result['output_dir'])})",
              soft_wrap=True)


def info(opened: Bundle, integrity: dict[str, str], stack: dict | None) -> None:
    model = opened.model
    params = f"{model.parameters:,}" if isinstance(model.parameters, int) else "?"
    out.print(f"[bold]{escape(model.name)}[/]  classes={model.num_classes}  params={params}  "
              f"input {opened.input.shape}")
    table = Table()
    for column in ("artifact", "format", "precision", "size", "sha256", "parity"):
        table.add_column(column)
    for artifact in opened.artifacts:
        state = integrity[artifact.name]
        shown = "ok" if state == "ok" else f"[red]{state}[/]"
        passed = (artifact.parity or {}).get("passed")
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "not run"}[passed]
        size = f"{artifact.size_bytes / 1e6:.1f} MB" if artifact.size_bytes is not None else "-"
        table.add_row(artifact.name, artifact.format, artifact.precision, size, shown, verdict)
    out.print(table)
    if stack:
        out.print("image stack: " + ", ".join(f"{k}={v}" for k, v in stack.items()))
