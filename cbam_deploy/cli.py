"""The ``cbam-deploy`` command line: one thin function per command over the library.

Each command parses options, calls ``cbam_deploy``, prints. A ``CbamDeployError`` becomes one red
line on stderr and a non-zero exit, never a traceback. ``--json`` prints one JSON document on
stdout and nothing else there.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from . import interrupts
from .backends import formats as backend_formats
from .errors import CbamDeployError
from .runtimes import runtime_help

_RUNTIME_HELP = ("Runtime that runs the artifacts: " + runtime_help() + ". Default: the best available here (for ONNX "
                 "ort-tensorrt > ort-cuda > ort-openvino > ort-cpu).")

# Piped output (CI logs, files) gets 120 columns rather than rich's 80, so tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)
# typer vendors click; its ClickException is found through a public exception's class hierarchy
_CLICK_EXCEPTION = next((c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"), typer.BadParameter)


class _OneLineUsageErrors(TyperGroup):
    """Command-line parse errors (a missing option, 'abc' for an integer, an unknown flag) are user
    errors like any other: one 'error:' line with the help hint, exit code 2, not a framed box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_EXCEPTION as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare 'cbam-deploy': the help, as usual
                if exc.format_message().strip():  # typer's rich help has already been printed
                    exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            err.print(f"[bold red]error:[/] {escape(_one_line(exc.format_message()))}{hint}", soft_wrap=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if interrupts.interrupted():
                _say_interrupted()
                sys.exit(interrupts.EXIT_CODE)
            err.print("[bold red]error:[/] aborted", soft_wrap=True)
            sys.exit(1)
        if interrupts.interrupted():  # typer turns a Ctrl-C while parsing into a silent exit code 130
            _say_interrupted()
            sys.exit(interrupts.EXIT_CODE)
        # without standalone mode, typer hands back the exit code of a typer.Exit (None on success)
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


app = typer.Typer(
    name="cbam-deploy",
    help="Ship CBAM networks to edge devices: export, quantize, build engines, check parity and latency.",
    cls=_OneLineUsageErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _handle_errors(func):
    """A ``CbamDeployError`` becomes one red line; Ctrl-C becomes one line and exit 130, also when a
    library swallowed it or turned it into another exception (``interrupts``)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            result = func(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()
        except CbamDeployError as exc:
            if interrupts.interrupted():
                _interrupted()
            err.print(f"[bold red]error:[/] {escape(_one_line(str(exc)))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except BaseException:
            if interrupts.interrupted():
                _interrupted()
            raise
        if interrupts.interrupted():  # swallowed by a library: still an interrupted run
            _interrupted()
        return result

    return wrapper


def _interrupted():
    _say_interrupted()
    raise typer.Exit(interrupts.EXIT_CODE) from None


def _say_interrupted() -> None:
    if interrupts.first_to_say():
        err.print(f"[red]interrupted[/]{escape(interrupts.MESSAGE[len('interrupted'):])}", soft_wrap=True)


def _one_line(message: str) -> str:
    """An error is one line on stderr, whatever text (a user's exception, a library's) it carries."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"


def _parse_batch(value: str) -> int | None:
    from .options import parse_batch

    return parse_batch(value)


def _attention(parity: dict | None) -> str:
    """The worst spatial gate: 'corr 0.9976 IoU 0.864'; '-' without CBAM spatial gates."""
    if not parity or parity.get("min_correlation") is None:
        return "-" if not parity or not parity.get("skipped") else "skipped"
    return f"corr {parity['min_correlation']:.4f} IoU {parity['min_top_iou']:.3f}"


def _top1(metrics: dict, decimals: int = 1) -> str:
    """Top-1 agreement as a percentage; '-' for models without a logits output (no top-1 there)."""
    value = metrics.get("top1_agreement")
    return "-" if value is None else f"{value * 100:.{decimals}f}%"


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


_TrustModel = Annotated[Optional[str], typer.Option(
    "--model", help="A factory-made bundle: its factory again (FILE.py:FACTORY), so that its code may run to rebuild the "
                    "PyTorch reference; the file's sha256 must match the one recorded at export.")]
_TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="Run the factory file the bundle's manifest names (only for a bundle you trust: it is Python).")]


def _trust(model: str | None, trust_code: bool):
    """The code the user lets a command run (``models.CodeTrust``); a bundle's own code never runs by itself."""
    from .models import CodeTrust

    return CodeTrust(factory=model, trust_bundle=trust_code)


def _note_untrusted(bundle: str, trust) -> None:
    """One line when the bundle's PyTorch model will not be rebuilt because its code is not trusted."""
    from .runners import untrusted_code

    why = untrusted_code(bundle, trust)
    if why:
        err.print(f"[yellow]note:[/] no PyTorch reference: {escape(why)}", soft_wrap=True)


@app.command("models")
@_handle_errors
def models_command(
    input_size: Annotated[int, typer.Option(help="Input side for the GFLOPs column.")] = 224,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the model zoo: name, parameters, GFLOPs (computed)."""
    from .options import check_input_size

    check_input_size(input_size, "resnet18", "imagenet")
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
    formats: Annotated[str, typer.Option("--format", help=f"Comma list of {', '.join(backend_formats())} "
                                                          "(the backend table).")] = "onnx",
    precisions: Annotated[str, typer.Option("--precision", help="Comma list of fp32, fp16, int8.")] = "fp32",
    gates: Annotated[Optional[str], typer.Option(help="INT8 gate policy: int8 or fp (default per target).")] = None,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to tune for.")] = 1,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 8,
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace limit (MiB).")] = 2048,
    timing_cache: Annotated[Optional[str], typer.Option(help="TensorRT timing cache file, reused across builds.")] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Jetson: build for this DLA core, GPU fallback on.")] = None,
    outputs: Annotated[str, typer.Option(help="Zoo models: logits (the classifier) or features (the backbone's stage "
                                               "outputs C2..C5, for detectors and FPNs).")] = "logits",
    output_kind: Annotated[Optional[list[str]], typer.Option(
        "--output-kind", help="NAME=KIND, repeatable: how parity judges that output. KIND: logits (top-1 too), dense "
                              "(cosine and bounds: embeddings, boxes, maps) or other (bounds). Default: logits for a "
                              "2-D (N, C) output, dense for 3-D and up.")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also quantize to INT8 (needs --calib-data).")] = False,
    calib_data: Annotated[Optional[str], typer.Option(help="With --int8: image folder, .npy/.npz, or 'synthetic'.")] = None,
    target: Annotated[str, typer.Option(help="With --int8: comma list of ort-cpu, tensorrt, openvino.")] = "ort-cpu",
    cbam_opt: Annotated[str, typer.Option(help="on: CBAM rewrites for speed (exact ones checked by the parity run; "
                                               "recorded in the manifest); off: export the model as written.")] = "on",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Export a model to an ONNX bundle and check its parity with PyTorch."""
    from .options import validate_export_options

    checked = validate_export_options(  # every option, before anything is built or written
        model, weights, num_classes, stem, output, input_size, batch, opset, exporter, formats, precisions, gates,
        min_batch, opt_batch, max_batch, workspace_mb, timing_cache, dla_core, int8, calib_data, target, output_kind,
        cbam_opt=cbam_opt,
    )
    from .build import TensorRTOptions
    from .pipeline import ExportRequest, plan_export, run_export

    request = ExportRequest(
        model=model, weights=weights, num_classes=num_classes, stem=stem, output=output, input_size=input_size,
        batch=_parse_batch(batch), dynamic_hw=dynamic_hw, opset=opset, exporter=exporter, simplify=simplify,
        parity=parity, force=force, outputs=outputs, output_kinds=checked.output_kinds, cbam_opt=cbam_opt,
    )
    plan = plan_export(formats, precisions, int8, target, calib_data, gates,
                       TensorRTOptions(min_batch, opt_batch, max_batch, workspace_mb, timing_cache, dla_core))
    if not as_json:
        err.print(f"exporting [bold]{model}[/] ...")
    result = run_export(request, plan)
    if as_json:
        _print_json(result)
    else:
        _print_export(result)
        if result.get("int8"):
            _print_quantize(result["int8"])
        if result.get("summary"):
            _print_summary(result["summary"])
    if result["passed"] is False:
        err.print("[bold red]error:[/] parity check failed: the ONNX model does not match PyTorch (recorded in the manifest)")
        raise typer.Exit(3)
    if result.get("int8") and not result["int8"]["passed"]:
        err.print("[bold red]error:[/] an INT8 artifact disagrees with PyTorch beyond tolerance (recorded in the manifest)")
        raise typer.Exit(3)
    if result.get("summary") and result["summary"]["passed"] is False:
        err.print("[bold red]error:[/] an artifact failed verification (recorded in the manifest)")
        raise typer.Exit(3)


def _print_export(result: dict) -> None:
    model = result["model"]
    weights = model["weights"]["path"] if model["weights"] else "none (random init)"
    out.print(f"model   {model['name']}  classes={model['num_classes']}  params={model['parameters']:,}  weights={weights}")
    out.print(f"bundle  {result['bundle']}  ({result['artifacts'][0]['size_bytes'] / 1e6:.1f} MB ONNX, opset "
              f"{result['export']['opset']}, input {result['export']['input_shape']}, export {result['export']['export_seconds']:.1f}s)")
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
            f"{case.get('cosine_min', float('nan')):.6f}", _top1(case, 0),
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
    runtime: Annotated[Optional[str], typer.Option(help=_RUNTIME_HELP + " Artifacts it does not run are skipped.")] = None,
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Check every artifact against PyTorch FP32; on an ONNX failure, name the first layer that departs.

    A factory-made bundle's model is rebuilt only with --model FILE.py:FACTORY (sha256 checked) or
    --trust-code; without them every artifact is 'skipped: no trusted reference', never passed."""
    from .bundle import Bundle
    from .options import check_artifact_names, parse_list, validate_verify_options
    from .verify import verify_bundle

    validate_verify_options(data, samples)
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    check_artifact_names(Bundle.open(bundle), names, bundle)
    result = verify_bundle(bundle, data, names, samples, runtime=runtime, trust=_trust(model, trust_code))
    if as_json:
        _print_json(result)
    else:
        under = f" (runtime {runtime})" if runtime else ""
        table = Table(title=f"verify {result['bundle']}{under} against {result['reference']}")
        for column in ("artifact", "precision", "inputs", "max abs err", "cosine", "top-1", "attention", "result"):
            table.add_column(column)
        for row in result["results"]:
            if row.get("skipped"):
                table.add_row(row["artifact"], row["precision"], "-", "-", "-", "-", "-",
                              f"[yellow]skipped[/] {escape(row['skipped'][:50])}")
                continue
            cosine = row.get("cosine_min", row.get("cosine_mean"))
            table.add_row(row["artifact"], row["precision"], row.get("inputs", "")[:40], f"{row.get('max_abs_err', 0):.2e}",
                          f"{cosine:.5f}", _top1(row), _attention(row.get("attention")),
                          "[green]pass[/]" if row["passed"] else f"[red]FAIL[/] {escape(row.get('reason', ''))}")
        out.print(table)
        for row in result["results"]:
            divergence = row.get("first_divergence")
            if divergence:
                out.print(f"[red]{row['artifact']}[/]: first departs at module [bold]{divergence['module']}[/] "
                          f"({divergence['type']}, ONNX node {divergence['onnx_node']}): max abs error "
                          f"{divergence['max_abs_err']:.3g} > {divergence['bound']:.3g}")
    for row in result["results"]:
        if row.get("fallback"):
            err.print(f"[yellow]warning:[/] {escape(row['artifact'])} under {row.get('runtime')}: {escape(row['fallback'])}",
                      soft_wrap=True)
    for warning in result.get("warnings", []):
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if result["passed"] is False:
        recorded = "not recorded" if result.get("warnings") else "recorded in the manifest"
        err.print(f"[bold red]error:[/] verification failed ({recorded})")
        raise typer.Exit(3)


@app.command("bench")
@_handle_errors
def bench_command(
    bundle: Annotated[Optional[str], typer.Argument(help="Bundle folder (or use --model).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Export this zoo model to a temporary bundle and bench it; with a "
                                                      "factory-made BUNDLE: its factory again (FILE.py:FACTORY, sha256 "
                                                      "checked), so that its code may run.")] = None,
    trust_code: _TrustCode = False,
    batch: Annotated[str, typer.Option(help="Comma list of batch sizes, e.g. 1,8,32.")] = "1",
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default: all).")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Interleaved rounds (default: adaptive, see --min-seconds).")] = None,
    min_seconds: Annotated[float, typer.Option(help="Measure at least this long per batch size, then on until every "
                                                    "ratio's 95% interval is narrow.")] = 5.0,
    max_seconds: Annotated[Optional[float], typer.Option(help="Measuring budget per batch size (default 4x --min-seconds).")] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up runs per runner.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Threads for every backend (default: theirs).")] = None,
    peers: Annotated[bool, typer.Option("--peers", help="Also bench what the engines' own documented paths give "
                                                        "(torch.compile, ov.convert_model, NNCF and ORT defaults).")] = False,
    overhead: Annotated[bool, typer.Option("--overhead", help="Also bench the plain twin (resnet50 for resnet50_cbam): "
                                                              "attention overhead per engine.")] = False,
    cbam_opt_compare: Annotated[bool, typer.Option("--cbam-opt-compare", help="Also bench the same model exported with "
                                                   "the other --cbam-opt mode, built with the same recipes: the "
                                                   "rewrites' speed-up per engine.")] = False,
    calib_data: Annotated[Optional[str], typer.Option(help="Calibration data for INT8 peers and the plain twin (default: "
                                                           "the bundle's INT8 calibration source).")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="Comma list. " + _RUNTIME_HELP + " Each artifact runs under every "
                                                   "listed runtime that runs its format, in the same rounds (rows "
                                                   "ARTIFACT@RUNTIME).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="An unstable measurement is an error (exit 5).")] = False,
    retries: Annotated[int, typer.Option(help="Measure an unstable batch size again, up to this many times.")] = 0,
    wait_quiet: Annotated[float, typer.Option(help="Wait up to this many seconds for other processes to go quiet first.")] = 0.0,
    markdown: Annotated[Optional[str], typer.Option(help="Write a markdown report here.")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG plot (latency vs batch) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Latency and throughput of every artifact next to PyTorch eager, measured in the same run:
    medians with 95% intervals, ratios of medians, and a stability verdict per row."""
    import tempfile

    from .bench import bench_bundle, markdown_report, plot_latency
    from .options import check_artifact_names, check_int, check_model_spec, check_number, parse_list, validate_bench_options

    # every option, and the report paths, before any measuring: a typo must not cost the whole run
    batches = validate_bench_options(batch, iters, min_seconds, warmup, threads, markdown, plot)
    check_int("--retries", retries, 0, 10)
    from .runtimes import parse_runtimes

    parse_runtimes(runtime)  # an unknown or missing runtime before any export or measuring
    if max_seconds is not None:
        check_number("--max-seconds", max_seconds)
    if wait_quiet < 0:
        raise CbamDeployError(f"--wait-quiet must be >= 0 seconds, got {wait_quiet}")
    if bundle is None and model is None:
        raise CbamDeployError("give a BUNDLE folder or --model NAME (one of them)")
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    trust = _trust(model if bundle is not None else None, trust_code)
    if bundle is None:
        check_model_spec(model)
        check_artifact_names({"artifacts": [{"name": "onnx-fp32"}]}, names, f"(exported from --model {model})")
    else:
        from .bundle import Bundle

        check_artifact_names(Bundle.open(bundle), names, bundle)
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        if model:
            from .pipeline import ExportRequest, export_bundle

            bundle = export_bundle(ExportRequest(model=model, output=str(tmp), parity=False))["bundle"]
        result = bench_bundle(bundle, batches, names, iters, min_seconds, warmup, threads, max_seconds, strict, retries,
                              wait_quiet, peers, overhead, calib_data, runtime, cbam_opt_compare, trust=trust)
    title = f"{result['model']}: latency vs PyTorch eager"
    try:  # the paths were checked before measuring; a disk that fills up meanwhile is still one line
        if markdown:
            from .fsutil import write_bytes_atomic

            write_bytes_atomic(markdown, markdown_report(result, title).encode())
        if plot:
            plot_latency(result["results"], plot, title)
    except OSError as exc:
        raise CbamDeployError(f"cannot write the report {exc.filename or markdown or plot}: {exc.strerror or exc}") from None
    if as_json:
        _print_json(result)
        return
    _print_bench(result, title)


def _print_bench(result: dict, title: str) -> None:
    from .bench import COLUMNS, OVERHEAD_COLUMNS, compare_heading, overhead_cells, row_cells, unstable_notes

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
    from .bench import fallback_notes

    for note in fallback_notes(result["results"]):
        out.print(f"[yellow]fallback[/] {escape(note)}")
    for note in unstable_notes(result["results"]):
        out.print(f"[yellow]unstable[/] {escape(note)}")
    if not result["stable"]:
        out.print("[yellow]unstable measurement:[/] the rows marked NO are not to be quoted; try --wait-quiet 60 "
                  "--retries 2 on a quieter machine, or --strict to make this an error")
    for skip in result["skipped"]:
        out.print(f"[yellow]skipped[/] {skip['artifact']}: {escape(skip['reason'])}")


@app.command("profile")
@_handle_errors
def profile_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default: every onnx and openvino one).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size (a fixed-batch model uses its own).")] = 1,
    runs: Annotated[int, typer.Option(help="Profiled runs (after the warm-up).")] = 20,
    warmup: Annotated[int, typer.Option(help="Warm-up runs, not profiled.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Threads for every backend (default: theirs).")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG (stacked bar per artifact) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Per-operator time (onnxruntime profiler, OpenVINO performance counters), rolled up into conv,
    CBAM channel gate, CBAM spatial gate, layout, quantize/dequantize and other."""
    from .options import check_int, check_output_file, parse_list
    from .profile import plot_profile, profile_bundle

    check_int("--batch", batch, 1, 1024)
    check_int("--runs", runs, 1, 100000)
    check_int("--warmup", warmup, 0, 100000)
    check_int("--threads", threads, 1, allow_none=True)
    check_output_file("--plot", plot)
    result = profile_bundle(bundle, parse_list(artifact, "--artifact") if artifact else None, batch, runs, warmup, threads)
    if plot:
        plot_profile(result, plot)
    if as_json:
        _print_json(result)
        return
    for row in result["results"]:
        table = Table(title=f"{row['artifact']} ({row['tool']}): {row['total_ms']:.3f} ms per inference in kernels, "
                            f"batch {result['batch']}")
        for column in ("category", "ms", "share"):
            table.add_column(column, justify="left" if column == "category" else "right")
        for category in row["categories"]:
            table.add_row(category["category"], f"{category['ms']:.3f}", f"{category['share'] * 100:.1f}%")
        out.print(table)
        out.print("slowest ops: " + ", ".join(f"{o['op']} ({o['category']}) {o['ms']:.3f} ms" for o in row["top_ops"][:5]))


@app.command("quantize")
@_handle_errors
def quantize_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (from 'cbam-deploy export').")],
    target: Annotated[str, typer.Option(help="Comma list of ort-cpu, tensorrt, openvino.")] = "ort-cpu",
    calib_data: Annotated[str, typer.Option(help="Image folder (recursive), .npy/.npz, or 'synthetic' (not for production).")] = ...,
    calib_size: Annotated[int, typer.Option(help="Calibration samples (seeded choice).")] = 128,
    calib_batch: Annotated[int, typer.Option(help="Calibration batch size.")] = 8,
    method: Annotated[Optional[str], typer.Option(help="minmax, entropy or percentile (default: per target, see docs/int8.md).")] = None,
    gates: Annotated[Optional[str], typer.Option(help="int8: quantize the attention gates too; fp: keep them in float.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse cached calibration for the same model, data and recipe.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration samples.")] = 0,
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Quantize a bundle's FP32 ONNX to INT8 for each target and measure agreement with PyTorch
    (for a factory-made bundle without --model/--trust-code: with its FP32 ONNX)."""
    from .bundle import Bundle
    from .options import validate_quantize_options
    from .quantize import quantize_bundle

    targets = validate_quantize_options(target, calib_data, calib_size, calib_batch, method, gates)
    Bundle.open(bundle)  # a missing or damaged bundle is reported before the calibration data is read
    trust = _trust(model, trust_code)
    _note_untrusted(bundle, trust)
    result = quantize_bundle(bundle, targets, calib_data, calib_size, calib_batch, method, gates, cache, seed, trust=trust)
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
            _top1(parity), f"{parity['cosine_mean']:.4f}",
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
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Top-1, top-5 and agreement with PyTorch FP32 on labelled images, for each artifact."""
    from .evaluate import evaluate_bundle
    from .options import validate_eval_options

    validate_eval_options(data, batch, limit)

    trust = _trust(model, trust_code)
    _note_untrusted(bundle, trust)
    result = evaluate_bundle(bundle, data, artifact, batch, limit, trust=trust)
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
    bundles: Annotated[list[str], typer.Argument(
        help="Bundle folder(s), or a folder of bundles: each is served as its own model, with its own batcher.")],
    artifact: Annotated[Optional[str], typer.Option(help="Artifact to serve (default: each bundle's first, onnx-fp32).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless told otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0: any free one; the line 'serving ... on' names it).")] = 8000,
    grpc_port: Annotated[int, typer.Option(
        help="gRPC port of the same protocol (KServe v2 GRPCInferenceService), 8001 as Triton; 0 turns it off.")] = 8001,
    name: Annotated[Optional[str], typer.Option(help="Model name in the API (default: the bundle's model); one bundle only.")] = None,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: most samples per run (1 = off).")] = 8,
    batch_timeout_ms: Annotated[float, typer.Option(help="Dynamic batching: wait this long for more requests.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Larger request bodies get 413 (gRPC: RESOURCE_EXHAUSTED).")] = 32.0,
    labels: Annotated[Optional[str], typer.Option(help="Class names, one per line, for /v1/classify.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Inference threads (per model).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for inference, per model; more get 503 at once.")] = 256,
    request_timeout_s: Annotated[float, typer.Option(
        help="Seconds to receive a body (else 408) and to wait for a result (else 504).")] = 30.0,
    limit_concurrency: Annotated[int, typer.Option(help="Connections and requests in flight; more get 503.")] = 256,
    runtime: Annotated[Optional[str], typer.Option(help=_RUNTIME_HELP)] = None,
) -> None:
    """Serve artifacts over the Open Inference Protocol (KServe v2), HTTP and gRPC, plus /v1/classify and /metrics.

    Several bundles (or a folder of bundles) are several models, each named after its bundle's model
    (its folder when two would clash) and listed by /v2/repository/index. Exit codes: 0 stopped by
    Ctrl-C, 2 a bad option or bundle, 4 an address could not be bound or the server could not start.
    SIGTERM stops it within a few seconds."""
    from .serve.app import ServeConfig, serve

    if not 0 <= grpc_port <= 65535:
        raise CbamDeployError(f"--grpc-port must be 0 to 65535, got {grpc_port}")
    if grpc_port and grpc_port == port:
        raise CbamDeployError(f"--port and --grpc-port are both {port}")
    config = ServeConfig(bundles[0] if len(bundles) == 1 else list(bundles), artifact=artifact, name=name,
                         max_batch=max_batch, batch_timeout_ms=batch_timeout_ms, max_body_mb=max_body_mb, labels=labels,
                         threads=threads, max_queue=max_queue, request_timeout_s=request_timeout_s,
                         limit_concurrency=limit_concurrency, grpc_port=grpc_port or None, runtime=runtime)
    state = {}

    def started(address: str) -> None:
        app = state.get("app")
        models = ", ".join(app.state.repository.models) if app is not None else ""
        grpc_address = app.state.grpc_address if app is not None else None
        endpoints = f"http://{address}" + (f" and grpc://{grpc_address}" if grpc_address else "")
        err.print(f"serving {escape(models or ' '.join(bundles))} on {endpoints} "
                  "(Open Inference Protocol: /v2/models/...; Ctrl-C stops)", soft_wrap=True)

    try:
        serve(config, host, port, on_started=started, on_app=lambda app: state.update(app=app))
    except KeyboardInterrupt:
        err.print("stopped")
    interrupts.reset()  # Ctrl-C is how a server is stopped: exit code 0


@app.command("kserve")
@_handle_errors
def kserve_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The InferenceService manifest to write (YAML).")] = ...,
    storage_uri: Annotated[str, typer.Option(
        help="Where the cluster fetches the model from (s3://, gs://, pvc://, ...): the Triton repository "
             "(triton) or the bundle (cbam-deploy).")] = ...,
    predictor: Annotated[str, typer.Option(
        help="triton: KServe's Triton runtime over the Triton repository; cbam-deploy: this server as a custom "
             "predictor image.")] = "triton",
    repository: Annotated[Optional[str], typer.Option(
        help="triton: also write the Triton model repository here (what to upload to --storage-uri).")] = None,
    image: Annotated[Optional[str], typer.Option(help="cbam-deploy: the image (the Dockerfile's, in your registry).")] = None,
    artifact: Annotated[Optional[str], typer.Option(help="Artifact (default onnx-fp32 for triton, the first for cbam-deploy).")] = None,
    name: Annotated[Optional[str], typer.Option(help="InferenceService name (default: from the model's).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Kubernetes namespace (default: kubectl's).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Model name in the API (default: the bundle's model).")] = None,
    cpu: Annotated[str, typer.Option(help="CPU per replica, request = limit (2, 500m).")] = "2",
    memory: Annotated[str, typer.Option(help="Memory per replica, request = limit (4Gi).")] = "4Gi",
    gpus: Annotated[Optional[int], typer.Option(help="nvidia.com/gpu per replica (default 1 for a TensorRT artifact, else 0).")] = None,
    min_replicas: Annotated[int, typer.Option(help="Replicas at least (0: scale to zero).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Replicas at most.")] = 4,
    scale_target: Annotated[int, typer.Option(help="Autoscaler target: requests in flight per replica.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: most samples per run (both predictors).")] = 8,
) -> None:
    """Write a KServe InferenceService manifest for the bundle (kubectl apply -f it)."""
    from .serve.kserve import inference_service, write_yaml

    service = inference_service(bundle, storage_uri, predictor=predictor, name=name, namespace=namespace,
                                artifact=artifact, image=image, model_name=model_name, cpu=cpu, memory=memory, gpus=gpus,
                                min_replicas=min_replicas, max_replicas=max_replicas, scale_target=scale_target,
                                max_batch=max_batch)
    header = [f"KServe InferenceService for {bundle} (artifact {service['metadata']['annotations']['cbam-deploy/artifact']}), "
              f"made by cbam-deploy kserve"]
    if predictor == "triton":
        if repository:
            from .serve.triton import write_repository

            written = write_repository(bundle, repository, [service["metadata"]["annotations"]["cbam-deploy/artifact"]],
                                       name=model_name, max_batch=max_batch)
            out.print(f"Triton repository: {written[0]['path']} (model {written[0]['model']})")
        header.append(f"upload the Triton repository ({repository or 'cbam-deploy triton BUNDLE -o REPO'}) to {storage_uri}")
    else:
        header.append(f"upload the bundle folder to {storage_uri}; push the image {image}")
    header.append(f"then: kubectl apply -f {Path(output).name}")
    path = write_yaml(service, output, header)
    out.print(f"{path}: InferenceService {service['metadata']['name']} ({predictor} predictor, "
              f"{min_replicas}-{max_replicas} replicas, readiness /v2/health/ready)")


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
    triton_release: Annotated[Optional[str], typer.Option(help="Triton release (YY.MM) the repository is for; TensorRT "
                                                               "engines are checked against it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Write a Triton Inference Server model repository for the bundle's artifacts."""
    from .bundle import Bundle
    from .options import check_artifact_names, parse_list, validate_triton_options
    from .serve.triton import write_repository

    validate_triton_options(output, max_batch, instances, delay_us, kind)
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    opened = Bundle.open(bundle)
    check_artifact_names(opened, names, bundle)
    for chosen in names or ["onnx-fp32"]:  # present and intact, before the repository folder is made
        opened.path_of(chosen)
    written = write_repository(bundle, output, names, name, max_batch, instances, delay_us, kind, triton_release)
    if as_json:
        _print_json(written)
        return
    for entry in written:
        out.print(f"{entry['model']}: {entry['format']} artifact {entry['artifact']} -> {entry['path']}")
        for warning in entry.get("warnings", []):
            out.print(f"[yellow]warning:[/] {escape(warning)}")
    out.print(f"start Triton: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/{output}:/models "
              f"nvcr.io/nvidia/tritonserver:{triton_release or '<yy.mm>'}-py3 tritonserver --model-repository=/models")


@app.command("explain")
@_handle_errors
def explain_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    image: Annotated[str, typer.Option(help="The image to explain (preprocessed as the manifest says).")] = ...,
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of onnx/openvino artifacts (default: all of them).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Folder for the PNGs and the page "
                                                                         "(default explain/<bundle name>/).")] = None,
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """See what the network sees: Grad-CAM, every CBAM gate per stage, and the attention parity of each artifact.

    Writes PNG overlays and one self-contained HTML page (every image embedded) into the output folder.
    Exit codes: 0 the page was written (also for a model without spatial gates: the page says so),
    2 a bad option, bundle or image."""
    from .explain import explain_bundle
    from .options import check_existing_file, check_output_dir, parse_list

    check_existing_file("--image", image)
    check_output_dir("--output", output)
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    trust = _trust(model, trust_code)
    _note_untrusted(bundle, trust)
    result = explain_bundle(bundle, image, names, output, trust=trust)
    if as_json:
        _print_json(result)
        return
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


@app.command("info")
@_handle_errors
def info_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON, with each artifact's integrity.")] = False,
) -> None:
    """Show a bundle's manifest: model, input, artifacts, their parity and whether their files are intact.

    Every artifact's files are checked against the sha256 in the manifest: integrity "ok", "changed" or
    "missing" (also in --json). Exit code 0 when all are intact, 3 when any changed or is missing (the
    same code as a failed verification), 2 for an unreadable or damaged manifest.
    """
    from .bundle import Bundle

    opened = Bundle.open(bundle)
    integrity = opened.check_integrity()
    from .exporters.tensorrt import image_stack

    stack = image_stack()  # the pinned stack of a cbam-deploy Docker image; None elsewhere
    if as_json:
        artifacts = [{**a.raw, "integrity": integrity[a.name]} for a in opened.artifacts]
        _print_json({**opened.manifest, "artifacts": artifacts, **({"image_stack": stack} if stack else {})})
    else:
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
    broken = [f"{name} ({state})" for name, state in integrity.items() if state != "ok"]
    if broken:
        unsafe = "; unsafe: a symbolic link, not a regular file, or a file the manifest does not record, never read" \
            if "unsafe" in integrity.values() else ""
        err.print(f"[bold red]error:[/] integrity check failed for {escape(', '.join(broken))}: the files are not the "
                  f"ones the manifest recorded (sha256){unsafe}; rebuild these artifacts or re-export the bundle",
                  soft_wrap=True)
        raise typer.Exit(3)


def main() -> None:  # console-script entry point (``cbam_deploy.__main__`` installs the Ctrl-C handler earlier)
    interrupts.install()
    app()


if __name__ == "__main__":
    main()
