"""The gate finder's ONNX adapter: an ONNX graph (FP32, or Q/DQ INT8) as the finder's op list, its
node types classified by a table; the gates the INT8 recipes keep in float or quantize, the gate
tensors the attention probe reads, and the policy check on a built Q/DQ graph."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from ...gates import Graph, GraphGate, Op, graph_gates, policy_check, pool_from_shapes
from ...scopes import node_module_path

_VIEW = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose", "Identity", "Cast"}
# node type (a QLinear prefix dropped) -> the finder's op kind
_KINDS = {"Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid", "Mul": "mul", "Add": "add", "HardSwish": "hardswish",
          **dict.fromkeys(("Conv", "ConvInteger", "ConvTranspose"), "conv"),
          **dict.fromkeys(("Gemm", "MatMul", "MatMulInteger"), "linear")}
# ops whose first input alone is data (the rest: shapes, axes, scales)
_FIRST_INPUT = {**dict.fromkeys(_VIEW, "view"), "QuantizeLinear": "quant", "DequantizeLinear": "dequant"}
_GLOBAL_POOLS = {"GlobalAveragePool": "avg", "GlobalMaxPool": "max", "GlobalLpPool": "other"}
_POOLS = {"ReduceMean": "avg", "AveragePool": "avg", "ReduceMax": "max", "MaxPool": "max", "ReduceL2": "other",
          "ReduceLogSumExp": "other", "ReduceSum": "other", "LpPool": "other"}


def onnx_graph(proto) -> Graph:
    """An ONNX ``ModelProto`` as the finder's op list (shapes from ONNX's shape inference where it works)."""
    graph = proto.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # shapes only help; a graph inference cannot type still gets searched
        inferred = graph
    shapes = {}
    for info in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                      for d in info.type.tensor_type.shape.dim)
    initializers = {i.name: i for i in graph.initializer}
    constants = set(initializers)
    int8 = {n for n, i in initializers.items() if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    for name, init in initializers.items():
        shapes.setdefault(name, tuple(init.dims))
    inputs = {i.name for i in graph.input if i.name not in initializers}
    ops = []
    for node in graph.node:
        data = [t for t in node.input if t]
        op = Op(node.name or node.output[0], "other", data, list(node.output), node_module_path(node), None,
                op_type=node.op_type)
        _classify(op, node, shapes, initializers)
        if node.op_type == "Constant" or (data and all(t in constants for t in data)):
            constants.update(node.output)
            if any(t in int8 for t in data):
                int8.update(node.output)
        ops.append(op)
    return Graph(ops, shapes, constants, int8, inputs, [o.name for o in graph.output])


def _axes(node, initializers):
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1] in initializers:
        return [int(a) for a in numpy_helper.to_array(initializers[node.input[1]]).ravel()]
    return None


def _classify(op: Op, node, shapes, initializers) -> None:
    t = node.op_type
    if t.startswith("QLinear"):
        op.quantized_op = True
        t = t[len("QLinear"):]
    if t in _KINDS:
        op.kind = _KINDS[t]
    elif t in _FIRST_INPUT:
        op.kind, op.inputs = _FIRST_INPUT[t], op.inputs[:1]
    elif t in _GLOBAL_POOLS:
        op.kind, op.axes, op.pool = "pool", "hw", _GLOBAL_POOLS[t]
    elif t in _POOLS:
        pool = _POOLS[t]
        axes = _axes(node, initializers) if t.startswith("Reduce") else None
        before = shapes.get(node.input[0])
        rank = len(before) if before is not None else 4
        if axes is not None:
            axes = sorted(a % rank for a in axes)
            if axes == [2, 3]:
                op.kind, op.axes, op.pool = "pool", "hw", pool
            elif axes == [1]:
                op.kind, op.axes, op.pool = "pool", "c", pool
        else:
            pool_from_shapes(op, before, shapes.get(node.output[0]), pool)
        op.inputs = op.inputs[:1]


def onnx_gates(proto, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an ONNX graph (FP32 or Q/DQ), named after ``expected`` (the manifest's) where they match."""
    return graph_gates(onnx_graph(proto), expected)


def check_onnx_policy(proto, expected: list[dict] | None, policy: str, artifact: str,
                      found: list[GraphGate] | None = None) -> dict:
    """The gate policy on a Q/DQ graph (``found``: its gates, when the caller has them already)."""
    return policy_check(found if found is not None else onnx_gates(proto, expected), expected, policy, artifact)


__all__ = ["check_onnx_policy", "onnx_gates", "onnx_graph"]
