"""The gate finder's PyTorch adapter: the model traced with ``torch.export``, its ops classified by a
table, searched by ``gates.search``. What the manifest lists (``find_gates``), the reference gate
maps every check compares with (``trace_gate_maps``), and the gates of a ``torch.export`` program,
PT2E-quantized ones included (``program_gates``)."""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict

import numpy as np
import torch

from .gates import (ACTIVATION_CLASSES, GateReport, GatesUntraceable, Graph, GraphGate, Op, describe, graph_gates,
                    output_tail, policy_check, pool_from_shapes, search, shape_map, tail_boundary, tail_check)

def _export(model, example):
    model = model.eval()
    with torch.no_grad():
        return torch.export.export(model, (example,), strict=False)


def _torch_graph(program) -> tuple[Graph, dict]:
    """The exported program as a ``Graph``; also {fx node name: fx node}."""
    signature = program.graph_signature
    user_inputs = set(signature.user_inputs)
    ops, shapes, constants, nodes = [], {}, set(), {}
    outputs = [name for name in signature.user_outputs if isinstance(name, str)]
    for node in program.graph.nodes:
        nodes[node.name] = node
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shapes[node.name] = tuple(int(d) if isinstance(d, int) else str(d) for d in value.shape)
        if node.op == "placeholder":
            if node.name not in user_inputs:
                constants.add(node.name)
            continue
        if node.op != "call_function":
            continue
        inputs = []
        for arg in node.args:
            for item in (arg if isinstance(arg, (list, tuple)) else [arg]):
                if isinstance(item, torch.fx.Node):
                    inputs.append(item.name)
        stack = node.meta.get("nn_module_stack") or {}
        module, module_class = (list(stack.values())[-1] if stack else ("", None))
        module_class = module_class.rsplit(".", 1)[-1] if isinstance(module_class, str) else None
        op = Op(node.name, "other", inputs, [node.name], module, module_class, op_type=str(node.target))
        _classify_aten(op, node, shapes)
        if inputs and all(t in constants for t in inputs):
            constants.add(node.name)
        ops.append(op)
    return Graph(ops, shapes, constants, inputs=user_inputs, outputs=outputs), nodes


_ATEN_VIEW = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "expand_as", "transpose", "permute",
              "clone", "contiguous", "alias", "slice", "_unsafe_view", "t", "select", "detach", "to", "_to_copy")
# aten op (its overload and trailing underscore dropped) -> the finder's op kind
_ATEN_KINDS = {"sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid", "add": "add", "silu": "silu", "hardswish": "hardswish",
               **dict.fromkeys(("conv1d", "conv2d", "convolution", "conv_transpose2d"), "conv"),
               **dict.fromkeys(("linear", "addmm", "mm", "matmul"), "linear"),
               **dict.fromkeys(_ATEN_VIEW, "view")}
# reductions and pools -> the pool they are when they take a map to (N, C, 1, 1) or (N, 1, H, W)
_ATEN_POOLS = {**dict.fromkeys(("mean", "adaptive_avg_pool2d", "avg_pool2d"), "avg"),
               **dict.fromkeys(("amax", "max", "adaptive_max_pool2d", "max_pool2d", "max_pool2d_with_indices"), "max"),
               **dict.fromkeys(("sum", "logsumexp", "norm"), "other")}


def _classify_aten(op: Op, node, shapes: dict) -> None:
    target = node.target
    if target is operator.getitem:
        op.kind = "view" if node.args[1] == 0 else "other"
        return
    base = getattr(target, "__name__", str(target)).split(".")[0].rstrip("_")
    if base.startswith("quantize_per"):  # PT2E's Q/DQ pairs (quantized_decomposed.*)
        op.kind, op.inputs = "quant", op.inputs[:1]
    elif base.startswith("dequantize_per"):
        op.kind, op.inputs = "dequant", op.inputs[:1]
    elif base == "mul":
        op.kind = "mul" if len(op.inputs) == 2 else "other"
    elif base in _ATEN_KINDS:
        op.kind = _ATEN_KINDS[base]
    elif base in _ATEN_POOLS:
        pool_from_shapes(op, shapes.get(node.args[0].name) if hasattr(node.args[0], "name") else None,
                         shapes.get(node.name) if node.name in shapes else _first_shape(node, shapes), _ATEN_POOLS[base])


def _first_shape(node, shapes):
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)) and value and hasattr(value[0], "shape"):
        return tuple(int(d) if isinstance(d, int) else str(d) for d in value[0].shape)
    return None


def _torch_activation_stripper(model):
    modules = dict(model.named_modules())

    def strip(sigmoid: Op) -> str:
        path = sigmoid.module or ""
        module = modules.get(path)
        if path and module is not None and not list(module.children()) and type(module).__name__ in ACTIVATION_CLASSES:
            return path.rpartition(".")[0]
        return path
    return strip


def example_input(channels: int = 3, size: int = 32):
    return torch.zeros(1, channels, size, size)


def find_gates(model, example=None) -> GateReport:
    """The gates of a PyTorch model, from its ``torch.export`` graph (``example``: one input batch;
    default a 1x3x32x32 zero tensor). A model that cannot be traced gets an empty report with the
    reason (the exported graphs are then searched on their own)."""
    example = example if example is not None else example_input()
    try:
        program = _export(model, example)
    except Exception as exc:  # a user's model may not trace; the ONNX graphs are searched anyway
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return GateReport([], "torch.export", f"torch.export could not trace the model: {type(exc).__name__}: {text}")
    graph, _ = _torch_graph(program)
    gates = search(graph)
    return GateReport(describe(graph, gates, _torch_activation_stripper(model)), "torch.export (structure)")


_TRACED = weakref.WeakKeyDictionary()  # model -> {input shape: (program, [(fx node name, record)])}


def _traced(model, example):
    """The exported program of ``model`` for inputs shaped like ``example``, with its gates (cached
    per model and shape: verify and explain read the maps once per artifact)."""
    key = (tuple(example.shape), tuple(t.data_ptr() for t in model.state_dict().values()))
    per_model = _TRACED.setdefault(model, {})
    if key not in per_model:
        try:
            program = _export(model, example)
        except Exception as exc:  # a user's model may not trace: no PyTorch maps, said in one line
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GatesUntraceable(f"torch.export could not trace the model, so its gate maps cannot be read: "
                                   f"{type(exc).__name__}: {text}") from None
        graph, _ = _torch_graph(program)
        found = search(graph)
        records = describe(graph, found, _torch_activation_stripper(model))
        per_model.clear()
        per_model[key] = (program, [(g["sigmoid"].name, r) for g, r in zip(found, records)])
    return per_model[key]


def trace_gate_maps(model, x: np.ndarray, gates: list[dict] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(maps, kinds): the map every gate of ``model`` computes for ``x``, by gate name: spatial
    (N, 1, H, W), channel (N, C), joint (N, C, H, W); read from the traced graph, so functional
    sigmoids are seen as well as modules. ``gates``: only these (the manifest's list)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    program, wanted = _traced(model, tensor[:1])
    if gates is not None:
        names = {g["name"] for g in gates}
        wanted = [(k, r) for k, r in wanted if r["name"] in names]
    if not wanted:
        return {}, {}
    nodes = dict(wanted)
    captured = defaultdict(list)
    module = program.module()

    class _Capture(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in nodes:
                captured[n.name].append(value.detach().float())
            return value

    with torch.no_grad():
        for i in range(len(tensor)):  # the trace is specialised to batch 1
            _Capture(module).run(tensor[i:i + 1])
    maps = {r["name"]: shape_map(torch.cat(captured[k]).numpy(), r["kind"]) for k, r in wanted if k in captured}
    return maps, {r["name"]: r["kind"] for _, r in wanted}


def program_gates(program, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of a ``torch.export`` program (FP32, or PT2E-quantized with its Q/DQ pairs), their
    nodes named by the program's fx node names, named after ``expected`` where they match."""
    return graph_gates(_torch_graph(program)[0], expected)


def check_program_policy(program, expected: list[dict] | None, policy: str, artifact: str) -> dict:
    return policy_check(program_gates(program, expected), expected, policy, artifact)


def program_tail(program) -> tuple[list[str], list[str]]:
    """(the output tail's fx node names, the weighted layers feeding it) of a ``torch.export`` program
    (``gates.output_tail``)."""
    graph = _torch_graph(program)[0]
    tail = output_tail(graph)
    return [op.name for op in tail], [op.name for op in tail_boundary(graph, tail)]


def check_program_tail(program, artifact: str) -> dict:
    """The output tail of a PT2E-converted program checked free of quantize/dequantize nodes."""
    return tail_check(_torch_graph(program)[0], artifact)


__all__ = ["check_program_policy", "check_program_tail", "example_input", "find_gates", "program_gates", "program_tail",
           "trace_gate_maps"]
