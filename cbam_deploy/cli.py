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
from rich.table import Table

from .errors import CbamDeployError

app = typer.Typer(
    name="cbam-deploy",
    help="Ship CBAM networks to edge devices: export, quantize, build engines, check parity and latency.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _handle_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CbamDeployError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")] = False,
) -> None:
    """Export a model to an ONNX bundle and check its parity with PyTorch."""
    from .pipeline import ExportRequest, export_bundle

    request = ExportRequest(
        model=model, weights=weights, num_classes=num_classes, stem=stem, output=output, input_size=input_size,
        batch=_parse_batch(batch), dynamic_hw=dynamic_hw, opset=opset, exporter=exporter, simplify=simplify,
        parity=parity, force=force,
    )
    if not as_json:
        err.print(f"exporting [bold]{model}[/] ...")
    result = export_bundle(request)
    if as_json:
        _print_json(result)
    else:
        _print_export(result)
    if result["passed"] is False:
        err.print("[bold red]error:[/] parity check failed: the ONNX model does not match PyTorch (recorded in the manifest)")
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
            "[green]pass[/]" if case["passed"] else f"[red]FAIL[/] {case.get('reason', '')}",
        )
    out.print(table)
    for note in model["notes"]:
        out.print(f"[yellow]note:[/] {note}")


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
