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

import onnx

from ..models.layers import attention_modules  # noqa: F401  (step 1 lives with the layers)
from ..scopes import inside, name_module_path, node_module_path


def gate_nodes(model: onnx.ModelProto, modules: list[dict]) -> list[str]:
    """Names of the nodes that belong to any of ``modules`` (as recorded by ``attention_modules``)."""
    return [node.name for node in model.graph.node if inside(node_module_path(node), modules)]


def gate_op_names(names: list[str], modules: list[dict]) -> list[str]:
    """The same selection over plain names (OpenVINO friendly names)."""
    return [name for name in names if inside(name_module_path(name), modules)]
