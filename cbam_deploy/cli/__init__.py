"""The ``cbam-deploy`` command line: one thin function per command over the library.

Each command parses options, calls ``cbam_deploy``, and prints the result (``render``). A ``CbamDeployError`` becomes one red
line on stderr and a non-zero exit, never a traceback. ``--json`` prints one JSON document on
stdout and nothing else there.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .. import interrupts
from ..checks import parse_list
from ..bundle import Bundle
from ..errors import CbamDeployError
from ..evaluate import evaluate_bundle, validate_eval_options
from ..explain_report import explain_bundle
from ..info import bundle_info
from ..export_job import ExportOptions
from ..formats import formats as known_formats
from ..fsutil import write_bytes_atomic
from ..loaders import untrusted_code
from ..models import CodeTrust, zoo_table
from ..models.spec import check_input_size
from ..pipeline import bench_model, bench_with_twins, run_export
from ..profile import plot_profile, profile_bundle
from ..progress import Progress
from ..quantize import QuantizeOptions, quantize_bundle, targets
from ..report import markdown_report, plot_latency
from ..runtimes import runtime_help
from ..serve.app import ServeConfig, serve
from ..serve.kserve import inference_service, write_yaml
from ..serve.triton import write_repository
from ..verify import VerifyOptions, verify_bundle
from . import render
from .render import err, out, print_json

_RUNTIME_HELP = ("Runtime that runs the artifacts: " + runtime_help() + ". Default: the best available here (for ONNX "
                 "ort-tensorrt > ort-cuda > ort-openvino > ort-cpu).")

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


def _exit_with(result) -> None:
    """A result that failed its check: its one line on stderr and its exit code."""
    if result.exit_code:
        err.print(f"[bold red]error:[/] {escape(result.failure or 'failed')}", soft_wrap=True)
        raise typer.Exit(result.exit_code)


def _one_line(message: str) -> str:
    """An error is one line on stderr, whatever text (a user's exception, a library's) it carries."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip()) or "unknown error"


_TrustModel = Annotated[Optional[str], typer.Option(
    "--model", help="A factory-made bundle: its factory again (FILE.py:FACTORY), so that its code may run to rebuild the "
                    "PyTorch reference; the file's sha256 must match the one recorded at export.")]
_TrustCode = Annotated[bool, typer.Option(
    "--trust-code", help="Run the factory file the bundle's manifest names (only for a bundle you trust: it is Python).")]


def _trust(model: str | None, trust_code: bool) -> CodeTrust:
    """The code the user lets a command run (``models.CodeTrust``); a bundle's own code never runs by itself."""
    return CodeTrust(factory=model, trust_bundle=trust_code)


def _open_noting_trust(bundle: str, trust: CodeTrust) -> Bundle:
    """The bundle, opened once for the command; one line when its PyTorch model will not be rebuilt
    because its code is not trusted."""
    opened = Bundle.open(bundle)
    why = untrusted_code(opened, trust)
    if why:
        err.print(f"[yellow]note:[/] no PyTorch reference: {escape(why)}", soft_wrap=True)
    return opened


@app.command("models")
@_handle_errors
def models_command(
    input_size: Annotated[int, typer.Option(help="Input side for the GFLOPs column.")] = 224,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the model zoo: name, parameters, GFLOPs (computed)."""
    check_input_size(input_size, "resnet18", "imagenet")
    rows = zoo_table(input_size)
    if as_json:
        print_json(rows)
        return
    render.zoo(rows, input_size)

@app.command("export")
@_handle_errors
def export_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name (see 'cbam-deploy models'), path/to/file.py:factory, "
                                                           "timm:NAME?KEY=VALUE&... (a timm network), or an Ultralytics "
                                                           "model yaml or trained checkpoint (.pt, with --trust-code).")],
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Checkpoint: official attention-module format, a state dict, a .safetensors file or a timm training checkpoint.")] = None,
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
    formats: Annotated[str, typer.Option("--format", help=f"Comma list of {', '.join(known_formats())} "
                                                          "(the formats registry).")] = "onnx",
    precisions: Annotated[str, typer.Option("--precision", help="Comma list of fp32, fp16, int8.")] = "fp32",
    gates: Annotated[Optional[str], typer.Option(help="INT8 gate policy: int8 or fp (default per target).")] = None,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile and ExecuTorch bounds: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to tune for.")] = 1,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile and ExecuTorch bounds: largest batch.")] = 8,
    workspace_mb: Annotated[int, typer.Option(help="TensorRT workspace limit (MiB).")] = 2048,
    timing_cache: Annotated[Optional[str], typer.Option(help="TensorRT timing cache file, reused across builds.")] = None,
    dla_core: Annotated[Optional[int], typer.Option(help="Jetson: build for this DLA core, GPU fallback on.")] = None,
    outputs: Annotated[str, typer.Option(help="Zoo models: logits (the classifier) or features (the backbone's stage "
                                               "outputs C2..C5, for detectors and FPNs).")] = "logits",
    output_kind: Annotated[Optional[list[str]], typer.Option(
        "--output-kind", help="NAME=KIND, repeatable: how parity judges that output. KIND: logits (top-1 too), dense "
                              "(cosine and bounds: embeddings, boxes, maps) or other (bounds). Default: logits for a "
                              "2-D (N, C) output, dense for 3-D and up.")] = None,
    resize: Annotated[Optional[str], typer.Option(help="How an image is fitted to the input: crop (resize the shorter "
                                                       "side, centre crop) or letterbox (resize the longer side, pad; "
                                                       "YOLO). Default: the model's own.")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406 (0 for "
                                                     "none). Default: the model's own.")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, e.g. 0.229,0.224,0.225 (1 for none).")] = None,
    scale: Annotated[Optional[str], typer.Option(help="Pixel scale before mean/std, e.g. 1/255.")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="crop: the centre crop's share of the resized side "
                                                           "(default 0.875).")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="bilinear, bicubic or nearest.")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also quantize to INT8 (needs --calib-data).")] = False,
    calib_data: Annotated[Optional[str], typer.Option(help="With --int8: image folder, .npy/.npz, or 'synthetic'.")] = None,
    target: Annotated[str, typer.Option(help=f"With --int8: comma list of {', '.join(targets())}.")] = "ort-cpu",
    cbam_opt: Annotated[str, typer.Option(help="on: CBAM rewrites for speed (exact ones checked by the parity run; "
                                               "recorded in the manifest); off: export the model as written.")] = "on",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors and warnings only).")] = False,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Let a model file that holds code (a pickled "
                                                                  "checkpoint such as Ultralytics' best.pt) run it: "
                                                                  "only for a file you trust.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Export a model to an ONNX bundle and check its parity with PyTorch."""
    options = ExportOptions(  # every option, checked before anything is built or written
        model=model, weights=weights, num_classes=num_classes, stem=stem, output=output, input_size=input_size,
        batch=batch, dynamic_hw=dynamic_hw, opset=opset, exporter=exporter, simplify=simplify, parity=parity,
        force=force, outputs=outputs, output_kinds=output_kind, cbam_opt=cbam_opt, formats=formats,
        precisions=precisions, int8=int8, calib_data=calib_data, targets=target, gates=gates, min_batch=min_batch,
        opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb, timing_cache=timing_cache, dla_core=dla_core,
        preprocess=dict(resize=resize, mean=mean, std=std, scale=scale, crop_pct=crop_pct, interpolation=interpolation),
        trust_code=trust_code)
    if not as_json:
        err.print(f"exporting [bold]{escape(model)}[/] ...")
    result = run_export(options, progress=Progress(quiet=quiet))
    if as_json:
        print_json(result)
    else:
        render.export(result)
        if result.get("int8"):
            render.quantize(result["int8"])
        if result.get("summary"):
            render.summary(result["summary"])
    _exit_with(result)


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors and warnings only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Check every artifact against PyTorch FP32; on an ONNX failure, name the first layer that departs.

    A factory-made bundle's model is rebuilt only with --model FILE.py:FACTORY (sha256 checked) or
    --trust-code; without them every artifact is 'skipped: no trusted reference', never passed."""
    options = VerifyOptions(data, artifact, samples, runtime=runtime)  # every option, before the bundle is read
    result = verify_bundle(bundle, options=options, trust=_trust(model, trust_code), progress=Progress(quiet=quiet))
    if as_json:
        print_json(result)
    else:
        render.verify(result, runtime)
    for row in result["results"]:
        if row.get("fallback"):
            err.print(f"[yellow]warning:[/] {escape(row['artifact'])} under {row.get('runtime')}: {escape(row['fallback'])}",
                      soft_wrap=True)
    for warning in result.get("warnings", []):
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    _exit_with(result)


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors and warnings only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Latency and throughput of every artifact next to PyTorch eager, measured in the same run:
    medians with 95% intervals, ratios of medians, and a stability verdict per row."""
    if bundle is None and model is None:
        raise CbamDeployError("give a BUNDLE folder or --model NAME (one of them)")
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    options = dict(batches=batch, artifacts=names, iters=iters, min_seconds=min_seconds, warmup=warmup, threads=threads,
                   max_seconds=max_seconds, strict=strict, retries=retries, wait_quiet=wait_quiet, peers=peers,
                   overhead=overhead, calib_data=calib_data, runtime=runtime, cbam_opt_compare=cbam_opt_compare,
                   markdown=markdown, plot=plot, progress=Progress(quiet=quiet))
    if bundle is None:
        result = bench_model(model, **options)
    else:  # --model with a BUNDLE names its factory again, so that its code may run
        result = bench_with_twins(bundle, **options, trust=_trust(model, trust_code))
    title = f"{result['model']}: latency vs PyTorch eager"
    try:  # the paths were checked before measuring; a disk that fills up meanwhile is still one line
        if markdown:
            write_bytes_atomic(markdown, markdown_report(result, title).encode())
        if plot:
            plot_latency(result["results"], plot, title)
    except OSError as exc:
        raise CbamDeployError(f"cannot write the report {exc.filename or markdown or plot}: {exc.strerror or exc}") from None
    if as_json:
        print_json(result)
        return
    render.bench(result, title)


@app.command("profile")
@_handle_errors
def profile_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts (default: every one whose format gives "
                                                         "per-operator times).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size (a fixed-batch model uses its own).")] = 1,
    runs: Annotated[int, typer.Option(help="Profiled runs (after the warm-up).")] = 20,
    warmup: Annotated[int, typer.Option(help="Warm-up runs, not profiled.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Threads for every backend (default: theirs).")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Write a PNG (stacked bar per artifact) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Per-operator time (each format's own profiler: onnxruntime's, OpenVINO's performance counters), rolled
    up into conv, CBAM channel gate, CBAM spatial gate, layout, quantize/dequantize and other."""
    result = profile_bundle(bundle, parse_list(artifact, "--artifact") if artifact else None, batch, runs, warmup, threads,
                            plot)
    if plot:
        plot_profile(result, plot)
    if as_json:
        print_json(result)
        return
    render.profile(result)


@app.command("quantize")
@_handle_errors
def quantize_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (from 'cbam-deploy export').")],
    target: Annotated[str, typer.Option(help=f"Comma list of {', '.join(targets())}.")] = "ort-cpu",
    calib_data: Annotated[str, typer.Option(help="Image folder (recursive), .npy/.npz, or 'synthetic' (not for production).")] = ...,
    calib_size: Annotated[int, typer.Option(help="Calibration samples (seeded choice).")] = 128,
    calib_batch: Annotated[int, typer.Option(help="Calibration batch size.")] = 8,
    method: Annotated[Optional[str], typer.Option(help="minmax, entropy or percentile (default: per target, see docs/int8.md).")] = None,
    gates: Annotated[Optional[str], typer.Option(help="int8: quantize the attention gates too; fp: keep them in float.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse cached calibration for the same model, data and recipe.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration samples.")] = 0,
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (errors and warnings only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Quantize a bundle's FP32 ONNX to INT8 for each target and measure agreement with PyTorch
    (for a factory-made bundle without --model/--trust-code: with its FP32 ONNX)."""
    options = QuantizeOptions(target, calib_data, calib_size, calib_batch, method, gates, cache, seed)  # before any work
    trust = _trust(model, trust_code)
    result = quantize_bundle(_open_noting_trust(bundle, trust), options=options, trust=trust,
                             progress=Progress(quiet=quiet))
    if as_json:
        print_json(result)
    else:
        render.quantize(result)
    _exit_with(result)


@app.command("eval")
@_handle_errors
def eval_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    data: Annotated[str, typer.Option(help="A classifier's ImageFolder (one sub-folder per class, sorted names = class "
                                           "indices), or a detector's YOLO-format folder (images/ beside labels/) or "
                                           "data.yaml (its val split).")] = ...,
    artifact: Annotated[Optional[str], typer.Option(help="One artifact (default: all of the bundle).")] = None,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 32,
    limit: Annotated[Optional[int], typer.Option(help="Use at most this many images.")] = None,
    model: _TrustModel = None,
    trust_code: _TrustCode = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Top-1, top-5 and agreement with PyTorch FP32 on labelled images (a detector: mAP50, mAP50-95 and the
    detections it keeps), for each artifact."""
    trust = _trust(model, trust_code)
    validate_eval_options(data, batch, limit)  # before the bundle is read
    result = evaluate_bundle(_open_noting_trust(bundle, trust), data, artifact, batch, limit, trust=trust)
    if as_json:
        print_json(result)
        return
    render.evaluation(result)


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
    service = inference_service(bundle, storage_uri, predictor=predictor, name=name, namespace=namespace,
                                artifact=artifact, image=image, model_name=model_name, cpu=cpu, memory=memory, gpus=gpus,
                                min_replicas=min_replicas, max_replicas=max_replicas, scale_target=scale_target,
                                max_batch=max_batch)
    header = [f"KServe InferenceService for {bundle} (artifact {service['metadata']['annotations']['cbam-deploy/artifact']}), "
              f"made by cbam-deploy kserve"]
    if predictor == "triton":
        if repository:
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
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    written = write_repository(bundle, output, names, name, max_batch, instances, delay_us, kind, triton_release)
    if as_json:
        print_json(written)
        return
    render.triton(written, output, triton_release)


@app.command("explain")
@_handle_errors
def explain_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder.")],
    image: Annotated[str, typer.Option(help="The image to explain (preprocessed as the manifest says).")] = ...,
    artifact: Annotated[Optional[str], typer.Option(help="Comma list of artifacts whose format reads its gates (default: "
                                                         "all of them).")] = None,
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
    names = parse_list(artifact, "--artifact") if artifact is not None else None
    trust = _trust(model, trust_code)
    result = explain_bundle(_open_noting_trust(bundle, trust), image, names, output, trust=trust)
    if as_json:
        print_json(result)
        return
    render.explain(result)


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
    result = bundle_info(bundle)
    if as_json:
        print_json(result)
    else:
        render.info(result.bundle, result.integrity, result.get("image_stack"))
    _exit_with(result)


def main() -> None:  # console-script entry point (``cbam_deploy.__main__`` installs the Ctrl-C handler earlier)
    interrupts.install()
    app()


if __name__ == "__main__":
    main()
