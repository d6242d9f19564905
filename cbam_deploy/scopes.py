"""Where an ONNX node came from: the PyTorch module path in its name or metadata. The one parser of
module scopes; the INT8 gate policy, first-divergence localisation, the profiler roll-up and the
dynamo exporter's node naming all read scopes through it.

The TorchScript exporter names nodes after their module scope
(``/layer1/layer1.0/cbam/ChannelGate/mlp/mlp.1/Gemm``); the dynamo exporter writes the scope into
the node's ``pkg.torch.onnx.name_scopes`` metadata; OpenVINO's friendly names derive from the ONNX
names (``.../Conv/WithoutBiases``).
"""

from __future__ import annotations

import ast
import re

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def metadata_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module scopes the dynamo exporter recorded for ``node`` (outermost first), or None."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                return [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return None
    return None


_SUFFIX = re.compile(r"_\d+$")


def node_module_path(node: onnx.NodeProto) -> str | None:
    """The qualified module name that produced ``node``, or None when the graph does not say."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                continue
            scopes = [s for s in scopes if s]
            return scopes[-1] if scopes else None
    return name_module_path(node.name)


def name_module_path(name: str) -> str | None:
    """Module path from a scoped name such as ``/layer1/layer1.0/cbam/ChannelGate/mlp/mlp.1/Gemm``
    (TorchScript exporter) or OpenVINO's friendly name derived from it (``.../Conv/WithoutBiases``);
    trailing op segments may remain, which prefix matching ignores."""
    if not name.startswith("/"):
        return None
    segments = [_SUFFIX.sub("", s) for s in name.strip("/").split("/")[:-1]]
    path = ""
    for segment in segments:
        if path and segment.startswith(path + "."):
            path = segment  # a fully qualified scope (dynamo exports, see backends.onnx.exporter)
        elif path and segment.startswith(path.rsplit(".", 1)[-1] + "."):
            # Sequential children are scoped 'parent.index' under 'parent': replace, don't append
            path = path[: len(path) - len(path.rsplit(".", 1)[-1])] + segment
        else:
            path = f"{path}.{segment}" if path else segment
    return path or None


def inside(path: str | None, modules: list[dict]) -> bool:
    return bool(path) and any(path == m["path"] or path.startswith(m["path"] + ".") for m in modules)


