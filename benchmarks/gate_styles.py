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
                        "--calib-size", "16", "--gates", policy)
        for artifact in quantized["artifacts"]:
            checks[artifact["name"]] = artifact["quantization"]["gate_check"]
    verified = cli("verify", str(bundle), "--samples", "8")
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


def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| network | gates found / expected | policy held (ort-cpu, openvino; fp, int8) | attention parity, "
             "INT8 ort-cpu (worst map corr / IoU; worst channel cosine / top-k) | attention parity, INT8 openvino |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        found = ", ".join(f"{v} {k}" for k, v in row["found"].items()) or "none"
        expected = ", ".join(f"{v} {k}" for k, v in row["expected"].items())
        held = sum(1 for c in row["gate_checks"].values() if c["held"])

        def cell(name):
            p = row["parity"].get(name, {})
            verdict = "pass" if p.get("attention_passed") else "FAIL"
            count = sum(p.get("counts", {}).get(k, 0) for k in ("spatial", "channel", "joint"))
            return (f"{verdict}, {count} gates: {_fmt(p.get('min_correlation'), 4)} / {_fmt(p.get('min_top_iou'), 2)}; "
                    f"{_fmt(p.get('min_channel_cosine'), 5)} / {_fmt(p.get('min_channel_overlap'), 2)}")
        lines.append(f"| {row['network']} | {found} / {expected} | {held}/{len(row['gate_checks'])} | "
                     f"{cell('int8-ort-cpu')} | {cell('int8-openvino')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="factory names to run (default: all)")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbam-styles-") as tmp:
        for label, spec, size, batch, expected in NETWORKS:
            if args.only and spec.rpartition(":")[2] not in args.only:
                continue
            rows.append(run(label, spec, size, batch, expected, Path(tmp)))
            print(f"done: {label}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
