"""Orchestration: export, then carry out the rest of what ``cbam-deploy export`` was asked for (INT8
recipes, or a format x precision matrix that is built, verified and timed next to PyTorch), with
every option checked before anything is built or written.

``run_export`` is what ``cbam-deploy export`` calls; ``build_verify_bench`` is the one-command job
after an export; ``bench_with_twins`` and ``bench_model`` are what ``cbam-deploy bench`` calls (the
plain twin for ``--overhead`` and the other ``--cbam-opt`` mode are built here, then timed in the
same rounds by ``bench``). The jobs themselves are ``export``, ``quantize``, ``build``, ``verify``
and ``bench``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .bench import (BenchOptions, BenchResult, Twin, bench_bundle, bench_calibration, bench_checked, check_bench_options,
                    open_for_bench, pytorch_spec)
from .backends.base import TensorRTOptions
from .build import build_artifacts
from .bundle import Bundle, ModelInfo, check_artifact_names
from .errors import CbamDeployError
from .export_job import ExportOptions, ExportResult, export_bundle
from .formats import get as get_format
from .formats import root_row
from .loaders import ReferenceModel
from .manifest import ROOT_ARTIFACT
from .models import CodeTrust, is_factory_spec
from .models.registry import get_entry, list_models
from .models.spec import check_model_spec
from .quantize import quantize_bundle
from .runtimes import available_runtimes, fitting
from .verify import verify_bundle


def run_export(options: ExportOptions, progress=None) -> ExportResult:
    """Export, then carry out the rest of what was asked (``--int8`` alone: quantize for its targets; a
    format x precision matrix: build, verify and time it); the summary that ``export --json`` prints.
    The PyTorch model the export built is the reference of every later step (nothing is rebuilt), and
    the bundle is opened once and passed along."""
    result = export_bundle(options)
    if progress is not None:
        progress.line(f"exported {ROOT_ARTIFACT} in {result['seconds']:.1f} s"
                      f" ({result['artifacts'][0]['size_bytes'] / 1e6:.1f} MB)")
    bundle = Bundle.open(result["bundle"])
    root = root_row()
    bundle.remember("runner", ROOT_ARTIFACT, result.parity_runner, root.reference_runtime, None)
    reference = ReferenceModel(bundle, module=result.module)
    if options.quantize_targets:
        result.add("int8", quantize_bundle(bundle, options.quantize_targets, options.calib_data, gates=options.gates,
                                           reference=reference, progress=progress))
        bundle = bundle.refresh()
    if options.builds:
        result.add("summary", build_verify_bench(bundle, options.format_list, options.precision_list,
                                                 options.calib_data, options.gates, options.trt, reference=reference,
                                                 progress=progress))
    return result


def build_verify_bench(bundle_dir, formats: str, precisions: str, calib_data: str | None = None,
                       gates: str | None = None, trt=None, bench_iters: int = 20, trust=None,
                       reference: ReferenceModel | None = None, progress=None) -> dict:
    """The one-command job after an export: build every requested artifact the machine can build,
    verify each against PyTorch, time each next to PyTorch eager (batch 1), one summary."""
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    reference = reference or ReferenceModel(bundle, trust)
    outcomes = build_artifacts(bundle, formats, precisions, calib_data, gates=gates, trt=trt, reference=reference,
                               progress=progress)
    bundle = bundle.refresh()
    built = [o.name for o in outcomes if o.name]
    verified = verify_bundle(bundle, artifacts=built, reference=reference, progress=progress)
    timing = bench_bundle(bundle, [1], artifacts=built, iters=bench_iters, trust=trust, reference=reference,
                          progress=progress)
    verdict = {r["artifact"]: r.get("passed") for r in verified["results"]}
    latency = {r["runner"]: r for r in timing["results"]}
    pytorch = latency.get("pytorch")
    rows = [{"artifact": "pytorch (eager)", "format": "pytorch", "precision": "fp32", "passed": None,
             "latency_ms": pytorch["p50_ms"] if pytorch else None, "speedup": 1.0,
             "stable": pytorch["stability"]["stable"] if pytorch else None}]
    for outcome in outcomes:
        if outcome.skipped or outcome.failed:
            rows.append({"artifact": None, "format": outcome.format, "precision": outcome.precision,
                         **({"skipped": outcome.skipped} if outcome.skipped else {"failed": outcome.failed,
                                                                                    "passed": False})})
            continue
        measured = latency.get(outcome.name)
        artifact = bundle.artifact(outcome.name)
        rows.append({"artifact": outcome.name, "format": outcome.format, "precision": outcome.precision,
                     "size_bytes": artifact.size_bytes, "passed": verdict.get(outcome.name),
                     "latency_ms": measured["p50_ms"] if measured else None,
                     "speedup": measured.get("speedup_vs_pytorch") if measured else None,
                     "build_seconds": outcome.seconds,
                     "stable": measured["stability"]["stable"] if measured else None,
                     **{k: v for k, v in get_format(outcome.format).summary(artifact).items() if v is not None}})
    verdicts = [r["passed"] for r in rows if r.get("passed") is not None]
    return {"bundle": str(bundle.directory), "rows": rows, "machine": timing["machine"], "timing": timing_verdict(timing),
            "passed": all(verdicts) if verdicts else None}


def timing_verdict(timing) -> dict:
    """bench's stability verdict over a whole run, for a summary: whether every row was stable, the
    reasons (what the OS saw of the machine's load, each once; then which row checks failed and how
    many rows), and other processes' CPU use."""
    machine: dict[str, None] = {}
    checks: dict[str, None] = {}
    for row in timing["results"]:
        for reason in row["stability"]["reasons"]:
            if reason.startswith(("other processes", "the hypervisor", "CPU frequency")):
                machine[reason] = None
            else:
                checks[reason.split(":")[0]] = None
    unstable = sum(1 for r in timing["results"] if not r["stability"]["stable"])
    reasons = list(machine) + ([f"{', '.join(checks)} in {unstable} of {len(timing['results'])} rows"] if checks else [])
    load = next((r["load"] for r in timing["results"] if r.get("load")), None)
    return {"stable": timing["stable"], "busy": bool(machine), "reasons": reasons,
            "other_cpu_fraction": load["other_cpu_fraction"] if load else None}


def bench_with_twins(bundle_dir, batches: str | list[int] | None = None, *, overhead: bool = False,
                     cbam_opt_compare: bool = False, trust: CodeTrust | None = None, progress=None, module=None,
                     **options) -> BenchResult:
    """``cbam-deploy bench BUNDLE``: ``bench.bench_bundle`` with ``options``, and in the same rounds, with
    ``overhead``, the model's plain twin (resnet50 for resnet50_cbam) exported and built like the bundle,
    for a cbam/plain ratio per engine (``result["overhead"]``); with ``cbam_opt_compare``, the same model
    exported with the other ``--cbam-opt`` mode and built with the same recipes, for an on/off ratio per
    engine (``result["cbam_opt_compare"]``, rows ``cbam-opt-off:ARTIFACT``, or ``-on:``). Every option is
    checked once, before any export or measuring."""
    bundle, checked = open_for_bench(bundle_dir, batches=batches, **options)
    return _bench_with_twins(bundle, checked, overhead, cbam_opt_compare, trust, progress, module=module)


def bench_model(model: str, *, overhead: bool = False, cbam_opt_compare: bool = False, progress=None,
                **options) -> BenchResult:
    """``bench --model``: export ``model`` (a zoo name or file.py:factory) to a temporary bundle and bench it
    (as ``bench_with_twins`` with ``options``). The model, the artifact names and every bench option are
    checked before the export."""
    checked = check_bench_options(**options)
    check_model_spec(model)
    check_artifact_names({"artifacts": [{"name": ROOT_ARTIFACT}]}, checked.artifacts, f"(exported from --model {model})")
    trust = CodeTrust(factory=model) if is_factory_spec(model) else None  # the user's own code
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        exported = export_bundle(ExportOptions(model=model, output=str(tmp), parity=False))
        return _bench_with_twins(Bundle.open(exported["bundle"]), checked, overhead, cbam_opt_compare, trust, progress,
                                 module=exported.module)


def _bench_with_twins(bundle: Bundle, options: BenchOptions, overhead: bool, cbam_opt_compare: bool,
                      trust: CodeTrust | None, progress=None, module=None) -> BenchResult:
    plain = plain_twin(bundle.model) if overhead else None
    if not (overhead or cbam_opt_compare):
        return bench_checked(bundle, options, trust, module=module, progress=progress)
    # the twins are built for the artifacts the bench opens: those a runtime here (of --runtime) runs
    names = [a.name for a in bundle.artifacts if (not options.artifacts or a.name in options.artifacts)
             and (available_runtimes(a.format) if options.runtimes is None else fitting(a.format, options.runtimes))]
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        calib = bench_calibration(bundle, options.calib_data)
        twins, skipped = [], []
        if plain:
            built = build_twin(bundle, plain, calib, Path(tmp) / "plain", names, skipped, trust=trust)
            twins.append(Twin("plain:", built, pytorch=True))
        other = None
        if cbam_opt_compare:
            other = "off" if bundle.cbam_opt.get("mode") == "on" else "on"
            built = build_twin(bundle, None, calib, Path(tmp) / f"cbam-opt-{other}", names, skipped, cbam_opt=other,
                               trust=trust)
            twins.append(Twin(f"cbam-opt-{other}:", built, artifacts=names))
        result = bench_checked(bundle, options, trust, twins=twins, calib=calib, module=module, progress=progress)
    result["skipped"].extend(skipped)
    paired = result.remove("paired")
    if plain:
        result.add("overhead", {"plain": plain, "rows": paired["plain:"]})
    if other:
        result.add("cbam_opt_compare", {"other": other, "rows": paired[f"cbam-opt-{other}:"]})
    return result


def plain_twin(model: ModelInfo) -> str:
    """The zoo model without attention (resnet50 for resnet50_cbam)."""
    if model.source != "zoo":
        raise CbamDeployError("--overhead compares a zoo model with its plain twin; this bundle is a factory model")
    entry = get_entry(model.name)
    if entry.attention is None or entry.family not in list_models():
        raise CbamDeployError(f"--overhead: {model.name} has no attention, so no plain twin to compare with")
    return entry.family


def build_twin(bundle: Bundle, twin: str | None, calib, out: Path, artifacts: list[str], skipped: list,
               cbam_opt: str = "on", trust: CodeTrust | None = None) -> Path:
    """The plain twin (``twin``: its zoo name), or the bundle's own model again (``twin`` None: with its
    weights, exported with ``cbam_opt``), exported and built like the bundle: same input, batch, opset and
    exporter; every artifact of ``artifacts`` made again by its format's build (same precision and batch
    bounds) or INT8 recipe (same method and gate policy, on the same calibration data). What cannot be
    made again is listed in ``skipped`` with the reason."""
    export = bundle.artifact(ROOT_ARTIFACT).export or {}
    model = bundle.model
    weights = model.weights.path if twin is None and model.weights and Path(model.weights.path).is_file() else None
    module = export_bundle(ExportOptions(
        model=twin or pytorch_spec(bundle, trust), weights=weights, num_classes=model.num_classes, stem=model.stem,
        cbam_opt=cbam_opt, outputs=model.outputs_mode or "logits", output=str(out), input_size=bundle.input.side,
        batch=bundle.fixed_batch, dynamic_hw=bundle.input.dynamic_hw, opset=export.get("opset", 17), parity=False)).module
    copy = Bundle.open(out)
    reference = ReferenceModel(copy, module=module)
    for name in artifacts:
        artifact = bundle.artifact(name)
        row = get_format(artifact.format)
        if row.root and artifact.precision == "fp32":
            continue  # the export made it
        why = None
        if artifact.precision == "int8":
            recipe = (artifact.quantization or {}).get("recipe") or row.int8_recipe
            if calib is None:
                why = f"no calibration data for the {out.name} build's INT8 (give --calib-data)"
            elif recipe is None:
                why = f"{row.title} INT8 has no recipe to make it again"
            else:
                q = artifact.quantization or {}
                made = quantize_bundle(copy, [recipe], calib.source, calib_size=len(calib.inputs), method=q.get("method"),
                                       gates=q.get("gates"), check_samples=8, reference=reference, skip_unavailable=True)
                why = made["skipped"].get(recipe)
                copy = copy.refresh()
        if why is None and (artifact.precision != "int8" or row.int8_from_recipe_artifact):
            bounds = row.batch_bounds(artifact.raw)
            trt = TensorRTOptions(bounds[0], bounds[0], bounds[1]) if bounds else None
            outcome = build_artifacts(copy, artifact.format, artifact.precision, gates=(artifact.quantization or {})
                                      .get("gates"), trt=trt, reference=reference)[0]
            why = outcome.skipped or outcome.failed
            copy = copy.refresh()
        if why:
            skipped.append({"artifact": f"{out.name}:{name}", "reason": why})
    return out
