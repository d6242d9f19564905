"""Attention parity: does a deployed artifact still look where the PyTorch FP32 model looks?

Logit agreement can hide a gate that has collapsed. Every attention gate the gate finder
(``cbam_deploy.gates``) finds is read out of the PyTorch model (its traced graph, so a functional
``torch.sigmoid`` is seen as well as a module) and out of each artifact under its own runtime,
through the artifact's row (``formats.Format.gate_maps``: a probe of the artifact that exposes each
gate's sigmoid as an extra output), the gate found by the same finder in the artifact's graph. A
format without a gate reader says why in one line, and its artifacts are skipped. Per gate:

- spatial (N, 1, H, W) and joint (N, C, H, W) maps: Pearson correlation and the IoU of the top-10%
  regions;
- channel gates (N, C): cosine of the channel profiles and the overlap of their top-k channels
  (k = a quarter of the channels, at least one).

Noise or drift: where a sample's PyTorch map or profile varies less than the artifact's own error at
that gate, which channels or pixels rank highest is noise, not evidence. Those samples are left out of
the ranking measures (top-k overlap; correlation and IoU); a gate flat on every sample is judged by the
cosine alone, and its record says so (``flat``). The error is the part of the artifact's map that
PyTorch's does not explain (the residual of a least-squares fit ``artifact = a + b * pytorch``), so a
gate stuck at a constant or collapsed to nearly one has almost none, and its ranking is judged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from .bundle import Bundle
from .errors import BackendUnavailable, CbamDeployError
from .formats import get as get_format
from .gates import GatesUntraceable, shape_map
from .torch_gates import trace_gate_maps

TOP_FRACTION = 0.10
TOP_CHANNEL_FRACTION = 0.25
# Per precision: a spatial gate passes when its map correlates at least this well with PyTorch FP32
# and its top-10% region overlaps at least this much (IoU).
THRESHOLDS = {"fp32": (0.999, 0.90), "fp16": (0.99, 0.80), "bf16": (0.98, 0.70), "int8": (0.90, 0.50)}
# Per precision: a channel gate passes when its profile's cosine with PyTorch FP32 and the overlap of
# its top-k channels reach these.
CHANNEL_THRESHOLDS = {"fp32": (0.9999, 0.90), "fp16": (0.999, 0.75), "bf16": (0.995, 0.70), "int8": (0.98, 0.50)}
# A sample's ranking is judged when PyTorch's map or profile spreads (standard deviation over channels or
# pixels) at least this many times the artifact's error at the gate.
SPREAD_OVER_ERROR = 2.0


def torch_maps(model: nn.Module, x: np.ndarray, kind: str | None = "spatial",
               gates: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The gates PyTorch computes for ``x``, by gate name: spatial maps (N, 1, H, W), channel
    profiles (N, C), joint maps (N, C, H, W); ``kind`` keeps one kind (None: all)."""
    maps, kinds = trace_gate_maps(model, x, gates)
    return {g: m for g, m in maps.items() if kind is None or kinds.get(g) == kind}


def artifact_maps(bundle_dir: str | Path | None, manifest, name: str, x: np.ndarray,
                  threads: int | None = None) -> dict[str, np.ndarray]:
    """The gates an artifact of the bundle (``manifest``: a ``Bundle`` or its manifest dict) computes for
    ``x``, under its own runtime, by gate name (named as the manifest names them)."""
    return artifact_probe(bundle_dir, manifest, name, x, threads)[0]


def artifact_probe(bundle_dir: str | Path | None, manifest, name: str, x: np.ndarray,
                   threads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the gate maps of ``artifact_maps``, the model's outputs) from one run of the artifact's probe. Its
    graph is parsed and its gates found once per command (``Bundle.graph``, ``Bundle.found_gates``); a
    format that cannot give its gate maps raises ``BackendUnavailable`` with the one line why."""
    bundle = Bundle.of(manifest)
    if bundle_dir is not None and bundle.directory != Path(bundle_dir):
        bundle = Bundle(bundle.manifest, bundle_dir)
    artifact = bundle.artifact(name)
    row = get_format(artifact.format)
    found = bundle.found_gates(name)
    raw, outputs = row.gate_maps(bundle.path_of(name), bundle.graph(name), found, artifact.precision, x, threads)
    kinds = {g.name: g.kind for g in found}
    return {gate: shape_map(values, kinds[gate]) for gate, values in raw.items()}, outputs


def compare_maps(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str = "fp32",
                 top_fraction: float = TOP_FRACTION, kinds: dict[str, str] | None = None) -> dict:
    """Per gate: for maps, correlation, top-k% IoU, max abs error; for channel gates (``kinds``
    says which; by default a 2-D reference is a channel profile), cosine and top-k overlap. The
    verdict by the precision's thresholds, the ranking measures over the samples whose PyTorch map
    spreads above the artifact's error (``ranked_samples``); a gate flat on every sample by its cosine
    (``flat`` says why)."""
    min_corr, min_iou = THRESHOLDS.get(precision, THRESHOLDS["fp32"])
    min_cos, min_overlap = CHANNEL_THRESHOLDS.get(precision, CHANNEL_THRESHOLDS["fp32"])
    stages, reasons = {}, []
    for gate, ref in reference.items():
        cand = candidate.get(gate)
        if cand is None or cand.size != ref.size:
            stages[gate] = {"found": False}
            reasons.append(f"{gate}: not found in the artifact")
            continue
        r = ref.reshape(len(ref), -1).astype(np.float64)
        c = cand.reshape(len(cand), -1).astype(np.float64)
        kind = (kinds or {}).get(gate) or ("channel" if ref.ndim == 2 else "spatial")
        spread, error = _spread_and_error(r, c)
        ranked = spread > SPREAD_OVER_ERROR * error
        stage = {"found": True, "kind": kind, "max_abs_err": float(np.abs(r - c).max()),
                 "spread": float(spread.mean()), "error": float(error.mean()),
                 "ranked_samples": int(ranked.sum()), "samples": len(r)}
        cosine = float(np.mean([_cosine(a, b) for a, b in zip(r, c)]))
        flat = None if ranked.any() else (
            f"flat {'profile' if kind == 'channel' else 'map'}: its spread ({stage['spread']:.2g}) is under "
            f"{SPREAD_OVER_ERROR:g}x the artifact's error there ({stage['error']:.2g}) on every sample, so which "
            f"{'channels' if kind == 'channel' else 'pixels'} rank highest is noise: judged on cosine alone")
        judged = ranked if ranked.any() else np.ones(len(r), dtype=bool)
        if kind == "channel":
            overlap = float(np.mean([_top_overlap(a, b, TOP_CHANNEL_FRACTION) for a, b in zip(r[judged], c[judged])]))
            stages[gate] = {**stage, "cosine": cosine, "top_overlap": overlap, **({"flat": flat} if flat else {})}
            if cosine < min_cos or (not flat and overlap < min_overlap):
                reasons.append(f"{gate}: channel profile cosine {cosine:.4f}, top-{TOP_CHANNEL_FRACTION:.0%} overlap "
                               f"{overlap:.3f} (needs {min_cos}" + (f" and {min_overlap})" if not flat else "; flat)"))
            continue
        corr = _correlation(r[judged], c[judged])
        ties = np.maximum(2 * error[judged], 1e-6)  # values within the artifact's own error of the k-th are tied
        iou = float(np.mean([_top_iou(a, b, top_fraction, t) for a, b, t in zip(r[judged], c[judged], ties)]))
        stages[gate] = {**stage, "correlation": corr, "top_iou": iou}
        if flat:
            stages[gate].update(flat=flat, map_cosine=cosine)
            if cosine < min_cos:
                reasons.append(f"{gate}: flat map cosine {cosine:.4f} (needs {min_cos})")
        elif corr < min_corr or iou < min_iou:
            reasons.append(f"{gate}: correlation {corr:.4f}, top-{top_fraction:.0%} IoU {iou:.3f} "
                           f"(needs {min_corr} and {min_iou})")
    maps = [s for s in stages.values() if s.get("found") and "correlation" in s]
    profiles = [s for s in stages.values() if s.get("found") and "cosine" in s]
    return {"gates": stages, "passed": not reasons, "reason": "; ".join(reasons) if reasons else None,
            "counts": {"spatial": sum(1 for s in stages.values() if s.get("kind") == "spatial"),
                       "channel": sum(1 for s in stages.values() if s.get("kind") == "channel"),
                       "joint": sum(1 for s in stages.values() if s.get("kind") == "joint"),
                       "not_found": sum(1 for s in stages.values() if not s.get("found"))},
            "min_correlation": min((s["correlation"] for s in maps), default=None),
            "min_top_iou": min((s["top_iou"] for s in maps), default=None),
            "min_channel_cosine": min((s["cosine"] for s in profiles), default=None),
            "min_channel_overlap": min((s["top_overlap"] for s in profiles if not s.get("flat")), default=None),
            "thresholds": {"min_correlation": min_corr, "min_top_iou": min_iou, "top_fraction": top_fraction,
                           "min_channel_cosine": min_cos, "min_channel_overlap": min_overlap,
                           "top_channel_fraction": TOP_CHANNEL_FRACTION, "spread_over_error": SPREAD_OVER_ERROR}}


def _spread_and_error(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (rows): the reference's standard deviation, and the artifact's error that the
    reference does not explain: the RMS residual of the least-squares fit ``candidate = a + b * reference``
    (a shift or a gain keeps every ranking; a constant or a collapsed gate leaves almost no residual)."""
    r = reference - reference.mean(axis=1, keepdims=True)
    c = candidate - candidate.mean(axis=1, keepdims=True)
    variance = (r * r).sum(axis=1)
    gain = np.where(variance > 0, (r * c).sum(axis=1) / np.maximum(variance, 1e-300), 0.0)
    return np.sqrt(variance / r.shape[1]), np.sqrt(((c - gain[:, None] * r) ** 2).mean(axis=1))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:  # a constant map: equal constants agree perfectly, anything else does not
        return 1.0 if np.allclose(a, b) else 0.0
    return float(a @ b / denominator)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(a @ b / denominator)


def _top_overlap(reference: np.ndarray, candidate: np.ndarray, fraction: float, tie: float = 1e-6) -> float:
    """Share of the candidate's top-k channels that are among the reference's top k (a channel tied,
    within ``tie``, with the reference's k-th value counts as among them)."""
    k = max(1, int(round(fraction * reference.size)))
    kth = np.partition(-reference, k - 1)[k - 1] * -1
    top_candidate = np.argpartition(-candidate, k - 1)[:k]
    return float(np.mean(reference[top_candidate] >= kth - tie))


def _top_iou(a: np.ndarray, b: np.ndarray, fraction: float, tie: float = 1e-6) -> float:
    """IoU of the two maps' top regions: the pixels at or above each map's k-th largest value (k = the
    fraction of the pixels), less ``tie``, so that pixels tied there (a gate saturated at 1 over a
    large area) all count, and none is picked by the order of a sort among equals."""
    k = max(1, int(round(fraction * a.size)))
    top_a = a >= np.partition(a, a.size - k)[a.size - k] - tie
    top_b = b >= np.partition(b, b.size - k)[b.size - k] - tie
    union = np.count_nonzero(top_a | top_b)
    return float(np.count_nonzero(top_a & top_b) / union) if union else 1.0


def attention_parity(bundle_dir: str | Path, manifest, name: str, model: nn.Module, x: np.ndarray,
                     precision: str | None = None) -> dict | None:
    """Attention parity of one artifact (``manifest``: a ``Bundle`` or its manifest dict) against the
    PyTorch model on ``x``, for every gate of the model; None for a model without gates. ``precision``:
    whose thresholds judge it, the precision it ran in (default: the one the artifact claims)."""
    bundle = Bundle.of(manifest)
    gates = bundle.model.gate_list
    try:
        reference, kinds = trace_gate_maps(model, x, gates)
    except GatesUntraceable as exc:
        return {"passed": None, "skipped": str(exc)}
    if not reference:
        return None
    artifact = bundle.artifact(name)
    try:
        candidate = artifact_maps(bundle_dir, manifest, name, x)
    except BackendUnavailable as exc:
        return {"passed": None, "skipped": str(exc)}
    except CbamDeployError:
        raise
    return compare_maps(reference, candidate, precision or artifact.precision, kinds=kinds)
