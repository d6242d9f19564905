"""Detections: what a detector's decoded output (``outputs`` kind ``detections``: (batch, 4 + classes, anchors),
box centre x, y, width, height in input pixels, then the class probabilities) means after NMS, how two
artifacts' detections agree, and mAP on a YOLO-format labelled folder.

- ``nms``: greedy, class-aware non-maximum suppression in numpy (what a deployment runs after the model);
- ``agreement``: the INT8 verdict of a detector: the reference's detections (after NMS at ``CONF``) matched
  one to one to the candidate's (same class, IoU >= ``MATCH_IOU``), counted as kept, lost and extra;
- ``yolo_folder`` / ``load_yolo_folder``: a labelled folder in Ultralytics' layout (``images/...`` beside
  ``labels/...``, one ``class cx cy w h`` line per object, normalised), or a ``data.yaml`` naming its ``val``;
  each image letterboxed as the bundle's preprocessing says and its boxes mapped into the input's pixels;
- ``mean_ap``: mAP50 and mAP50-95 with Ultralytics' own metric code (its NMS at the validator's settings, its
  IoU matching, its ``DetMetrics``), so the figures are the ones Ultralytics' validator reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_SUFFIXES, _Unreadable, letterbox_geometry, preprocess_image
from .errors import CbamDeployError
from .models.ultralytics_source import ULTRALYTICS, ultralytics

CONF = 0.25  # Ultralytics' predict default: the detections a deployment keeps
NMS_IOU = 0.7  # Ultralytics' NMS IoU (predict and val)
MATCH_IOU = 0.5  # a candidate box is the reference's when it has its class and overlaps it this much
MAX_DET = 300
INT8_MIN_KEPT = 0.9  # of the reference's detections an INT8 artifact must keep
INT8_MAX_EXTRA = 0.1  # detections it may add, as a fraction of the reference's


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    xy, wh = boxes[:, :2], boxes[:, 2:4] / 2
    return np.concatenate([xy - wh, xy + wh], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4 xyxy) with every box of ``b`` (m, 4): (n, m)."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:4] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:4] - b[:, :2], 0, None).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(prediction: np.ndarray, conf: float = CONF, iou: float = NMS_IOU, max_det: int = MAX_DET) -> np.ndarray:
    """One image's decoded output (4 + classes, anchors) -> its detections (n, 6): x1, y1, x2, y2, score,
    class, best first (each anchor's best class, greedy suppression within a class)."""
    prediction = np.asarray(prediction, dtype=np.float64)
    scores = prediction[4:]
    classes = scores.argmax(axis=0)
    best = scores[classes, np.arange(scores.shape[1])]
    keep = np.flatnonzero(best >= conf)
    if not len(keep):
        return np.zeros((0, 6))
    keep = keep[np.argsort(-best[keep], kind="stable")]
    boxes = xywh_to_xyxy(prediction[:4, keep].T)
    labels, confidence = classes[keep], best[keep]
    chosen = []
    alive = np.ones(len(keep), dtype=bool)
    for i in range(len(keep)):
        if not alive[i]:
            continue
        chosen.append(i)
        if len(chosen) == max_det:
            break
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        same = rest[labels[rest] == labels[i]]
        if len(same):
            alive[same[box_iou(boxes[i:i + 1], boxes[same])[0] > iou]] = False
    chosen = np.asarray(chosen)
    return np.concatenate([boxes[chosen], confidence[chosen, None], labels[chosen, None]], axis=1)


def match(reference: np.ndarray, candidate: np.ndarray, iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """One-to-one matches (reference index, candidate index, IoU): the reference's detections, best first,
    each take the unmatched candidate of its class that overlaps it most, at ``iou`` or more."""
    if not len(reference) or not len(candidate):
        return []
    overlap = box_iou(reference[:, :4], candidate[:, :4])
    overlap[reference[:, 5][:, None] != candidate[:, 5][None, :]] = 0
    taken = np.zeros(len(candidate), dtype=bool)
    pairs = []
    for r in np.argsort(-reference[:, 4], kind="stable"):
        row = np.where(taken, -1.0, overlap[r])
        c = int(row.argmax())
        if row[c] >= iou:
            taken[c] = True
            pairs.append((int(r), c, float(row[c])))
    return pairs


def agreement(reference: np.ndarray, candidate: np.ndarray, judge: bool = True, conf: float = CONF) -> dict:
    """How far a candidate's detections agree with the reference's, over a batch of decoded outputs
    (batch, 4 + classes, anchors): NMS at ``conf`` on both, then one-to-one matching by class and IoU. The
    verdict: at least ``INT8_MIN_KEPT`` of the reference's detections kept, at most ``INT8_MAX_EXTRA`` added.
    ``judge=False`` (a model without trained weights): reported, not judged."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if candidate.shape != reference.shape:
        return {"passed": False, "kind": "detections", "samples": len(reference),
                "reason": f"output shape {candidate.shape} does not match the reference {reference.shape}"}
    if not np.isfinite(candidate).all():
        return {"passed": False, "kind": "detections", "samples": len(reference), "reason": "output holds NaN or Inf"}
    total = kept = extra = 0
    ious, score_errors, box_errors = [], [], []
    for ref_out, cand_out in zip(reference, candidate):
        ref, cand = nms(ref_out, conf), nms(cand_out, conf)
        pairs = match(ref, cand)
        total += len(ref)
        kept += len(pairs)
        extra += len(cand) - len(pairs)
        for r, c, overlap in pairs:
            ious.append(overlap)
            score_errors.append(abs(ref[r, 4] - cand[c, 4]))
            box_errors.append(float(np.abs(ref[r, :4] - cand[c, :4]).max()))
    metrics = {"samples": len(reference), "kind": "detections", "conf": conf, "nms_iou": NMS_IOU, "match_iou": MATCH_IOU,
               "reference_detections": total, "kept": kept, "lost": total - kept, "extra": extra,
               "kept_fraction": kept / total if total else None,
               "mean_iou": float(np.mean(ious)) if ious else None,
               "max_box_err_px": max(box_errors) if box_errors else None,
               "max_score_err": float(max(score_errors)) if score_errors else None}
    reasons = []
    if not total:
        metrics["note"] = (f"the reference keeps no detection at score {conf} on these inputs: nothing to compare "
                           + ("(the candidate keeps none either)" if not extra else f"(the candidate keeps {extra})"))
        if extra and judge:
            reasons.append(f"{extra} detections where the reference has none")
    elif not judge:
        metrics["note"] = "random (untrained) weights: detection agreement reported, not judged"
    else:
        if kept / total < INT8_MIN_KEPT:
            reasons.append(f"kept {kept} of the reference's {total} detections ({kept / total:.3f} < {INT8_MIN_KEPT})")
        if extra > INT8_MAX_EXTRA * total:
            reasons.append(f"{extra} extra detections (> {INT8_MAX_EXTRA:g} x {total})")
    metrics["passed"] = not reasons
    if reasons:
        metrics["reason"] = "; ".join(reasons)
    return metrics


def split_errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(largest box error in pixels, largest score error) between two decoded outputs."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    difference = np.abs(reference - candidate)
    return float(difference[:, :4].max()), float(difference[:, 4:].max()) if reference.shape[1] > 4 else 0.0


# ---------------------------------------------------------------------------------------------- labelled data

@dataclass
class LabelledDetections:
    """A YOLO-format folder as the model sees it: inputs (N, C, S, S), and per image its ground truth in input
    pixels (classes, xyxy boxes)."""

    inputs: np.ndarray
    targets: list[tuple[np.ndarray, np.ndarray]]
    images: list[Path]
    skipped: int
    classes: int


def yolo_folder(source: str | Path) -> list[tuple[Path, Path]]:
    """(image, label file) pairs of a YOLO-format folder, or of the ``val`` split a ``data.yaml`` names. The
    label of ``.../images/x/y.png`` is ``.../labels/x/y.txt`` (Ultralytics' rule), else ``y.txt`` beside it; an
    image without a label file has no objects."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".yaml", ".yml"):
        folders = _yaml_split(source)
    elif source.is_dir():
        folders = [source / "images"] if (source / "images").is_dir() else [source]
    else:
        raise CbamDeployError(f"--data {source}: not a folder of images with YOLO labels, nor a data.yaml")
    pairs = []
    for folder in folders:
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            parts = list(image.parts)
            label = image.with_suffix(".txt")
            if "images" in parts:
                at = len(parts) - 1 - parts[::-1].index("images")
                label = Path(*parts[:at], "labels", *parts[at + 1:]).with_suffix(".txt")
            pairs.append((image, label))
    if not pairs:
        raise CbamDeployError(f"--data {source} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
    return pairs


def _yaml_split(path: Path) -> list[Path]:
    import yaml  # lazy: only a data.yaml needs it (Ultralytics' own dependency)

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CbamDeployError(f"--data {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not data.get("val"):
        raise CbamDeployError(f"--data {path}: a data.yaml needs a 'val' entry (the labelled images to evaluate on)")
    root = Path(data.get("path") or path.parent)
    root = root if root.is_absolute() else path.parent / root
    splits = data["val"] if isinstance(data["val"], list) else [data["val"]]
    folders = [Path(s) if Path(s).is_absolute() else root / s for s in splits]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise CbamDeployError(f"--data {path}: its val folder(s) {', '.join(missing)} do not exist")
    return folders


def read_labels(path: Path) -> np.ndarray:
    """A YOLO label file -> (n, 5): class, cx, cy, w, h (normalised); none when the file is absent or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return np.zeros((0, 5))
    try:
        rows = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise CbamDeployError(f"label file {path}: not 'class cx cy w h' lines ({exc})") from None
    if rows.shape[1] < 5:
        raise CbamDeployError(f"label file {path}: each line needs class cx cy w h (got {rows.shape[1]} values)")
    return rows[:, :5]


def load_yolo_folder(source: str | Path, spec: dict, limit: int | None = None) -> LabelledDetections:
    """Every image letterboxed as ``spec`` (the manifest's ``input``) says, and its boxes mapped the same way."""
    pre = spec["preprocess"]
    if pre.get("mode") != "letterbox":
        raise CbamDeployError("detector evaluation needs the letterbox preprocessing (input.preprocess.mode), as the "
                              "labels' boxes are mapped through it")
    side = int(pre["center_crop"])
    arrays, targets, images, skipped, top = [], [], [], 0, -1
    for image_path, label_path in yolo_folder(source):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            with Image.open(image_path) as image:
                image.load()
                width, height = image.size
                arrays.append(preprocess_image(image, spec))
        except (OSError, ValueError, Image.DecompressionBombError, _Unreadable):
            skipped += 1
            continue
        labels = read_labels(label_path)
        ratio, (left, top_pad), _ = letterbox_geometry(width, height, side)
        boxes = labels[:, 1:5] * np.array([width, height, width, height])
        boxes = xywh_to_xyxy(boxes) * ratio + np.array([left, top_pad, left, top_pad])
        targets.append((labels[:, 0].astype(np.int64), boxes))
        images.append(image_path)
        top = max(top, int(labels[:, 0].max()) if len(labels) else -1)
    if not arrays:
        raise CbamDeployError(f"--data {source}: none of its images could be read")
    return LabelledDetections(np.stack(arrays).astype(np.float32), targets, images, skipped, top + 1)


def mean_ap(outputs: np.ndarray, data: LabelledDetections, names: list[str] | None = None) -> dict:
    """mAP50 and mAP50-95 of decoded outputs (N, 4 + classes, anchors) against the folder's labels, with
    Ultralytics' metric code: its NMS at the validator's settings (score 0.001, IoU 0.7, multi-label, 300 per
    image), its matching at IoU 0.50:0.05:0.95 and its ``DetMetrics`` (``ap_per_class``)."""
    ultralytics()  # offline, as every use of the library here
    metrics_module, nms_module, validator = ULTRALYTICS.require_all("ultralytics.utils.metrics", "ultralytics.utils.nms",
                                                                    "ultralytics.engine.validator")
    classes = int(outputs.shape[1]) - 4
    labels = {i: (names[i] if names and i < len(names) else str(i)) for i in range(classes)}
    metrics = metrics_module.DetMetrics(names=labels)
    thresholds = type("Thresholds", (), {"iouv": torch.linspace(0.5, 0.95, 10)})()
    kept = nms_module.non_max_suppression(torch.from_numpy(np.ascontiguousarray(outputs, np.float32)), 0.001, 0.7,
                                          multi_label=True, max_det=MAX_DET)
    for index, (detections, (target_cls, target_boxes)) in enumerate(zip(kept, data.targets)):
        detections = detections.numpy()
        if len(detections) and len(target_cls):
            iou = metrics_module.box_iou(torch.from_numpy(target_boxes).float(), torch.from_numpy(detections[:, :4]))
            tp = validator.BaseValidator.match_predictions(thresholds, torch.from_numpy(detections[:, 5]),
                                                          torch.from_numpy(target_cls), iou).numpy()
        else:
            tp = np.zeros((len(detections), 10), dtype=bool)
        metrics.update_stats({"tp": tp, "conf": detections[:, 4], "pred_cls": detections[:, 5],
                              "target_cls": target_cls, "target_img": np.unique(target_cls),
                              "im_name": str(data.images[index].name)})
    metrics.process()
    return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map),
            "mean_precision": float(metrics.box.mp), "mean_recall": float(metrics.box.mr)}


__all__ = ["CONF", "INT8_MAX_EXTRA", "INT8_MIN_KEPT", "LabelledDetections", "MATCH_IOU", "agreement", "box_iou",
           "load_yolo_folder", "match", "mean_ap", "nms", "read_labels", "split_errors", "xywh_to_xyxy", "yolo_folder"]
