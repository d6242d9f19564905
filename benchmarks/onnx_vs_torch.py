"""Batch-1 CPU latency: PyTorch eager vs onnxruntime, for resnet50 and resnet50_cbam, one run.

Prints median latencies, the onnxruntime/PyTorch ratio per model and the CBAM overhead ratio per
backend. The runs are interleaved (torch, ort, torch, ort, ...) so the machine's noise hits both
alike. Usage: python benchmarks/onnx_vs_torch.py [--iters 30] [--threads N] [--models resnet50,resnet50_cbam]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
from cbam_deploy.bench import interleaved_latency
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.models import create_model
from cbam_deploy.runners.torch import TorchRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="resnet50,resnet50_cbam")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    runners, export_seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            started = time.perf_counter()
            export_bundle(ExportOptions(model=name, output=str(Path(tmp) / name), parity=False))
            export_seconds[name] = time.perf_counter() - started
            runners[f"{name}/torch"] = TorchRunner(create_model(name))
            runners[f"{name}/onnxruntime"] = OnnxRuntimeRunner(Path(tmp) / name / "model.onnx", threads=args.threads)
        medians = {runner: statistics.median(times) for runner, times in interleaved_latency(runners, x, args.iters).items()}
    print(f"batch 1, 224x224, {torch.get_num_threads()} torch threads, {args.iters} interleaved iterations, median ms")
    for name in args.models.split(","):
        t, o = medians[f"{name}/torch"], medians[f"{name}/onnxruntime"]
        print(f"{name:16s} export {export_seconds[name]:5.1f}s  torch {t:7.2f} ms  onnxruntime {o:7.2f} ms  ort/torch {o / t:.2f}x")
    names = args.models.split(",")
    if len(names) == 2:
        for backend in ("torch", "onnxruntime"):
            ratio = medians[f"{names[1]}/{backend}"] / medians[f"{names[0]}/{backend}"]
            print(f"{names[1]} / {names[0]} latency on {backend}: {ratio:.3f}x")


if __name__ == "__main__":
    main()
