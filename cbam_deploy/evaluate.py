"""Accuracy on labelled images: a classifier's top-1, top-5 and agreement with PyTorch FP32 on an ImageFolder;
a detector's mAP50 and mAP50-95 (Ultralytics' metric code) and its detections' agreement with PyTorch FP32 on
a YOLO-format folder.

Classes are the sorted sub-folder names, index i = output i (torchvision's ImageFolder rule); a detector's
labels are ``class cx cy w h`` lines beside its images (``detection.yolo_folder``).
Every image is preprocessed once, by the manifest's preprocessing, and fed to every artifact.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import detection
from .batching import fit_batch
from .bundle import Bundle, check_artifact_names
from .checks import MAX_BATCH, check_int
from .data import _Unreadable, check_data_source, image_folder, load_image_file
from .errors import BackendUnavailable, CbamDeployError
from .formats import root_row
from .loaders import ReferenceModel, open_artifact
from .models import CodeTrust
from .results import Result


class EvalResult(Result):
    """Top-1, top-5 and agreement with the reference's top-1, per artifact (``results``), on labelled images."""

    command = "eval"

    @property
    def results(self) -> list[dict]:
        return self["results"]


def load_labelled(data_dir: str | Path, spec: dict, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    folder = image_folder(data_dir)
    arrays, labels, skipped = [], [], 0
    for path, label in zip(folder.paths, folder.labels):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(load_image_file(path, spec))
            labels.append(label)
        except _Unreadable:
            skipped += 1
    if not arrays:
        raise CbamDeployError(f"{data_dir}: none of its images could be read")
    return np.stack(arrays), np.asarray(labels), folder.classes, skipped


def topk_metrics(logits: np.ndarray, labels: np.ndarray, reference_top1: np.ndarray | None) -> dict:
    order = np.argsort(-logits, axis=1)
    k = min(5, logits.shape[1])
    metrics = {
        "top1": float((order[:, 0] == labels).mean()),
        "top5": float((order[:, :k] == labels[:, None]).any(axis=1).mean()),
    }
    if reference_top1 is not None:
        metrics["agreement"] = float((order[:, 0] == reference_top1).mean())
    return metrics


def evaluate_bundle(bundle_dir: str | Path, data_dir: str | Path, artifact: str | None = None,
                    batch: int = 32, limit: int | None = None, trust: CodeTrust | None = None,
                    reference: ReferenceModel | None = None) -> EvalResult:
    validate_eval_options(str(data_dir), batch, limit)  # every option before any work
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    bundle_dir = bundle.directory
    check_artifact_names(bundle, [artifact] if artifact else None, bundle_dir)
    if bundle.classification_output is None:
        detections = [o for o in bundle.outputs if o.kind == "detections"]
        if len(detections) == 1:
            return evaluate_detector(bundle, data_dir, detections[0].name, artifact, batch, limit, trust, reference)
        raise CbamDeployError(f"eval measures top-1/top-5 of a classifier or mAP of a detector (an output of kind "
                              f"detections); {bundle.model.name} has the outputs "
                              f"{', '.join(f'{o.name} ({o.kind})' for o in bundle.outputs)}: "
                              "use 'cbam-deploy verify' for its per-output parity")
    inputs, labels, classes, skipped = load_labelled(data_dir, bundle.input.raw, limit)
    num_classes = bundle.model.num_classes
    if num_classes and len(classes) > num_classes:
        raise CbamDeployError(f"{data_dir} has {len(classes)} class folders but the model has {num_classes} outputs")
    inputs, batch = bundle.fit_to_batch(inputs, batch)
    labels = labels[:len(inputs)]

    def measure(runner, entry, ref_logits):
        started = time.perf_counter()
        logits = runner.run_batched(inputs, batch)
        seconds = time.perf_counter() - started
        top1 = (logits if ref_logits is None else ref_logits).argmax(1)
        return logits, {**topk_metrics(logits, labels, top1), "seconds": round(seconds, 2)}

    model = reference or ReferenceModel(bundle, trust)  # the FP32 ONNX stands in without it
    rows, reference_label = _measure_all(bundle, model, artifact, measure)
    return EvalResult({"bundle": str(bundle_dir), "data": str(data_dir), "images": int(len(labels)),
                       "classes": len(classes), "skipped_unreadable": skipped, "reference": reference_label,
                       "results": rows})


def evaluate_detector(bundle: Bundle, data_dir, output: str, artifact: str | None = None, batch: int = 32,
                      limit: int | None = None, trust: CodeTrust | None = None,
                      reference: ReferenceModel | None = None) -> EvalResult:
    """mAP50 and mAP50-95 of every artifact and of PyTorch FP32 on a YOLO-format folder (Ultralytics' metric
    code on each one's decoded ``output``), and how many of the reference's detections each keeps."""
    data = detection.load_yolo_folder(data_dir, bundle.input.raw, limit)
    num_classes = bundle.model.num_classes
    if num_classes and data.classes > num_classes:
        raise CbamDeployError(f"{data_dir}: its labels name class {data.classes - 1}, but the model detects "
                              f"{num_classes} classes")
    inputs, batch = bundle.fit_to_batch(data.inputs, batch)
    data.targets, data.images = data.targets[:len(inputs)], data.images[:len(inputs)]
    data.inputs = inputs

    labels = bundle.labels

    def measure(runner, entry, ref_out):
        started = time.perf_counter()
        out = runner.infer_batched(inputs, batch if entry is None else fit_batch(bundle, entry, batch))[output]
        metrics = {**detection.mean_ap(out, data, labels), "seconds": round(time.perf_counter() - started, 2)}
        if ref_out is not None:
            agree = detection.agreement(ref_out, out, judge=False)
            metrics.update(agreement=agree["kept_fraction"],
                           detections={k: agree[k] for k in ("reference_detections", "kept", "lost", "extra")})
        return out, metrics

    model = reference or ReferenceModel(bundle, trust)
    rows, reference_label = _measure_all(bundle, model, artifact, measure)
    return EvalResult({"bundle": str(bundle.directory), "data": str(data_dir), "task": "detection",
                       "images": int(len(inputs)), "classes": num_classes or data.classes,
                       "skipped_unreadable": data.skipped, "reference": reference_label,
                       "metric": "mAP50 and mAP50-95 (Ultralytics' DetMetrics; NMS at score 0.001, IoU 0.7)",
                       "results": rows})


def _measure_all(bundle: Bundle, model: ReferenceModel, artifact: str | None, measure) -> tuple[list[dict], str]:
    """The reference's row, then one row per artifact (or the one asked for): ``measure(runner, entry,
    reference_output)`` returns (the output, its metrics); entry and reference_output are None for the
    reference itself. An artifact whose runtime is missing is a skipped row."""
    reference, reference_label = model.runner()
    ref_out, metrics = measure(reference, None, None)
    rows = [{"artifact": reference_label, "format": root_row().name if model.stand_in else "pytorch",
             "precision": "fp32", **metrics}]
    for name in [artifact] if artifact else bundle.artifact_names:
        entry = bundle.artifact(name)
        try:
            runner = open_artifact(bundle.directory, bundle, name)
        except BackendUnavailable as exc:
            rows.append({"artifact": name, "format": entry.format, "precision": entry.precision, "skipped": str(exc)})
            continue
        rows.append({"artifact": name, "format": entry.format, "precision": entry.precision,
                     **measure(runner, entry, ref_out)[1]})
    return rows, reference_label


def validate_eval_options(data: str, batch: int = 32, limit: int | None = None) -> None:
    check_int("--batch", batch, 1, MAX_BATCH)
    check_int("--limit", limit, 1, allow_none=True)
    if Path(data).is_file() and Path(data).suffix.lower() in (".yaml", ".yml"):
        return  # a detector's data.yaml (its val split), read by detection.yolo_folder
    check_data_source("--data", data, images_only=True)
