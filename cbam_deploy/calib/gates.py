"""Find the attention-gate subgraphs (CBAM channel MLP, sigmoids, gating multiplies, spatial 7x7 conv;
SE and BAM gates) in an exported ONNX graph, from their origin in the PyTorch modules.

Two steps, neither a hand-kept list of node names:

1. at export, ``models.layers.attention_modules(model)`` walks the nn.Module tree and records the qualified
   names of attention modules: instances of cbam_deploy's CBAM / SE / BAM classes, and, for
   bring-your-own networks, modules whose class name says attention (CBAM, ChannelAttention,
   SpatialGate, SqueezeExcitation, SELayer, ...). The list goes into the manifest.
2. at quantization, ``gate_nodes(onnx_model, modules)`` maps every ONNX node back to the module
   that produced it: the TorchScript exporter's node names carry the module scope
   (``/layer1/layer1.0/cbam/ChannelGate/mlp/mlp.1/Gemm``), the dynamo exporter writes it into the
   node's ``pkg.torch.onnx.name_scopes`` metadata. A node whose module lies inside a recorded
   attention module is a gate node.
"""

from __future__ import annotations

import ast
import re

import onnx

from ..models.layers import attention_modules  # noqa: F401  (step 1 lives with the layers)

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
            path = segment  # a fully qualified scope (dynamo exports, see exporters.onnx)
        elif path and segment.startswith(path.rsplit(".", 1)[-1] + "."):
            # Sequential children are scoped 'parent.index' under 'parent': replace, don't append
            path = path[: len(path) - len(path.rsplit(".", 1)[-1])] + segment
        else:
            path = f"{path}.{segment}" if path else segment
    return path or None


def inside(path: str | None, modules: list[dict]) -> bool:
    return bool(path) and any(path == m["path"] or path.startswith(m["path"] + ".") for m in modules)


def gate_nodes(model: onnx.ModelProto, modules: list[dict]) -> list[str]:
    """Names of the nodes that belong to any of ``modules`` (as recorded by ``attention_modules``)."""
    return [node.name for node in model.graph.node if inside(node_module_path(node), modules)]


def gate_op_names(names: list[str], modules: list[dict]) -> list[str]:
    """The same selection over plain names (OpenVINO friendly names)."""
    return [name for name in names if inside(name_module_path(name), modules)]
