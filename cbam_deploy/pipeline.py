"""The export job: model (+ checkpoint) -> ONNX -> parity against PyTorch -> bundle with manifest.

``export_bundle`` is what ``cbam-deploy export`` calls. It writes the ONNX file and then the
manifest, each atomically; a failure before the end leaves any earlier bundle in the folder as it
was (nothing half-written). A parity failure still writes the bundle, with the failure recorded,
and the result says so (the CLI exits non-zero).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import MANIFEST_NAME, new_manifest, upsert_artifact, write_manifest
from .errors import CbamDeployError
from .exporters.onnx import OnnxExportOptions, export_onnx
from .fsutil import ensure_writable_dir, sha256_file
from .models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, build_model, count_gmacs
from .parity import plan_cases, run_parity
from .runners import OnnxRuntimeRunner, TorchRunner

ONNX_FILE = "model.onnx"
CROP_PCT = 0.875


@dataclass
class ExportRequest:
    model: str
    weights: str | None = None
    num_classes: int | None = None
    stem: str = "imagenet"
    output: str | None = None
    input_size: int | None = None
    batch: int | None = None
    dynamic_hw: bool = False
    opset: int = 17
    exporter: str = "torchscript"
    simplify: bool = True
    parity: bool = True
    parity_samples: int = 8
    seed: int = 0
    force: bool = False
    extra_notes: list[str] = field(default_factory=list)


def default_output_dir(model_spec: str) -> Path:
    stem = Path(model_spec.rpartition(":")[0]).stem + "_" + model_spec.rpartition(":")[2] if ":" in model_spec else model_spec
    return Path("bundles") / stem


def input_spec(loaded: LoadedModel, options: OnnxExportOptions) -> dict:
    return make_input_spec(options.input_size, loaded.mean, loaded.std, options.symbolic_input_shape())


def make_input_spec(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, shape: list | None = None) -> dict:
    """The manifest's ``input``: what every consumer needs to feed the model identically."""
    return {
        "name": "input",
        "shape": shape or ["batch", 3, size, size],
        "dtype": "float32",
        "layout": "NCHW",
        "color": "RGB",
        "preprocess": {
            "resize_shorter": int(round(size / CROP_PCT)) if size >= 64 else size,
            "center_crop": size,
            "interpolation": "bilinear",
            "scale": 1 / 255,
            "mean": list(mean),
            "std": list(std),
        },
    }


def _guard_existing(out_dir: Path, model_name: str, force: bool) -> None:
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.exists() or force:
        return
    try:
        existing = json.loads(manifest_path.read_text()).get("model", {}).get("name")
    except (OSError, ValueError, AttributeError):
        existing = None
    if existing != model_name:
        raise CbamDeployError(
            f"{out_dir} already holds a bundle of {existing or 'an unreadable manifest'}; choose another "
            "--output or pass --force to replace it"
        )


def export_bundle(request: ExportRequest) -> dict:
    """Run the whole export; returns the summary that ``--json`` prints."""
    started = time.perf_counter()
    loaded = build_model(request.model, request.weights, request.num_classes, request.stem)
    options = OnnxExportOptions(
        input_size=request.input_size or loaded.default_input_size,
        batch=request.batch,
        dynamic_hw=request.dynamic_hw,
        opset=request.opset,
        exporter=request.exporter,
        simplify=request.simplify,
    )
    options.validate()
    out_dir = Path(request.output) if request.output else default_output_dir(request.model)
    _guard_existing(out_dir, loaded.name, request.force)
    created = not out_dir.exists()
    ensure_writable_dir(out_dir)
    try:
        return _export_into(request, loaded, options, out_dir, started)
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # leave no empty folder behind a failed first export
        raise


def _export_into(request: ExportRequest, loaded: LoadedModel, options: OnnxExportOptions, out_dir: Path,
                 started: float) -> dict:
    onnx_path = out_dir / ONNX_FILE
    info = export_onnx(loaded.module, onnx_path, options)

    parity = None
    if request.parity:
        cases = plan_cases(options.input_size, options.batch, options.dynamic_hw, request.parity_samples)
        parity = run_parity(TorchRunner(loaded.module), OnnxRuntimeRunner(onnx_path), cases, "fp32", seed=request.seed)

    model_info = loaded.describe()
    try:
        model_info["gflops"] = round(count_gmacs(loaded.module, options.input_size), 3)
        model_info["gflops_input_size"] = options.input_size
    except Exception:  # a user's factory model may not run on the counter; the count is optional
        model_info["gflops"] = None
    model_info["notes"] = model_info["notes"] + request.extra_notes
    manifest = new_manifest(
        model_info,
        input_spec(loaded, options),
        [{"name": info["output_name"], "shape": ["batch" if options.batch is None else options.batch, loaded.num_classes or "classes"],
          "dtype": "float32", "kind": "logits"}],
    )
    manifest["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    artifact = {
        "name": "onnx-fp32",
        "path": ONNX_FILE,
        "format": "onnx",
        "precision": "fp32",
        "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "export": info,
        "parity": parity if parity is not None else {"passed": None, "skipped": "--no-parity"},
    }
    upsert_artifact(manifest, artifact)
    manifest_path = write_manifest(out_dir, manifest)
    return {
        "bundle": str(out_dir),
        "manifest": str(manifest_path),
        "model": model_info,
        "artifacts": [{"name": artifact["name"], "path": str(onnx_path), "format": "onnx", "precision": "fp32",
                       "size_bytes": artifact["size_bytes"], "sha256": artifact["sha256"]}],
        "export": info,
        "parity": artifact["parity"],
        "passed": parity["passed"] if parity is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


def build_verify_bench(bundle_dir: str | Path, formats: str, precisions: str, calib_data: str | None = None,
                       gates: str | None = None, trt=None, bench_iters: int = 20) -> dict:
    """The one-command job after export: build every requested artifact the machine can build,
    verify each against PyTorch, time each next to PyTorch eager (batch 1), one summary."""
    from .bench import bench_bundle
    from .build import build_artifacts
    from .bundle import read_manifest
    from .verify import verify_bundle

    outcomes = build_artifacts(bundle_dir, formats, precisions, calib_data, gates=gates, trt=trt)
    built = [o.name for o in outcomes if o.name]
    verified = verify_bundle(bundle_dir, artifacts=built)
    timing = bench_bundle(bundle_dir, [1], artifacts=built, iters=bench_iters)
    manifest = read_manifest(bundle_dir)
    sizes = {a["name"]: a.get("size_bytes") for a in manifest["artifacts"]}
    verdict = {r["artifact"]: r.get("passed") for r in verified["results"]}
    latency = {r["runner"]: r for r in timing["results"]}
    pytorch = latency.get("pytorch")
    rows = [{"artifact": "pytorch (eager)", "format": "pytorch", "precision": "fp32", "passed": None,
             "latency_ms": pytorch["mean_ms"] if pytorch else None, "speedup": 1.0}]
    for outcome in outcomes:
        if outcome.skipped:
            rows.append({"artifact": None, "format": outcome.format, "precision": outcome.precision, "skipped": outcome.skipped})
            continue
        measured = latency.get(outcome.name)
        rows.append({"artifact": outcome.name, "format": outcome.format, "precision": outcome.precision,
                     "size_bytes": sizes.get(outcome.name), "passed": verdict.get(outcome.name),
                     "latency_ms": measured["mean_ms"] if measured else None,
                     "speedup": measured.get("speedup_vs_pytorch") if measured else None})
    verdicts = [r["passed"] for r in rows if r.get("passed") is not None]
    return {"bundle": str(bundle_dir), "rows": rows, "machine": timing["machine"],
            "passed": all(verdicts) if verdicts else None}
