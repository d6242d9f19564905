"""CBAM as people write it, through the whole tool as a new user runs it: for each network,
``export --model file.py:factory``, ``quantize --target ort-cpu,openvino`` under ``--gates fp`` and
``--gates int8``, then ``verify --json``; one markdown row per network with the gates found against
those the network holds, whether the gate policy held on every built graph, and the attention parity
of every gate on every INT8 artifact. Calibration and verify inputs are the tool's synthetic images
(the networks are random-init with live BN statistics: every gate varies with the input).

Usage: python benchmarks/gate_styles.py [--only NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

import cbam_styles  # noqa: E402

# (label, factory spec, input size, batch, expected gates)
NETWORKS = [
    ("third-party CBAM ResNet-18 (multiply in the block, 1x1-conv MLP, nn.Sigmoid)",
     f"{ROOT / 'benchmarks/styles/third_party_resnet18.py'}:resnet18_cbam", 224, None, {"channel": 8, "spatial": 8}),
    ("Ultralytics-layout detector, 2 outputs, SiLU everywhere",
     f"{ROOT / 'tests/data/cbam_styles.py'}:yolo_detector", 64, None, cbam_styles.EXPECTED["yolo_detector"]),
    ("neutral names (Recalibrate / Locate), torch.sigmoid, Linear MLP, multiply in the parent",
     f"{ROOT / 'tests/data/cbam_styles.py'}:neutral_names", 64, None, cbam_styles.EXPECTED["neutral_names"]),
    ("third-party style, small (tests/data)", f"{ROOT / 'tests/data/cbam_styles.py'}:third_party_resnet", 32, None,
     cbam_styles.EXPECTED["third_party_resnet"]),
    ("official layout (ChannelGate/SpatialGate, multiply inside, pools from x.size())",
     f"{ROOT / 'tests/data/cbam_styles.py'}:official_layout", 32, 1, cbam_styles.EXPECTED["official_layout"]),
    ("SE with hard-sigmoid + ECA, beside hard-swish", f"{ROOT / 'tests/data/cbam_styles.py'}:se_eca", 32, None,
     cbam_styles.EXPECTED["se_eca"]),
]


def cli(*args: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cbam_deploy.cli", *args, "--json"], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if done.returncode not in (0, 3):
        raise SystemExit(f"cbam-deploy {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout)
    result["_seconds"] = round(time.perf_counter() - started, 1)
    return result


def run(label: str, spec: str, size: int, batch, expected: dict, work: Path) -> dict:
    bundle = work / spec.rpartition(":")[2]
    export_args = ["export", "--model", spec, "--input-size", str(size), "-o", str(bundle), "--force"]
    if batch:
        export_args += ["--batch", str(batch)]
    exported = cli(*export_args)
    found = {k: v for k, v in exported["model"]["gates"]["kinds"].items() if v}
    checks = {}
    for policy in ("fp", "int8"):
        quantized = cli("quantize", str(bundle), "--target", "ort-cpu,openvino", "--calib-data", "synthetic",
                        "--calib-size", "16", "--gates", policy, "--model", spec)
        for artifact in quantized["artifacts"]:
            checks[artifact["name"]] = artifact["quantization"]["gate_check"]
    verified = cli("verify", str(bundle), "--samples", "8", "--model", spec)
    parity = {}
    for row in verified["results"]:
        attention = row.get("attention") or {}
        parity[row["artifact"]] = {
            "passed": row.get("passed"), "attention_passed": attention.get("passed"),
            "counts": {k: v for k, v in (attention.get("counts") or {}).items() if v},
            "min_correlation": attention.get("min_correlation"), "min_top_iou": attention.get("min_top_iou"),
            "min_channel_cosine": attention.get("min_channel_cosine"),
            "min_channel_overlap": attention.get("min_channel_overlap"),
            "gate_policy_held": (row.get("gate_policy") or {}).get("held"),
        }
    return {"network": label, "expected": expected, "found": found, "gate_checks": checks, "parity": parity,
            "seconds": {"export": exported["_seconds"], "verify": verified["_seconds"]}}


def _cpu() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {len(names) or '?'} logical CPUs"


def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| network | gates found / expected | policy held on the built graph (ort-cpu, openvino x fp, int8) | "
             "attention parity, 4 INT8 artifacts | worst map corr / top-10% IoU | worst channel cosine / top-k overlap |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        found = ", ".join(f"{v} {k}" for k, v in row["found"].items()) or "none"
        expected = ", ".join(f"{v} {k}" for k, v in row["expected"].items())
        held = sum(1 for c in row["gate_checks"].values() if c["held"])
        int8 = [p for name, p in row["parity"].items() if name.startswith("int8-")]
        passed = sum(1 for p in int8 if p["attention_passed"])
        gates = sum(int8[0]["counts"].get(k, 0) for k in ("spatial", "channel", "joint")) if int8 else 0

        def worst(key):
            values = [p[key] for p in int8 if p.get(key) is not None]
            return min(values) if values else None
        lines.append(f"| {row['network']} | {found} / {expected} | {held}/{len(row['gate_checks'])} | "
                     f"{passed}/{len(int8)} pass, {gates} gates each | {_fmt(worst('min_correlation'), 4)} / "
                     f"{_fmt(worst('min_top_iou'), 2)} | {_fmt(worst('min_channel_cosine'), 5)} / "
                     f"{_fmt(worst('min_channel_overlap'), 2)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="factory names to run (default: all)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--render", help="print the table of a results file written by --json, run nothing")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbam-styles-") as tmp:
        for label, spec, size, batch, expected in NETWORKS:
            if args.only and spec.rpartition(":")[2] not in args.only:
                continue
            rows.append(run(label, spec, size, batch, expected, Path(tmp)))
            print(f"done: {label}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"machine: {_cpu()}, python {platform.python_version()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
