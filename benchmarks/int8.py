"""INT8 figures: latency on this CPU and accuracy on the reference digits model, one run.

Part 1 (latency, batch 1, 224x224): for resnet50 and resnet50_cbam, PyTorch eager FP32,
onnxruntime FP32 / INT8 (ort-cpu recipe, gates int8 and fp), OpenVINO FP32 / INT8 (gates int8 and
fp), interleaved, median ms and ratio to PyTorch eager. Calibration: scikit-image's sample photos.
Part 2 (accuracy): the reference digits CBAM model, held-out top-1 for FP32 and every recipe x
method x gate policy that runs here.

Usage: python benchmarks/int8.py [--iters 30] [--skip-latency] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.backends.openvino.exporter import export_ir  # noqa: E402
from cbam_deploy.backends.openvino.runner import OpenVINORunner  # noqa: E402
from cbam_deploy.bench import interleaved_latency  # noqa: E402
from cbam_deploy.bundle import read_manifest  # noqa: E402
from cbam_deploy.evaluate import evaluate_bundle  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.loaders import open_artifact  # noqa: E402
from cbam_deploy.quantize import quantize_bundle  # noqa: E402
from cbam_deploy.runners.torch import TorchRunner  # noqa: E402
from reference.digits import CHECKPOINT, MODEL_NAME, STEM, write_image_folder  # noqa: E402


def photos(dst: Path) -> Path:
    import skimage

    src = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.stat().st_size > 10_000:
            shutil.copy(path, dst / path.name)
    return dst


def latency(iters: int, tmp: Path) -> None:
    calib = photos(tmp / "photos")
    print(f"calibration photos: {len(list(calib.iterdir()))} from scikit-image")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for model in ("resnet50", "resnet50_cbam"):
        bundle = tmp / model
        export_bundle(ExportOptions(model=model, output=str(bundle), parity=False))
        for gates in ("int8", "fp"):
            quantize_bundle(bundle, ["ort-cpu", "openvino"], str(calib), calib_size=32, gates=gates, use_cache=False)
        manifest = read_manifest(bundle)
        export_ir(bundle / "model.onnx", bundle / "model.fp32.xml")
        from cbam_deploy.models import build_model

        runners = {"pytorch eager fp32": TorchRunner(build_model(model).module),
                   "onnxruntime fp32": open_artifact(bundle, manifest, "onnx-fp32"),
                   "onnxruntime int8 gates=int8": open_artifact(bundle, manifest, "int8-ort-cpu-gates-int8"),
                   "onnxruntime int8 gates=fp": open_artifact(bundle, manifest, "int8-ort-cpu"),
                   "openvino fp32 (f32 hint)": OpenVINORunner(bundle / "model.fp32.xml"),
                   "openvino int8 gates=int8": open_artifact(bundle, manifest, "int8-openvino-gates-int8"),
                   "openvino int8 gates=fp": open_artifact(bundle, manifest, "int8-openvino")}
        times = interleaved_latency(runners, x, iters)
        base = statistics.median(times["pytorch eager fp32"])
        print(f"\n{model}: batch 1, 224x224, median of {iters} interleaved runs, {torch.get_num_threads()} threads")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:30s} {median:8.2f} ms   {median / base:5.2f}x PyTorch")


def accuracy(tmp: Path) -> None:
    test = write_image_folder(tmp / "digits" / "test", "test")
    train = write_image_folder(tmp / "digits" / "train", "train")
    bundle = tmp / "digits" / "bundle"
    export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(bundle)))
    for method in ("minmax", "entropy", "percentile"):
        for gates in ("int8", "fp"):
            targets = ["ort-cpu", "tensorrt"] + (["openvino"] if method != "entropy" else [])
            started = time.perf_counter()
            made = quantize_bundle(bundle, targets, str(train), calib_size=128, method=method, gates=gates, use_cache=False)
            cosine = {a["name"]: a["parity"]["cosine_mean"] for a in made["artifacts"]}
            result = evaluate_bundle(bundle, test)
            print(f"\n{MODEL_NAME} digits held-out ({result['images']} images), method={method}, gates={gates} "
                  f"(quantize {time.perf_counter() - started:.0f}s)")
            for row in result["results"]:
                if row["artifact"].startswith("int8") and row["artifact"] not in cosine:
                    continue
                extra = f"  logit cosine {cosine[row['artifact']]:.5f}" if row["artifact"] in cosine else ""
                print(f"  {row['artifact']:26s} top-1 {row['top1'] * 100:6.2f}%  agreement {row['agreement'] * 100:6.2f}%{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cbam-int8-bench-") as tmp:
        if not args.skip_accuracy:
            accuracy(Path(tmp))
        if not args.skip_latency:
            latency(args.iters, Path(tmp))


if __name__ == "__main__":
    main()
