"""See what the network sees, computed: Grad-CAM, every CBAM gate, and attention parity across
precisions, for one image (``explain_report`` draws them as PNG overlays on one HTML page).

``explain_image`` rebuilds the PyTorch original of a bundle, preprocesses the image as the manifest
says, and computes for it:

- the top-5 predictions of PyTorch and of each artifact (classifiers);
- Grad-CAM of the PyTorch model for its top class (captum's ``LayerGradCam`` on the last
  attention-bearing stage, upsampled with ``LayerAttribution.interpolate``; classifiers only);
- every gate the gate finder (``cbam_deploy.gates``) finds, whatever its module or class names:
  each spatial gate (the sigmoid map; a BAM joint gate as its mean over channels) of PyTorch and
  of each artifact whose format reads its gates, under its own runtime (``attention.artifact_maps``), with
  the per-gate correlation and top-10% IoU of ``attention.compare_maps``; each channel gate (SE, ECA,
  CBAM's channel attention) as a profile, one value per channel, of PyTorch and of each artifact,
  with the profiles' cosine and top-k channel overlap.

A bundle whose PyTorch model cannot be rebuilt (a stand-in reference) still gets the artifacts'
maps and channel profiles, compared with the FP32 ONNX's, but no Grad-CAM; the notes say so. A
model without gates gets its predictions and Grad-CAM and a note saying there are no gates to
compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attention import artifact_maps, artifact_probe, compare_maps, torch_maps
from .bundle import Bundle, check_artifact_names
from .data import _Unreadable, load_image_file
from .errors import BackendUnavailable, CbamDeployError
from .formats import get as get_format
from .gates import GatesUntraceable, shape_map
from .loaders import ReferenceModel
from .manifest import ROOT_ARTIFACT
from .models import CodeTrust
from .transaction import faultpoint

TOP_K = 5


@dataclass
class Explanation:
    """What ``explain_image`` found for one image. Maps are (1, 1, H, W) spatial, (1, C) channel.

    ``key``: the reference's runner name ('pytorch-fp32', or 'onnx-fp32' standing in), ``label`` its
    description; ``kinds`` {gate: 'spatial' | 'channel' | ...}; ``reference_all`` every gate of the
    reference as found; ``rows`` {artifact: {"format", "precision", "attention", "top1_agrees", "files",
    "channel_files"}} (the file lists are filled by whoever draws them)."""

    image_path: Path
    chw: np.ndarray
    key: str
    label: str
    classifier: bool
    kinds: dict[str, str]
    reference_all: dict[str, np.ndarray]
    reference_maps: dict[str, np.ndarray]
    channel_maps: dict[str, np.ndarray]
    predictions: dict[str, list[dict]]
    gradcam: dict | None
    gradcam_map: np.ndarray | None
    rows: dict[str, dict]
    candidate_maps: dict[str, dict[str, np.ndarray]]
    candidate_profiles: dict[str, dict[str, np.ndarray]]
    skipped: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def gates(self) -> list[str]:
        """The spatial gates (joint ones included), in the model's order."""
        return list(self.reference_maps)


def explain_image(bundle: Bundle, image_path: str | Path, artifacts: list[str] | None = None,
                  trust: CodeTrust | None = None, reference: ReferenceModel | None = None) -> Explanation:
    """Explain one image with an open bundle: predictions, Grad-CAM and every gate's map of the
    reference and of each artifact whose format reads its gates, compared (see the module doc).

    ``artifacts``: names of such artifacts (default: all of them in the bundle; others are listed under
    ``skipped``, with their format's reason)."""
    bundle_dir = bundle.directory
    image_path = Path(image_path)
    try:
        chw = load_image_file(image_path, bundle.input.raw)
    except _Unreadable as exc:
        raise CbamDeployError(f"--image {image_path} is not an image this machine can read: {exc}") from None
    x = np.repeat(chw[None], bundle.fixed_batch or 1, axis=0).astype(np.float32)  # a fixed batch gets copies

    chosen, skipped = _choose_artifacts(bundle, artifacts)
    classifier = bundle.classification_output is not None
    notes: list[str] = []

    reference = reference or ReferenceModel(bundle, trust)  # a factory's code runs only when trusted
    runner, label = reference.runner()
    key = label.split(" ")[0]  # 'pytorch-fp32', or 'onnx-fp32' standing in
    stand_in = reference.stand_in
    model = None if stand_in else runner.model
    if stand_in:
        notes.append(f"The PyTorch model could not be rebuilt; the reference is {label}. Grad-CAM needs the PyTorch model "
                     "and is not shown; the artifacts' maps and channel profiles are compared with the FP32 ONNX's.")
        chosen = [name for name in chosen if name != ROOT_ARTIFACT]

    # --- the reference: gates, channel profiles, predictions, Grad-CAM -----------------------------
    gate_list = bundle.model.gate_list
    kinds = {g["name"]: g["kind"] for g in gate_list or []}
    if model is not None:
        try:
            reference_all = {g: m[:1] for g, m in torch_maps(model, x, None, gate_list).items()}
        except GatesUntraceable as exc:
            notes.append(str(exc))
            reference_all = {}
    else:
        try:
            reference_all = {g: m[:1] for g, m in artifact_maps(bundle_dir, bundle, ROOT_ARTIFACT, x).items()}
        except BackendUnavailable:
            reference_all = {}
    kinds.update({g: "channel" if m.ndim == 2 else "spatial" for g, m in reference_all.items() if g not in kinds})
    reference_maps = {g: _as_spatial(m) for g, m in reference_all.items() if kinds[g] != "channel"}
    channel_maps = {g: m for g, m in reference_all.items() if kinds[g] == "channel"}
    gates = list(reference_maps)
    predictions: dict[str, list[dict]] = {}
    if classifier:
        predictions[key] = _top_k(runner.run(x)[0])

    gradcam, gradcam_map = None, None
    if model is not None and classifier:
        try:
            gradcam, gradcam_map = _grad_cam(model, x[:1], predictions[key][0]["class"], gate_list)
        except BackendUnavailable as exc:
            notes.append(str(exc))
    elif not classifier:
        notes.append("Grad-CAM and top-5 are for classifiers; this bundle's outputs are "
                     f"{', '.join(o.name for o in bundle.outputs)} (maps only).")

    if not gates and not classifier and not channel_maps:
        raise CbamDeployError(f"nothing to explain in {bundle_dir}: the model has no attention gates and is not a "
                              "classifier (no Grad-CAM)")
    if not gates and not channel_maps:
        notes.append(f"{bundle.model.name} has no attention gates: there are no attention maps to show or "
                     "to compare across artifacts" + ("; Grad-CAM and predictions only." if classifier else "."))
    elif not gates:
        notes.append(f"{bundle.model.name} has channel gates only (no spatial map): its gates are shown as channel "
                     "profiles.")

    # --- the artifacts ----------------------------------------------------------------------------
    candidate_maps: dict[str, dict[str, np.ndarray]] = {}
    candidate_profiles: dict[str, dict[str, np.ndarray]] = {}
    rows: dict[str, dict] = {}
    for name in chosen:
        artifact = bundle.artifact(name)
        try:
            maps, outputs = artifact_probe(bundle_dir, bundle, name, x)  # one run gives the maps and the logits
            every = {g: m[:1] for g, m in maps.items()} if reference_all else {}
            logits = outputs[bundle.outputs[0].name][0] if classifier else None
        except BackendUnavailable as exc:
            if artifacts:  # asked for by name: say why it cannot be done
                raise
            skipped[name] = str(exc)
            continue
        candidate_maps[name] = {g: _as_spatial(m) for g, m in every.items() if kinds.get(g, "spatial") != "channel"}
        candidate_profiles[name] = {g: shape_map(m, "channel") for g, m in every.items() if kinds.get(g) == "channel"}
        row = {"format": artifact.format, "precision": artifact.precision, "files": {}, "channel_files": {}}
        if reference_all:
            row["attention"] = compare_maps(reference_all, every, artifact.precision, kinds=kinds)
        if classifier:
            predictions[name] = _top_k(logits)
            row["top1_agrees"] = predictions[name][0]["class"] == predictions[key][0]["class"]
        rows[name] = row

    return Explanation(image_path, chw, key, label, classifier, kinds, reference_all, reference_maps, channel_maps,
                       predictions, gradcam, gradcam_map, rows, candidate_maps, candidate_profiles, skipped, notes)


def _as_spatial(values: np.ndarray) -> np.ndarray:
    """A gate as one map per image (N, 1, H, W): a joint (N, C, H, W) gate by its mean over channels."""
    return values if values.ndim != 4 or values.shape[1] == 1 else values.mean(axis=1, keepdims=True)


# --- choosing --------------------------------------------------------------------------------------

def _choose_artifacts(bundle: Bundle, names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The artifacts to explain (those whose format reads its gates), and {name: why not} for those of
    the bundle left out by default."""
    if names:
        check_artifact_names(bundle, names, bundle.directory)
        wrong = [n for n in names if not get_format(bundle.artifact(n).format).reads_gates]
        if wrong:
            shown = "; ".join(f"{n}: {get_format(bundle.artifact(n).format).why_no_gates()}" for n in wrong)
            raise CbamDeployError(f"--artifact: explain reads the gates of an artifact under its own runtime; {shown}")
        return list(dict.fromkeys(names)), {}
    chosen = [a.name for a in bundle.artifacts if get_format(a.format).reads_gates]
    skipped = {a.name: get_format(a.format).why_no_gates() for a in bundle.artifacts
               if not get_format(a.format).reads_gates}
    return chosen, skipped


# --- the reference's own figures -------------------------------------------------------------------

def _top_k(logits: np.ndarray, k: int = TOP_K) -> list[dict]:
    logits = np.asarray(logits, np.float64).ravel()
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-logits, kind="stable")[:k]
    return [{"class": int(i), "probability": float(probs[i]), "logit": float(logits[i])} for i in order]


def _grad_cam(model, x: np.ndarray, target: int, gates: list[dict] | None = None) -> tuple[dict, np.ndarray]:
    """captum's LayerGradCam on the last attention-bearing stage (else the last stage), for ``target``,
    upsampled to the input's size with LayerAttribution.interpolate (bilinear)."""
    faultpoint("explain-gradcam")
    try:
        from captum.attr import LayerAttribution, LayerGradCam  # lazy: captum is the optional explain extra
    except ImportError:
        raise BackendUnavailable("Grad-CAM needs captum: pip install 'cbam-deploy[explain]'") from None

    layer_name, layer = _last_stage(model, x, gates)
    inputs = torch.from_numpy(np.ascontiguousarray(x, np.float32)).requires_grad_(True)
    model.eval()
    with torch.enable_grad():
        attribution = LayerGradCam(model, layer).attribute(inputs, target=int(target), relu_attributions=True)
        upsampled = LayerAttribution.interpolate(attribution, tuple(x.shape[2:]), interpolate_mode="bilinear")
    cam = upsampled.detach().float()[0, 0].numpy()
    info = {"layer": layer_name, "target": int(target), "shape": list(cam.shape),
            "layer_shape": list(attribution.shape[2:]), "max": float(cam.max()), "finite": bool(np.isfinite(cam).all())}
    return info, cam


def _last_stage(model, x: np.ndarray, gates: list[dict] | None = None):
    """(name, module): the last top-level child holding a gate (``gates``: the manifest's); else
    ``layer4``; else the last top-level child whose output is a feature map (4-D)."""
    children = list(model.named_children())
    homes = {(g.get("module") or g["name"]).split(".")[0] for g in gates or []}
    with_gates = [(n, m) for n, m in children if n in homes]
    if with_gates:
        return with_gates[-1]
    if isinstance(getattr(model, "layer4", None), torch.nn.Module):
        return "layer4", model.layer4
    shapes = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, getattr(o, "ndim", 0)))
               for n, m in children]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for handle in handles:
            handle.remove()
    maps = [(n, m) for n, m in children if shapes.get(n) == 4]
    if not maps:
        raise BackendUnavailable("Grad-CAM: no stage of the model gives a feature map")
    return maps[-1]
