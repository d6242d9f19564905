"""OpenVINO's INT8 IR of an untrained CBAM net: are the channel gates' pools computed right?

Exports ``resnet10_half_cbam`` (CIFAR stem, random official init) and quantizes it for OpenVINO
(``--gates fp``, synthetic calibration), then, on the verify inputs of that artifact:

1. the largest ReduceMax of every channel gate's pool in the compiled IR, with OpenVINO's
   low-precision transformations on (the default) and off (``LP_TRANSFORMS_MODE: False``), next to
   the FP32 IR's;
2. the IR's logits against PyTorch's, and against PyTorch's with every channel gate held at 0.5.

Usage: python benchmarks/openvino_gate_pools.py [--keep DIR] [--gates fp|int8] [--weights CKPT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.benchstats import machine_info  # noqa: E402
from cbam_deploy.build import build_artifacts  # noqa: E402
from cbam_deploy.bundle import Bundle  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.loaders import open_artifact, reference_runner  # noqa: E402
from cbam_deploy.quantize import quantize_bundle  # noqa: E402
from cbam_deploy.verify import _int8_inputs  # noqa: E402


def pool_maxima(xml: Path, x: np.ndarray, config: dict) -> list[float]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    pools = [op for op in model.get_ops() if "ChannelGate" in op.get_friendly_name() and op.get_type_name() == "ReduceMax"]
    model.add_outputs([op.output(0) for op in pools])
    compiled = core.compile_model(model, "CPU", config)
    result = compiled(x)
    return [float(np.abs(result[port]).max()) for port in compiled.outputs[-len(pools):]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the bundle here and keep it")
    parser.add_argument("--gates", default="fp", choices=("fp", "int8"))
    parser.add_argument("--weights", help="a checkpoint (default: the random official init)")
    args = parser.parse_args()
    print("machine:", json.dumps(machine_info()))
    root = Path(args.keep or tempfile.mkdtemp(prefix="cbam-ov-pools-"))
    if not (root / "manifest.json").is_file():
        export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", weights=args.weights,
                                    num_classes=10 if args.weights else None, output=str(root), parity=False))
        build_artifacts(root, "openvino", "fp32")
        quantize_bundle(root, ["openvino"], "synthetic", gates=args.gates, use_cache=False)
    bundle = Bundle.open(root)
    name = "int8-openvino" if args.gates == "fp" else "int8-openvino-gates-int8"
    x, _ = _int8_inputs(bundle, bundle.artifact(name), None, 16, 7)
    int8_xml, fp32_xml = bundle.path_of(name), bundle.path_of("openvino-fp32")
    print("channel-gate ReduceMax, largest |value| per gate:")
    print("  fp32 IR              ", ["%.3g" % v for v in pool_maxima(fp32_xml, x, {"INFERENCE_PRECISION_HINT": "f32"})])
    print("  int8 IR, LPT on      ", ["%.3g" % v for v in pool_maxima(int8_xml, x, {})])
    print("  int8 IR, LPT off     ", ["%.3g" % v for v in pool_maxima(int8_xml, x, {"LP_TRANSFORMS_MODE": False})])
    model = reference_runner(bundle)[0].model
    with torch.no_grad():
        live = model(torch.from_numpy(x)).numpy()
        hooks = [m.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
                 for n, m in model.named_modules() if n.endswith("ChannelGate.mlp")]
        held = model(torch.from_numpy(x)).numpy()
        for hook in hooks:
            hook.remove()
    out = open_artifact(root, bundle, name).run(x)
    print(f"{name} logits: cosine {cosine(out, live):.5f} with PyTorch, {cosine(out, held):.5f} with PyTorch's "
          f"channel gates held at 0.5 (PyTorch against itself held: {cosine(live, held):.5f})")


if __name__ == "__main__":
    main()
