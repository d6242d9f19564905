"""The gate finder's ncnn adapter: an ncnn ``.param``'s layers as the finder's op list (a fused
conv+sigmoid split in two, pnnx's channel pools recognised), its layer types classified by a table.
ncnn keeps no module names, so gates are named by kind and order (pnnx keeps the traced order)."""

from __future__ import annotations

from ...gates import Graph, GraphGate, Op, graph_gates, policy_check

_VIEW = {"Split", "Reshape", "Flatten", "Permute", "Squeeze", "ExpandDims", "Noop"}
_ACTIVATIONS = {"Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid"}
_WEIGHTED = {"Convolution": "conv", "ConvolutionDepthWise": "conv", "Convolution1D": "conv", "InnerProduct": "linear"}
_BINARY = {0: "add", 2: "mul"}  # BinaryOp's op_type (param 0)
_POOLING = {0: "max", 1: "avg"}  # Pooling's pooling_type (param 0)
_REDUCTION = {3: "avg", 4: "max"}  # Reduction's operation (param 0): mean, max
_SIGMOID_ACTIVATION = 4  # activation_type (param 9) of a conv / inner product with a fused sigmoid


def _int(layer, key: int, default: int = 0) -> int:
    value = layer.params.get(str(key))
    try:
        return default if value is None else int(float(value))
    except (ValueError, OverflowError):  # an expression where a number is read: ncnn refuses the file itself
        return default


def ncnn_graph(layers) -> Graph:
    """``layers``: an ncnn .param's layers (type, name, inputs, outputs, params: id -> text). A conv or
    inner product with a fused sigmoid (pnnx fuses them) is split into the layer and its sigmoid."""
    ops, constants, inputs = [], set(), set()
    producers = {b: layer for layer in layers for b in layer.outputs}
    for layer in layers:
        t = layer.type
        if t == "Input":
            inputs.update(layer.outputs)
            continue
        if t == "MemoryData":
            constants.update(layer.outputs)
            continue
        op = Op(layer.name, "other", list(layer.inputs), list(layer.outputs), op_type=t)
        if t in _ACTIVATIONS:
            op.kind = _ACTIVATIONS[t]
        elif t == "BinaryOp":
            kind = _BINARY.get(_int(layer, 0))
            with_scalar = _int(layer, 1) == 1
            op.kind = kind if kind and (kind == "add" or not with_scalar) else "other"
        elif t in _VIEW:
            op.kind, op.inputs = "view", op.inputs[:1]
        elif t in _WEIGHTED:
            op.kind = _WEIGHTED[t]
            op.quantized_op = _int(layer, 8) > 0
            if _int(layer, 9) == _SIGMOID_ACTIVATION:
                pre = f"{layer.outputs[0]}#{layer.name}"
                op.outputs = [pre]
                ops.append(op)
                op = Op(f"{layer.name}:sigmoid", "sigmoid", [pre], list(layer.outputs), op_type="Sigmoid")
        elif t == "Pooling":
            pool = _POOLING.get(_int(layer, 0), "other")
            global_pool = _int(layer, 4) == 1 or (_int(layer, 7) == 1 and _int(layer, 8) == 1 and _int(layer, 18, 1) == 1)
            if global_pool:
                op.kind, op.axes, op.pool = "pool", "hw", pool
            else:  # a (C, 1) pool over a map whose channels were permuted to its H axis: a pool over C
                source = producers.get(layer.inputs[0])
                while source is not None and source.type == "Split":
                    source = producers.get(source.inputs[0])
                if source is not None and source.type == "Permute" and _int(layer, 1) == 1 and \
                        _int(layer, 11, 1) > 1:
                    op.kind, op.axes, op.pool = "pool", "c", pool
        elif t == "Reduction":
            pool = _REDUCTION.get(_int(layer, 0), "other")
            raw = layer.params.get("-23303")
            try:
                axes = tuple(sorted(int(float(v)) for v in raw.split(",")[1:])) if raw else ()
            except (ValueError, OverflowError):  # not an array of numbers: not a pool ncnn runs
                axes = ()
            if axes == (1, 2):
                op.kind, op.axes, op.pool = "pool", "hw", pool
            elif axes == (0,):
                op.kind, op.axes, op.pool = "pool", "c", pool
        ops.append(op)
    read = {b for layer in layers for b in layer.inputs}
    outputs = [b for layer in layers if layer.type != "Input" for b in layer.outputs if b not in read]
    return Graph(ops, {}, constants, set(), inputs, outputs)


def ncnn_gates(layers, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an ncnn .param (its layers), named after ``expected`` (the manifest's): the n-th
    gate of a kind here is the model's n-th gate of that kind."""
    found = graph_gates(ncnn_graph(layers), expected, by_order=True)
    for gate in found:
        gate.record["ncnn_layers"] = gate.quantized["all_layers"]
    return found


def check_ncnn_policy(layers, expected: list[dict] | None, policy: str, artifact: str,
                      found: list[GraphGate] | None = None) -> dict:
    """The gate policy on an ncnn INT8 model: ncnn runs Sigmoid and BinaryOp in float whatever the
    policy (it has no int8 kernels for them), so the policy governs the gate's layers: ``fp``: none
    of them has int8 scales; ``int8``: every one of them has."""
    found = found if found is not None else ncnn_gates(layers, expected)
    check = policy_check(found, expected, policy, artifact, float_gate_ops=True)
    return {**check, "note": "ncnn has no int8 Sigmoid or BinaryOp: gate sigmoids and multiplies run in fp32"}


__all__ = ["check_ncnn_policy", "ncnn_gates", "ncnn_graph"]
