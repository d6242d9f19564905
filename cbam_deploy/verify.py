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

from pathlib import Path

import numpy as np
import onnx

from .attention import attention_parity
from .backends.ncnn.exporter import NcnnParam
from .backends.openvino.exporter import require_openvino
from .bundle import ArtifactRecord, Bundle, check_artifact_names
from .checks import check_int
from .data import check_data_source, load_calibration
from .diagnose import locate_divergence
from .errors import BackendUnavailable, CbamDeployError
from .gates import check_ncnn_policy, check_onnx_policy, check_openvino_policy
from .loaders import is_stand_in, open_artifact, reference_runner, untrusted_code
from .models import CodeTrust
from .parity import TOLERANCES, bound_precision, compare_all, compare_int8, make_inputs, plan_cases, run_parity
from .runtimes import RUNTIMES, parse_runtimes
from .transaction import faultpoint, update_manifest


def _int8_inputs(bundle: Bundle, artifact: ArtifactRecord, data: str | None, samples: int,
                 seed: int) -> tuple[np.ndarray, str]:
    source = data or (artifact.calibration or {}).get("source")
    if source and (source == "synthetic" or Path(source).exists()):
        loaded = load_calibration(source, bundle.input.raw, samples, seed + 1)
        return loaded.inputs, f"{loaded.kind}: {loaded.source}"
    case = plan_cases(bundle.input.side, None, False, samples)[0]
    return make_inputs(case, seed=seed), "seeded N(0,1) noise (no image data found): weak evidence for int8"


def verify_artifact(bundle: Bundle, artifact: ArtifactRecord, reference, data: str | None = None,
                    samples: int = 16, seed: int = 0, runtime: str | None = None) -> dict:
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
        inputs, label = _int8_inputs(bundle, artifact, data, samples, seed)
        inputs, batch = bundle.fit_to_batch(inputs)
        return {**compare_int8(reference.infer_batched(inputs, batch), runner.infer_batched(inputs, batch),
                               judge_top1=bundle.model.trained, kinds=kinds),
                **precisions, "inputs": label, "candidate": runner.describe(), **ran}
    tolerance = precisions["judged_by"]
    cases = plan_cases(bundle.input.side, bundle.fixed_batch, bundle.input.dynamic_hw, 8)
    result = run_parity(reference, runner, cases, tolerance, seed=seed, kinds=kinds)
    result.update(precisions)
    result["inputs"] = "seeded N(0,1) in the normalised input space"
    result.update(ran)
    if data:
        images, batch = bundle.fit_to_batch(load_calibration(data, bundle.input.raw, samples, seed).inputs)
        on_images = compare_all(reference.infer_batched(images, batch), runner.infer_batched(images, batch),
                                TOLERANCES[tolerance], kinds)
        result["images"] = {"source": data, **on_images}
        result["passed"] = result["passed"] and on_images["passed"]
    return result


def _check_attention(bundle: Bundle, artifact: ArtifactRecord, model, result: dict, data: str | None,
                     samples: int, seed: int) -> None:
    """Attention parity (``attention``): every gate of the artifact (spatial maps, channel profiles)
    against PyTorch's, on images where there are any. A gate that drifted fails the artifact even when
    its logits agree."""
    x, label = _int8_inputs(bundle, artifact, data, min(samples, 16), seed + 7)
    x, _ = bundle.fit_to_batch(x)
    x = x[:bundle.fixed_batch] if bundle.fixed_batch else x
    parity = attention_parity(bundle.directory, bundle, artifact.name, model, x, result.get("judged_by"))
    if parity is None:
        return
    result["attention"] = {**parity, "inputs": label}
    if parity["passed"] is False:
        result["passed"] = False
        result["reason"] = "; ".join(r for r in (result.get("reason"), "attention drifted: " + parity["reason"]) if r)


def _check_gate_policy(bundle: Bundle, artifact: ArtifactRecord, result: dict) -> None:
    """The INT8 gate policy the manifest states for ``artifact``, checked on the artifact's graph."""
    policy = (artifact.quantization or {}).get("gates")
    if artifact.precision == "int8" and policy is not None and artifact.format == "executorch":
        recorded = (artifact.quantization or {}).get("gate_check")
        if not isinstance(recorded, dict) or recorded.get("policy") != policy:
            result["gate_policy"] = {"policy": policy, "held": None,
                                     "skipped": "no gate check recorded with the artifact: build it again"}
            return
        # the .pte's delegate payload is opaque: the check is the one made on the PT2E program it was lowered from
        result["gate_policy"] = {**recorded, "note": "checked at build on the PT2E-converted program; the .pte's "
                                 "XNNPACK payload is opaque to the runtime"}
        if not recorded.get("held"):
            result["passed"] = False
            reason = f"gate policy --gates {policy} broken: " + "; ".join(recorded.get("broken") or [])
            result["reason"] = "; ".join(r for r in (result.get("reason"), reason) if r)
        return
    if artifact.precision != "int8" or policy is None or artifact.format not in ("onnx", "openvino", "ncnn"):
        return
    path = bundle.path_of(artifact.name)
    expected = bundle.model.gate_list
    if artifact.format == "onnx":
        check = check_onnx_policy(onnx.load(str(path)), expected, policy, artifact.name)
    elif artifact.format == "ncnn":  # int8_scale_term per layer, read from the .param
        check = check_ncnn_policy(NcnnParam.read(path).layers, expected, policy, artifact.name)
    else:
        try:
            ov = require_openvino()
        except BackendUnavailable as exc:
            result["gate_policy"] = {"policy": policy, "held": None, "skipped": str(exc)}
            return
        check = check_openvino_policy(ov.Core().read_model(str(path)), expected, policy, artifact.name)
    result["gate_policy"] = check
    if not check["held"]:
        result["passed"] = False
        reason = f"gate policy --gates {policy} broken: " + "; ".join(check["broken"])
        result["reason"] = "; ".join(r for r in (result.get("reason"), reason) if r)


def _ran(runner) -> dict:
    """Which runtime and providers really ran the artifact (onnxruntime may fall back silently)."""
    described = runner.describe()
    return {key: described[key] for key in ("runtime", "providers_active", "fallback") if key in described} or \
        {"runtime": getattr(runner, "runtime", None)}


def verify_bundle(bundle_dir: str | Path, data: str | None = None, artifacts: list[str] | None = None,
                  samples: int = 16, seed: int = 0, runtime: str | None = None, trust: CodeTrust | None = None) -> dict:
    """``runtime``: run every artifact whose format it runs under that runtime (see
    ``cbam_deploy.runtimes``), the others are skipped; default: the best runtime for each format.
    ``trust`` (``models.CodeTrust``): the code the user lets rebuild a factory model; without it such a
    bundle's artifacts are all skipped ("no trusted reference"), never passed."""
    validate_verify_options(data, samples)
    if runtime is not None and len(parse_runtimes(runtime)) != 1:
        raise CbamDeployError(f"--runtime: verify takes one runtime, got {runtime}")
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.open(bundle_dir)
    check_artifact_names(bundle, artifacts, bundle_dir)
    untrusted = untrusted_code(bundle, trust)
    if untrusted is not None:
        rows = [{"artifact": a.name, "format": a.format, "precision": a.precision, "passed": None,
                 "skipped": "no trusted reference", "reference": None}
                for a in bundle.artifacts if not artifacts or a.name in artifacts]
        return {"bundle": str(bundle_dir), "reference": "none", "results": rows, "passed": None,
                "warnings": [f"nothing verified: no trusted reference: {untrusted}"]}
    reference, label = reference_runner(bundle, trust=trust)
    rows, recorded = [], {}
    for artifact in bundle.artifacts:
        if artifacts and artifact.name not in artifacts:
            continue
        if is_stand_in(reference) and artifact.name == "onnx-fp32":
            result = {"passed": None, "skipped": f"no independent reference ({label}); it was checked against "
                                                 "PyTorch at export (see its parity)"}
        elif runtime is not None and artifact.format not in RUNTIMES[runtime].formats:
            result = {"passed": None, "skipped": f"runtime {runtime} does not run {artifact.format} artifacts"}
        else:
            result = verify_artifact(bundle, artifact, reference, data, samples, seed, runtime)
        result["reference"] = label
        if result.get("passed") is not None:
            _check_gate_policy(bundle, artifact, result)
        if result.get("passed") is not None and not is_stand_in(reference):
            _check_attention(bundle, artifact, reference.model, result, data, samples, seed)
        if result.get("passed") is False and artifact.format == "onnx" and artifact.precision != "int8" \
                and not is_stand_in(reference):
            x = make_inputs(plan_cases(bundle.input.side, None, False, 1)[0], seed=seed)
            x = np.repeat(x, bundle.fixed_batch or 1, axis=0)
            result["first_divergence"] = locate_divergence(reference.model, bundle.path_of(artifact.name, False), x)
        if result.get("passed") is not None:
            recorded[artifact.name] = (artifact.sha256, result)
        rows.append({"artifact": artifact.name, "format": artifact.format, "precision": artifact.precision, **result})
    faultpoint("verified")
    warnings = _record(bundle_dir, recorded)
    verdicts = [r["passed"] for r in rows if r.get("passed") is not None]
    return {"bundle": str(bundle_dir), "reference": label, "results": rows, "warnings": warnings,
            "passed": all(verdicts) if verdicts else None}


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
