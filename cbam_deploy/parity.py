"""Compare an artifact's outputs with the PyTorch original: metrics, tolerances per precision.

Knows nothing of backends: it takes two runners (or two arrays) and seeded inputs.

FP32 tolerance (documented in docs/export.md): for every case,
``max_abs_err <= atol + rtol * max|reference|`` with atol = 1e-5, rtol = 1e-4, the minimum per-sample
cosine similarity >= 0.99999, and top-1 agreement on every sample whose reference top-1/top-2 gap
is larger than that same error bound (a near tie may flip without anything being wrong).
onnxruntime vs eager on these networks is typically ~1e-6 relative, so the bound leaves two
orders of magnitude of headroom while still catching a wrong op (errors of 1e-2 and up).

A detector's decoded output (kind ``detections``: boxes in input pixels, then class probabilities) is
judged in the units of each part: its boxes by ``atol + rtol * side`` pixels (``side``: the input's
longer side), its scores by ``atol + rtol`` (absolute probabilities); its INT8 by the detections it keeps
after NMS (``detection.agreement``), never by cosine on the concatenated output.

The seeded inputs are drawn in the model's input range: uniform pixels through the manifest's
preprocessing (scale, mean, std), so a model trained on 0-1 pixels is not fed N(0, 1) noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import detection
from .runners.base import Runner


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float
    min_top1: float  # fraction of decisive samples whose top-1 must agree

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max())


TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-4, min_cosine=0.99999, min_top1=1.0),
    # half precision: 11-bit (fp16) / 8-bit (bf16) mantissas through ~50 layers
    "fp16": Tolerance(atol=1e-3, rtol=2e-2, min_cosine=0.999, min_top1=0.99),
    "bf16": Tolerance(atol=1e-2, rtol=6e-2, min_cosine=0.99, min_top1=0.95),
}
# INT8 is judged by agreement, not element-wise error: top-1 agreement over all samples and the
# mean cosine similarity of the logits.
INT8_MIN_TOP1 = 0.90
INT8_MIN_COSINE = 0.98
# Precisions from the tightest bounds to the loosest (TOLERANCES, then INT8's agreement).
LOOSENESS = ("fp32", "fp16", "bf16", "int8")


def bound_precision(stored: str, computed: str | None) -> str:
    """The precision whose bounds judge an artifact: the looser of what it stores (an fp16 IR's fp16
    weights, int8) and what the runtime reports it computed in (``computed``; None: it does not say).
    An fp16 IR that a CPU without fp16 or bf16 arithmetic runs in f32 still carries fp16 weights, so
    fp16 bounds; one that runs in bf16 gets bf16 bounds. Precisions this table does not know count as fp32."""
    ranks = [LOOSENESS.index(p) if p in LOOSENESS else 0 for p in (stored, computed) if p is not None]
    return LOOSENESS[max(ranks, default=0)]


def compare_int8(reference, candidate, judge_top1: bool = True, kind: str = "logits",
                 kinds: dict[str, str] | None = None) -> dict:
    """INT8 verdict. ``judge_top1=False`` for models without trained weights: their logits are
    near ties, so top-1 flips say nothing about the quantization; only the cosine is judged then.
    Dense outputs (feature maps) are judged by cosine alone; a detector's decoded output by the
    detections it keeps (``detection.agreement``). Dicts of outputs go through ``compare_all``."""
    if isinstance(reference, dict):
        return compare_all(reference, candidate, None, kinds, judge_top1=judge_top1)
    if kind == "detections":
        return detection.agreement(reference, candidate, judge=judge_top1)
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(axis=1) / np.maximum(norms, 1e-30)
    metrics = {"samples": len(ref), "kind": kind, "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
               "max_abs_err": float(np.abs(ref - cand).max())}
    if kind == "logits":
        metrics["top1_agreement"] = float((ref.argmax(1) == cand.argmax(1)).mean())
    reasons = []
    if kind != "logits":
        pass
    elif not judge_top1:
        metrics["note"] = "random (untrained) weights: top-1 agreement reported, not judged"
    elif metrics["top1_agreement"] < INT8_MIN_TOP1:
        reasons.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < {INT8_MIN_TOP1}")
    if metrics["cosine_mean"] < INT8_MIN_COSINE:
        reasons.append(f"mean cosine {metrics['cosine_mean']:.4f} < {INT8_MIN_COSINE}")
    metrics["passed"] = not reasons
    if reasons:
        metrics["reason"] = "; ".join(reasons)
    return metrics


def compare_all(reference, candidate, tolerance: Tolerance | None = None, kinds: dict[str, str] | None = None,
                judge_top1: bool = True, side: int | None = None) -> dict:
    """Every output of a case: per-output metrics (``outputs``) and the verdict over all of them. An
    output's kind decides what is judged: logits get top-1 checks, dense/other outputs only cosine and
    element-wise bounds. ``tolerance`` None: the INT8 verdict (``compare_int8``) per output. One
    output gives exactly that output's metrics (what classifiers always had)."""
    reference, candidate = _as_dict(reference), _as_dict(candidate)
    missing = [name for name in reference if name not in candidate]
    if missing:
        return {"passed": False, "reason": f"outputs {missing} are missing from the candidate",
                "samples": len(next(iter(reference.values())))}
    per_output = {}
    for name, ref in reference.items():
        kind = (kinds or {}).get(name, "logits")
        if tolerance is None:
            per_output[name] = compare_int8(ref, candidate[name], judge_top1=judge_top1, kind=kind)
        else:
            per_output[name] = compare_outputs(ref, candidate[name], tolerance, kind=kind, side=side)
    if len(per_output) == 1:
        return next(iter(per_output.values()))
    first = next(iter(per_output.values()))
    failed = [f"{name}: {m['reason']}" for name, m in per_output.items() if not m["passed"]]
    summary = {"samples": first["samples"], "passed": not failed, "outputs": per_output,
               "max_abs_err": max(m.get("max_abs_err", float("inf")) for m in per_output.values()),
               "cosine_min": min(m.get("cosine_min", 0.0) for m in per_output.values()),
               "cosine_mean": float(np.mean([m.get("cosine_mean", 0.0) for m in per_output.values()]))}
    logits = [m for name, m in per_output.items() if (kinds or {}).get(name, "logits") == "logits"]
    if logits:
        summary["top1_agreement"] = logits[0]["top1_agreement"]
    if all("mean_abs_err" in m for m in per_output.values()):
        summary["mean_abs_err"] = float(np.mean([m["mean_abs_err"] for m in per_output.values()]))
    if failed:
        summary["reason"] = "; ".join(failed)
    return summary


def _as_dict(outputs) -> dict[str, np.ndarray]:
    return outputs if isinstance(outputs, dict) else {"output": outputs}


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, kind: str = "logits",
                    side: int | None = None) -> dict:
    """Metrics of one output of one case (a batch) and whether it passes; top-1 only for logits; a
    detector's boxes and scores each in their own units (``side``: the input's longer side)."""
    if kind == "detections":
        return compare_detections(reference, candidate, tolerance, side)
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    candidate = np.asarray(candidate, dtype=np.float64)
    if candidate.size != reference.size:
        return {"passed": False, "reason": f"output shape {candidate.shape} does not match the reference", "samples": len(reference)}
    candidate = candidate.reshape(reference.shape)
    if not np.isfinite(candidate).all():
        return {"passed": False, "reason": "output holds NaN or Inf", "samples": len(reference)}
    diff = np.abs(reference - candidate)
    bound = tolerance.bound(reference)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.where(norms > 0, (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    metrics = {
        "samples": len(reference),
        "kind": kind,
        "max_abs_err": float(diff.max()),
        "mean_abs_err": float(diff.mean()),
        "max_rel_err": float(diff.max() / max(np.abs(reference).max(), 1e-30)),
        "bound": bound,
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }
    reasons = []
    if metrics["max_abs_err"] > bound:
        reasons.append(f"max abs error {metrics['max_abs_err']:.3g} > {bound:.3g}")
    if metrics["cosine_min"] < tolerance.min_cosine:
        reasons.append(f"cosine {metrics['cosine_min']:.6f} < {tolerance.min_cosine}")
    if kind == "logits":
        agree = reference.argmax(axis=1) == candidate.argmax(axis=1)
        if reference.shape[1] > 1:
            ordered = np.sort(reference, axis=1)
            decisive = (ordered[:, -1] - ordered[:, -2]) > bound
        else:
            decisive = np.ones(len(reference), dtype=bool)
        decisive_agree = float(agree[decisive].mean()) if decisive.any() else 1.0
        metrics.update(top1_agreement=float(agree.mean()), top1_agreement_decisive=decisive_agree)
        if decisive_agree < tolerance.min_top1:
            reasons.append(f"top-1 agreement {decisive_agree:.3f} < {tolerance.min_top1}")
    metrics["passed"] = not reasons
    if reasons:
        metrics["reason"] = "; ".join(reasons)
    return metrics


def compare_detections(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance, side: int | None) -> dict:
    """A detector's decoded output (batch, 4 + classes, anchors): its boxes within ``atol + rtol * side``
    pixels, its class probabilities within ``atol + rtol``; cosine reported, not judged (pixels and
    probabilities in one vector say little)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if candidate.shape != reference.shape or reference.ndim != 3 or reference.shape[1] < 5:
        return {"passed": False, "kind": "detections", "samples": len(reference),
                "reason": f"output shape {candidate.shape} does not match the reference {reference.shape} "
                          "(batch, 4 + classes, anchors)"}
    if not np.isfinite(candidate).all():
        return {"passed": False, "kind": "detections", "samples": len(reference), "reason": "output holds NaN or Inf"}
    side = side or float(np.abs(reference[:, :4]).max())
    box_err, score_err = detection.split_errors(reference, candidate)
    box_bound, score_bound = tolerance.atol + tolerance.rtol * side, tolerance.atol + tolerance.rtol
    flat_ref, flat_cand = reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosine = np.where(norms > 0, (flat_ref * flat_cand).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
    diff = np.abs(reference - candidate)
    metrics = {"samples": len(reference), "kind": "detections", "max_abs_err": float(diff.max()),
               "mean_abs_err": float(diff.mean()), "max_box_err_px": box_err, "box_bound_px": box_bound,
               "max_score_err": score_err, "score_bound": score_bound, "bound": box_bound, "side": side,
               "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}
    reasons = []
    if box_err > box_bound:
        reasons.append(f"boxes off by {box_err:.3g} px > {box_bound:.3g} px ({tolerance.rtol:g} of the {side:g}-px side)")
    if score_err > score_bound:
        reasons.append(f"class probabilities off by {score_err:.3g} > {score_bound:.3g}")
    metrics["passed"] = not reasons
    if reasons:
        metrics["reason"] = "; ".join(reasons)
    return metrics


@dataclass(frozen=True)
class ParityCase:
    batch: int
    height: int
    width: int
    samples: int


def plan_cases(input_size: int, batch: int | None, dynamic_hw: bool, samples: int = 8,
               stride: int = 8) -> list[ParityCase]:
    """Batch 1 and a larger batch on ``samples`` inputs (or the fixed batch), plus two other sizes
    when H/W are dynamic (multiples of ``stride``, the model's: a detector's sides must be)."""
    if batch is None:
        cases = [ParityCase(1, input_size, input_size, samples), ParityCase(4, input_size, input_size, samples)]
        other_batch = 2
    else:
        total = batch * max(1, -(-samples // batch))
        cases = [ParityCase(batch, input_size, input_size, total)]
        other_batch = batch
    if dynamic_hw:
        for scale in (0.75, 1.25):
            side = max(stride, int(round(input_size * scale / stride)) * stride)
            cases.append(ParityCase(other_batch, side, side + stride, other_batch))
    return cases


def make_inputs(case: ParityCase, channels: int = 3, seed: int = 0, preprocess: dict | None = None) -> np.ndarray:
    """Seeded inputs in the model's input range: uniform 8-bit pixels scaled and normalised as ``preprocess``
    (the manifest's ``input.preprocess``) says; without it, N(0, 1) in the normalised space."""
    rng = np.random.default_rng([seed, case.height, case.width])
    shape = (case.samples, channels, case.height, case.width)
    if preprocess is None:
        return rng.standard_normal(shape, dtype=np.float32)
    pixels = rng.uniform(0, 255, shape) * float(preprocess.get("scale", 1 / 255))
    mean = np.resize(np.asarray(preprocess.get("mean", [0.0]), np.float64), channels).reshape(1, channels, 1, 1)
    std = np.resize(np.asarray(preprocess.get("std", [1.0]), np.float64), channels).reshape(1, channels, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def inputs_label(preprocess: dict | None) -> str:
    """What the seeded inputs are, for the parity record."""
    if preprocess is None:
        return "seeded N(0,1) in the normalised input space"
    return "seeded uniform 8-bit pixels through the model's preprocessing (scale, mean, std)"


def run_parity(
    reference: Runner,
    candidate: Runner,
    cases: list[ParityCase],
    precision: str = "fp32",
    channels: int = 3,
    seed: int = 0,
    kinds: dict[str, str] | None = None,
    preprocess: dict | None = None,
) -> dict:
    """Run both runners on every case; aggregate metrics and a pass/fail per case and overall. ``preprocess``:
    the manifest's ``input.preprocess``, so the inputs are in the model's range (``make_inputs``)."""
    tolerance = TOLERANCES[precision]
    results = []
    for case in cases:
        inputs = make_inputs(case, channels, seed, preprocess)
        metrics = compare_all(reference.infer_batched(inputs, case.batch), candidate.infer_batched(inputs, case.batch),
                              tolerance, kinds, side=max(case.height, case.width))
        results.append({"batch": case.batch, "height": case.height, "width": case.width, **metrics})
    passed = all(r["passed"] for r in results)
    summary = {
        "passed": passed,
        "precision": precision,
        "reference": reference.describe(),
        "candidate": candidate.describe(),
        "tolerance": asdict(tolerance),
        "seed": seed,
        "inputs": inputs_label(preprocess),
        "samples": sum(r["samples"] for r in results),
        "max_abs_err": max(r.get("max_abs_err", float("inf")) for r in results),
        "mean_abs_err": float(np.mean([r.get("mean_abs_err", float("inf")) for r in results])),
        "cosine_min": min(r.get("cosine_min", 0.0) for r in results),
        **({"top1_agreement": float(np.mean([r["top1_agreement"] for r in results]))}
           if all("top1_agreement" in r for r in results) else {}),
        "cases": results,
    }
    if results and all("max_box_err_px" in r for r in results):  # a detector: its worst box and score, in units
        summary.update(max_box_err_px=max(r["max_box_err_px"] for r in results),
                       box_bound_px=min(r["box_bound_px"] for r in results),
                       max_score_err=max(r["max_score_err"] for r in results),
                       score_bound=min(r["score_bound"] for r in results))
    return summary
