"""Wall time and peak memory of the commands a user runs on a full network, for comparing two installs of
cbam-deploy back to back on one machine (before and after a change):

    export --model resnet50_cbam --format onnx,openvino,ncnn,executorch --precision fp32,int8 --calib-data DIR
    verify BUNDLE
    explain BUNDLE --image IMAGE

The calibration folder is written from scikit-image's bundled photographs (nothing is downloaded). Each
command runs once per ``--cli`` given (several minutes each), in the order given, and the table says the
1-minute load average before and after each: a figure taken while something else ran is not a figure.

Usage: python benchmarks/command_times.py --cli /path/to/before/.venv/bin/cbam-deploy
                                          --cli /path/to/after/.venv/bin/cbam-deploy [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# photographs that scikit-image ships inside its wheel (no download)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon", "page", "horse",
          "text", "grass", "gravel", "brick", "clock", "eagle", "logo", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "microaneurysms")


def write_calibration(folder: Path) -> list[Path]:
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo this scikit-image does not ship without a download
            continue
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(float(image.max() - image.min()), 1e-9)).astype(np.uint8)
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        path = folder / f"{name}.png"
        Image.fromarray(image).convert("RGB").save(path)
        written.append(path)
    return written


def load1() -> float:
    return os.getloadavg()[0]


def run(command: list[str], log: Path) -> dict:
    """One command, its wall and CPU seconds and its peak resident memory (GNU time's %M, per command)."""
    before = load1()
    start = time.perf_counter()
    timed = ["/usr/bin/time", "-f", "@@time %U %S %M"] + command if Path("/usr/bin/time").exists() else command
    done = subprocess.run(timed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    log.write_text(done.stderr)  # what the user saw on stderr (progress lines: stderr is not a terminal here)
    marks = [line.split()[1:] for line in lines if line.startswith("@@time ")]
    user, system, rss_kb = (float(v) for v in marks[-1]) if marks else (float("nan"),) * 3
    return {"exit": done.returncode, "wall_s": wall, "cpu_s": user + system, "peak_rss_gb": rss_kb / 2**20,
            "load_before": before, "load_after": load1(),
            "stderr_tail": [line for line in lines if not line.startswith("@@time ")][-1:]}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(isa)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", action="append", required=True, help="a cbam-deploy executable (repeat)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cbam-command-times-"))
    photos = write_calibration(work / "calib")
    print(f"{machine()}; {dt.date.today()}; {len(photos)} calibration photos", file=sys.stderr)
    rows = []
    for index, cli in enumerate(args.cli):
        bundle = work / f"bundle{index}"
        commands = {
            "export": [cli, "export", "--model", "resnet50_cbam", "--format", "onnx,openvino,ncnn,executorch",
                       "--precision", "fp32,int8", "--calib-data", str(work / "calib"), "--output", str(bundle)],
            "verify": [cli, "verify", str(bundle)],
            "explain": [cli, "explain", str(bundle), "--image", str(photos[0]), "--output", str(work / f"explain{index}")],
        }
        for name, command in commands.items():
            print(f"{cli}: {name} ...", file=sys.stderr)
            figures = run(command, work / f"{name}{index}.stderr.txt")
            rows.append((cli, name, figures))
            print(f"  {figures}", file=sys.stderr)
    print(f"{machine()}, {dt.date.today()}\n")
    print("| cbam-deploy | command | exit | wall s | CPU s | peak RSS GB | load before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cli, name, f in rows:
        print(f"| {cli} | {name} | {f['exit']} | {f['wall_s']:.1f} | {f['cpu_s']:.1f} | {f['peak_rss_gb']:.2f} | "
              f"{f['load_before']:.2f} / {f['load_after']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
