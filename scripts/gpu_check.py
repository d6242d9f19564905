#!/usr/bin/env python3
"""The prepared GPU check: what a CPU-only machine cannot run, in one script that
finishes in under 5 minutes on one GPU.

  python scripts/gpu_check.py [--model resnet50_cbam] [--json out.json] [--budget-s 270] [--int8]

Steps (each is skipped, with its reason, where the library is missing; none is faked):
  1. environment: torch, CUDA, GPU, compute capability; TF32 flags before and after
     cbam_deploy.runners.torch.disable_tf32 (cuDNN's allow_tf32 defaults to True)
  2. PyTorch CUDA fp32 (TF32 off) and fp16 against PyTorch CPU fp32 with the project's parity bounds;
     the same fp32 model with TF32 on, for the size of the error TF32 makes
  3. latency at batch 1 and 8: CPU on the host clock, CUDA with CUDA events (compute) and the host
     clock (end to end, with copies), medians of --iters runs after warm-up
  4. onnxruntime-gpu (CUDA execution provider), when importable: parity and latency, and the
     provider that really ran
  5. TensorRT, when importable: fp32 (TF32 cleared) and fp16 engines (and int8 with --int8) built
     by cbam-deploy, parity against PyTorch CPU fp32, CUDA-event latency, and the profile
     enforcement (a batch above the profile max is split, one below its min padded)

Exit codes: 0 every check that ran passed (or no GPU: one SKIP line), 1 a parity check failed,
2 the budget ran out before all steps (what ran is still reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RESULTS: dict = {"steps": {}, "failures": [], "skipped": {}}
STARTED = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {text}", flush=True)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def time_runner(runner, x: np.ndarray, iters: int, warmup: int = 3) -> dict:
    """Median host (end-to-end) and device (CUDA-event) milliseconds of runner.run_timed."""
    for _ in range(warmup):
        runner.run_timed(x)
    host, device = [], []
    for _ in range(iters):
        total, compute = runner.run_timed(x)
        host.append(total)
        if compute is not None:
            device.append(compute)
    out = {"batch": len(x), "iters": iters, "host_p50_ms": median_ms(host)}
    if device:
        out["cuda_event_p50_ms"] = median_ms(device)
    return out


def check(name: str, reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict:
    from cbam_deploy.parity import TOLERANCES, compare_outputs

    result = compare_outputs(reference, candidate, TOLERANCES[precision])
    keep = {k: result.get(k) for k in ("passed", "max_abs_err", "bound", "cosine_min", "top1_agreement", "reason") if k in result}
    verdict = "pass" if result["passed"] else "FAIL"
    say(f"  {name:<28} {precision}: max|err| {result.get('max_abs_err', float('nan')):.3g} (bound {result.get('bound', float('nan')):.3g}), "
        f"cos min {result.get('cosine_min', float('nan')):.6f}  {verdict}")
    if not result["passed"]:
        RESULTS["failures"].append(f"{name} {precision}: {result.get('reason')}")
    return keep


def over_budget(args) -> bool:
    return time.perf_counter() - STARTED > args.budget_s


def step_environment(torch) -> dict:
    from cbam_deploy.runners.torch import disable_tf32, tf32_state

    before = tf32_state()
    after = disable_tf32()
    major, minor = torch.cuda.get_device_capability(0)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
           "tf32_default": before, "tf32_after_disable": after, "cpu_threads": torch.get_num_threads()}
    try:
        from cbam_deploy.devices import image_stack

        env["image_stack"] = image_stack()
    except Exception:
        pass
    for key, value in env.items():
        say(f"  {key}: {value}")
    if any(after.values()):
        RESULTS["failures"].append("TF32 still on after disable_tf32()")
    return env


def step_torch(args, torch, module, inputs: dict) -> dict:
    import copy

    from cbam_deploy.runners.torch import TorchRunner

    out: dict = {"parity": {}, "latency": {}}
    cpu = TorchRunner(copy.deepcopy(module))
    reference = {b: cpu.run(x) for b, x in inputs.items()}
    fp32 = TorchRunner(copy.deepcopy(module), device="cuda")
    fp16 = TorchRunner(copy.deepcopy(module), device="cuda", precision="fp16")
    big = max(inputs)
    out["parity"]["cuda-fp32-tf32-off"] = check("torch cuda (TF32 off)", reference[big], fp32.run(inputs[big]), "fp32")
    out["parity"]["cuda-fp16"] = check("torch cuda fp16", reference[big], fp16.run(inputs[big]), "fp16")
    # the same fp32 model with TF32 allowed, for the size of what TF32 does (informative, not judged)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32 = fp32.run(inputs[big])
    finally:
        from cbam_deploy.runners.torch import disable_tf32

        disable_tf32()
    from cbam_deploy.parity import TOLERANCES, compare_outputs

    tf32_result = compare_outputs(reference[big], tf32, TOLERANCES["fp32"])
    out["parity"]["cuda-fp32-tf32-on (informative)"] = {k: tf32_result.get(k) for k in ("passed", "max_abs_err", "bound", "cosine_min")}
    say(f"  torch cuda (TF32 ON, info)   fp32: max|err| {tf32_result['max_abs_err']:.3g} vs bound {tf32_result['bound']:.3g} "
        f"-> {'within' if tf32_result['passed'] else 'OUTSIDE'} the fp32 bound")
    for b, x in inputs.items():
        out["latency"][f"cpu-fp32-b{b}"] = time_runner(cpu, x, max(3, args.iters // 4), warmup=1)
        out["latency"][f"cuda-fp32-b{b}"] = time_runner(fp32, x, args.iters)
        out["latency"][f"cuda-fp16-b{b}"] = time_runner(fp16, x, args.iters)
    for name, row in out["latency"].items():
        say(f"  {name:<16} host p50 {row['host_p50_ms']:8.3f} ms" + (f"   cuda events p50 {row['cuda_event_p50_ms']:8.3f} ms"
                                                                    if "cuda_event_p50_ms" in row else ""))
    out["reference"] = reference
    return out


def step_onnxruntime_gpu(args, onnx_path: Path, inputs: dict, reference: dict) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    available = ort.get_available_providers()
    say(f"  onnxruntime {ort.__version__}, providers {available}")
    if "CUDAExecutionProvider" not in available:
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)",
                "providers": available}
    from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(onnx_path, providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    ran = runner.session.get_providers()
    out = {"version": ort.__version__, "providers_ran": ran}
    say(f"  session providers: {ran}")
    if ran[0] != "CUDAExecutionProvider":
        RESULTS["failures"].append(f"onnxruntime fell back to {ran[0]}")
    big = max(inputs)
    out["parity"] = check("onnxruntime CUDA EP", reference[big], runner.run(inputs[big]), "fp32")
    out["latency"] = {f"b{b}": time_runner(runner, x, args.iters) for b, x in inputs.items()}
    for name, row in out["latency"].items():
        say(f"  ort-cuda {name:<6} host p50 {row['host_p50_ms']:8.3f} ms")
    return out


def step_tensorrt(args, bundle: Path, inputs: dict, reference: dict) -> dict:
    try:
        import tensorrt as trt
    except ImportError:
        return {"skipped": "TensorRT (python module tensorrt) is not installed"}
    from cbam_deploy.build import TensorRTOptions, build_artifacts
    from cbam_deploy.bundle import read_manifest
    from cbam_deploy.loaders import open_artifact

    out: dict = {"version": trt.__version__, "engines": {}}
    say(f"  TensorRT {trt.__version__}")
    precisions = ["fp32", "fp16"] + (["int8"] if args.int8 else [])
    big = max(inputs)
    options = TensorRTOptions(min_batch=2, opt_batch=big, max_batch=big,
                              timing_cache=str(Path(tempfile.gettempdir()) / "cbam-gpu-check-timing.cache"))
    for precision in precisions:
        if over_budget(args):
            out["engines"][precision] = {"skipped": "budget"}
            continue
        started = time.perf_counter()
        outcomes = build_artifacts(bundle, "tensorrt", precision, calib_data="synthetic" if precision == "int8" else None,
                                   calib_size=32, trt=options)
        name = f"tensorrt-{precision}"
        built = next((o for o in outcomes if o.name == name), None)
        if built is None:
            out["engines"][precision] = {"skipped": "; ".join(str(o.skipped) for o in outcomes if o.skipped)}
            RESULTS["failures"].append(f"{name} not built: {out['engines'][precision]['skipped']}")
            continue
        manifest = read_manifest(bundle)
        export = next(a for a in manifest["artifacts"] if a["name"] == name)["export"]
        runner = open_artifact(bundle, manifest, name)
        row = {"build_s": round(time.perf_counter() - started, 1), "tf32": export.get("tf32"),
               "cleared_flags": export.get("cleared_flags"), "qdq_form": export.get("qdq_form")}
        say(f"  {name}: built in {row['build_s']} s, tf32={row['tf32']}, profile 2..{big}")
        if precision == "int8":
            from cbam_deploy.parity import compare_int8

            result = compare_int8(reference[big], runner.run(inputs[big]), judge_top1=False)
            row["parity"] = {k: result.get(k) for k in ("passed", "cosine_mean", "top1_agreement")}
            say(f"  {name:<28} int8: cosine mean {result.get('cosine_mean')}")
            if not result.get("passed"):
                RESULTS["failures"].append(f"{name}: {result.get('reason')}")
        else:
            row["parity"] = check(name, reference[big], runner.run(inputs[big]), precision)
        # the profile is 2..big: batch 1 is padded to 2, batch 2*big+1 split into big, big, 1 (padded);
        # each row must still match its own reference row
        padded = runner.run(inputs[1])
        row["padded_batch1_max_abs_err"] = float(np.abs(padded - reference[1]).max())
        split_in = np.concatenate([inputs[big], inputs[big], inputs[1]])
        split_ref = np.concatenate([reference[big], reference[big], reference[1]])
        row["split_batch_max_abs_err"] = float(np.abs(runner.run(split_in) - split_ref).max())
        row["latency"] = {f"b{big}": time_runner(runner, inputs[big], args.iters)}
        try:
            runner.run_timed(inputs[1])
            RESULTS["failures"].append(f"{name}: run_timed accepted a batch outside the profile")
        except Exception:
            row["run_timed_refuses_out_of_profile"] = True
        say(f"  {name} b{big}: host p50 {row['latency'][f'b{big}']['host_p50_ms']:.3f} ms, cuda events p50 "
            f"{row['latency'][f'b{big}'].get('cuda_event_p50_ms')} ms; batch 1 padded: max|err| "
            f"{row['padded_batch1_max_abs_err']:.3g}; batch {len(split_in)} split: max|err| {row['split_batch_max_abs_err']:.3g}")
        out["engines"][precision] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_cbam", help="zoo model (random seeded init); 224x224 ImageNet stem")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting new steps after this many seconds")
    parser.add_argument("--int8", action="store_true", help="also build a TensorRT INT8 engine (synthetic calibration)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print(f"SKIP: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing to check here")
        return 0

    say("1. environment")
    RESULTS["steps"]["environment"] = step_environment(torch)

    from cbam_deploy.models import build_model

    torch.manual_seed(0)
    module = build_model(args.model, None, 1000, "imagenet").module.eval()
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, 224, 224), dtype=np.float32) for b in (1, 8)}

    say(f"2-3. PyTorch {args.model}: CUDA fp32 (TF32 off) and fp16 vs CPU fp32; latency")
    torch_out = step_torch(args, torch, module, inputs)
    reference = torch_out.pop("reference")
    RESULTS["steps"]["torch"] = torch_out

    workdir = Path(tempfile.mkdtemp(prefix="cbam-gpu-check-"))
    bundle = workdir / "bundle"
    if not over_budget(args):
        say("export: ONNX bundle (random seeded init)")
        from cbam_deploy.export_job import ExportOptions, export_bundle

        export_bundle(ExportOptions(model=args.model, output=str(bundle), parity=False))
    for label, step in (("4. onnxruntime-gpu", lambda: step_onnxruntime_gpu(args, bundle / "model.onnx", inputs, reference)),
                        ("5. TensorRT", lambda: step_tensorrt(args, bundle, inputs, reference))):
        if over_budget(args) or not bundle.is_dir():
            RESULTS["skipped"][label] = "time budget spent"
            say(f"{label}: skipped (time budget spent)")
            continue
        say(label)
        try:
            result = step()
        except Exception as exc:  # report and go on: one broken step must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
            RESULTS["failures"].append(f"{label}: {type(exc).__name__}: {exc}")
            say(f"  ERROR {type(exc).__name__}: {exc}")
        if "skipped" in result:
            say(f"  skipped: {result['skipped']}")
        RESULTS["steps"][label] = result

    RESULTS["seconds"] = round(time.perf_counter() - STARTED, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    say(f"done in {RESULTS['seconds']} s; failures: {len(RESULTS['failures'])}")
    for failure in RESULTS["failures"]:
        say(f"  FAIL {failure}")
    if RESULTS["failures"]:
        return 1
    return 2 if RESULTS["skipped"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
