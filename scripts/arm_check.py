"""The x86 half of the ARM check (run it through scripts/arm_check.sh, which sets up the emulator,
the arm64 sysroot and the aarch64 packages first).

1. Exports a small CBAM bundle here (resnet10_half_cbam, CIFAR stem, 32x32; ONNX, OpenVINO, ncnn and
   ExecuTorch at fp32, and each format's INT8 on synthetic calibration data), cached by the source
   of cbam_deploy and the library versions.
2. Runs PyTorch here on fixed inputs (8 seeded N(0,1) samples and 8 synthetic images): the reference
   outputs, kept from x86; and every artifact here too.
3. Runs scripts/arm_worker.py under qemu-aarch64 for each emulated CPU (pinned: ``-cpu cortex-a76``,
   a Raspberry Pi 5 class core with fp16 arithmetic and dot product; ``-cpu cortex-a57``, plain
   ARMv8.0), which opens every artifact with cbam-deploy's own runners on the aarch64 runtimes.
4. Judges each artifact's aarch64 outputs against the x86 PyTorch outputs with the project's bounds
   (``parity.TOLERANCES`` for fp32, ``parity.compare_int8`` for int8), checks the fp32 pins held
   (the precision each runtime reports it computed in), and prints one table.

Exit 0 when every pinned artifact passed, every pin held and the seeded init was recognised on
aarch64; 1 otherwise. Parity figures only: emulated speed says nothing about a device.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from cbam_deploy.build import build_artifacts
from cbam_deploy.bundle import Bundle
from cbam_deploy.data import load_calibration
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.loaders import is_stand_in, open_artifact, reference_runner
from cbam_deploy.models import build_model
from cbam_deploy.parity import TOLERANCES, ParityCase, compare_all, compare_int8, make_inputs

ROOT = Path(__file__).resolve().parent.parent
MODEL, STEM = "resnet10_half_cbam", "cifar"
FORMATS, PRECISIONS = "onnx,openvino,ncnn,executorch", "fp32,int8"
CPUS = ["cortex-a76", "cortex-a57"]
VERSIONED = ("torch", "onnx", "onnxruntime", "openvino", "nncf", "ncnn", "pnnx", "executorch", "torchao", "numpy")
WORKER_TIMEOUT_S = 1800


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def bundle_key() -> str:
    """What the exported bundle depends on: cbam_deploy's source, the library versions, the recipe."""
    digest = hashlib.sha256(f"{MODEL} {STEM} {FORMATS} {PRECISIONS}".encode())
    for path in sorted((ROOT / "cbam_deploy").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    for name in VERSIONED:
        digest.update(f"{name}={_version(name)}".encode())
    return digest.hexdigest()[:16]


def export(cache: Path) -> Path:
    """The bundle, exported once per ``bundle_key`` into the cache (older ones removed)."""
    bundles = cache / "bundles"
    target = bundles / bundle_key()
    if (target / ".complete").is_file():
        return target
    if bundles.is_dir():
        shutil.rmtree(bundles)
    staging = bundles / (target.name + ".tmp")
    print(f"arm_check: exporting {MODEL} --stem {STEM} ({FORMATS} x {PRECISIONS}) ...", file=sys.stderr, flush=True)
    export_bundle(ExportOptions(model=MODEL, stem=STEM, output=str(staging)))
    outcomes = build_artifacts(staging, FORMATS, PRECISIONS, calib_data="synthetic")
    for outcome in outcomes:
        if outcome.skipped:
            print(f"arm_check: {outcome.format} {outcome.precision} not built: {outcome.skipped}", file=sys.stderr)
    (staging / ".complete").touch()
    staging.rename(target)
    return target


def fixed_inputs(bundle: Bundle) -> np.ndarray:
    side = bundle.input.side
    noise = make_inputs(ParityCase(8, side, side, 8), seed=0)
    images = load_calibration("synthetic", bundle.input.raw, 8, seed=1).inputs
    return np.concatenate([noise, images]).astype(np.float32)


def host_machine() -> dict:
    model, flags = platform.processor() or "?", []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("?", "", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa, "date": datetime.date.today().isoformat()}


def run_workers(args, bundle_dir: Path, inputs_path: Path, work: Path, cpus: list[str]) -> dict[str, dict]:
    """scripts/arm_worker.py under qemu-aarch64, one process per emulated CPU, as many at once as cores."""
    python = Path(args.sysroot) / "usr/bin/python3.11"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": f"{args.site}:{ROOT}", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "LANG": "C.UTF-8"}

    def one(cpu: str) -> tuple[str, dict]:
        out = work / cpu
        command = [args.qemu, "-cpu", cpu, "-L", args.sysroot, str(python), str(ROOT / "scripts/arm_worker.py"),
                   str(bundle_dir), str(inputs_path), str(out), "--threads", str(args.threads)]
        print(f"arm_check: running the artifacts on aarch64 (qemu -cpu {cpu}) ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, env={**env, "QEMU_CPU": cpu}, capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
        if done.returncode != 0 or not (out / "record.json").is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            return cpu, {"error": f"the aarch64 worker exited {done.returncode}:\n{tail}"}
        record = json.loads((out / "record.json").read_text())
        record["outputs"] = {name: dict(np.load(out / f"{name}.npz")) for name in record["artifacts"]
                             if (out / f"{name}.npz").is_file()}
        record["init"].update(init_difference(bundle_dir, dict(np.load(out / "init-state.npz"))))
        return cpu, record

    jobs = max(1, min(len(cpus), os.cpu_count() or 1, args.jobs))
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, cpus))


def init_difference(bundle_dir: Path, rebuilt: dict) -> dict:
    """How the seeded init rebuilt on aarch64 differs from the one rebuilt here, tensor by tensor."""
    model = Bundle.open(bundle_dir).model
    here = build_model(model.spec, None, model.num_classes, model.stem, model.outputs_mode).module.state_dict()
    deltas = {name: float(np.abs(tensor.numpy().astype(np.float64) - rebuilt[name]).max()) if tensor.numel() else 0.0
              for name, tensor in here.items()}
    return {"tensors_differing_bits": sum(d > 0 for d in deltas.values()), "max_abs_difference": max(deltas.values())}


def _max_delta(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)


def judge(bundle: Bundle, cpu: str, record: dict, reference: dict, on_x86: dict) -> list[dict]:
    """One row per artifact run on ``cpu``: parity against x86 PyTorch and what the runtime computed in."""
    kinds = bundle.output_kinds
    precisions = {a.name: a.precision for a in bundle.artifacts}
    rows = []
    for name, info in record["artifacts"].items():
        base = name.split("@")[0]
        precision = "fp32" if name == "pytorch-aarch64" else precisions.get(base, "fp32")
        row = {"cpu": cpu, "artifact": name, "precision": precision, "label": info.get("label", name),
               "pinned": "@" not in name}
        if "error" in info:
            rows.append({**row, "passed": False, "reason": info["error"]})
            continue
        outputs = record["outputs"][name]
        if precision == "int8":
            metrics = compare_int8(reference, outputs, judge_top1=bundle.model.trained, kinds=kinds)
        else:  # fp32 artifacts are judged by the fp32 bounds: the pins must have held
            metrics = compare_all(reference, outputs, TOLERANCES["fp32"], kinds)
        computed = info.get("computed_precision")
        described = info.get("described", {})
        row.update(
            max_abs_err=metrics.get("max_abs_err"), top1_agreement=metrics.get("top1_agreement"),
            cosine_min=metrics.get("cosine_min"), cosine_mean=metrics.get("cosine_mean"), bound=metrics.get("bound"),
            passed=bool(metrics["passed"]), reason=metrics.get("reason"),
            computed_in=(None if name == "pytorch-aarch64" else
                         f"int8, float parts {computed}" if precision == "int8" and computed else computed),
            runtime=described.get("runtime"),
            vs_x86_artifact=_max_delta(outputs, on_x86[base]) if base in on_x86 else None,
        )
        # an fp32 pin holds when the runtime reports fp32; a runtime that reports nothing is said so
        if precision == "fp32" and name != "pytorch-aarch64" and row["pinned"]:
            row["pin_held"] = None if computed is None else computed == "fp32"
        rows.append(row)
    return rows


def verdict(rows: list[dict], records: dict[str, dict]) -> tuple[bool, list[str]]:
    problems = []
    for row in rows:
        if not row["pinned"]:
            continue  # the runtimes' defaults are shown for comparison, not judged
        if not row["passed"]:
            problems.append(f"{row['cpu']} {row['artifact']}: {row.get('reason')}")
        if row.get("pin_held") is False:
            problems.append(f"{row['cpu']} {row['artifact']}: computed in {row['computed_in']}, not fp32")
    for cpu, record in records.items():
        if "error" in record:
            problems.append(f"{cpu}: {record['error']}")
        elif record["init"]["stand_in"]:
            problems.append(f"{cpu}: the seeded init was not recognised: {record['init']['verify_reference']}")
    return not problems, problems


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> str:
    host = result["host"]
    lines = [f"ARM check: {MODEL} --stem {STEM}, {result['inputs']} inputs; reference: PyTorch {result['torch']} on "
             f"{host['cpu']} ({host['cores']} cores, {', '.join(host['isa']) or 'no AVX2'}), {host['date']}",
             f"emulator: {result['qemu']}; aarch64 wheels: {result['aarch64_versions']}", ""]
    header = (f"{'cpu':<11} {'artifact':<24} {'prec':<5} {'computed in':<27} {'max|Δ| vs x86 PyTorch':>21} "
              f"{'top-1':>6} {'cos min':>9} {'vs x86 same':>11}  result")
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        computed = row.get("computed_in") or ("-" if row["artifact"] == "pytorch-aarch64" else "not reported")
        if row.get("pin_held") is True:
            computed += " (pin held)"
        result_text = "ERROR" if row.get("max_abs_err") is None and not row["passed"] else \
            ("pass" if row["passed"] else "FAIL")
        if not row["pinned"]:
            result_text = f"({result_text}: unpinned)"
        lines.append(f"{row['cpu']:<11} {row['artifact']:<24} {row['precision']:<5} {computed:<27} "
                     f"{_fmt(row.get('max_abs_err'), '.1e'):>21} {_fmt(row.get('top1_agreement'), '.0%'):>6} "
                     f"{_fmt(row.get('cosine_min'), '.6f'):>9} {_fmt(row.get('vs_x86_artifact'), '.1e'):>11}  "
                     f"{result_text}")
    lines.append("")
    for cpu, record in result["records"].items():
        if "error" in record:
            lines.append(f"{cpu}: {record['error']}")
            continue
        cpuinfo, defaults, init = record["cpu"], record["defaults"], record["init"]
        lines.append(f"{cpu}: guest /proc/cpuinfo CPU part {cpuinfo['cpu_part']}, features {' '.join(cpuinfo['features'])}")
        ncnn = ("fp16 storage and arithmetic" if defaults["ncnn_fp16_arithmetic"] else
                "fp16 storage, fp32 arithmetic" if defaults["ncnn_fp16_storage"] else "fp32")
        lines.append(f"  unpinned defaults: OpenVINO inference precision {defaults['openvino_inference_precision']}; "
                     f"ncnn {ncnn}")
        lines.append(f"  seeded init rebuilt by aarch64 torch {record['torch']}: {init['tensors_differing_bits']} of "
                     f"{init['tensors']} tensors differ from x86's (max |Δ| {init['max_abs_difference']:.1e}), exact "
                     f"sha256 {'equal' if init['exact_sha256_equal'] else 'differs'}; verify's reference there: "
                     f"{init['verify_reference']}")
    lines.append("")
    lines.append("result: " + ("pass" if result["passed"] else "FAIL\n  " + "\n  ".join(result["problems"])))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qemu", required=True)
    parser.add_argument("--sysroot", required=True)
    parser.add_argument("--site", required=True, help="the aarch64 packages (a PYTHONPATH)")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--cpu", action="append", dest="cpus",
                        help=f"an emulated CPU as qemu's -cpu takes it, e.g. 'max,sme=off'; repeatable (default: "
                             f"{' and '.join(CPUS)})")
    parser.add_argument("--threads", type=int, default=1, help="threads per runtime on aarch64 (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="emulated CPUs run at once (default 2)")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    args = parser.parse_args()
    cpus = args.cpus or CPUS

    bundle_dir = export(Path(args.cache))
    bundle = Bundle.open(bundle_dir)
    inputs = fixed_inputs(bundle)
    reference_model, label = reference_runner(bundle)
    if is_stand_in(reference_model):
        raise SystemExit(f"arm_check: the x86 reference is not PyTorch: {label}")
    batch = 4
    reference = reference_model.infer_batched(inputs, batch)
    on_x86 = {a.name: open_artifact(bundle_dir, bundle, a.name).infer_batched(inputs, batch) for a in bundle.artifacts}
    with tempfile.TemporaryDirectory(prefix="arm-check-") as tmp:
        work = Path(tmp)
        np.save(work / "inputs.npy", inputs)
        records = run_workers(args, bundle_dir, work / "inputs.npy", work, cpus)
    rows = [row for cpu in cpus if "error" not in records[cpu]
            for row in judge(bundle, cpu, records[cpu], reference, on_x86)]
    passed, problems = verdict(rows, records)
    qemu_version = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    aarch64 = next((r for r in records.values() if "error" not in r), {})
    result = {
        "host": host_machine(), "torch": _version("torch"), "qemu": qemu_version, "cpus": cpus,
        "inputs": f"{len(inputs)} ({8} seeded N(0,1), {len(inputs) - 8} synthetic images)",
        "aarch64_versions": ", ".join(f"{k} {v}" for k, v in aarch64.get("versions", {}).items()),
        "bundle": str(bundle_dir), "artifacts": [a.name for a in bundle.artifacts],
        "rows": rows, "passed": passed, "problems": problems,
        "records": {cpu: {k: v for k, v in rec.items() if k != "outputs"} for cpu, rec in records.items()},
    }
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
