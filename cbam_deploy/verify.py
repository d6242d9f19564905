"""``verify``: every artifact of a bundle against PyTorch FP32, with tolerances by precision.

fp32/fp16/bf16 use element-wise bounds (``parity.TOLERANCES``) on seeded inputs at the bundle's
shapes: the bounds of the looser of what the artifact stores (``precision``: an fp16 IR keeps fp16
weights) and what the runtime reports it computed in (``computed_in``: that IR runs in bf16 on a CPU
with bf16 but no fp16 arithmetic, in f32 on one with neither), ``parity.bound_precision``; the row
names the one that judged it (``judged_by``), and the attention parity thresholds follow it. int8
uses top-1 agreement and cosine (``parity.compare_int8``) on images: ``--data`` when given, else the artifact's own calibration source when it still exists, else
seeded noise (marked as such). When an ONNX artifact fails, ``diagnose.locate_divergence`` names the first
module whose output departs. Every gate the model has is compared too (attention parity: spatial
maps and channel profiles), and an INT8 artifact's gate policy is checked again on its graph (Q/DQ or
FakeQuantize placement, ``gates.policy_check``): a gate quantized under ``--gates fp``, or left in
float under ``--gates int8``, fails the artifact by name. Results go into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import attention_parity
from .batching import batch_limit, fit_batch
from .bundle import ArtifactRecord, Bundle, check_artifact_names
from .checks import check_int, parse_list
from .data import check_data_source, load_calibration
from .errors import BackendUnavailable, CbamDeployError
from .formats import get as get_format
from .loaders import ReferenceModel, is_stand_in, open_artifact, untrusted_code
from .manifest import ROOT_ARTIFACT
from .models import CodeTrust
from .parity import (TOLERANCES, bound_precision, compare_all, compare_int8, inputs_label, make_inputs, plan_cases,
                     run_parity)
from .progress import NULL
from .results import Result
from .runtimes import parse_runtimes, runs
from .transaction import faultpoint, update_manifest


class VerifyResult(Result):
    """Every artifact checked against the PyTorch reference (``results``: one row per artifact, with its
    verdict, its figures, its attention parity and gate policy), the reference's label, and warnings
    (a manifest that could not be updated, a reference that could not be had)."""

    command = "verify"

    @property
    def results(self) -> list[dict]:
        return self["results"]

    @property
    def warnings(self) -> list[str]:
        return self.get("warnings", [])

    def row(self, artifact: str) -> dict:
        return next(r for r in self.results if r["artifact"] == artifact)

    @property
    def failure(self) -> str | None:
        if self.passed is not False:
            return None
        recorded = "not recorded" if self.warnings else "recorded in the manifest"
        return f"verification failed ({recorded})"


class ImageCache:
    """Images decoded once per command: {(source, samples, seed): (inputs, label)}."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._loaded: dict[tuple, tuple[np.ndarray, str]] = {}

    def load(self, source: str, samples: int, seed: int) -> tuple[np.ndarray, str]:
        key = (source, samples, seed)
        if key not in self._loaded:
            loaded = load_calibration(source, self.bundle.input.raw, samples, seed)
            self._loaded[key] = (loaded.inputs, f"{loaded.kind}: {loaded.source}")
        return self._loaded[key]


def _int8_inputs(bundle: Bundle, artifact: ArtifactRecord, data: str | None, samples: int,
                 seed: int, images: ImageCache | None = None) -> tuple[np.ndarray, str]:
    """Images for an INT8 or attention comparison: ``data``, else the artifact's calibration source
    while it exists, else seeded noise (said so)."""
    source = data or (artifact.calibration or {}).get("source")
    if source and (source == "synthetic" or Path(source).exists()):
        return (images or ImageCache(bundle)).load(source, samples, seed + 1)
    case = plan_cases(bundle.input.side, None, False, samples)[0]
    preprocess = bundle.input.raw.get("preprocess")
    return (make_inputs(case, seed=seed, preprocess=preprocess),
            f"{inputs_label(preprocess)} (no image data found): weak evidence for int8")


def verify_artifact(bundle: Bundle, artifact: ArtifactRecord, reference, data: str | None = None,
                    samples: int = 16, seed: int = 0, runtime: str | None = None,
                    images: ImageCache | None = None) -> dict:
    try:
        runner = open_artifact(bundle.directory, bundle, artifact.name, runtime=runtime)
    except BackendUnavailable as exc:
        return {"passed": None, "skipped": str(exc)}
    ran = _ran(runner)
    # what the artifact stores (``precision``), what the runtime says it computed in, and the looser of
    # the two, whose bounds judge it
    computed = runner.computed_precision()
    precisions = {"precision": artifact.precision, "computed_in": computed,
                  "judged_by": bound_precision(artifact.precision, computed)}
    kinds = bundle.output_kinds
    if artifact.precision == "int8":
        inputs, label = _int8_inputs(bundle, artifact, data, samples, seed, images)
        inputs, batch = bundle.fit_to_batch(inputs)
        batch = fit_batch(bundle, artifact, batch)
        return {**compare_int8(reference.infer_batched(inputs, batch), runner.infer_batched(inputs, batch),
                               judge_top1=bundle.model.trained, kinds=kinds),
                **precisions, "inputs": label, "candidate": runner.describe(), **ran}
    tolerance = precisions["judged_by"]
    cases = plan_cases(bundle.input.side, _one_batch(bundle, artifact), bundle.input.dynamic_hw, 8,
                       bundle.model.raw.get("input_stride") or 8)
    result = run_parity(reference, runner, cases, tolerance, seed=seed, kinds=kinds,
                        preprocess=bundle.input.raw.get("preprocess"))
    result.update(precisions)
    result.update(ran)
    if data:
        decoded = (images or ImageCache(bundle)).load(data, samples, seed + 1)[0]
        batch_images, batch = bundle.fit_to_batch(decoded)
        batch = fit_batch(bundle, artifact, batch)
        on_images = compare_all(reference.infer_batched(batch_images, batch), runner.infer_batched(batch_images, batch),
                                TOLERANCES[tolerance], kinds, side=bundle.input.side)
        result["images"] = {"source": data, **on_images}
        result["passed"] = result["passed"] and on_images["passed"]
    return result


def _one_batch(bundle: Bundle, artifact: ArtifactRecord) -> int | None:
    """The batch every parity case of ``artifact`` must use: the model's fixed batch, or the one batch its
    format's bounds allow (a program exported for batch 1); None: batch 1 and a larger one."""
    if bundle.fixed_batch:
        return bundle.fixed_batch
    limit = batch_limit(bundle, artifact)
    return limit[0] if limit is not None and limit[0] == limit[1] else None


def _check_attention(bundle: Bundle, artifact: ArtifactRecord, model, result: dict, data: str | None,
                     samples: int, seed: int, images: ImageCache | None = None) -> None:
    """Attention parity (``attention``): every gate of the artifact (spatial maps, channel profiles)
    against PyTorch's, on images where there are any (the ones the artifact's other checks decoded).
    A gate that drifted fails the artifact even when its logits agree."""
    x, label = _int8_inputs(bundle, artifact, data, samples, seed, images)
    x, _ = bundle.fit_to_batch(x[:16])
    one = _one_batch(bundle, artifact)
    x = x[:one] if one else x
    parity = attention_parity(bundle.directory, bundle, artifact.name, model, x, result.get("judged_by"))
    if parity is None:
        return
    result["attention"] = {**parity, "inputs": label}
    if parity["passed"] is False:
        result["passed"] = False
        result["reason"] = "; ".join(r for r in (result.get("reason"), "attention drifted: " + parity["reason"]) if r)


def _check_gate_policy(bundle: Bundle, artifact: ArtifactRecord, result: dict) -> None:
    """The INT8 gate policy the manifest states for ``artifact``, checked on the artifact itself through
    its row (its graph and gates as read once per command); the row's one line where it cannot be."""
    policy = (artifact.quantization or {}).get("gates")
    if artifact.precision != "int8" or policy is None:
        return
    row = get_format(artifact.format)
    try:
        try:
            graph, found = bundle.graph(artifact.name), bundle.found_gates(artifact.name)
        except BackendUnavailable:  # no gate reader: the row may still hold a check made at build
            graph, found = None, None
        check = row.check_policy(artifact, graph, found, bundle.model.gate_list, policy)
    except BackendUnavailable as exc:
        check = {"policy": policy, "held": None, "skipped": str(exc)}
    result["gate_policy"] = check
    if check.get("held") is False:
        result["passed"] = False
        reason = f"gate policy --gates {policy} broken: " + "; ".join(check.get("broken") or [])
        result["reason"] = "; ".join(r for r in (result.get("reason"), reason) if r)
    if "output_tail" not in (artifact.quantization or {}):
        return  # a recipe that stated no output-tail rule (an artifact made before it)
    try:
        tail = row.check_output_tail(artifact, graph)
    except BackendUnavailable as exc:
        tail = {"held": None, "skipped": str(exc)}
    result["output_tail"] = tail
    if tail.get("held") is False:
        result["passed"] = False
        reason = "output tail quantized: " + "; ".join(tail.get("broken") or [])
        result["reason"] = "; ".join(r for r in (result.get("reason"), reason) if r)


def _ran(runner) -> dict:
    """Which runtime and providers really ran the artifact (onnxruntime may fall back silently)."""
    described = runner.describe()
    return {key: described[key] for key in ("runtime", "providers_active", "fallback") if key in described} or \
        {"runtime": getattr(runner, "runtime", None)}


@dataclass
class VerifyOptions:
    """verify's options, checked once here: ``data`` (images or arrays to compare on, besides seeded
    inputs), ``artifacts`` (default: all), ``samples``, ``seed``, ``runtime`` (one runtime name)."""

    data: str | None = None
    artifacts: list[str] | None = None
    samples: int = 16
    seed: int = 0
    runtime: str | None = None

    def __post_init__(self) -> None:
        validate_verify_options(self.data, self.samples)
        if isinstance(self.artifacts, str):
            self.artifacts = parse_list(self.artifacts, "--artifact")
        if self.runtime is not None and len(parse_runtimes(self.runtime)) != 1:
            raise CbamDeployError(f"--runtime: verify takes one runtime, got {self.runtime}")


def verify_bundle(bundle_dir, data: str | None = None, artifacts: list[str] | None = None,
                  samples: int = 16, seed: int = 0, runtime: str | None = None, trust: CodeTrust | None = None,
                  reference: ReferenceModel | None = None, progress=None,
                  options: VerifyOptions | None = None) -> VerifyResult:
    """``bundle_dir``: a folder or an open ``Bundle``; ``options``: a ``VerifyOptions`` (else made from the
    keywords). ``runtime``: run every artifact whose format it runs under that runtime (see
    ``cbam_deploy.runtimes``), the others are skipped; default: the best runtime for each format.
    ``trust`` (``models.CodeTrust``): the code the user lets rebuild a factory model; without it such a
    bundle's artifacts are all skipped ("no trusted reference"), never passed. ``reference``: the
    command's PyTorch reference when it has one already (an export)."""
    options = options or VerifyOptions(data, artifacts, samples, seed, runtime)
    data, artifacts, samples, seed, runtime = (options.data, options.artifacts, options.samples, options.seed,
                                               options.runtime)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    bundle_dir = bundle.directory
    check_artifact_names(bundle, artifacts, bundle_dir)
    untrusted = untrusted_code(bundle, trust) if reference is None else None
    if untrusted is not None:
        rows = [{"artifact": a.name, "format": a.format, "precision": a.precision, "passed": None,
                 "skipped": "no trusted reference", "reference": None}
                for a in bundle.artifacts if not artifacts or a.name in artifacts]
        return VerifyResult({"bundle": str(bundle_dir), "reference": "none", "results": rows, "passed": None,
                             "warnings": [f"nothing verified: no trusted reference: {untrusted}"]})
    reference_runner_, label = (reference or ReferenceModel(bundle, trust)).runner()
    stand_in = is_stand_in(reference_runner_)
    images = ImageCache(bundle)
    chosen = [a for a in bundle.artifacts if not artifacts or a.name in artifacts]
    rows, recorded = [], {}
    with (progress or NULL).task(f"verifying {len(chosen)} artifact(s)", len(chosen)) as step:
        for artifact in chosen:
            rows.append(_verify_one(bundle, artifact, reference_runner_, label, stand_in, data, samples, seed, runtime,
                                    images, recorded))
            step()
    faultpoint("verified")
    warnings = _record(bundle_dir, recorded)
    verdicts = [r["passed"] for r in rows if r.get("passed") is not None]
    return VerifyResult({"bundle": str(bundle_dir), "reference": label, "results": rows, "warnings": warnings,
                         "passed": all(verdicts) if verdicts else None})


def _verify_one(bundle: Bundle, artifact: ArtifactRecord, reference_runner_, label: str, stand_in: bool,
                data: str | None, samples: int, seed: int, runtime: str | None, images: ImageCache,
                recorded: dict) -> dict:
    """One artifact's row: its parity, gate policy, attention parity and, when it fails, its first divergence."""
    if stand_in and artifact.name == ROOT_ARTIFACT:
        result = {"passed": None, "skipped": f"no independent reference ({label}); it was checked against "
                                             "PyTorch at export (see its parity)"}
    elif runtime is not None and not runs(runtime, artifact.format):
        result = {"passed": None, "skipped": f"runtime {runtime} does not run {artifact.format} artifacts"}
    else:
        result = verify_artifact(bundle, artifact, reference_runner_, data, samples, seed, runtime, images)
    result["reference"] = label
    if result.get("passed") is not None:
        _check_gate_policy(bundle, artifact, result)
    if result.get("passed") is not None and not stand_in:
        _check_attention(bundle, artifact, reference_runner_.model, result, data, samples, seed, images)
    if result.get("passed") is False and artifact.precision != "int8" and not stand_in:
        _first_divergence(bundle, artifact, reference_runner_.model, result, seed)
    if result.get("passed") is not None:
        recorded[artifact.name] = (artifact.sha256, result)
    return {"artifact": artifact.name, "format": artifact.format, "precision": artifact.precision, **result}


def _first_divergence(bundle: Bundle, artifact: ArtifactRecord, model, result: dict, seed: int) -> None:
    """Where a failing float artifact first departs from PyTorch, where its format can say."""
    x = make_inputs(plan_cases(bundle.input.side, None, False, 1)[0], seed=seed,
                    preprocess=bundle.input.raw.get("preprocess"))
    x = np.repeat(x, bundle.fixed_batch or 1, axis=0)
    try:
        graph = bundle.graph(artifact.name)
    except BackendUnavailable:
        graph = None
    try:
        result["first_divergence"] = get_format(artifact.format).first_divergence(
            model, bundle.path_of(artifact.name), x, graph)
    except BackendUnavailable:
        return


def _record(bundle_dir: Path, recorded: dict) -> list[str]:
    """Merge the verdicts into the current manifest (for artifacts still as verified); report, never
    fail, when the bundle cannot be written."""
    if not recorded:
        return []
    stale = []

    def merge(current: dict) -> dict:
        for artifact in current["artifacts"]:
            sha_and_result = recorded.get(artifact["name"])
            if sha_and_result is None:
                continue
            if sha_and_result[0] == artifact["sha256"]:
                artifact["verify"] = sha_and_result[1]
            else:
                stale.append(artifact["name"])
        return current

    try:
        update_manifest(bundle_dir, merge)
    except CbamDeployError as exc:
        return [f"the manifest could not be updated, so these results were not recorded: {exc}"]
    return [f"{name} was rebuilt while it was verified; its new version's result was not recorded" for name in stale]


def validate_verify_options(data: str | None = None, samples: int = 16) -> None:
    check_int("--samples", samples, 1)
    check_data_source("--data", data)
