"""Train the reference detector (reference/yolov8n_cbam.yaml: YOLOv8n with three CBAM blocks, 3 classes) on the
synthetic shapes set (reference/shapes.py) with Ultralytics' own trainer, on the CPU, offline, deterministically.

    python -m reference.train_yolo_cbam [--data DIR] [--epochs 30]

Writes reference/yolov8n_cbam_shapes.pt: the trained weights as a plain state dict in fp16 (about 6 MB;
``cbam-deploy export --model reference/yolov8n_cbam.yaml --weights reference/yolov8n_cbam_shapes.pt``), and
prints Ultralytics' own validation of them. The recipe: 300 training images of 160 px, image size 128, batch 8,
no mosaic, one warm-up epoch, Ultralytics' automatic optimizer (AdamW), 30 epochs, seed 0, deterministic, one
process with 2 torch threads. Expected: mAP50 about 0.91, mAP50-95 about 0.61 on the 100 validation images.
The same versions (torch 2.13.0, Ultralytics 8.4.190) with the same thread count give the same weights, bit
for bit; about 40 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cbam_deploy.models.ultralytics_source import read_model_yaml, scale_cbam_rows, ultralytics

from .shapes import write_shapes

HERE = Path(__file__).resolve().parent
MODEL_YAML = HERE / "yolov8n_cbam.yaml"
WEIGHTS = HERE / "yolov8n_cbam_shapes.pt"
IMAGE_SIZE = 128
RECIPE = {"imgsz": IMAGE_SIZE, "batch": 8, "mosaic": 0.0, "close_mosaic": 0, "warmup_epochs": 1.0, "seed": 0,
          "deterministic": True, "workers": 0, "device": "cpu", "amp": False, "plots": False, "pretrained": False,
          "patience": 1000, "cache": False, "verbose": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the shapes set's folder (written there first when it holds no data.yaml)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    package = ultralytics()  # offline, CBAM registered for the parser
    with tempfile.TemporaryDirectory(prefix="yolo-cbam-train-") as tmp:
        data_dir = Path(args.data) if args.data else Path(tmp) / "shapes"
        data = data_dir / "data.yaml"
        if not data.is_file():
            data = write_shapes(data_dir)
        scaled = Path(tmp) / MODEL_YAML.name  # the same name: the parser reads the scale from it
        cfg = scale_cbam_rows(read_model_yaml(MODEL_YAML))
        cfg.pop("yaml_file", None)
        scaled.write_text(yaml.safe_dump(cfg, sort_keys=False))
        model = package.YOLO(str(scaled), task="detect")
        started = time.perf_counter()
        model.train(data=str(data), epochs=args.epochs, project=str(Path(tmp) / "runs"), name="train", exist_ok=True,
                    **RECIPE)
        seconds = time.perf_counter() - started
        trained = package.YOLO(str(model.trainer.best))
        metrics = trained.val(data=str(data), imgsz=IMAGE_SIZE, batch=8, device="cpu", workers=0, plots=False,
                              verbose=False, project=str(Path(tmp) / "runs"), name="val", exist_ok=True)
        state = trained.model.float().state_dict()
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes) after {args.epochs} epochs in {seconds:.0f}s: "
          f"Ultralytics val mAP50 {metrics.box.map50:.4f}, mAP50-95 {metrics.box.map:.4f}")


if __name__ == "__main__":
    main()
