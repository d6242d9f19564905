"""The gate finder: every attention gate of a network, found by its structure in a traced graph.

A gate is a sigmoid (a module or a function; hard-sigmoid too) whose output, through reshapes
only, multiplies a *different* feature map with broadcasting: (N, C, 1, 1) for a channel gate,
(N, 1, H, W) for a spatial gate, (N, C, H, W) for a joint gate (BAM's 1 + sigmoid(channel x
spatial)). It is computed from that feature map through pooled descriptors (avg/max over H, W for
channel gates; mean/max over C for spatial gates) and small layers: a Linear or 1x1-conv MLP, a
1-D conv across channels (ECA), a 7x7 conv. CBAM's two gates, SE, ECA and BAM are all of this form.
The sigmoid of SiLU and hard-swish multiplies its own input (x * sigmoid(x)): never a gate.
Module and class names play no part in the finding; they only name what was found.

The same search runs on three graphs, each turned into one small op list (``_Graph``):

* the PyTorch model, traced with ``torch.export`` (``find_gates``): what the manifest lists, what
  ``verify`` and ``explain`` read the reference maps from (``torch_gate_maps``);
* an ONNX graph, FP32 or Q/DQ INT8 (``onnx_gates``): the node sets the INT8 recipes keep in float or
  quantize, and the gate tensors the probes read;
* an OpenVINO model (``openvino_gates``): NNCF's ignored scope and the FakeQuantize check.

A gate found in an exported graph is matched to the model's gate by the module of its sigmoid
(the scope the exporter writes into node names) and its kind. ``policy_check`` inspects a built
INT8 graph: under ``--gates fp`` no gate sigmoid, gating multiply or gate layer may be quantized;
under ``--gates int8`` every gate sigmoid and gating multiply must be.
"""

from __future__ import annotations

import operator
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .errors import CbamDeployError
from .scopes import name_module_path, node_module_path

KINDS = ("channel", "spatial", "joint")


class GatesUntraceable(CbamDeployError):
    """The PyTorch model could not be traced, so its gates cannot be read from it."""
MAX_GATE_OPS = 96  # a backward walk from a sigmoid that needs more ops than this is not a gate
_ACTIVATION_CLASSES = {"Sigmoid", "Hardsigmoid", "HardSigmoid", "HSigmoid"}


@dataclass
class _Op:
    name: str
    kind: str  # normalised: sigmoid, hardsigmoid, mul, add, view, quant, dequant, pool, conv, linear, ...
    inputs: list
    outputs: list
    module: str | None = None
    module_class: str | None = None
    axes: str | None = None  # pools: "hw" or "c"
    pool: str | None = None  # pools: "avg", "max", "other"
    op_type: str = ""
    quantized_op: bool = False  # QLinear* (QOperator form)


@dataclass
class _Graph:
    ops: list
    shapes: dict = field(default_factory=dict)  # tensor -> tuple of dims (int, str or None) or None
    constants: set = field(default_factory=set)  # tensors computed from weights/constants only
    int8_constants: set = field(default_factory=set)  # constant tensors that hold or derive from int8 data
    inputs: set = field(default_factory=set)  # graph inputs

    def __post_init__(self) -> None:
        self.producer = {}
        self.consumers = defaultdict(list)
        for op in self.ops:
            for t in op.outputs:
                self.producer[t] = op
            for t in op.inputs:
                self.consumers[t].append(op)

    def shape(self, tensor):
        return self.shapes.get(tensor)


_TRANSPARENT = {"view", "quant", "dequant"}


def _root(graph: _Graph, tensor):
    """The tensor behind reshapes and (de)quantizers."""
    seen = 0
    while seen < 32:
        op = graph.producer.get(tensor)
        if op is None or op.kind not in _TRANSPARENT or not op.inputs:
            return tensor
        tensor = op.inputs[0]
        seen += 1
    return tensor


def _is_scalar_constant(graph: _Graph, tensor) -> bool:
    if tensor not in graph.constants:
        return False
    shape = graph.shape(tensor)
    return shape is None or all(d == 1 for d in shape)


def _dims_equal(a, b) -> bool:
    return a is None or b is None or a == b or isinstance(a, str) or isinstance(b, str)


def _search(graph: _Graph) -> list[dict]:
    """Every gate of ``graph``: sigmoid, the map chain, the multiply, the ops computing it, its pools."""
    found = []
    for op in graph.ops:
        if op.kind not in ("sigmoid", "hardsigmoid") or not op.inputs:
            continue
        gate = _gate_at(graph, op)
        if gate is not None:
            found.append(gate)
    return found


def _forward_to_multiply(graph: _Graph, sigmoid: _Op):
    """(multiply, chain ops, gate operand) reached from the sigmoid's output through reshapes,
    (de)quantizers and an added constant (BAM's 1 + sigmoid); None when its output multiplies nothing."""
    frontier = [(sigmoid.outputs[0], [])]
    steps = 0
    while frontier and steps < 24:
        tensor, chain = frontier.pop(0)
        steps += 1
        for consumer in graph.consumers.get(tensor, []):
            if consumer.kind == "mul" and len(consumer.inputs) == 2:
                return consumer, chain, tensor
            if consumer.kind in _TRANSPARENT or (consumer.kind == "add" and (len(consumer.inputs) == 1 or any(
                    _is_scalar_constant(graph, t) for t in consumer.inputs if t != tensor))):
                frontier.append((consumer.outputs[0], chain + [consumer]))
    return None


def _gate_at(graph: _Graph, sigmoid: _Op) -> dict | None:
    reached = _forward_to_multiply(graph, sigmoid)
    if reached is None:
        return None
    multiply, chain, operand = reached
    other = multiply.inputs[1] if multiply.inputs[0] == operand else multiply.inputs[0]
    if other in graph.constants:
        return None
    target = _root(graph, other)
    if _root(graph, sigmoid.inputs[0]) == target:
        return None  # x * sigmoid(x): SiLU / hard-swish
    # the ops that compute the gate: back from the sigmoid to its pools, the gated map or constants
    body, pools, seen = [], [], set()
    stack = [t for t in sigmoid.inputs if t not in graph.constants]
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in graph.constants:
            continue
        seen.add(tensor)
        if _root(graph, tensor) == target:
            continue
        if tensor in graph.inputs:
            return None  # computed from somewhere else than the map it gates
        op = graph.producer.get(tensor)
        if op is None:
            return None
        if op not in body:
            body.append(op)
        if len(body) > MAX_GATE_OPS:
            return None
        if op.kind == "pool":
            pools.append(op)
            continue
        stack.extend(t for t in op.inputs if t not in graph.constants)
    kind = _kind(graph, _gate_shape(graph, sigmoid, chain), graph.shape(other), pools, multiply)
    if kind is None:
        return None
    return {"sigmoid": sigmoid, "chain": chain, "multiply": multiply, "operand": operand, "target": other,
            "body": body, "pools": pools, "kind": kind}


def _gate_shape(graph: _Graph, sigmoid: _Op, chain: list):
    """The gate's shape as it broadcasts: the last shape on the way to the multiply before any
    explicit expand (``expand_as(x)``), so an expanded channel gate still reads (N, C, 1, 1)."""
    shape = graph.shape(sigmoid.outputs[0])
    for op in chain:
        if "expand" in op.op_type.lower() or op.op_type == "Broadcast":
            break
        if graph.shape(op.outputs[0]) is not None:
            shape = graph.shape(op.outputs[0])
    return shape


def _kind(graph: _Graph, gate_shape, map_shape, pools: list, multiply: _Op) -> str | None:
    """channel / spatial / joint from the gate's broadcast shape against the gated map, the pools
    deciding where the shape cannot (a 1x1 or one-channel map); None when the two disagree."""
    hw = [p for p in pools if p.axes == "hw"]
    c = [p for p in pools if p.axes == "c"]
    out_shape = graph.shape(multiply.outputs[0]) or map_shape
    by_shape = None
    if gate_shape is not None and len(gate_shape) == 4 and out_shape is not None and len(out_shape) == 4:
        spatial_1 = gate_shape[2] == 1 and gate_shape[3] == 1
        map_1 = out_shape[2] == 1 and out_shape[3] == 1
        if gate_shape[1] == 1 and out_shape[1] != 1 and not spatial_1:
            by_shape = "spatial"
        elif spatial_1 and not map_1:
            by_shape = "channel"
        elif all(_dims_equal(a, b) for a, b in zip(gate_shape, out_shape)) and not map_1:
            by_shape = "joint"
        elif map_1 or out_shape[1] == 1:  # a 1x1 or one-channel map: the shape cannot tell
            by_shape = "spatial" if c and not hw else "channel" if hw and not c else None
    elif gate_shape is None or out_shape is None:
        by_shape = "spatial" if c and not hw else "channel" if hw and not c else "joint" if hw and c else None
    if by_shape == "channel" and hw:
        return "channel"
    if by_shape == "spatial" and (c or not hw):
        return "spatial"
    if by_shape == "joint" and pools:
        return "joint"
    return None


# --------------------------------------------------------------------------------------- naming

def _family(gate: dict, kind: str, graph: _Graph) -> str:
    pool_kinds = {p.pool for p in gate["pools"]}
    if kind == "channel":
        if {"avg", "max"} <= pool_kinds:
            return "cbam"
        if any(op.kind == "conv" and _is_channel_conv(graph, op) for op in gate["body"]):
            return "eca"
        return "se"
    if kind == "spatial":
        return "cbam" if any(p.axes == "c" for p in gate["pools"]) else "spatial"
    return "bam"


def _is_channel_conv(graph: _Graph, op: _Op) -> bool:
    shape = graph.shape(op.inputs[0]) if op.inputs else None
    return shape is not None and len(shape) == 3


def _pool_label(op: _Op) -> str:
    return f"{op.pool}({'H,W' if op.axes == 'hw' else 'C'})"


def _common_module(paths: list) -> str:
    parts = [p.split(".") if p else [] for p in paths if p is not None]
    if not parts:
        return ""
    common = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def _describe(graph: _Graph, gates: list[dict], strip_activation) -> list[dict]:
    """Manifest records, in graph order, with unique names (the sigmoid's module, a trailing
    activation module dropped; ``:kind`` and an index added where one module holds several)."""
    records = []
    for gate in gates:
        sigmoid = gate["sigmoid"]
        kind = gate["kind"]
        scope = sigmoid.module or ""
        home = strip_activation(sigmoid)
        weights = [op for op in gate["body"] if op.kind in ("conv", "linear")]
        parts = [home] + [p.module for p in gate["pools"]] + [op.module for op in weights]
        records.append({
            "name": home,
            "kind": kind,
            "family": _family(gate, kind, graph),
            "sigmoid": {"op": sigmoid.kind, "module": scope, "node": sigmoid.name},
            "multiply": {"module": gate["multiply"].module or "", "node": gate["multiply"].name,
                         "inside_gate_module": bool(home) and (gate["multiply"].module or "").startswith(home)},
            "pools": [_pool_label(p) for p in gate["pools"]],
            "layers": sorted({op.module or "" for op in weights}),
            "module": _common_module([p for p in parts if p is not None]),
            "class": sigmoid.module_class if sigmoid.module_class not in _ACTIVATION_CLASSES else None,
        })
    _unique_names(records)
    return records


def _unique_names(records: list[dict]) -> None:
    counts = defaultdict(int)
    for r in records:
        counts[r["name"]] += 1
    seen = defaultdict(int)
    for r in records:
        base = r["name"] or "(model)"
        if counts[r["name"]] > 1:
            seen[(base, r["kind"])] += 1
            index = seen[(base, r["kind"])]
            base = f"{base}:{r['kind']}" + (f".{index}" if index > 1 else "")
        r["name"] = base


# ------------------------------------------------------------------------------------ PyTorch side

@dataclass
class GateReport:
    """What the finder says about a model: its gates (manifest records) and how they were found."""

    gates: list
    found_by: str
    error: str | None = None

    def describe(self) -> dict:
        counts = {k: sum(1 for g in self.gates if g["kind"] == k) for k in KINDS}
        info = {"found_by": self.found_by, "count": len(self.gates), "kinds": counts, "gates": self.gates}
        if self.error:
            info["error"] = self.error
        elif not self.gates:
            info["note"] = "no attention gates: no sigmoid in this model multiplies another feature map"
        return info


def _export(model, example):
    model = model.eval()
    with torch.no_grad():
        return torch.export.export(model, (example,), strict=False)


def _torch_graph(program) -> tuple[_Graph, dict]:
    """The exported program as a ``_Graph``; also {fx node name: fx node}."""
    signature = program.graph_signature
    user_inputs = set(signature.user_inputs)
    ops, shapes, constants, nodes = [], {}, set(), {}
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
        op = _Op(node.name, "other", inputs, [node.name], module, module_class, op_type=str(node.target))
        _classify_aten(op, node, shapes)
        if inputs and all(t in constants for t in inputs):
            constants.add(node.name)
        ops.append(op)
    return _Graph(ops, shapes, constants, inputs=user_inputs), nodes


_ATEN_VIEW = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "expand_as", "transpose", "permute",
              "clone", "contiguous", "alias", "slice", "_unsafe_view", "t", "select", "detach", "to", "_to_copy")


def _classify_aten(op: _Op, node, shapes: dict) -> None:
    target = node.target
    if target is operator.getitem:
        op.kind = "view" if node.args[1] == 0 else "other"
        return
    name = getattr(target, "__name__", str(target)).split(".")[0]
    base = name.rstrip("_")
    if base.startswith("quantize_per"):  # PT2E's Q/DQ pairs (quantized_decomposed.*)
        op.kind, op.inputs = "quant", op.inputs[:1]
    elif base.startswith("dequantize_per"):
        op.kind, op.inputs = "dequant", op.inputs[:1]
    elif base in ("sigmoid",):
        op.kind = "sigmoid"
    elif base in ("hardsigmoid",):
        op.kind = "hardsigmoid"
    elif base == "mul" and len(op.inputs) == 2:
        op.kind = "mul"
    elif base == "add":
        op.kind = "add"
    elif base in _ATEN_VIEW:
        op.kind = "view"
    elif base in ("conv1d", "conv2d", "convolution", "conv_transpose2d"):
        op.kind = "conv"
    elif base in ("linear", "addmm", "mm", "matmul"):
        op.kind = "linear"
    elif base in ("silu",):
        op.kind = "silu"
    elif base in ("hardswish",):
        op.kind = "hardswish"
    elif base in ("mean", "amax", "max", "sum", "logsumexp", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                  "avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "norm"):
        _pool_from_shapes(op, shapes.get(node.args[0].name) if hasattr(node.args[0], "name") else None,
                          shapes.get(node.name) if node.name in shapes else _first_shape(node, shapes),
                          "avg" if base in ("mean", "adaptive_avg_pool2d", "avg_pool2d") else
                          "max" if base in ("amax", "max", "adaptive_max_pool2d", "max_pool2d",
                                            "max_pool2d_with_indices") else "other")


def _first_shape(node, shapes):
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)) and value and hasattr(value[0], "shape"):
        return tuple(int(d) if isinstance(d, int) else str(d) for d in value[0].shape)
    return None


def _pool_from_shapes(op: _Op, before, after, pool: str) -> None:
    """A reduction is a pool when it takes a 4-D map to (N, C, 1, 1) (over H, W) or (N, 1, H, W) (over C)."""
    if before is None or after is None or len(before) != 4:
        return
    if len(after) == 4:
        if after[2] == 1 and after[3] == 1 and (before[2] != 1 or before[3] != 1) and after[1] == before[1]:
            op.kind, op.axes, op.pool = "pool", "hw", pool
        elif after[1] == 1 and before[1] != 1 and after[2:] == before[2:]:
            op.kind, op.axes, op.pool = "pool", "c", pool
        elif after[2] == 1 and after[3] == 1 and before[2] == 1 and before[3] == 1 and after[1] == before[1]:
            op.kind, op.axes, op.pool = "pool", "hw", pool  # a 1x1 map: a pool all the same
    elif len(after) == 2 and after[1] == before[1]:
        op.kind, op.axes, op.pool = "pool", "hw", pool
    elif len(after) == 3 and tuple(after[1:]) == tuple(before[2:]):
        op.kind, op.axes, op.pool = "pool", "c", pool


def _torch_activation_stripper(model):
    modules = dict(model.named_modules())

    def strip(sigmoid: _Op) -> str:
        path = sigmoid.module or ""
        module = modules.get(path)
        if path and module is not None and not list(module.children()) and type(module).__name__ in _ACTIVATION_CLASSES:
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
    gates = _search(graph)
    return GateReport(_describe(graph, gates, _torch_activation_stripper(model)), "torch.export (structure)")


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
        found = _search(graph)
        records = _describe(graph, found, _torch_activation_stripper(model))
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


def torch_gate_maps(model, x: np.ndarray, gates: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The maps of ``trace_gate_maps``, without the kinds."""
    return trace_gate_maps(model, x, gates)[0]


def shape_map(values: np.ndarray, kind: str) -> np.ndarray:
    """A gate's values in the shape parity and explain use: channel (N, C), spatial (N, 1, H, W)."""
    values = np.asarray(values)
    if kind == "channel":
        return values.reshape(values.shape[0], -1)
    if kind == "spatial" and values.ndim == 4:
        return values.reshape(values.shape[0], 1, *values.shape[-2:])
    return values


# --------------------------------------------------------------------------------------- ONNX side

_ONNX_VIEW = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose", "Identity", "Cast"}


def _onnx_graph(proto) -> _Graph:
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
        op = _Op(node.name or node.output[0], "other", data, list(node.output), node_module_path(node), None,
                 op_type=node.op_type)
        _classify_onnx(op, node, shapes, initializers, numpy_helper)
        if node.op_type == "Constant" or (data and all(t in constants for t in data)):
            constants.update(node.output)
            if any(t in int8 for t in data):
                int8.update(node.output)
        ops.append(op)
    return _Graph(ops, shapes, constants, int8, inputs)


def _onnx_axes(node, initializers, numpy_helper):
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1] in initializers:
        return [int(a) for a in numpy_helper.to_array(initializers[node.input[1]]).ravel()]
    return None


def _classify_onnx(op: _Op, node, shapes, initializers, numpy_helper) -> None:
    t = node.op_type
    if t.startswith("QLinear"):
        op.quantized_op = True
        t = t[len("QLinear"):]
    if t == "Sigmoid":
        op.kind = "sigmoid"
    elif t == "HardSigmoid":
        op.kind = "hardsigmoid"
    elif t == "Mul":
        op.kind = "mul"
    elif t == "Add":
        op.kind = "add"
    elif t in _ONNX_VIEW:
        op.kind = "view"
        op.inputs = op.inputs[:1]  # shape/axes inputs are not data
    elif t == "QuantizeLinear":
        op.kind, op.inputs = "quant", op.inputs[:1]
    elif t == "DequantizeLinear":
        op.kind, op.inputs = "dequant", op.inputs[:1]
    elif t in ("Conv", "ConvInteger", "ConvTranspose"):
        op.kind = "conv"
    elif t in ("Gemm", "MatMul", "MatMulInteger"):
        op.kind = "linear"
    elif t in ("HardSwish",):
        op.kind = "hardswish"
    elif t in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        op.kind, op.axes, op.pool = "pool", "hw", {"GlobalAveragePool": "avg", "GlobalMaxPool": "max"}.get(t, "other")
    elif t in ("ReduceMean", "ReduceMax", "ReduceL2", "ReduceLogSumExp", "ReduceSum", "AveragePool", "MaxPool", "LpPool"):
        pool = "avg" if t in ("ReduceMean", "AveragePool") else "max" if t in ("ReduceMax", "MaxPool") else "other"
        axes = _onnx_axes(node, initializers, numpy_helper) if t.startswith("Reduce") else None
        before = shapes.get(node.input[0])
        rank = len(before) if before is not None else 4
        if axes is not None:
            axes = sorted(a % rank for a in axes)
            if axes == [2, 3]:
                op.kind, op.axes, op.pool = "pool", "hw", pool
            elif axes == [1]:
                op.kind, op.axes, op.pool = "pool", "c", pool
        else:
            _pool_from_shapes(op, before, shapes.get(node.output[0]), pool)
        op.inputs = op.inputs[:1]


def _onnx_strip(expected: list[dict] | None, graph: _Graph):
    """Name ONNX/OpenVINO gates as the model's are named: the sigmoid module's recorded gate name;
    without a record, a module that holds nothing but the sigmoid (an activation module) is dropped."""
    homes = {}
    for gate in expected or []:
        module = gate.get("sigmoid", {}).get("module")
        if module is not None:
            homes[module] = gate["name"].split(":")[0] if gate["name"] != "(model)" else ""
    per_module = defaultdict(int)
    for op in graph.ops:
        per_module[op.module or ""] += 1

    def strip(sigmoid: _Op) -> str:
        module = sigmoid.module or ""
        if module in homes:
            return homes[module]
        return module.rpartition(".")[0] if module and per_module[module] == 1 else module
    return strip


@dataclass
class GraphGate:
    """A gate found in an exported graph: its record (as in the manifest) and its nodes."""

    record: dict
    sigmoid: str
    multiply: str
    chain: list
    nodes: list  # every node of the gate: its layers and pools, the sigmoid, the chain, the multiply
    sigmoid_tensor: str
    quantized: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def kind(self) -> str:
        return self.record["kind"]


def _graph_gates(graph: _Graph, expected: list[dict] | None) -> list[GraphGate]:
    found = _search(graph)
    records = _describe(graph, found, _onnx_strip(expected, graph))
    result = []
    for gate, record in zip(found, records):
        nodes = [op.name for op in gate["body"]] + [gate["sigmoid"].name] + [op.name for op in gate["chain"]] + \
            [gate["multiply"].name]
        result.append(GraphGate(record, gate["sigmoid"].name, gate["multiply"].name, [op.name for op in gate["chain"]],
                                list(dict.fromkeys(nodes)), gate["sigmoid"].outputs[0],
                                _quantization(graph, gate)))
    if expected is not None:
        _match_names(result, expected)
    return result


def _match_names(found: list[GraphGate], expected: list[dict]) -> None:
    """Give each gate found in an exported graph the model's name for it: same sigmoid module and
    kind, in order."""
    pool = defaultdict(list)
    for gate in expected:
        pool[(gate.get("sigmoid", {}).get("module"), gate["kind"])].append(gate["name"])
    for gate in found:
        names = pool.get((gate.record["sigmoid"]["module"], gate.kind))
        if names:
            gate.record["name"] = names.pop(0)


def onnx_gates(proto, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an ONNX graph (FP32 or Q/DQ), named after ``expected`` (the manifest's) where they match."""
    return _graph_gates(_onnx_graph(proto), expected)


# ----------------------------------------------------------------------------------- OpenVINO side

_OV_VIEW = {"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Broadcast", "Convert", "StridedSlice"}


def _ov_graph(model) -> _Graph:
    ops, shapes, constants, int8, inputs = [], {}, set(), set(), set()

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
        op = _Op(friendly, "other", data, outs, name_module_path(friendly), op_type=t)
        if t == "Parameter":
            inputs.update(outs)
            continue
        if t == "Constant":
            constants.update(outs)
            if str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>", "<Type: 'int4_t'>",
                                                "<Type: 'uint4_t'>") or node.get_element_type().get_type_name() in (
                                                    "i8", "u8", "i4", "u4"):
                int8.update(outs)
            continue
        if t == "Result":
            continue
        _classify_ov(op, node, shapes, data)
        if data and all(d in constants for d in data):
            constants.update(outs)
            if any(d in int8 for d in data):
                int8.update(outs)
        ops.append(op)
    return _Graph(ops, shapes, constants, int8, inputs)


def _classify_ov(op: _Op, node, shapes, data) -> None:
    t = node.get_type_name()
    if t == "Sigmoid":
        op.kind = "sigmoid"
    elif t in ("HSigmoid", "HardSigmoid"):
        op.kind = "hardsigmoid"
        op.inputs = data[:1]
    elif t == "Multiply":
        op.kind = "mul"
    elif t == "Add":
        op.kind = "add"
    elif t in _OV_VIEW:
        op.kind, op.inputs = "view", data[:1]
    elif t == "FakeQuantize":
        op.kind, op.inputs = "quant", data[:1]
    elif t in ("Convolution", "GroupConvolution"):
        op.kind = "conv"
    elif t == "MatMul":
        op.kind = "linear"
    elif t in ("Swish", "HSwish"):
        op.kind = "silu"
    elif t in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "AvgPool", "MaxPool", "AdaptiveAvgPool",
               "AdaptiveMaxPool"):
        pool = "avg" if t in ("ReduceMean", "AvgPool", "AdaptiveAvgPool") else \
            "max" if t in ("ReduceMax", "MaxPool", "AdaptiveMaxPool") else "other"
        _pool_from_shapes(op, shapes.get(data[0]) if data else None, shapes.get(op.outputs[0]), pool)
        op.inputs = data[:1]


def openvino_gates(model, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an OpenVINO ``Model`` (FP32 or INT8 IR), named after ``expected`` where they match."""
    return _graph_gates(_ov_graph(model), expected)


# --------------------------------------------------------------------------------------- ncnn side

_NCNN_VIEW = {"Split", "Reshape", "Flatten", "Permute", "Squeeze", "ExpandDims", "Noop"}
_NCNN_WEIGHTED = {"Convolution": "conv", "ConvolutionDepthWise": "conv", "Convolution1D": "conv",
                  "InnerProduct": "linear"}
_NCNN_SIGMOID_ACTIVATION = 4  # activation_type (param 9) of a conv / inner product with a fused sigmoid


def _ncnn_int(layer, key: int, default: int = 0) -> int:
    value = layer.params.get(str(key))
    try:
        return default if value is None else int(float(value))
    except (ValueError, OverflowError):  # an expression where a number is read: ncnn refuses the file itself
        return default


def _ncnn_graph(layers) -> _Graph:
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
        op = _Op(layer.name, "other", list(layer.inputs), list(layer.outputs), op_type=t)
        if t in ("Sigmoid", "HardSigmoid"):
            op.kind = "sigmoid" if t == "Sigmoid" else "hardsigmoid"
        elif t == "BinaryOp":
            kind = {0: "add", 2: "mul"}.get(_ncnn_int(layer, 0))
            with_scalar = _ncnn_int(layer, 1) == 1
            op.kind = kind if kind and (kind == "add" or not with_scalar) else "other"
        elif t in _NCNN_VIEW:
            op.kind, op.inputs = "view", op.inputs[:1]
        elif t in _NCNN_WEIGHTED:
            op.kind = _NCNN_WEIGHTED[t]
            op.quantized_op = _ncnn_int(layer, 8) > 0
            if _ncnn_int(layer, 9) == _NCNN_SIGMOID_ACTIVATION:
                pre = f"{layer.outputs[0]}#{layer.name}"
                op.outputs = [pre]
                ops.append(op)
                op = _Op(f"{layer.name}:sigmoid", "sigmoid", [pre], list(layer.outputs), op_type="Sigmoid")
        elif t == "Pooling":
            pool = {0: "max", 1: "avg"}.get(_ncnn_int(layer, 0), "other")
            global_pool = _ncnn_int(layer, 4) == 1 or (_ncnn_int(layer, 7) == 1 and _ncnn_int(layer, 8) == 1
                                                       and _ncnn_int(layer, 18, 1) == 1)
            if global_pool:
                op.kind, op.axes, op.pool = "pool", "hw", pool
            else:  # a (C, 1) pool over a map whose channels were permuted to its H axis: a pool over C
                source = producers.get(layer.inputs[0])
                while source is not None and source.type == "Split":
                    source = producers.get(source.inputs[0])
                if source is not None and source.type == "Permute" and _ncnn_int(layer, 1) == 1 and \
                        _ncnn_int(layer, 11, 1) > 1:
                    op.kind, op.axes, op.pool = "pool", "c", pool
        elif t == "Reduction":
            pool = {3: "avg", 4: "max"}.get(_ncnn_int(layer, 0), "other")
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
    return _Graph(ops, {}, constants, set(), inputs)


def ncnn_gates(layers, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of an ncnn .param (its layers), named after ``expected`` (the manifest's): ncnn keeps
    no module names, so the n-th gate of a kind here is the model's n-th gate of that kind (pnnx
    keeps the traced order)."""
    graph = _ncnn_graph(layers)
    found = _search(graph)
    records = _describe(graph, found, lambda sigmoid: sigmoid.name)
    result = []
    for gate, record in zip(found, records):
        nodes = [op.name for op in gate["body"]] + [gate["sigmoid"].name] + [op.name for op in gate["chain"]] + \
            [gate["multiply"].name]
        result.append(GraphGate(record, gate["sigmoid"].name, gate["multiply"].name, [op.name for op in gate["chain"]],
                                list(dict.fromkeys(nodes)), gate["sigmoid"].outputs[0], _quantization(graph, gate)))
        result[-1].record["ncnn_layers"] = result[-1].quantized["all_layers"]
    if expected is not None:
        names = defaultdict(list)
        for gate in expected:
            names[gate["kind"]].append(gate["name"])
        for gate in result:
            if names[gate.kind]:
                gate.record["name"] = names[gate.kind].pop(0)
    return result


def check_ncnn_policy(layers, expected: list[dict] | None, policy: str, artifact: str) -> dict:
    """The gate policy on an ncnn INT8 model: ncnn runs Sigmoid and BinaryOp in float whatever the
    policy (it has no int8 kernels for them), so the policy governs the gate's layers: ``fp``: none
    of them has int8 scales; ``int8``: every one of them has."""
    check = policy_check(ncnn_gates(layers, expected), expected, policy, artifact, float_gate_ops=True)
    return {**check, "note": "ncnn has no int8 Sigmoid or BinaryOp: gate sigmoids and multiplies run in fp32"}


# ------------------------------------------------------------------------------ the policy check

def _through(graph: _Graph, tensor, backwards: bool) -> bool:
    """Whether a (de)quantizer sits on ``tensor``'s path through reshapes (back to its producer, or
    forward to its consumers)."""
    if backwards:
        for _ in range(32):
            op = graph.producer.get(tensor)
            if op is None:
                return False
            if op.kind in ("quant", "dequant"):
                return True
            if op.kind != "view" or not op.inputs:
                return False
            tensor = op.inputs[0]
        return False
    frontier, steps = [tensor], 0
    while frontier and steps < 32:
        steps += 1
        for op in graph.consumers.get(frontier.pop(0), []):
            if op.kind in ("quant", "dequant"):
                return True
            if op.kind == "view":
                frontier.extend(op.outputs)
    return False


def _quantization(graph: _Graph, gate: dict) -> dict:
    """Which parts of a gate the graph quantizes: the sigmoid (its input or output through a
    (de)quantizer, or a QLinear op), the multiply (its gate operand through one), the gate's layers
    (quantized weights or inputs)."""
    sigmoid, multiply = gate["sigmoid"], gate["multiply"]
    sigmoid_q = sigmoid.quantized_op or _through(graph, sigmoid.inputs[0], True) or \
        _through(graph, sigmoid.outputs[0], False) or any(op.kind in ("quant", "dequant") for op in gate["chain"])
    multiply_q = multiply.quantized_op or _through(graph, gate["operand"], True)
    layers_q, layers_all = [], []
    for op in gate["body"]:
        if op.kind not in ("conv", "linear"):
            continue
        layers_all.append(op.name)
        if op.quantized_op or any(t in graph.int8_constants or _through(graph, t, True) for t in op.inputs):
            layers_q.append(op.name)
    return {"sigmoid": bool(sigmoid_q), "multiply": bool(multiply_q), "layers": layers_q, "all_layers": layers_all}


def policy_check(found: list[GraphGate], expected: list[dict] | None, policy: str, artifact: str,
                 float_gate_ops: bool = False) -> dict:
    """Whether a built INT8 graph follows the gate policy: ``fp``: no gate sigmoid, multiply or layer
    quantized; ``int8``: every gate sigmoid and multiply quantized, or, on a runtime that has no int8
    sigmoid or multiply (``float_gate_ops``), every gate layer. Every gate of ``expected`` (the
    manifest's) must be found in the graph. The result names each gate that breaks the policy."""
    if policy not in ("fp", "int8"):
        raise CbamDeployError(f"gate policy must be fp or int8, got {policy!r}")
    by_name = {g.name: g for g in found}
    names = [g["name"] for g in expected] if expected is not None else list(by_name)
    rows, broken = [], []
    for name in names:
        gate = by_name.get(name)
        if gate is None:
            rows.append({"gate": name, "found": False})
            broken.append(f"{name}: not found in {artifact}")
            continue
        q = gate.quantized
        row = {"gate": name, "kind": gate.kind, "found": True, "sigmoid_quantized": q["sigmoid"],
               "multiply_quantized": q["multiply"], "quantized_layers": q["layers"]}
        rows.append(row)
        if policy == "fp":
            parts = [p for p, bad in (("sigmoid", q["sigmoid"]), ("multiply", q["multiply"]),
                                      ("layers " + ", ".join(q["layers"]), bool(q["layers"]))) if bad]
            if parts:
                broken.append(f"{name}: {' and '.join(parts)} quantized under --gates fp")
        elif float_gate_ops:
            left = [n for n in q["all_layers"] if n not in q["layers"]]
            if left:
                broken.append(f"{name}: layers {', '.join(left)} left in float under --gates int8")
        else:
            parts = [p for p, ok in (("sigmoid", q["sigmoid"]), ("multiply", q["multiply"])) if not ok]
            if parts:
                broken.append(f"{name}: {' and '.join(parts)} left in float under --gates int8")
    return {"policy": policy, "gates": len(names), "checked_on": artifact, "held": not broken,
            "broken": broken, "per_gate": rows}


def program_gates(program, expected: list[dict] | None = None) -> list[GraphGate]:
    """The gates of a ``torch.export`` program (FP32, or PT2E-quantized with its Q/DQ pairs), their
    nodes named by the program's fx node names, named after ``expected`` where they match."""
    return _graph_gates(_torch_graph(program)[0], expected)


def check_program_policy(program, expected: list[dict] | None, policy: str, artifact: str) -> dict:
    return policy_check(program_gates(program, expected), expected, policy, artifact)


def check_onnx_policy(proto, expected: list[dict] | None, policy: str, artifact: str) -> dict:
    return policy_check(onnx_gates(proto, expected), expected, policy, artifact)


def check_openvino_policy(model, expected: list[dict] | None, policy: str, artifact: str) -> dict:
    return policy_check(openvino_gates(model, expected), expected, policy, artifact)


def nodes_of(found: list[GraphGate]) -> list[str]:
    """Every node of every gate (the set ``--gates`` governs)."""
    return list(dict.fromkeys(n for g in found for n in g.nodes))


__all__ = ["GateReport", "GatesUntraceable", "GraphGate", "KINDS", "check_ncnn_policy", "check_onnx_policy",
           "check_openvino_policy", "check_program_policy", "find_gates", "ncnn_gates", "nodes_of", "onnx_gates",
           "openvino_gates", "policy_check", "program_gates", "shape_map", "torch_gate_maps", "trace_gate_maps"]
