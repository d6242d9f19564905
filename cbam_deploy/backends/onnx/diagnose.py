"""Find where an ONNX model first departs from PyTorch: compare intermediate tensors layer by layer.

The comparison points are the model's composite modules (blocks, stages, CBAM and its gates, the
spatial conv+BN, the classifier) that run exactly once per forward pass. PyTorch outputs come from
forward hooks; the ONNX tensor for a module is the output of the last node, in graph order, whose
scoped name lies inside that module (leaf Conv/BN modules are skipped: the exporter folds BN into
the conv, so their ONNX outputs have no PyTorch counterpart).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ...scopes import inside, node_module_path
from .runner import OnnxRuntimeRunner

_LEAVES = (nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Flatten, nn.MaxPool2d)


def locate_divergence(model: nn.Module, proto: onnx.ModelProto, inputs: np.ndarray, atol: float = 1e-4,
                      rtol: float = 1e-3) -> dict | None:
    """The first module (in graph order) whose output in the ONNX graph ``proto`` differs from PyTorch
    beyond ``atol + rtol * max|reference|``, with its error; None when every compared point agrees.
    ``proto`` is probed on a copy (the caller's graph is left as it was)."""
    probe_proto = onnx.ModelProto()
    probe_proto.CopyFrom(proto)
    proto = probe_proto
    candidates = {name: m for name, m in model.named_modules() if name and not isinstance(m, _LEAVES)}
    calls: dict[str, int] = {name: 0 for name in candidates}
    captured: dict[str, np.ndarray] = {}

    def hook(name):
        def record(_module, _inputs, output):
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                captured[name] = output.detach().float().numpy().copy()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad():
            model.eval()(torch.from_numpy(inputs))
    finally:
        for handle in handles:
            handle.remove()

    last_output: dict[str, tuple[int, str]] = {}
    for index, node in enumerate(proto.graph.node):
        path = node_module_path(node)
        if not path:
            continue
        for name in candidates:
            if calls[name] == 1 and name in captured and inside(path, [{"path": name}]):
                last_output[name] = (index, node.output[0])
    if not last_output:
        return None
    existing = {o.name for o in proto.graph.output}
    for _, tensor in last_output.values():
        if tensor not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
            existing.add(tensor)
    with tempfile.TemporaryDirectory(prefix="cbam-diagnose-") as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe))
        values = OnnxRuntimeRunner(probe).infer(inputs)  # every tapped tensor comes back by name
    for name, (index, tensor) in sorted(last_output.items(), key=lambda item: item[1][0]):
        reference = captured[name]
        got = values.get(tensor)
        if got is None or got.size != reference.size:
            continue
        error = float(np.abs(got.reshape(reference.shape) - reference).max())
        bound = atol + rtol * float(np.abs(reference).max())
        if error > bound:
            return {"module": name, "type": type(candidates[name]).__name__, "onnx_node": proto.graph.node[index].name,
                    "max_abs_err": error, "bound": bound}
    return None
