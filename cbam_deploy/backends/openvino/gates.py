"""The gate finder's OpenVINO adapter: an OpenVINO ``Model`` (an FP32 or INT8 IR, or one converted by
another exporter) as the finder's op list, its op types classified by a table; NNCF's ignored scope,
the attention probe's outputs and the FakeQuantize policy check read it."""

from __future__ import annotations

from ...gates import Graph, GraphGate, Op, graph_gates, policy_check, pool_from_shapes
from ...scopes import name_module_path

# op type -> the finder's op kind
_KINDS = {"Sigmoid": "sigmoid", "Multiply": "mul", "Add": "add", "Convolution": "conv", "GroupConvolution": "conv",
          "MatMul": "linear", "Swish": "silu", "HSwish": "silu"}
# ops whose first input alone is data (the rest: shapes, axes, ranges)
_FIRST_INPUT = {"HSigmoid": "hardsigmoid", "HardSigmoid": "hardsigmoid", "FakeQuantize": "quant",
                **dict.fromkeys(("Reshape", "Unsqueeze", "Squeeze", "Transpose", "Broadcast", "Convert", "StridedSlice"),
                                "view")}
_POOLS = {"ReduceMean": "avg", "AvgPool": "avg", "AdaptiveAvgPool": "avg", "ReduceMax": "max", "MaxPool": "max",
          "AdaptiveMaxPool": "max", "ReduceSum": "other", "ReduceL2": "other"}
_INT8_TYPES = ("i8", "u8", "i4", "u4")


def openvino_graph(model) -> Graph:
    ops, shapes, constants, int8, inputs, results = [], {}, set(), set(), set(), []

    def key(output) -> str:
        return f"{output.get_node().get_name()}:{output.get_index()}"

    for node in model.get_ordered_ops():
        t = node.get_type_name()
        outs = [key(o) for o in node.outputs()]
        for o, k in zip(node.outputs(), outs):
            shape = o.get_partial_shape()
            if shape.rank.is_static:
                shapes[k] = tuple(d.get_length() if d.is_static else None for d in shape)
        data = [key(v) for v in node.input_values()]
        friendly = node.get_friendly_name()
        op = Op(friendly, "other", data, outs, name_module_path(friendly), op_type=t)
        if t == "Parameter":
            inputs.update(outs)
            continue
        if t == "Constant":
            constants.update(outs)
            if node.get_element_type().get_type_name() in _INT8_TYPES:
                int8.update(outs)
            continue
        if t == "Result":
            results.extend(data[:1])
            continue
        _classify(op, t, shapes, data)
        if data and all(d in constants for d in data):
            constants.update(outs)
            if any(d in int8 for d in data):
                int8.update(outs)
        ops.append(op)
    return Graph(ops, shapes, constants, int8, inputs, results)


def _classify(op: Op, t: str, shapes, data) -> None:
    if t in _KINDS:
        op.kind = _KINDS[t]
    elif t in _FIRST_INPUT:
        op.kind, op.inputs = _FIRST_INPUT[t], data[:1]
    elif t in _POOLS:
        pool_from_shapes(op, shapes.get(data[0]) if data else None, shapes.get(op.outputs[0]), _POOLS[t])
        op.inputs = data[:1]


def openvino_gates(model, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an OpenVINO ``Model`` (FP32 or INT8 IR), named after ``expected`` where they match."""
    return graph_gates(openvino_graph(model), expected)


def check_openvino_policy(model, expected: list[dict] | None, policy: str, artifact: str,
                          found: list[GraphGate] | None = None) -> dict:
    return policy_check(found if found is not None else openvino_gates(model, expected), expected, policy, artifact)


__all__ = ["check_openvino_policy", "openvino_gates", "openvino_graph"]
