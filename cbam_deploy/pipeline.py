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
from dataclasses import dataclass, field
from pathlib import Path

from .bench import (BenchOptions, Twin, bench_bundle, bench_calibration, bench_checked, check_bench_options,
                    open_for_bench, pytorch_spec)
from .build import PRECISIONS, build_artifacts
from .bundle import Bundle, ModelInfo, check_artifact_names
from .calib.targets import GATES, TARGETS
from .checks import (
    MAX_BATCH,
    check_choice,
    check_existing_file,
    check_int,
    check_output_dir,
    check_output_file,
    parse_batch,
    parse_list,
)
from .data import check_data_source
from .errors import CbamDeployError
from .export import ExportRequest, check_model_options, export_bundle
from .formats import formats as backend_formats
from .models import CodeTrust, is_factory_spec
from .models.registry import get_entry, list_models
from .models.spec import check_model_spec
from .outputs import parse_output_kinds
from .quantize import quantize_bundle
from .runtimes import available_runtimes, fitting
from .verify import verify_bundle


@dataclass
class ExportChoices:
    """What ``validate_export_options`` understood: the parsed lists the later steps use."""

    batch: int | None
    formats: list[str]
    precisions: list[str]
    targets: list[str]
    int8: bool
    notes: list[str] = field(default_factory=list)
    output_kinds: dict[str, str] = field(default_factory=dict)


def validate_export_options(
    model: str,
    weights: str | None = None,
    num_classes: int | None = None,
    stem: str = "imagenet",
    output: str | None = None,
    input_size: int | None = None,
    batch: str | int | None = "dynamic",
    opset: int = 17,
    exporter: str = "torchscript",
    formats: str = "onnx",
    precisions: str = "fp32",
    gates: str | None = None,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mb: int = 2048,
    timing_cache: str | None = None,
    dla_core: int | None = None,
    int8: bool = False,
    calib_data: str | None = None,
    target: str = "ort-cpu",
    output_kinds: list[str] | None = None,
    cbam_opt: str = "on",
) -> ExportChoices:
    """Every ``export`` option, checked before anything is built or written (the names in
    ``--output-kind`` are checked against the model's outputs once it has run, before the ONNX export)."""
    check_model_options(model, stem, num_classes, input_size, opset, exporter, cbam_opt)
    parsed_batch = parse_batch(batch)
    format_list = parse_list(formats, "--format", backend_formats())
    precision_list = parse_list(precisions, "--precision", PRECISIONS)
    target_list = parse_list(target, "--target", TARGETS)
    if gates is not None:
        check_choice("--gates", gates, GATES)
    check_int("--min-batch", min_batch, 1, MAX_BATCH)
    check_int("--opt-batch", opt_batch, 1, MAX_BATCH)
    check_int("--max-batch", max_batch, 1, MAX_BATCH)
    if not min_batch <= opt_batch <= max_batch:
        raise CbamDeployError(
            f"the TensorRT batch profile must satisfy 1 <= --min-batch <= --opt-batch <= --max-batch, "
            f"got {min_batch}/{opt_batch}/{max_batch}"
        )
    check_int("--workspace-mb", workspace_mb, 1)
    check_int("--dla-core", dla_core, 0, allow_none=True)
    if timing_cache is not None:
        if Path(timing_cache).is_dir():
            raise CbamDeployError(f"--timing-cache {timing_cache} is a folder; give a file path")
        check_output_file("--timing-cache", timing_cache)
    wants_int8 = int8 or "int8" in precision_list
    if wants_int8 and not calib_data:
        flag = "--int8" if int8 else "--precision int8"
        raise CbamDeployError(f"{flag} needs --calib-data DIR (images), a .npy/.npz file, or 'synthetic'")
    check_data_source("--calib-data", calib_data)
    kinds = parse_output_kinds(output_kinds)
    check_existing_file("--weights", weights)
    check_output_dir("--output", output)
    check_model_spec(model, stem)
    return ExportChoices(parsed_batch, format_list, precision_list, target_list, wants_int8, output_kinds=kinds)


@dataclass
class ExportPlan:
    """What ``export`` does after the ONNX: nothing; quantize to INT8 for some targets (``--int8``);
    or build, verify and time a format x precision matrix (``--format/--precision``, INT8 included
    when asked for). One plan, made here, so the CLI has one route."""

    quantize_targets: list[str] = field(default_factory=list)
    formats: str = "onnx"
    precisions: str = "fp32"
    calib_data: str | None = None
    gates: str | None = None
    trt: object = None

    @property
    def builds(self) -> bool:
        return self.formats != "onnx" or self.precisions != "fp32"


def plan_export(formats: str = "onnx", precisions: str = "fp32", int8: bool = False, targets: str = "ort-cpu",
                calib_data: str | None = None, gates: str | None = None, trt=None) -> ExportPlan:
    """The one plan for export's options: ``--int8`` alone quantizes ``--target``s; with a
    ``--format/--precision`` matrix it adds int8 to the matrix (built, verified and timed like the rest)."""
    if int8 and not calib_data:
        raise CbamDeployError("--int8 needs --calib-data DIR (images), a .npy/.npz file, or 'synthetic'")
    plan = ExportPlan(formats=formats, precisions=precisions, calib_data=calib_data, gates=gates, trt=trt)
    if int8 and plan.builds:
        if "int8" not in parse_list(precisions, "--precision"):
            plan.precisions += ",int8"
    elif int8:
        plan.quantize_targets = parse_list(targets, "--target")
    return plan


def run_export(request: ExportRequest, plan: ExportPlan | None = None) -> dict:
    """Export, then carry out the plan; the summary that ``export --json`` prints."""
    result = export_bundle(request)
    plan = plan or ExportPlan()
    trust = CodeTrust(factory=request.model) if is_factory_spec(request.model) else None  # the user's own code
    if plan.quantize_targets:
        result["int8"] = quantize_bundle(result["bundle"], plan.quantize_targets, plan.calib_data, gates=plan.gates,
                                         trust=trust)
    if plan.builds:
        result["summary"] = build_verify_bench(result["bundle"], plan.formats, plan.precisions, plan.calib_data, plan.gates,
                                               plan.trt, trust=trust)
    return result


def build_verify_bench(bundle_dir: str | Path, formats: str, precisions: str, calib_data: str | None = None,
                       gates: str | None = None, trt=None, bench_iters: int = 20, trust=None) -> dict:
    """The one-command job after export: build every requested artifact the machine can build,
    verify each against PyTorch, time each next to PyTorch eager (batch 1), one summary."""
    outcomes = build_artifacts(bundle_dir, formats, precisions, calib_data, gates=gates, trt=trt, trust=trust)
    built = [o.name for o in outcomes if o.name]
    verified = verify_bundle(bundle_dir, artifacts=built, trust=trust)
    timing = bench_bundle(bundle_dir, [1], artifacts=built, iters=bench_iters, trust=trust)
    opened = Bundle.open(bundle_dir)
    sizes = {a.name: a.size_bytes for a in opened.artifacts}
    layer_notes = {a.name: _ncnn_layers(opened.manifest, a.name) for a in opened.artifacts if a.format == "ncnn"}
    # delegate-lowered programs (ExecuTorch): partitions and the ops left outside them
    delegation = {a.name: {"partitions": a.export["partitions"], "outside_delegate": a.export.get("outside_delegate")}
                  for a in opened.artifacts if (a.export or {}).get("partitions") is not None}
    verdict = {r["artifact"]: r.get("passed") for r in verified["results"]}
    latency = {r["runner"]: r for r in timing["results"]}
    pytorch = latency.get("pytorch")
    rows = [{"artifact": "pytorch (eager)", "format": "pytorch", "precision": "fp32", "passed": None,
             "latency_ms": pytorch["p50_ms"] if pytorch else None, "speedup": 1.0,
             "stable": pytorch["stability"]["stable"] if pytorch else None}]
    for outcome in outcomes:
        if outcome.skipped:
            rows.append({"artifact": None, "format": outcome.format, "precision": outcome.precision, "skipped": outcome.skipped})
            continue
        measured = latency.get(outcome.name)
        rows.append({"artifact": outcome.name, "format": outcome.format, "precision": outcome.precision,
                     "size_bytes": sizes.get(outcome.name), "passed": verdict.get(outcome.name),
                     "latency_ms": measured["p50_ms"] if measured else None,
                     "speedup": measured.get("speedup_vs_pytorch") if measured else None,
                     "stable": measured["stability"]["stable"] if measured else None,
                     **delegation.get(outcome.name, {}),
                     **({"ncnn": layer_notes[outcome.name]} if outcome.name in layer_notes else {})})
    verdicts = [r["passed"] for r in rows if r.get("passed") is not None]
    return {"bundle": str(bundle_dir), "rows": rows, "machine": timing["machine"], "timing": timing_verdict(timing),
            "passed": all(verdicts) if verdicts else None}


def timing_verdict(timing: dict) -> dict:
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


def _ncnn_layers(manifest: dict, name: str) -> dict:
    """What an ncnn artifact's record says about its layers: the ncnn-pools rewrite and the generic
    (unoptimised) layers left."""
    record = next(a for a in manifest["artifacts"] if a["name"] == name)
    export = record.get("export") or (record.get("quantization") or {}).get("conversion") or {}
    rewrite = export.get("rewrite") or {}
    return {"hw_pools_rewritten": rewrite.get("hw_pools"), "channel_pools_rewritten": rewrite.get("channel_pools"),
            "reductions_left": len(rewrite.get("reductions_left") or []), "generic_layers": export.get("generic_layers")}


def bench_with_twins(bundle_dir, batches: str | list[int] | None = None, *, overhead: bool = False,
                     cbam_opt_compare: bool = False, trust: CodeTrust | None = None, **options) -> dict:
    """``cbam-deploy bench BUNDLE``: ``bench.bench_bundle`` with ``options``, and in the same rounds, with
    ``overhead``, the model's plain twin (resnet50 for resnet50_cbam) exported and built like the bundle,
    for a cbam/plain ratio per engine (``result["overhead"]``); with ``cbam_opt_compare``, the same model
    exported with the other ``--cbam-opt`` mode and built with the same recipes, for an on/off ratio per
    engine (``result["cbam_opt_compare"]``, rows ``cbam-opt-off:ARTIFACT``, or ``-on:``). Every option is
    checked once, before any export or measuring."""
    bundle, checked = open_for_bench(bundle_dir, batches=batches, **options)
    return _bench_with_twins(bundle, checked, overhead, cbam_opt_compare, trust)


def bench_model(model: str, *, overhead: bool = False, cbam_opt_compare: bool = False, **options) -> dict:
    """``bench --model``: export ``model`` (a zoo name or file.py:factory) to a temporary bundle and bench it
    (as ``bench_with_twins`` with ``options``). The model, the artifact names and every bench option are
    checked before the export."""
    checked = check_bench_options(**options)
    check_model_spec(model)
    check_artifact_names({"artifacts": [{"name": "onnx-fp32"}]}, checked.artifacts, f"(exported from --model {model})")
    trust = CodeTrust(factory=model) if is_factory_spec(model) else None  # the user's own code
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        bundle = export_bundle(ExportRequest(model=model, output=str(tmp), parity=False))["bundle"]
        return _bench_with_twins(Bundle.open(bundle), checked, overhead, cbam_opt_compare, trust)


def _bench_with_twins(bundle: Bundle, options: BenchOptions, overhead: bool, cbam_opt_compare: bool,
                      trust: CodeTrust | None) -> dict:
    plain = plain_twin(bundle.model) if overhead else None
    if not (overhead or cbam_opt_compare):
        return bench_checked(bundle, options, trust)
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
        result = bench_checked(bundle, options, trust, twins=twins, calib=calib)
    result["skipped"] += skipped
    paired = result.pop("paired")
    if plain:
        result["overhead"] = {"plain": plain, "rows": paired["plain:"]}
    if other:
        result["cbam_opt_compare"] = {"other": other, "rows": paired[f"cbam-opt-{other}:"]}
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
    exporter; the same INT8 recipes on the same calibration data."""
    export = bundle.artifact().export or {}
    model = bundle.model
    weights = model.weights.path if twin is None and model.weights and Path(model.weights.path).is_file() else None
    export_bundle(ExportRequest(model=twin or pytorch_spec(bundle, trust), weights=weights, num_classes=model.num_classes,
                                stem=model.stem, cbam_opt=cbam_opt, outputs=model.outputs_mode or "logits", output=str(out),
                                input_size=bundle.input.side, batch=bundle.fixed_batch,
                                dynamic_hw=bundle.input.dynamic_hw, opset=export.get("opset", 17), parity=False))
    for name in artifacts:
        artifact = bundle.artifact(name)
        if artifact.format == "openvino" and artifact.precision in ("fp32", "fp16"):
            build_artifacts(out, "openvino", artifact.precision)
        elif artifact.precision == "int8" and artifact.quantization:
            if calib is None:
                skipped.append({"artifact": f"{out.name}:{name}", "reason": "no calibration data for the "
                                f"{out.name} build's INT8 (give --calib-data)"})
                continue
            q = artifact.quantization
            quantize_bundle(out, [q["recipe"]], calib.source, calib_size=len(calib.inputs), method=q["method"],
                            gates=q["gates"], check_samples=8, trust=trust)
    return out
