"""The aarch64 half of the ARM check (scripts/arm_check.sh): run under qemu-aarch64 by the aarch64
Python, with the aarch64 wheels of torch and the runtimes. It opens every artifact of a bundle with
cbam-deploy's own loaders and runners (the same precision pins a user on an ARM board gets), runs the
inputs it is given and writes the outputs and what each runtime reported; the x86 side compares.

    python arm_worker.py BUNDLE INPUTS.npy OUT_DIR [--threads N]

Also run, for comparison: the ncnn and OpenVINO fp32 artifacts with the runtime's own defaults (no
pin), and the PyTorch model rebuilt here from the bundle's seeded init (how ``verify`` finds its
reference on this CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from cbam_deploy.backends.ncnn.exporter import require_ncnn
from cbam_deploy.backends.ncnn.runner import NcnnRunner
from cbam_deploy.backends.openvino.exporter import require_openvino
from cbam_deploy.backends.openvino.runner import OpenVINORunner
from cbam_deploy.bundle import Bundle
from cbam_deploy.loaders import is_stand_in, open_artifact, reference_runner
from cbam_deploy.models import build_model, match_state_summary, state_fingerprint

BATCH = 4


def emulated_cpu() -> dict:
    """What the guest sees in /proc/cpuinfo (qemu 10 emulates it for the CPU it was given)."""
    text = Path("/proc/cpuinfo").read_text()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return {"machine": platform.machine(), "cpu_part": fields.get("CPU part"),
            "features": fields.get("Features", "").split(), "cores": text.count("processor\t:")}


def versions() -> dict:
    found = {}
    for name in ("torch", "onnxruntime", "openvino", "ncnn", "executorch", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run(runner, inputs: np.ndarray) -> tuple[dict, float]:
    started = time.perf_counter()
    outputs = runner.infer_batched(inputs, BATCH)
    return outputs, time.perf_counter() - started


def described(runner) -> dict:
    info = runner.describe()
    keep = ("runtime", "threads", "inference_precision", "compute_precision", "ncnn_options", "cpu_support",
            "providers_active", "fallback", "partitions", "outside_delegate")
    return {k: info[k] for k in keep if k in info}


def runtime_defaults() -> dict:
    """What the runtimes pick on this CPU when nothing is pinned."""
    ov = require_openvino()
    ncnn = require_ncnn()
    opt = ncnn.Net().opt
    arithmetic = bool(opt.use_fp16_arithmetic) and bool(getattr(ncnn, "cpu_support_arm_asimdhp", lambda: 0)())
    storage = bool(opt.use_fp16_storage or opt.use_fp16_packed)  # fp16 conversions: every ARMv8 core has them
    return {
        "openvino_inference_precision": str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
        .replace("<Type: '", "").rstrip("'>"),
        "ncnn_fp16_storage": storage,
        "ncnn_fp16_arithmetic": arithmetic,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = np.load(args.inputs)
    bundle = Bundle.open(args.bundle)
    record = {"cpu": emulated_cpu(), "torch": torch.__version__, "versions": versions(), "defaults": runtime_defaults(), "artifacts": {}}

    def keep(name: str, runner, label: str | None = None) -> None:
        outputs, seconds = run(runner, inputs)
        np.savez(out / f"{name}.npz", **outputs)
        record["artifacts"][name] = {"label": label or name, "described": described(runner),
                                     "computed_precision": runner.computed_precision(), "seconds": round(seconds, 2)}

    # ExecuTorch last, on its default thread pool: resetting that pool (``threads``) is "unsafe" by
    # ExecuTorch's own name for it, and under emulation it corrupted the heap or hung the process
    for artifact in sorted(bundle.artifacts, key=lambda a: a.format == "executorch"):
        threads = None if artifact.format == "executorch" else args.threads
        try:
            runner = open_artifact(bundle.directory, bundle, artifact.name, threads=threads)
        except Exception as exc:  # reported per artifact: the others still run
            record["artifacts"][artifact.name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        keep(artifact.name, runner)
        if artifact.precision == "fp32" and artifact.format == "ncnn":
            keep(f"{artifact.name}@defaults", NcnnRunner(bundle.path_of(artifact.name), threads=args.threads,
                                                         pinned=False), "ncnn's defaults (no pin)")
        if artifact.precision == "fp32" and artifact.format == "openvino":
            default = require_openvino().Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
            keep(f"{artifact.name}@defaults", OpenVINORunner(bundle.path_of(artifact.name), precision="fp32",
                                                             inference_precision=default, threads=args.threads),
                 "the device's default precision (no pin)")

    # the reference as verify finds it on this CPU: the seeded init rebuilt by the aarch64 torch
    model = bundle.model
    rebuilt = build_model(model.spec, None, model.num_classes, model.stem, model.outputs_mode).module
    match = match_state_summary(rebuilt, (model.init or {}).get("state_summary"))
    np.savez(out / "init-state.npz", **{k: v.detach().numpy() for k, v in rebuilt.state_dict().items()})
    reference, label = reference_runner(bundle)
    record["init"] = {"exact_sha256_equal": state_fingerprint(rebuilt) == (model.init or {}).get("state_sha256"),
                      "tolerant_match": match.matched, "worst_share_of_bound": match.worst,
                      "tensors_differing": match.differing, "tensors": match.tensors, "reason": match.reason,
                      "verify_reference": label, "stand_in": is_stand_in(reference)}
    keep("pytorch-aarch64", reference, label)
    (out / "record.json").write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
