"""OpenVINO INT8 with and without VNNI: the attention parity of the same IRs on this CPU's own
integer kernels and with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: no VNNI, u8 x s8 pairs
summed in saturating 16-bit), for weights in NNCF's default range (full 8 bits, 7 bits on the first
layer only) and in the recipe's (7 bits on every layer, NNCF's ``OverflowFix.ENABLE``).

The model is the Ultralytics-style detector of tests/data/cbam_styles.py, quantized as
tests/test_gates.py does (synthetic calibration, 8 samples, gates int8); each IR runs in a child
process per ISA (oneDNN reads the variable once per process). It prints, per IR and ISA, every
gate's correlation (maps) or cosine (channel profiles) against PyTorch and its max abs error, and
the largest difference between the two ISAs' gate maps.

Usage: python benchmarks/int8_isa.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = f"{ROOT / 'tests' / 'data' / 'cbam_styles.py'}:yolo_detector"
ARTIFACT = "int8-openvino-gates-int8"


def build(out: Path, overflow_fix: str) -> None:
    """Export and quantize (gates int8) with NNCF's overflow fix set to ``overflow_fix``: the recipe's
    own value ('enable'), or NNCF's default ('first_layer_only'), passed through to nncf.quantize."""
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix

    from cbam_deploy.export_job import ExportOptions, export_bundle
    from cbam_deploy.models import CodeTrust
    from cbam_deploy.quantize import quantize_bundle

    quantize = getattr(nncf.quantize, "original", nncf.quantize)

    def with_fix(*args, advanced_parameters=None, **kwargs):
        advanced_parameters.overflow_fix = OverflowFix(overflow_fix)
        return quantize(*args, advanced_parameters=advanced_parameters, **kwargs)

    with_fix.original = quantize
    nncf.quantize = with_fix
    export_bundle(ExportOptions(model=SPEC, output=str(out), input_size=32, parity_samples=2))
    quantize_bundle(out, ["openvino"], "synthetic", calib_size=8, calib_batch=4, check_samples=4, gates="int8",
                    use_cache=False, trust=CodeTrust(factory=SPEC))


def measure(bundle: Path, maps_out: Path) -> dict:
    """This process's attention parity of the IR (as verify computes it) and its gate maps."""
    from cbam_deploy.attention import artifact_maps
    from cbam_deploy.bundle import Bundle
    from cbam_deploy.models import CodeTrust
    from cbam_deploy.verify import verify_bundle

    row = verify_bundle(bundle, samples=4, artifacts=[ARTIFACT], trust=CodeTrust(factory=SPEC))["results"][0]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(maps_out, **{k.replace(".", "_"): v for k, v in artifact_maps(bundle, Bundle.open(bundle), ARTIFACT, x).items()})
    return {"passed": row["attention"]["passed"],
            "gates": {g: {"figure": s.get("correlation", s.get("cosine")), "max_abs_err": s["max_abs_err"]}
                      for g, s in row["attention"]["gates"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the bundles here and keep them")
    parser.add_argument("--measure", nargs=2, metavar=("BUNDLE", "MAPS"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    from cbam_deploy.benchstats import machine_info

    print("machine:", json.dumps(machine_info()))
    root = Path(args.keep or tempfile.mkdtemp(prefix="cbam-int8-isa-"))
    os.environ["CBAM_DEPLOY_CACHE"] = str(root / "cache")
    for fix in ("first_layer_only", "enable"):
        bundle = root / fix
        if not (bundle / "manifest.json").is_file():
            build(bundle, fix)
        maps = {}
        for isa in ("native", "AVX2"):
            env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
            if isa != "native":
                env["ONEDNN_MAX_CPU_ISA"] = isa
            out = root / f"{fix}-{isa}.npz"
            done = subprocess.run([sys.executable, __file__, "--measure", str(bundle), str(out)], env=env,
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            maps[isa] = np.load(out)
            figures = ", ".join(f"{g} {s['figure']:.4f} (max|err| {s['max_abs_err']:.4f})"
                                for g, s in result["gates"].items())
            print(f"overflow_fix={fix:16} ISA={isa:6} attention {'pass' if result['passed'] else 'FAIL'}: {figures}")
        gap = max(float(np.abs(maps["native"][k] - maps["AVX2"][k]).max()) for k in maps["native"].files)
        print(f"overflow_fix={fix:16} largest gate-map difference between the two ISAs: {gap:.4g}")


if __name__ == "__main__":
    main()
