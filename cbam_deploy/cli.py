"""The ``cbam-deploy`` command line: one thin function per command over the library.

Each command parses options, calls ``cbam_deploy``, prints. A ``CbamDeployError`` becomes one red
line on stderr and a non-zero exit, never a traceback. ``--json`` prints one JSON document on
stdout and nothing else there.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .build import comma_list
from .errors import CbamDeployError

app = typer.Typer(
    name="cbam-deploy",
    help="Ship CBAM networks to edge devices: export, quantize, build engines, check parity and latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


def _handle_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CbamDeployError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]: nothing half-written was kept")
            raise typer.Exit(130) from None

    return wrapper


def _parse_batch(value: str) -> int | None:
    if value.lower() == "dynamic":
        return None
    try:
        number = int(value)
    except ValueError:
        raise CbamDeployError(f"--batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if number < 1:
        raise CbamDeployError(f"--batch must be 'dynamic' or a positive integer, got {value!r}")
    return number


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command("models")
@_handle_errors
def models_command(
    input_size: Annotated[int, typer.Option(help="Input side for the GFLOPs column.")] = 224,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the model zoo: name, parameters, GFLOPs (computed)."""
    from .models import zoo_table

    rows = zoo_table(input_size)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"cbam-deploy model zoo (GFLOPs = multiply-accumulates at {input_size}x{input_size})")
    table.add_column("model")
    table.add_column("params", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], f"{row['parameters']:,}", f"{row['gflops']:.3f}", row["description"])
    out.print(table)
    out.print("Any zoo model also takes --stem cifar (3x3 stem, no max pool). Your own network: --model file.py:factory")


@app.command("export")
@_handle_errors
def export_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name (see 'cbam-deploy models') or path/to/file.py:factory.")],
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Checkpoint: official attention-module format or a state dict.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier size; inferred from --weights when left out (else 1000).")] = None,
    stem: Annotated[str, typer.Option(help="imagenet (7x7/2 + max pool) or cifar (3x3, no max pool).")] = "imagenet",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Bundle folder (default bundles/<model>).")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default 224; 32 with --stem cifar).")] = None,
    batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size.")] = "dynamic",
    dynamic_hw: Annotated[bool, typer.Option("--dynamic-hw", help="Make height and width dynamic too.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 parses on TensorRT 8.5 and 10.x).")] = 17,
    exporter: Annotated[str, typer.Option(help="torchscript (default, opset 13-20) or dynamo (opset 18+).")] = "torchscript",
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="Simplify the graph with onnxslim.")] = True,
    parity: Annotated[bool, typer.Option("--parity/--no-parity", help="Check onnxruntime against PyTorch after export.")] = True,
    force: Annotated[bool, typer.Option(help="Replace a bundle of another model in the output folder.")] = False,
    formats: Annotated[str, typer.Option("--format", help="Comma list of onnx, openvino, tensorrt.")] = "onnx",
    precisions: Annotated[str, typer.Option("--precision", help="Comma list of fp32, fp16, int8.")] = "fp32",
    gates: Annotated[Optional[str], typer.Option(help="INT8 gate policy: int8 or fp (default per target).")] = None,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to tune for.")] = 1,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 8,
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace limit (MiB).")] = 2048,
    timing_cache: Annotated[Optional[str], typer.Option(help="TensorRT timing cache file, reused across builds.")] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Jetson: build for this DLA core, GPU fallback on.")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also quantize to INT8 (needs --calib-data).")] = False,
    calib_data: Annotated[Optional[str], typer.Option(help="With --int8: image folder, .npy/.npz, or 'synthetic'.")] = None,
    target: Annotated[str, typer.Option(help="With --int8: comma list of ort-cpu, tensorrt, openvino.")] = "ort-cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Export a model to an ONNX bundle and check its parity with PyTorch."""
    if int8 and not calib_data:
        raise CbamDeployError("--int8 needs --calib-data DIR (images), a .npy/.npz file, or 'synthetic'")
    from .pipeline import ExportRequest, export_bundle

    request = ExportRequest(
        model=model, weights=weights, num_classes=num_classes, stem=stem, output=output, input_size=input_size,
        batch=_parse_batch(batch), dynamic_hw=dynamic_hw, opset=opset, exporter=exporter, simplify=simplify,
        parity=parity, force=force,
    )
    if not as_json:
        err.print(f"exporting [bold]{model}[/] ...")
    if int8 and (formats != "onnx" or precisions != "fp32") and "int8" not in precisions:
        precisions += ",int8"
    result = export_bundle(request)
    if formats != "onnx" or precisions != "fp32":
        from .build import TensorRTOptions
        from .pipeline import build_verify_bench

        trt = TensorRTOptions(min_batch, opt_batch, max_batch, workspace_mb, timing_cache, dla_core)
        summary = build_verify_bench(result["bundle"], formats, precisions, calib_data, gates, trt)
        if as_json:
            _print_json({**result, "summary": summary})
        else:
            _print_export(result)
            _print_summary(summary)
        if result["passed"] is False or summary["passed"] is False:
            err.print("[bold red]error:[/] an artifact failed verification (recorded in the manifest)")
            raise typer.Exit(3)
        return
    if int8:
        from .quantize import quantize_bundle

        result["int8"] = quantize_bundle(result["bundle"], comma_list(target, "target"), calib_data, gates=gates)
    if as_json:
        _print_json(result)
    else:
        _print_export(result)
        if int8:
            _print_quantize(result["int8"])
    if result["passed"] is False:
        err.print("[bold red]error:[/] parity check failed: the ONNX model does not match PyTorch (recorded in the manifest)")
        raise typer.Exit(3)
    if int8 and not result["int8"]["passed"]:
        err.print("[bold red]error:[/] an INT8 artifact disagrees with PyTorch beyond tolerance (recorded in the manifest)")
        raise typer.Exit(3)


def _print_export(result: dict) -> None:
    model = result["model"]
    weights = model["weights"]["path"] if model["weights"] else "none (random init)"
    out.print(f"model   {model['name']}  classes={model['num_classes']}  params={model['parameters']:,}  weights={weights}")
    out.print(f"bundle  {result['bundle']}  ({result['artifacts'][0]['size_bytes'] / 1e6:.1f} MB ONNX, opset "
              f"{result['export']['opset']}, input {result['export']['input_shape']}, export {result['export']['export_seconds']:.1f}s)")
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
            f"{case.get('cosine_min', float('nan')):.6f}", f"{case.get('top1_agreement', 0) * 100:.0f}%",
            "[green]pass[/]" if case["passed"] else f"[red]FAIL[/] {escape(case.get('reason', ''))}",
        )
    out.print(table)
    for note in model["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")


def _print_summary(summary: dict) -> None:
    table = Table(title=f"bundle {summary['bundle']}: every artifact vs PyTorch eager (batch 1, this machine)")
    for column in ("format", "precision", "artifact", "size", "parity", "latency ms", "speed-up"):
        table.add_column(column, justify="right" if column in ("size", "latency ms", "speed-up") else "left")
    order = {"pytorch": 0, "onnx": 1, "openvino": 2, "tensorrt": 3}
    rows = sorted(summary["rows"], key=lambda r: (order.get(r["format"], 9), ("fp32", "fp16", "int8").index(r["precision"])))
    for row in rows:
        if row.get("skipped"):
            table.add_row(row["format"], row["precision"], "-", "-", "[yellow]skipped[/]", "-", "-")
            continue
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "reference"}[row.get("passed")]
        latency = f"{row['latency_ms']:.2f}" if row.get("latency_ms") else "-"
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        size = f"{row['size_bytes'] / 1e6:.1f} MB" if row.get("size_bytes") else "-"
        table.add_row(row["format"], row["precision"], row["artifact"], size, verdict, latency, speedup)
    out.print(table)
    for row in rows:
        if row.get("skipped"):
            out.print(f"[yellow]skipped[/] {row['format']} {row['precision']}: {escape(row['skipped'])}")


@app.command("verify")
@_handle_errors
def verify_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    data: Annotated[Optional[str], typer.Option(help="Also compare on these images (folder) or arrays.")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default: all).")] = None,
    samples: Annotated[int, typer.Option(help="Images for the --data and INT8 checks.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Check every artifact against PyTorch FP32; on an ONNX failure, name the first layer that departs."""
    from .verify import verify_bundle

    result = verify_bundle(bundle, data, comma_list(artifact, "artifact") if artifact else None, samples)
    if as_json:
        _print_json(result)
    else:
        table = Table(title=f"verify {result['bundle']} against {result['reference']}")
        for column in ("artifact", "precision", "inputs", "max abs err", "cosine", "top-1", "result"):
            table.add_column(column)
        for row in result["results"]:
            if row.get("skipped"):
                table.add_row(row["artifact"], row["precision"], "-", "-", "-", "-", f"[yellow]skipped[/] {escape(row['skipped'][:50])}")
                continue
            cosine = row.get("cosine_min", row.get("cosine_mean"))
            table.add_row(row["artifact"], row["precision"], row.get("inputs", "")[:40], f"{row.get('max_abs_err', 0):.2e}",
                          f"{cosine:.5f}", f"{row.get('top1_agreement', 0) * 100:.1f}%",
                          "[green]pass[/]" if row["passed"] else f"[red]FAIL[/] {escape(row.get('reason', ''))}")
        out.print(table)
        for row in result["results"]:
            divergence = row.get("first_divergence")
            if divergence:
                out.print(f"[red]{row['artifact']}[/]: first departs at module [bold]{divergence['module']}[/] "
                          f"({divergence['type']}, ONNX node {divergence['onnx_node']}): max abs error "
                          f"{divergence['max_abs_err']:.3g} > {divergence['bound']:.3g}")
    if result["passed"] is False:
        err.print("[bold red]error:[/] verification failed (recorded in the manifest)")
        raise typer.Exit(3)


@app.command("bench")
@_handle_errors
def bench_command(
    bundle: Annotated[Optional[str], typer.Argument(help="Bundle folder (or use --model).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Export this zoo model to a temporary bundle and bench it.")] = None,
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes, e.g. 1,8,32.")] = "1",
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default: all).")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Interleaved rounds (default: enough for --min-seconds).")] = None,
    min_seconds: Annotated[float, typer.Option(help="Minimum measuring time per batch size.")] = 5.0,
    warmup: Annotated[int, typer.Option(help="Warm-up runs per runner.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Threads for every backend (default: theirs).")] = None,
    markdown: Annotated[Optional[str], typer.Option(help="Write a markdown report here.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG plot (latency vs batch) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Latency and throughput of every artifact next to PyTorch eager, measured in the same run."""
    import tempfile

    from .bench import bench_bundle, markdown_report, plot_latency

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise CbamDeployError(f"--batch takes a comma list of integers, got {batch!r}") from None
    if not batches or min(batches) < 1:
        raise CbamDeployError(f"--batch takes positive integers, got {batch!r}")
    if (bundle is None) == (model is None):
        raise CbamDeployError("give a BUNDLE folder or --model NAME (one of them)")
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        if model:
            from .pipeline import ExportRequest, export_bundle

            bundle = export_bundle(ExportRequest(model=model, output=str(tmp), parity=False))["bundle"]
        result = bench_bundle(bundle, batches, comma_list(artifact, "artifact") if artifact else None, iters, min_seconds, warmup, threads)
    title = f"{result['model']}: latency vs PyTorch eager"
    if markdown:
        from .fsutil import write_bytes_atomic

        write_bytes_atomic(markdown, markdown_report(result["results"], result["machine"], title).encode())
    if plot:
        plot_latency(result["results"], plot, title)
    if as_json:
        _print_json(result)
        return
    table = Table(title=title)
    for column in ("runner", "backend", "precision", "batch", "mean ms", "p50", "p90", "p99", "img/s", "x PyTorch"):
        table.add_column(column, justify="left" if column in ("runner", "backend", "precision") else "right")
    for r in result["results"]:
        table.add_row(r["runner"], r["backend"], r.get("inference_precision", r["precision"]), str(r["batch"]),
                      f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['throughput_ips']:.1f}", f"{r.get('ratio_to_pytorch', float('nan')):.2f}")
    out.print(table)
    out.print("machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    for skip in result["skipped"]:
        out.print(f"[yellow]skipped[/] {skip['artifact']}: {escape(skip['reason'])}")


@app.command("quantize")
@_handle_errors
def quantize_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (from 'cbam-deploy export').")],
    target: Annotated[str, typer.Option(help="Comma list of ort-cpu, tensorrt, openvino.")] = "ort-cpu",
    calib_data: Annotated[str, typer.Option(help="Image folder (recursive), .npy/.npz, or 'synthetic' (not for production).")] = ...,
    calib_size: Annotated[int, typer.Option(help="Calibration samples (seeded choice).")] = 128,
    calib_batch: Annotated[int, typer.Option(help="Calibration batch size.")] = 8,
    method: Annotated[Optional[str], typer.Option(help="minmax, entropy or percentile (default: per target, see README).")] = None,
    gates: Annotated[Optional[str], typer.Option(help="int8: quantize the attention gates too; fp: keep them in float.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse cached calibration for the same model, data and recipe.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration samples.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Quantize a bundle's FP32 ONNX to INT8 for each target and measure agreement with PyTorch."""
    from .quantize import quantize_bundle

    result = quantize_bundle(bundle, comma_list(target, "target"), calib_data, calib_size, calib_batch, method, gates, cache, seed)
    if as_json:
        _print_json(result)
    else:
        _print_quantize(result)
    if not result["passed"]:
        err.print("[bold red]error:[/] an INT8 artifact disagrees with PyTorch beyond tolerance (recorded in the manifest)")
        raise typer.Exit(3)


def _print_quantize(result: dict) -> None:
    calib = result["calibration"]
    out.print(f"calibration  {calib['source']} ({calib['kind']}): {calib['samples']} samples, "
              f"{calib['skipped_unreadable']} unreadable skipped")
    for warning in calib.get("warnings", []):
        out.print(f"[yellow]warning:[/] {escape(warning)}")
    table = Table(title="INT8 artifacts vs PyTorch FP32")
    for column in ("artifact", "recipe", "method", "gates", "size", "top-1 agree", "cosine", "cache", "result"):
        table.add_column(column)
    for artifact in result["artifacts"]:
        quant, parity = artifact["quantization"], artifact["parity"]
        table.add_row(
            artifact["name"], quant["recipe"], quant["method"], quant["gates"], f"{artifact['size_bytes'] / 1e6:.1f} MB",
            f"{parity['top1_agreement'] * 100:.1f}%", f"{parity['cosine_mean']:.4f}",
            "hit" if quant["calibration_cache"].get("hit") else "-",
            "[green]pass[/]" if parity["passed"] else "[red]FAIL[/]",
        )
    out.print(table)


@app.command("eval")
@_handle_errors
def eval_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    data: Annotated[str, typer.Option(help="ImageFolder: one sub-folder per class, sorted names = class indices.")] = ...,
    artifact: Annotated[Optional[str], typer.Option(help="One artifact (default: all of the bundle).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 32,
    limit: Annotated[Optional[int], typer.Option(help="Use at most this many images.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Top-1, top-5 and agreement with PyTorch FP32 on labelled images, for each artifact."""
    from .evaluate import evaluate_bundle

    result = evaluate_bundle(bundle, data, artifact, batch, limit)
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"{result['images']} images, {result['classes']} classes ({result['data']})")
    for column in ("artifact", "format", "precision", "top-1", "top-5", "agree w/ fp32", "seconds"):
        table.add_column(column, justify="right" if column not in ("artifact", "format") else "left")
    for row in result["results"]:
        if "skipped" in row:
            table.add_row(row["artifact"], row["format"], row["precision"], "-", "-", "-", f"skipped: {row['skipped']}")
            continue
        table.add_row(row["artifact"], row["format"], row["precision"], f"{row['top1'] * 100:.2f}%",
                      f"{row['top5'] * 100:.2f}%", f"{row.get('agreement', 1) * 100:.2f}%", f"{row['seconds']:.2f}")
    out.print(table)


@app.command("serve")
@_handle_errors
def serve_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    artifact: Annotated[Optional[str], typer.Option(help="Artifact to serve (default: the first, onnx-fp32).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless told otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    name: Annotated[Optional[str], typer.Option(help="Model name in the API (default: the bundle's model).")] = None,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: most samples per run (1 = off).")] = 8,
    batch_timeout_ms: Annotated[float, typer.Option(help="Dynamic batching: wait this long for more requests.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Larger request bodies get 413.")] = 32.0,
    labels: Annotated[Optional[str], typer.Option(help="Class names, one per line, for /v1/classify.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Inference threads.")] = None,
) -> None:
    """Serve an artifact over the Open Inference Protocol (KServe v2), plus /v1/classify and /metrics."""
    from .serve.app import ServeConfig, serve

    config = ServeConfig(bundle, artifact, name, max_batch, batch_timeout_ms, max_body_mb, labels, threads)
    err.print(f"serving {bundle} on http://{host}:{port} (Open Inference Protocol: /v2/models/...; Ctrl-C stops)")
    serve(config, host, port)


@app.command("triton")
@_handle_errors
def triton_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Model repository folder.")] = ...,
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default onnx-fp32).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the bundle's model).")] = None,
    max_batch: Annotated[int, typer.Option(help="max_batch_size.")] = 8,
    instances: Annotated[int, typer.Option(help="instance_group count.")] = 1,
    delay_us: Annotated[int, typer.Option(help="dynamic_batching max_queue_delay_microseconds.")] = 5000,
    kind: Annotated[Optional[str], typer.Option(help="KIND_CPU or KIND_GPU (default: by backend).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Write a Triton Inference Server model repository for the bundle's artifacts."""
    from .serve.triton import write_repository

    written = write_repository(bundle, output, comma_list(artifact, "artifact") if artifact else None, name, max_batch, instances, delay_us, kind)
    if as_json:
        _print_json(written)
        return
    for entry in written:
        out.print(f"{entry['model']}: {entry['format']} artifact {entry['artifact']} -> {entry['path']}")
    out.print(f"start Triton: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/{output}:/models "
              "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")


@app.command("info")
@_handle_errors
def info_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a bundle's manifest: model, input, artifacts and their parity."""
    from .bundle import artifact_path, read_manifest

    manifest = read_manifest(bundle)
    if as_json:
        _print_json(manifest)
        return
    model = manifest["model"]
    out.print(f"[bold]{model['name']}[/]  classes={model['num_classes']}  params={model['parameters']:,}  "
              f"input {manifest['input']['shape']}")
    table = Table()
    for column in ("artifact", "format", "precision", "size", "sha256", "parity"):
        table.add_column(column)
    for artifact in manifest["artifacts"]:
        try:
            artifact_path(bundle, manifest, artifact["name"])
            integrity = "ok"
        except CbamDeployError:
            integrity = "[red]changed/missing[/]"
        passed = artifact.get("parity", {}).get("passed")
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "not run"}[passed]
        table.add_row(artifact["name"], artifact["format"], artifact["precision"],
                      f"{artifact.get('size_bytes', 0) / 1e6:.1f} MB", integrity, verdict)
    out.print(table)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
