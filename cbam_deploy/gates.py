"""The gate finder: every attention gate of a network, found by its structure in a graph.

A gate is a sigmoid (a module or a function; hard-sigmoid too) whose output, through reshapes
only, multiplies a *different* feature map with broadcasting: (N, C, 1, 1) for a channel gate,
(N, 1, H, W) for a spatial gate, (N, C, H, W) for a joint gate (BAM's 1 + sigmoid(channel x
spatial)). It is computed from that feature map through pooled descriptors (avg/max over H, W for
channel gates; mean/max over C for spatial gates) and small layers: a Linear or 1x1-conv MLP, a
1-D conv across channels (ECA), a 7x7 conv. CBAM's two gates, SE, ECA and BAM are all of this form.
The sigmoid of SiLU and hard-swish multiplies its own input (x * sigmoid(x)): never a gate.
Module and class names play no part in the finding; they only name what was found.

This module holds the search and the policy check, on one small op list (``Graph`` of ``Op``). Each
graph has an adapter that turns it into that list, its op types classified by a table: the PyTorch
model traced with ``torch.export`` (``torch_gates``: what the manifest lists, the reference maps),
and beside each format, its own graph (``backends/<format>/gates.py``: ONNX, OpenVINO, ncnn), read
through the format's row (``formats.Format.gates``).

A gate found in an exported graph is matched to the model's gate by the module of its sigmoid (the
scope the exporter writes into node names) and its kind, or where a graph keeps no module names, by
its kind and order. ``policy_check`` inspects a built INT8 graph: under ``--gates fp`` no gate
sigmoid, gating multiply or gate layer may be quantized; under ``--gates int8`` every gate sigmoid
and gating multiply must be.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .errors import CbamDeployError

KINDS = ("channel", "spatial", "joint")


class GatesUntraceable(CbamDeployError):
    """The PyTorch model could not be traced, so its gates cannot be read from it."""
MAX_GATE_OPS = 96  # a backward walk from a sigmoid that needs more ops than this is not a gate
ACTIVATION_CLASSES = {"Sigmoid", "Hardsigmoid", "HardSigmoid", "HSigmoid"}


@dataclass
class Op:
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
class Graph:
    ops: list
    shapes: dict = field(default_factory=dict)  # tensor -> tuple of dims (int, str or None) or None
    constants: set = field(default_factory=set)  # tensors computed from weights/constants only
    int8_constants: set = field(default_factory=set)  # constant tensors that hold or derive from int8 data
    inputs: set = field(default_factory=set)  # graph inputs
    outputs: list = field(default_factory=list)  # graph outputs (the tensors the model returns)

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


def _root(graph: Graph, tensor):
    """The tensor behind reshapes and (de)quantizers."""
    seen = 0
    while seen < 32:
        op = graph.producer.get(tensor)
        if op is None or op.kind not in _TRANSPARENT or not op.inputs:
            return tensor
        tensor = op.inputs[0]
        seen += 1
    return tensor


def _is_scalar_constant(graph: Graph, tensor) -> bool:
    if tensor not in graph.constants:
        return False
    shape = graph.shape(tensor)
    return shape is None or all(d == 1 for d in shape)


def _dims_equal(a, b) -> bool:
    return a is None or b is None or a == b or isinstance(a, str) or isinstance(b, str)


def search(graph: Graph) -> list[dict]:
    """Every gate of ``graph``: sigmoid, the map chain, the multiply, the ops computing it, its pools."""
    found = []
    for op in graph.ops:
        if op.kind not in ("sigmoid", "hardsigmoid") or not op.inputs:
            continue
        gate = _gate_at(graph, op)
        if gate is not None:
            found.append(gate)
    return found


def _forward_to_multiply(graph: Graph, sigmoid: Op):
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


def _gate_at(graph: Graph, sigmoid: Op) -> dict | None:
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


def _gate_shape(graph: Graph, sigmoid: Op, chain: list):
    """The gate's shape as it broadcasts: the last shape on the way to the multiply before any
    explicit expand (``expand_as(x)``), so an expanded channel gate still reads (N, C, 1, 1)."""
    shape = graph.shape(sigmoid.outputs[0])
    for op in chain:
        if "expand" in op.op_type.lower() or op.op_type == "Broadcast":
            break
        if graph.shape(op.outputs[0]) is not None:
            shape = graph.shape(op.outputs[0])
    return shape


def _kind(graph: Graph, gate_shape, map_shape, pools: list, multiply: Op) -> str | None:
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

def _family(gate: dict, kind: str, graph: Graph) -> str:
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


def _is_channel_conv(graph: Graph, op: Op) -> bool:
    shape = graph.shape(op.inputs[0]) if op.inputs else None
    return shape is not None and len(shape) == 3


def _pool_label(op: Op) -> str:
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


def describe(graph: Graph, gates: list[dict], strip_activation) -> list[dict]:
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
            "class": sigmoid.module_class if sigmoid.module_class not in ACTIVATION_CLASSES else None,
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


def pool_from_shapes(op: Op, before, after, pool: str) -> None:
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


def shape_map(values: np.ndarray, kind: str) -> np.ndarray:
    """A gate's values in the shape parity and explain use: channel (N, C), spatial (N, 1, H, W)."""
    values = np.asarray(values)
    if kind == "channel":
        return values.reshape(values.shape[0], -1)
    if kind == "spatial" and values.ndim == 4:
        return values.reshape(values.shape[0], 1, *values.shape[-2:])
    return values


# ------------------------------------------------------------------------------ gates of a graph

def name_by_expected(expected: list[dict] | None, graph: Graph):
    """Name a graph's gates as the model's are named: the sigmoid module's recorded gate name;
    without a record, a module that holds nothing but the sigmoid (an activation module) is dropped."""
    homes = {}
    for gate in expected or []:
        module = gate.get("sigmoid", {}).get("module")
        if module is not None:
            homes[module] = gate["name"].split(":")[0] if gate["name"] != "(model)" else ""
    per_module = defaultdict(int)
    for op in graph.ops:
        per_module[op.module or ""] += 1

    def strip(sigmoid: Op) -> str:
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


def graph_gates(graph: Graph, expected: list[dict] | None, by_order: bool = False) -> list[GraphGate]:
    """The gates of an adapted graph, named after ``expected`` (the manifest's) where they match: by
    the sigmoid's module and the kind, or with ``by_order`` (a graph that keeps no module names, such
    as ncnn's) the n-th gate of a kind here is the model's n-th gate of that kind."""
    found = search(graph)
    strip = (lambda sigmoid: sigmoid.name) if by_order else name_by_expected(expected, graph)
    records = describe(graph, found, strip)
    result = []
    for gate, record in zip(found, records):
        nodes = [op.name for op in gate["body"]] + [gate["sigmoid"].name] + [op.name for op in gate["chain"]] + \
            [gate["multiply"].name]
        result.append(GraphGate(record, gate["sigmoid"].name, gate["multiply"].name, [op.name for op in gate["chain"]],
                                list(dict.fromkeys(nodes)), gate["sigmoid"].outputs[0],
                                quantization(graph, gate)))
    if expected is not None:
        _match_names(result, expected, by_order)
    return result


def _match_names(found: list[GraphGate], expected: list[dict], by_order: bool) -> None:
    """Give each gate found in an exported graph the model's name for it: same sigmoid module (unless
    ``by_order``) and kind, in order."""
    pool = defaultdict(list)
    for gate in expected:
        pool[(None if by_order else gate.get("sigmoid", {}).get("module"), gate["kind"])].append(gate["name"])
    for gate in found:
        names = pool.get((None if by_order else gate.record["sigmoid"]["module"], gate.kind))
        if names:
            gate.record["name"] = names.pop(0)


# ------------------------------------------------------------------------------ the policy check

def _through(graph: Graph, tensor, backwards: bool) -> bool:
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


def quantization(graph: Graph, gate: dict) -> dict:
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


# ------------------------------------------------------------------------------ the output tail

WEIGHTED = ("conv", "linear")
TAIL_RULE = ("the output tail (every op from which a model output is reached without passing through a conv or "
             "linear layer: a detector's box decode, the concatenation of its pixel boxes with its probabilities, its "
             "final sigmoid; a classifier's logits after its last layer) stays in float")


def output_tail(graph: Graph) -> list[Op]:
    """The ops between a model's last weighted layers and its outputs, in graph order: walking back from
    every output, each op is taken until a conv or linear layer ends the walk. An INT8 recipe keeps them in
    float (``TAIL_RULE``): one quantization scale over pixels and probabilities, or over a box decode, costs
    a detector its detections while the output's cosine stays at 0.9999."""
    taken, stack, seen = set(), list(graph.outputs), set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in graph.constants:
            continue
        seen.add(tensor)
        op = graph.producer.get(tensor)
        if op is None or op.kind in WEIGHTED or id(op) in taken:
            continue
        taken.add(id(op))
        stack.extend(op.inputs)
    return [op for op in graph.ops if id(op) in taken]


def tail_boundary(graph: Graph, tail: list[Op]) -> list[Op]:
    """The weighted layers whose outputs feed the tail (or are outputs): their outputs stay float too."""
    names = {op.name for op in tail}
    wanted = set(graph.outputs) | {t for op in tail for t in op.inputs}
    return [op for op in graph.ops if op.kind in WEIGHTED and op.name not in names and set(op.outputs) & wanted]


def tail_check(graph: Graph, artifact: str) -> dict:
    """Whether a built INT8 graph keeps its output tail in float: no quantizer, dequantizer or quantized op
    between its last weighted layers and its outputs. The result names the ops that break it."""
    if not graph.outputs:
        return {"rule": TAIL_RULE, "checked_on": artifact, "held": None,
                "skipped": "the graph's outputs cannot be read here"}
    tail = output_tail(graph)
    quantized = [op.name for op in tail if op.kind in ("quant", "dequant") or op.quantized_op]
    return {"rule": TAIL_RULE, "checked_on": artifact, "held": not quantized, "ops": len(tail),
            "float_ops": len(tail) - len(quantized), "quantized": quantized[:20],
            "broken": [f"{len(quantized)} quantize/dequantize or quantized op(s) in the output tail: "
                       f"{', '.join(quantized[:5])}"] if quantized else []}


def nodes_of(found: list[GraphGate]) -> list[str]:
    """Every node of every gate (the set ``--gates`` governs)."""
    return list(dict.fromkeys(n for g in found for n in g.nodes))


__all__ = ["ACTIVATION_CLASSES", "GateReport", "GatesUntraceable", "Graph", "GraphGate", "KINDS", "Op", "TAIL_RULE",
           "describe", "graph_gates", "nodes_of", "output_tail", "policy_check", "pool_from_shapes", "search",
           "shape_map", "tail_boundary", "tail_check"]