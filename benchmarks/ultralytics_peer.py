"""cbam-deploy against Ultralytics' own exporter on the same YOLO-CBAM detector, side by side.

The reference detector (reference/yolov8n_cbam.yaml with its trained weights reference/yolov8n_cbam_shapes.pt)
at ``--size`` (default 128, the side it was trained at):

* ours:   cbam-deploy's artifacts: onnx, openvino, ncnn, executorch at fp32, and the INT8 of every recipe
          (ort-cpu, openvino, ncnn, executorch; gates fp, output tail in float), calibrated on the shapes
          set's training images;
* theirs: ``YOLO(model).export(format=...)`` for every format Ultralytics builds offline here (torchscript,
          onnx, onnx INT8, openvino, openvino INT8, ncnn; executorch is tried and its error reported), INT8
          calibrated on the same images (``bench --peers`` builds the same peers).

Per artifact: batch-1 latency (median with its 95% interval, every runner timed in the same interleaved
rounds with PyTorch eager, ``cbam_deploy.bench.bench_runners``, and the stability verdict), the largest
difference from PyTorch over all anchors on the validation images (boxes in pixels, class probabilities),
mAP50 and mAP50-95 on the validation images (``cbam_deploy.detection.mean_ap``: Ultralytics' metric code),
the reference's detections it keeps, and for INT8 whether the CBAM gates were quantized and whether the
output tail stayed in float (cbam-deploy's gate finder on each graph). Printed as a Markdown table with the
machine (CPU model, cores, ISA) and the date. Not a timed test: run it on a quiet machine.

Usage: python benchmarks/ultralytics_peer.py [--size 128] [--val 100] [--calib 128] [--min-seconds 5]
                                              [--out table.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import torch

from cbam_deploy import detection
from cbam_deploy.bench import bench_runners
from cbam_deploy.benchstats import machine_info
from cbam_deploy.build import build_artifacts
from cbam_deploy.bundle import Bundle
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.loaders import ReferenceModel, open_artifact
from cbam_deploy.models import library
from cbam_deploy.peers import build_peers
from reference.shapes import write_shapes
from reference.train_yolo_cbam import MODEL_YAML, WEIGHTS

FORMATS = "onnx,openvino,ncnn,executorch"


def outputs_of(runner, inputs: np.ndarray) -> np.ndarray:
    """The decoded output (N, 4 + classes, anchors), image by image (every peer is exported for batch 1)."""
    return np.concatenate([np.asarray(runner.run(inputs[i:i + 1]), dtype=np.float32) for i in range(len(inputs))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--val", type=int, default=100, help="validation images (held out: seed 1)")
    parser.add_argument("--calib", type=int, default=128, help="calibration images")
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ultralytics-peer-") as tmp:
        tmp = Path(tmp)
        write_shapes(tmp / "shapes", train=args.calib, val=args.val, seed=1)
        train, val = tmp / "shapes" / "images" / "train", tmp / "shapes" / "images" / "val"
        out = tmp / "bundle"
        exported = export_bundle(ExportOptions(model=str(MODEL_YAML), weights=str(WEIGHTS), input_size=args.size,
                                               output=str(out), calib_data=str(val)))
        bundle = Bundle.open(out)
        reference = ReferenceModel(bundle, module=exported.module)
        build_artifacts(bundle, FORMATS, "fp32,int8", calib_data=str(train), calib_size=args.calib,
                        reference=reference)
        bundle = bundle.refresh()
        data = detection.load_yolo_folder(val, bundle.input.raw)
        calib = detection.load_yolo_folder(train, bundle.input.raw).inputs
        module = exported.module
        peers, skipped = build_peers(module, data.inputs[:1], calib, tmp / "peers", args.threads,
                                     which=list(library("ultralytics").peers()),
                                     library_peers=library("ultralytics").peers())
        runners = {"pytorch": reference.runner()[0]}
        kinds = {"pytorch": ("PyTorch eager", "fp32", "-")}
        for artifact in bundle.artifacts:
            runners[artifact.name] = open_artifact(out, bundle, artifact.name, threads=args.threads)
            quantization = artifact.quantization or {}
            gates = quantization.get("gate_check")
            kinds[artifact.name] = ("cbam-deploy", artifact.precision,
                                    ("no" if gates and gates.get("held") and quantization.get("gates") == "fp" else "yes")
                                    + (", tail float" if (quantization.get("output_tail") or {}).get("held") else "")
                                    if artifact.precision == "int8" else "-")
        for name, peer in peers.items():
            runners[name] = peer
            report = peer.facts.get("gates")
            gates = "-" if not report else ("unread" if not report.get("read") else
                                            f"{'yes' if report['gates_quantized'] else 'no'} ({report['quantized']} of "
                                            f"{report['found']})" + (", tail float" if report.get("output_tail_float")
                                                                     else ", tail quantized"))
            kinds[name] = ("Ultralytics", peer.precision, gates)
        rows = {r["runner"]: r for r in bench_runners(runners, (3, args.size, args.size), [1],
                                                       min_seconds=args.min_seconds)}
        reference_out = outputs_of(runners["pytorch"], data.inputs)
        lines = [f"machine: {machine_info()}", f"date: {dt.date.today().isoformat()}",
                 f"model: {MODEL_YAML.name} + {WEIGHTS.name} at {args.size}x{args.size}, {len(data.inputs)} validation "
                 f"images, {len(calib)} calibration images", "",
                 "| artifact | made by | precision | p50 ms (95% CI) | stable | max abs delta boxes px / scores | "
                 "mAP50 | mAP50-95 | kept of PyTorch's | gates quantized |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, runner in runners.items():
            out_name = outputs_of(runner, data.inputs)
            box, score = detection.split_errors(reference_out, out_name)
            ap = detection.mean_ap(out_name, data, bundle.labels)
            agree = detection.agreement(reference_out, out_name, judge=False)
            row = rows.get(name, {})
            latency = (f"{row['p50_ms']:.2f} ({row['p50_ci_ms'][0]:.2f}-{row['p50_ci_ms'][1]:.2f})" if row else "-")
            made_by, precision, gates = kinds[name]
            lines.append(f"| {name} | {made_by} | {precision} | {latency} | "
                         f"{'yes' if row.get('stability', {}).get('stable') else 'NO'} | {box:.2g} / {score:.2g} | "
                         f"{ap['map50']:.4f} | {ap['map50_95']:.4f} | {agree['kept']}/{agree['reference_detections']} | "
                         f"{gates} |")
        for skip in skipped:
            lines.append(f"| {skip['peer']} | Ultralytics | - | not built: {skip['reason'][:160]} | | | | | | |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
