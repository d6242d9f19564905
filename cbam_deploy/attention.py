"""Attention parity: does a deployed artifact still look where the PyTorch FP32 model looks?

Logit agreement can hide a spatial gate that has collapsed. Here every CBAM spatial gate (the
sigmoid map, N x 1 x H x W) is read out of the PyTorch model (forward hooks) and out of each artifact
under its own runtime: a probe copy of the artifact exposes each gate's sigmoid tensor as an extra
output (ONNX: graph outputs; OpenVINO IR: ``Model.add_outputs``), found by the module scope of the
node (``scopes``). Per stage: Pearson correlation of the maps and the IoU of their top-k% regions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .bundle import Bundle
from .errors import BackendUnavailable, CbamDeployError
from .exporters.openvino import require_openvino
from .models.layers import ChannelGate, SpatialGate
from .runners import OnnxRuntimeRunner
from .runners.openvino import OpenVINORunner
from .scopes import name_module_path, node_module_path

TOP_FRACTION = 0.10
# Per precision: a gate passes when its map correlates at least this well with PyTorch FP32 and
# its top-10% region overlaps at least this much (IoU).
THRESHOLDS = {"fp32": (0.999, 0.90), "fp16": (0.99, 0.80), "bf16": (0.98, 0.70), "int8": (0.90, 0.50)}


def torch_maps(model: nn.Module, x: np.ndarray, kind: str = "spatial") -> dict[str, np.ndarray]:
    """The gates PyTorch computes for ``x``: spatial maps (N, 1, H, W) or channel profiles (N, C)."""
    wanted = SpatialGate if kind == "spatial" else ChannelGate
    captured: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, inputs, _output):
            gate = module.attention(inputs[0])
            captured[name] = gate.detach().float().reshape(gate.shape[0], -1 if kind == "channel" else 1,
                                                         *(() if kind == "channel" else gate.shape[2:])).numpy()
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, wanted)]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _gate_of(path: str | None) -> str | None:
    """'layer1.0.cbam.SpatialGate' for any node inside that gate's scope."""
    if not path or "SpatialGate" not in path.split("."):
        return None
    parts = path.split(".")
    return ".".join(parts[: parts.index("SpatialGate") + 1])


def onnx_gate_tensors(proto) -> dict[str, str]:
    """{spatial gate module: the tensor its Sigmoid writes} in an ONNX graph (FP32 or Q/DQ INT8)."""
    found = {}
    for node in proto.graph.node:
        gate = _gate_of(node_module_path(node)) if node.op_type == "Sigmoid" else None
        if gate:
            found[gate] = node.output[0]
    return found


def artifact_maps(bundle_dir: str | Path, manifest, name: str, x: np.ndarray,
                  threads: int | None = None) -> dict[str, np.ndarray]:
    """The spatial gates an artifact of the bundle (``manifest``: a ``Bundle`` or its manifest dict)
    computes for ``x``, under its own runtime."""
    bundle = Bundle(Bundle.of(manifest).manifest, bundle_dir)
    path = bundle.path_of(name)
    artifact = bundle.artifact(name)
    with tempfile.TemporaryDirectory(prefix="cbam-attention-") as tmp:
        if artifact.format == "onnx":
            proto = onnx.load(str(path))
            tensors = onnx_gate_tensors(proto)
            existing = {o.name for o in proto.graph.output}
            for tensor in tensors.values():
                if tensor not in existing:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
            probe = Path(tmp) / "probe.onnx"
            onnx.save(proto, str(probe))
            outputs = OnnxRuntimeRunner(probe, threads=threads, precision=artifact.precision).infer(x)
        elif artifact.format == "openvino":
            ov = require_openvino()
            model = ov.Core().read_model(str(path))
            tensors = {}
            for op in model.get_ops():
                gate = _gate_of(name_module_path(op.get_friendly_name())) if op.get_type_name() == "Sigmoid" else None
                if gate:
                    model.add_outputs([op.output(0)])
                    tensors[gate] = op.output(0).get_any_name()
            probe = Path(tmp) / "probe.xml"
            ov.save_model(model, str(probe), compress_to_fp16=False)
            outputs = OpenVINORunner(probe, precision=artifact.precision, threads=threads).infer(x)
        else:
            raise BackendUnavailable(f"attention maps are read from onnx and openvino artifacts; {name} is {artifact.format}")
    return {gate: outputs[tensor] for gate, tensor in tensors.items() if tensor in outputs}


def compare_maps(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], precision: str = "fp32",
                 top_fraction: float = TOP_FRACTION) -> dict:
    """Per gate: correlation, top-k% IoU, max abs error; the verdict by the precision's thresholds."""
    min_corr, min_iou = THRESHOLDS.get(precision, THRESHOLDS["fp32"])
    stages, reasons = {}, []
    for gate, ref in reference.items():
        cand = candidate.get(gate)
        if cand is None or cand.size != ref.size:
            stages[gate] = {"found": False}
            reasons.append(f"{gate}: not found in the artifact")
            continue
        r = ref.reshape(len(ref), -1).astype(np.float64)
        c = cand.reshape(len(cand), -1).astype(np.float64)
        corr = _correlation(r, c)
        iou = float(np.mean([_top_iou(a, b, top_fraction) for a, b in zip(r, c)]))
        stages[gate] = {"found": True, "correlation": corr, "top_iou": iou, "max_abs_err": float(np.abs(r - c).max())}
        if corr < min_corr or iou < min_iou:
            reasons.append(f"{gate}: correlation {corr:.4f}, top-{top_fraction:.0%} IoU {iou:.3f} "
                           f"(needs {min_corr} and {min_iou})")
    found = [s for s in stages.values() if s.get("found")]
    return {"gates": stages, "passed": not reasons, "reason": "; ".join(reasons) if reasons else None,
            "min_correlation": min((s["correlation"] for s in found), default=None),
            "min_top_iou": min((s["top_iou"] for s in found), default=None),
            "thresholds": {"min_correlation": min_corr, "min_top_iou": min_iou, "top_fraction": top_fraction}}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:  # a constant map: equal constants agree perfectly, anything else does not
        return 1.0 if np.allclose(a, b) else 0.0
    return float(a @ b / denominator)


def _top_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    k = max(1, int(round(fraction * a.size)))
    top_a = set(np.argpartition(-a, k - 1)[:k].tolist())
    top_b = set(np.argpartition(-b, k - 1)[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def attention_parity(bundle_dir: str | Path, manifest, name: str, model: nn.Module, x: np.ndarray) -> dict | None:
    """Attention parity of one artifact (``manifest``: a ``Bundle`` or its manifest dict) against the
    PyTorch model on ``x``; None for a model without spatial gates."""
    reference = torch_maps(model, x)
    if not reference:
        return None
    artifact = Bundle.of(manifest).artifact(name)
    try:
        candidate = artifact_maps(bundle_dir, manifest, name, x)
    except BackendUnavailable as exc:
        return {"passed": None, "skipped": str(exc)}
    except CbamDeployError:
        raise
    return compare_maps(reference, candidate, artifact.precision)
