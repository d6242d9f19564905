"""The ONNX INT8 recipes: Q/DQ ONNX from the bundle's FP32 ONNX, calibrated with onnxruntime.

* ``ort-cpu``   Q/DQ ONNX, uint8 activations (asymmetric) with int8 per-channel weights: the U8S8
               form x86 VNNI kernels want. int8/int8 Q/DQ can run slower than FP32 in onnxruntime
               on x86 (onnxruntime#5319, #6732).
* ``tensorrt``  Q/DQ ONNX, symmetric int8 activations and weights (zero points 0), weights per
               output channel, bias left in float: the explicit-quantization form that TensorRT 8.5,
               10 and 11 parse (11 has no implicit calibration and no INT8 builder flag); the
               TensorRT format builds its INT8 engine from this artifact.

Both run onnxruntime's pre-processing (symbolic shape inference, graph optimisation) on the FP32
ONNX first. The output tail (``gates.output_tail``: every node from which a model output is reached without
passing through a conv or linear layer: a detector's box decode, the concatenation of its pixel boxes with
its probabilities, its final sigmoid; a classifier's logits after its last layer) stays in float: its
nodes are excluded from quantization, the quantize/dequantize pairs onnxruntime puts on the tensors
entering it are taken out, and the built graph is checked for it (``quantization.output_tail``). One
scale over boxes in pixels and probabilities in 0-1 turns every score of a detector to 0 while the
output's cosine stays at 0.9999. The gate policy covers every attention gate the finder finds in the pre-processed graph,
each as a whole: its pools and layers, its sigmoid, the reshapes to its multiply and the multiply,
wherever the model computes it. ``gates='fp'`` keeps all of that out of quantization; ``gates='int8'``
quantizes it, gate sigmoids and gating multiplies included (onnxruntime quantizes neither op type by
default, so they are added for the gates' own nodes only). Then the built graph is inspected (Q/DQ
placement): a gate that does not follow the policy fails the artifact, by name; the checked result
goes into the manifest as ``quantization.gate_check``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import onnx

from ...calib.recipes import (RecipeResult, cache_key, cache_rebuilt, fail_unless_held, first_line,
                              graph_gates_or_fail, preprocess_onnx, rebuild_cache_entry)
from ...data import CalibrationSet
from ...errors import CbamDeployError
from ...fsutil import atomic_path, sha256_file
from ...gates import nodes_of, output_tail, tail_check
from .gates import check_onnx_policy, onnx_gates, onnx_graph


class _Reader:
    """onnxruntime CalibrationDataReader over a CalibrationSet."""

    def __init__(self, data: CalibrationSet, input_name: str, batch: int) -> None:
        self._data = data
        self._batches = [data.inputs[i:i + batch] for i in range(0, len(data.inputs), batch)]
        self._name = input_name
        self._index = 0

    def get_next(self):
        if self._index >= len(self._batches):
            return None
        self._index += 1
        self._data.advance(len(self._batches[self._index - 1]))
        return {self._name: self._batches[self._index - 1]}

    def rewind(self) -> None:
        self._index = 0

    def __len__(self) -> int:
        return len(self._batches)


def quantize_onnx(
    fp32_onnx: Path,
    out_path: Path,
    data: CalibrationSet,
    target: str,
    method: str,
    gates: str,
    expected: list[dict] | None,
    batch: int = 8,
    cache_dir: Path | None = None,
) -> RecipeResult:
    """The ort-cpu or tensorrt Q/DQ recipe; writes ``out_path`` atomically."""
    from onnxruntime.quantization import (  # lazy: onnxruntime.quantization is heavy and only INT8 needs it
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    if target == "ort-cpu":
        activation, extra = QuantType.QUInt8, {"ActivationSymmetric": False, "WeightSymmetric": True}
    else:
        activation, extra = QuantType.QInt8, {"ActivationSymmetric": True, "WeightSymmetric": True,
                                              "QuantizeBias": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    with tempfile.TemporaryDirectory(prefix="cbam-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        preprocess_onnx(fp32_onnx, pre)
        proto = onnx.load(str(pre))
        found = graph_gates_or_fail(onnx_gates(proto, expected), expected, "the ONNX graph")
        excluded, extra_types = _onnx_policy(proto, found, gates)
        tail = [op.name for op in output_tail(onnx_graph(proto))]
        excluded = list(dict.fromkeys(excluded + tail))
        if gates == "fp" and _unshare_initializers(proto, set(nodes_of(found))):
            onnx.save(proto, str(pre))
        input_name = proto.graph.input[0].name
        supports_cache = "calibration_cache_path" in quantize_static.__code__.co_varnames
        cache_path, cache_hit, cache_warning = None, False, None
        if cache_dir is not None and supports_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            cache_path = cache_dir / f"{cache_key(sha256_file(pre), data, target, method, gates)}.json"
            cache_hit = cache_path.exists()
            if cache_hit:
                problem = _ort_cache_problem(cache_path, calibrate_method)
                if problem:
                    cache_hit, cache_warning = False, cache_rebuilt(data, cache_path, problem)

        def run(calibration_cache: Path | None) -> None:
            kwargs = {"calibration_cache_path": str(calibration_cache)} if calibration_cache is not None else {}
            # onnxruntime's histogram calibrators print progress on stdout, which belongs to --json output
            with atomic_path(out_path) as tmp_out, contextlib.redirect_stdout(sys.stderr):
                quantize_static(
                    str(pre), str(tmp_out), _Reader(data, input_name, batch),
                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                    activation_type=activation, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, calibrate_method=calibrate_method, extra_options=extra,
                    op_types_to_quantize=_ort_op_types(extra_types), **kwargs,
                )
                built = onnx.load(str(tmp_out))
                if float_tail(built):
                    onnx.save(built, str(tmp_out))
                onnx.checker.check_model(str(tmp_out))

        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs every skipped node
        try:
            if cache_path is None or cache_hit:
                try:
                    run(cache_path)
                except Exception as exc:
                    if not cache_hit:
                        raise
                    # the entry parsed but did not fit this graph: a miss after all, rebuilt below
                    cache_hit = False
                    cache_warning = cache_rebuilt(data, cache_path, f"{type(exc).__name__}: {first_line(exc)}")
            if cache_path is not None and not cache_hit:
                rebuild_cache_entry(cache_path, run)
        except CbamDeployError:
            raise
        except Exception as exc:
            raise CbamDeployError(f"quantization ({target}, {method}) failed: {type(exc).__name__}: {exc}") from None
        finally:
            logging.getLogger().setLevel(previous)
    quantized = onnx.load(str(out_path))
    model_gates = expected if expected is not None else [g.record for g in found]
    found_quantized = onnx_gates(quantized, model_gates)
    check = check_onnx_policy(quantized, model_gates, gates, f"the {target} Q/DQ graph", found_quantized)
    fail_unless_held(check, out_path)
    tail_record = tail_check(onnx_graph(quantized), f"the {target} Q/DQ graph")
    if tail_record["held"] is False:
        out_path.unlink(missing_ok=True)
        raise CbamDeployError(f"the output tail is quantized in the {target} Q/DQ graph: {tail_record['broken'][0]}")
    ops = [n.op_type for n in quantized.graph.node]
    info = {
        "recipe": target,
        "method": method,
        "gates": gates,
        "activations": "uint8 asymmetric" if target == "ort-cpu" else "int8 symmetric (zero point 0)",
        "weights": "int8 symmetric, per output channel",
        "excluded_nodes": len(excluded) if gates == "fp" else 0,
        "gate_nodes": len(nodes_of(found)),
        "gate_check": check,
        "output_tail": {**tail_record, "excluded_nodes": len(tail)},
        "quantize_linear_nodes": ops.count("QuantizeLinear"),
        "opset": next((o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")), None),
        "calibration_cache": {"path": str(cache_path), "hit": cache_hit} if cache_path is not None else
                             {"path": None, "hit": False, "reason": "disabled" if cache_dir is None else
                              "this onnxruntime has no calibration cache"},
    }
    if cache_warning:
        info["calibration_cache"]["rebuilt"] = cache_warning
    return RecipeResult(out_path, "onnx", info, graph=quantized, gates=found_quantized)


def float_tail(proto: onnx.ModelProto) -> int:
    """Take the quantize/dequantize nodes out of the output tail: every tail node (and every graph output)
    reads the float tensor its Q/DQ chain started from; nodes left with no reader are removed. Returns how
    many were removed."""
    graph = proto.graph
    tail = output_tail(onnx_graph(proto))
    qdq_types = ("QuantizeLinear", "DequantizeLinear")
    producer = {out: node for node in graph.node for out in node.output}

    def float_source(tensor: str) -> str:
        for _ in range(64):
            node = producer.get(tensor)
            if node is None or node.op_type not in qdq_types:
                return tensor
            tensor = node.input[0]
        return tensor

    tail_names = {op.name for op in tail if op.op_type not in qdq_types}
    for node in graph.node:
        if (node.name or node.output[0]) in tail_names:
            for index, tensor in enumerate(node.input):
                if tensor:
                    node.input[index] = float_source(tensor)
    for output in graph.output:  # an output a dequantizer writes: the float tensor takes the output's name
        source = float_source(output.name)
        if source != output.name:
            graph.node.remove(producer[output.name])
            for node in graph.node:
                node.output[:] = [output.name if t == source else t for t in node.output]
                node.input[:] = [output.name if t == source else t for t in node.input]
    removed = 0
    while True:
        read = {t for node in graph.node for t in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in qdq_types and not any(t in read for t in n.output)]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def _onnx_policy(proto: onnx.ModelProto, found: list, gates: str) -> tuple[list[str], list[str]]:
    """(nodes_to_exclude, op types to add): ``fp`` excludes every gate node; ``int8`` adds the gate
    sigmoid and multiply op types, and excludes the nodes of those types that are not part of a gate
    (so the rest of the network is quantized as the recipe always did)."""
    gate_nodes = set(nodes_of(found))
    if gates == "fp":
        return [n.name for n in proto.graph.node if n.name in gate_nodes], []
    extra = sorted({n.op_type for n in proto.graph.node if n.name in gate_nodes and n.op_type in _GATE_OP_TYPES})
    others = [n.name for n in proto.graph.node if n.op_type in extra and n.name not in gate_nodes]
    return others, extra


_GATE_OP_TYPES = ("Sigmoid", "HardSigmoid", "Mul", "Add")


def _unshare_initializers(proto: onnx.ModelProto, gate_nodes: set[str]) -> int:
    """Give gate nodes their own copy of every initializer they share with a node outside the gates.
    Graph simplification merges equal constants (a zero bias of a gate's MLP and of a folded conv
    become one initializer); onnxruntime then quantizes it for the conv and hands the gate the
    dequantized int32 copy, so a gate kept in float would read a quantized bias. Returns the copies made."""
    initializers = {i.name: i for i in proto.graph.initializer}
    outside = {name for node in proto.graph.node if node.name not in gate_nodes for name in node.input}
    copies = {}
    for node in proto.graph.node:
        if node.name not in gate_nodes:
            continue
        for index, name in enumerate(node.input):
            if name in initializers and name in outside:
                if name not in copies:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(initializers[name])
                    copy.name = f"{name}__gate_float"
                    proto.graph.initializer.append(copy)
                    copies[name] = copy.name
                node.input[index] = copies[name]
    return len(copies)


def _ort_op_types(extra: list[str]) -> list[str] | None:
    """onnxruntime's default Q/DQ op types plus ``extra``; None (its default) when there is nothing to add."""
    if not extra:
        return None
    from onnxruntime.quantization.registry import QDQRegistry  # lazy: onnxruntime.quantization is heavy and only INT8 needs it

    return sorted(set(QDQRegistry) | set(extra))


def _ort_cache_problem(entry: Path, calibrate_method) -> str | None:
    """Why an onnxruntime calibration-cache entry cannot be used, or None when it can."""
    if not entry.is_file():
        return "not a file"
    try:
        from onnxruntime.quantization.calibrate import load_tensors_data  # lazy: onnxruntime.quantization is heavy and only INT8 needs it

        ranges = load_tensors_data(entry)
    except Exception as exc:  # truncated or garbled JSON, wrong structure: a miss, never a failure
        return f"{type(exc).__name__}: {first_line(exc)}"
    if getattr(ranges, "calibration_method", calibrate_method) != calibrate_method:
        return f"made with {ranges.calibration_method}, not {calibrate_method}"
    if not len(getattr(ranges, "data", {}) or {}):
        return "it holds no tensor ranges"
    return None
