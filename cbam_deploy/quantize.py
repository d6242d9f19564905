"""The INT8 job: a bundle's FP32 ONNX (or its PyTorch model) + calibration data -> INT8 artifacts in the
same bundle, one per target, every target in one pass: the calibration images are decoded once, the
PyTorch reference rebuilt once and its outputs computed once.

Each target is a recipe of a format's row (``formats.Recipe``). Each artifact's agreement with the
PyTorch original (top-1 agreement, cosine) is measured on held-out calibration-source samples and
recorded with the recipe, method, gate policy and data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .backends.base import RecipeJob
from .batching import fit_batch
from .bundle import Bundle
from .calib.recipes import default_cache_dir
from .checks import MAX_BATCH, check_int, parse_list
from .data import check_data_source, load_calibration
from .errors import BackendUnavailable, CbamDeployError
from .formats import recipe as get_recipe
from .formats import recipes
from .loaders import ReferenceModel, open_artifact
from .manifest import ROOT_ARTIFACT
from .parity import INT8_MIN_COSINE, INT8_MIN_TOP1, compare_int8
from .progress import NULL
from .results import Result


class QuantizeResult(Result):
    """What ``quantize`` made: one INT8 artifact per target (``artifacts``: their manifest records, each
    with its parity against PyTorch), the calibration data it used, and the targets it could not make
    here (``skipped``: {target: why})."""

    command = "quantize"

    @property
    def artifacts(self) -> list[dict]:
        return self["artifacts"]

    @property
    def skipped(self) -> dict[str, str]:
        return self["skipped"]

    @property
    def failure(self) -> str | None:
        if self.passed is False:
            return "an INT8 artifact disagrees with PyTorch beyond tolerance (recorded in the manifest)"
        return None
from .transaction import BundleUpdate, commit_from_source, faultpoint


@dataclass
class QuantizeOptions:
    """quantize's options, checked once here: the ``targets`` (recipes), the calibration data and how much
    of it, the method and gate policy (default: each recipe's), the cache, the seed, and the held-out
    samples each INT8 artifact is checked on."""

    targets: str | list[str] = "ort-cpu"
    calib_data: str = "synthetic"
    calib_size: int = 128
    calib_batch: int = 8
    method: str | None = None
    gates: str | None = None
    use_cache: bool = True
    seed: int = 0
    check_samples: int = 64

    def __post_init__(self) -> None:
        self.targets = validate_quantize_options(self.targets, self.calib_data, self.calib_size, self.calib_batch,
                                                 self.method, self.gates)
        check_int("check_samples", self.check_samples, 1)


def quantize_bundle(
    bundle_dir,
    targets: str | list[str] | None = None,
    calib_data: str | None = None,
    calib_size: int = 128,
    calib_batch: int = 8,
    method: str | None = None,
    gates: str | None = None,
    use_cache: bool = True,
    seed: int = 0,
    check_samples: int = 64,
    trust=None,
    reference: ReferenceModel | None = None,
    skip_unavailable: bool = False,
    progress=None,
    options: QuantizeOptions | None = None,
) -> QuantizeResult:
    """INT8 artifacts for ``targets``, each checked against the PyTorch original (rebuilt only with
    ``trust`` for a factory model, else the FP32 ONNX stands in: ``loaders.reference_runner``).
    ``bundle_dir``: a folder or an open ``Bundle``; ``reference``: the command's reference, when it has
    one already. A target that cannot be made here (its library missing, the PyTorch model it needs
    not available) is refused in one line before any calibration work, or with ``skip_unavailable``
    listed in the result's ``skipped`` while the others are made."""
    options = options or QuantizeOptions(targets or "ort-cpu", calib_data, calib_size, calib_batch, method, gates,
                                         use_cache, seed, check_samples)  # every option, before any work
    targets, calib_data, calib_size, calib_batch, method, gates, use_cache, seed, check_samples = (
        options.targets, options.calib_data, options.calib_size, options.calib_batch, options.method, options.gates,
        options.use_cache, options.seed, options.check_samples)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)  # reported before data is read
    bundle.path_of(ROOT_ARTIFACT)
    reference = reference or ReferenceModel(bundle, trust)
    skipped: dict[str, str] = {}
    chosen = []
    for target in targets:
        why = _unavailable(target, reference)
        if why and not skip_unavailable:
            raise BackendUnavailable(why)
        if why:
            skipped[target] = why
        else:
            chosen.append(target)
    results = []
    data = None
    if chosen:
        with BundleUpdate(bundle.directory) as update:
            # quantize a snapshot: a re-export that lands meanwhile cannot change the file under our feet
            fp32, fp32_path = bundle.snapshot(ROOT_ARTIFACT, update)
            data = load_calibration(calib_data, bundle.input.raw, calib_size + check_samples, seed)
            data.inputs, calib_batch = bundle.fit_to_batch(data.inputs, calib_batch)
            if bundle.fixed_batch:  # calibration and check sets both whole batches
                calib_size = max(calib_batch, min(calib_size, len(data.inputs)) // calib_batch * calib_batch)
            if len(data.inputs) > calib_size:
                check = data.inputs[calib_size:]
                data.inputs = data.inputs[:calib_size]
                check_source = "held-out samples of the calibration source"
            else:
                check = data.inputs[: min(len(data.inputs), check_samples)]
                check_source = "calibration samples (source too small to hold any out)"
            check, _ = bundle.fit_to_batch(check, calib_batch)
            runner, reference_label = reference.runner()
            ref_out = runner.infer_batched(check, calib_batch)
            cache_dir = default_cache_dir() if use_cache else None
            for target in chosen:
                job = _job(bundle, update, target, method, gates, fp32_path, fp32.sha256, data, calib_batch, cache_dir,
                           reference)
                with (progress or NULL).task(f"quantizing for {target} ({len(data.inputs)} calibration samples)",
                                             len(data.inputs)) as step:
                    data.on_samples = step
                    try:
                        results.append(_quantize_one(update, bundle, job, check, check_source, ref_out,
                                                     reference_label))
                    finally:
                        data.on_samples = None
            faultpoint("quantized")
            commit_from_source(update, fp32.sha256, "quantizing", "run quantize again")
    return QuantizeResult({"bundle": str(bundle.directory), "artifacts": results,
                           "calibration": data.describe() if data is not None else None, "skipped": skipped,
                           "passed": all(a["parity"]["passed"] for a in results) if results else None})


def _unavailable(target: str, reference: ReferenceModel) -> str | None:
    """Why ``target`` cannot be made here (checked before any calibration work), or None."""
    recipe = get_recipe(target)
    missing = recipe.probe()
    if missing:
        return f"target {target}: {missing}"
    if recipe.from_pytorch:
        module, why = reference.module_or_reason()
        if module is None:
            return f"target {target} quantizes the PyTorch model, which is not available here: {why}"
    return None


def _job(bundle: Bundle, update: BundleUpdate, target: str, method: str | None, gates: str | None, fp32_path: Path,
         source_sha: str, data, calib_batch: int, cache_dir, reference: ReferenceModel) -> RecipeJob:
    recipe = get_recipe(target)
    chosen_method, chosen_gates = recipe.resolve(method, gates)
    module = reference.module_or_reason()[0] if recipe.from_pytorch else None
    return RecipeJob(bundle, recipe, chosen_method, chosen_gates, fp32_path, source_sha, data, bundle.model.gate_list,
                     calib_batch, cache_dir, update.stage_artifact(recipe.writes, "int8", target, chosen_gates), module,
                     bundle.cbam_opt.get("mode", "on") == "on", update)


def _quantize_one(update: BundleUpdate, bundle: Bundle, job: RecipeJob, check, check_source: str, ref_out,
                  reference_label: str) -> dict:
    """One INT8 artifact, made by its recipe, staged in ``update`` and checked against the reference outputs."""
    started = time.perf_counter()
    result = job.recipe.run(job)
    seconds = time.perf_counter() - started
    fields = {"export": result.export} if result.export is not None else {}
    artifact = update.add_artifact(job.recipe.writes, "int8", job.recipe.target, job.gates, source_sha256=job.source_sha,
                                   quantization={**result.info, "seconds": round(seconds, 2)},
                                   calibration=job.data.describe(), **fields)
    # what the recipe read of the artifact it wrote (its graph and gates, for its policy check) is not read again
    staged = bundle.derived({**bundle.manifest, "artifacts": [artifact]}, update.staging)
    staged.remember("graph", artifact["name"], result.graph)
    staged.remember("gates", artifact["name"], result.gates)
    return _check_int8(update, bundle, artifact, check, check_source, job.calib_batch, ref_out, reference_label, job.data)


def _check_int8(update, bundle: Bundle, artifact: dict, check, check_source: str, calib_batch: int, ref_out,
                reference_label: str, data) -> dict:
    """The staged INT8 artifact run on the check set against the reference outputs; its parity record."""
    staged = bundle.derived({**bundle.manifest, "artifacts": [artifact]}, update.staging)
    runner = open_artifact(update.staging, staged, artifact["name"])
    batch = fit_batch(staged, artifact, calib_batch)
    measured = compare_int8(ref_out, runner.infer_batched(check, batch), judge_top1=bundle.model.trained,
                            kinds=bundle.output_kinds)
    artifact["parity"] = {
        "precision": "int8", "reference": reference_label, "inputs": check_source,
        "tolerance": {"min_top1_agreement": INT8_MIN_TOP1, "min_cosine_mean": INT8_MIN_COSINE}, **measured,
    }
    if data.kind == "synthetic":
        artifact["parity"]["warning"] = "synthetic calibration data: not fit for production"
    return artifact


def validate_quantize_options(targets: str | list[str], calib_data: str, calib_size: int = 128, calib_batch: int = 8,
                              method: str | None = None, gates: str | None = None) -> list[str]:
    target_list = parse_list(targets, "--target")
    for target in target_list:
        get_recipe(target).resolve(method, gates)  # "unknown target ...", "... calibrates with ...", "--gates ..."
    check_int("--calib-size", calib_size, 1)
    check_int("--calib-batch", calib_batch, 1, MAX_BATCH)
    if not calib_data:
        raise CbamDeployError("--calib-data needs a folder of images, a .npy/.npz file, or 'synthetic'")
    check_data_source("--calib-data", calib_data)
    return target_list


def targets() -> tuple[str, ...]:
    """Every quantize target (the recipes of every format)."""
    return tuple(recipes())
