"""Experiment: exact Q/DQ rewrites of the CBAM gates for onnxruntime INT8, kept as a record.

They keep the full-size gate work on the uint8 feature map instead of dequantized float copies, and
they are exact (outputs bit-identical on resnet50_cbam here), but onnxruntime 1.32 runs every one of
them slower than the plain Q/DQ graph (resnet50_cbam, batch 1, AMD EPYC, 2 cores, AVX-512 VNNI/BF16,
2026-11-27, one interleaved run):
uint8 ReduceMax x1.09, MatMulInteger mean pool x1.02, per-channel dequantize as the gate multiply x1.22,
all three x1.35. Its generic uint8 reduce and per-axis dequantize kernels are unvectorised and
break the NHWC layout its QLinearConv path uses, so cbam-deploy does not apply them.

Run: python benchmarks/ort_qdq_rewrites.py BUNDLE  (a bundle with int8-ort-cpu; prints timings)
"""

from __future__ import annotations

import sys
import time

from cbam_deploy.errors import CbamDeployError
#
# In the Q/DQ model the gates keep float (policy ``gates=fp``), so every CBAM block dequantizes the
# block's uint8 feature map to float once per consumer (onnxruntime duplicates a shared DequantizeLinear
# for each) and then reads and writes float maps. The rewrites below keep the full-size work on the
# uint8 tensor; each is exact (integer arithmetic, or float rounding only):
#
# * ``int8-max-pool``: ReduceMax(DQ(q)) = DQ(ReduceMax(q)) - max commutes with x -> s (x - z), s > 0.
# * ``int8-mean-pool``: ReduceMean over H, W of DQ(q) = s (sum(q) / HW - z), the sum an exact int32
#   MatMulInteger of q against a vector of ones.
# * ``int8-channel-gate``: DQ(q) * g[n, c] = DequantizeLinear(q, scale = s g[n, c], zero point z) per
#   axis over N*C channels: the channel gate is applied by the dequantization itself, one uint8 read
#   and one float write, instead of a float write, read and write.

QDQ_REWRITES = {
    "int8-max-pool": "channel max pool on the uint8 map, then dequantize the (N, C) result",
    "int8-mean-pool": "channel mean pool as an int32 MatMulInteger sum of the uint8 map",
    "int8-channel-gate": "channel gate multiply folded into a per-channel dequantize of the uint8 map",
}


def rewrite_qdq_gates(model, enabled: tuple[str, ...] = tuple(QDQ_REWRITES)) -> dict:
    """Apply the Q/DQ rewrites in place on an onnx.ModelProto; returns the record for the manifest."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts = {name: 0 for name in enabled}
    added: list = []
    removed: set[int] = set()
    serial = [0]

    def const(name_hint: str, array) -> str:
        serial[0] += 1
        name = f"cbam_opt/{name_hint}_{serial[0]}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, inputs: list[str], scope: str, **attrs) -> str:
        serial[0] += 1
        out = f"{scope}/cbam_opt_{op}_{serial[0]}"
        added.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def scalar(name: str):
        tensor = inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def axes_of(n) -> list[int] | None:
        for a in n.attribute:
            if a.name == "axes":
                return list(a.ints)
        if len(n.input) > 1 and n.input[1]:
            value = scalar(n.input[1])
            return None if value is None else [int(v) for v in np.atleast_1d(value)]
        return None

    def keepdims(n) -> int:
        return next((a.i for a in n.attribute if a.name == "keepdims"), 1)

    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        scale, zero = scalar(dq.input[1]), scalar(dq.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype != np.uint8 \
                or not float(scale.reshape(-1)[0]) > 0 or any(a.name == "axis" for a in dq.attribute if scale.ndim):
            continue
        q, s_name, z_name = dq.input
        s_value = float(scale.reshape(-1)[0])
        for user in consumers.get(dq.output[0], []):
            scope = user.name.rsplit("/", 1)[0]
            if user.op_type == "ReduceMax" and "int8-max-pool" in enabled and user.input[0] == dq.output[0]:
                pooled = node("ReduceMax", [q], scope, axes=axes_of(user), keepdims=keepdims(user)) \
                    if axes_of(user) is not None else None
                if pooled is None:
                    continue
                added.append(helper.make_node("DequantizeLinear", [pooled, s_name, z_name], [user.output[0]],
                                              name=f"{scope}/cbam_opt_DequantizeLinear_{serial[0]}"))
                removed.add(id(user))
                counts["int8-max-pool"] += 1
            elif (user.op_type == "ReduceMean" and "int8-mean-pool" in enabled and axes_of(user) in ([2, 3], [-2, -1])
                  and keepdims(user) == 1):
                flat = node("Reshape", [q, const("shape_nc_hw", np.array([0, 0, -1], np.int64))], scope)
                shape = node("Shape", [flat], scope)
                hw = node("Slice", [shape, const("start", np.array([2], np.int64)), const("end", np.array([3], np.int64))], scope)
                ones_shape = node("Concat", [hw, const("one", np.array([1], np.int64))], scope, axis=0)
                ones = node("ConstantOfShape", [ones_shape], scope,
                            value=numpy_helper.from_array(np.array([1], np.uint8)))
                total = node("MatMulInteger", [flat, ones], scope)  # (N, C, 1) int32, exact
                total_f = node("Cast", [total], scope, to=onnx.TensorProto.FLOAT)
                hw_f = node("Cast", [hw], scope, to=onnx.TensorProto.FLOAT)
                mean = node("Div", [total_f, hw_f], scope)
                centred = node("Sub", [mean, const("zero_point", np.array(float(zero.reshape(-1)[0]), np.float32))], scope)
                scaled = node("Mul", [centred, const("scale", np.array(s_value, np.float32))], scope)
                added.append(helper.make_node("Unsqueeze", [scaled, const("axes", np.array([3], np.int64))],
                                              [user.output[0]], name=f"{scope}/cbam_opt_Unsqueeze_{serial[0]}"))
                removed.add(id(user))
                counts["int8-mean-pool"] += 1
            elif user.op_type == "Mul" and "int8-channel-gate" in enabled:
                other = user.input[1] if user.input[0] == dq.output[0] else user.input[0]
                unsq = producer.get(other)
                if unsq is None or unsq.op_type != "Unsqueeze" or (axes_of(unsq) or []) != [2, 3]:
                    continue
                gate = unsq.input[0]  # (N, C)
                scaled = node("Mul", [gate, s_name], scope)
                per_channel = node("Reshape", [scaled, const("flat", np.array([-1], np.int64))], scope)
                zeros = node("Expand", [z_name, node("Shape", [per_channel], scope)], scope)
                q_shape = node("Shape", [q], scope)
                hw = node("Slice", [q_shape, const("start", np.array([2], np.int64)), const("end", np.array([4], np.int64))], scope)
                merged = node("Concat", [const("one_all", np.array([1, -1], np.int64)), hw], scope, axis=0)
                q_merged = node("Reshape", [q, merged], scope)  # (1, N*C, H, W)
                gated = node("DequantizeLinear", [q_merged, per_channel, zeros], scope, axis=1)
                added.append(helper.make_node("Reshape", [gated, q_shape], [user.output[0]],
                                              name=f"{scope}/cbam_opt_Reshape_{serial[0]}"))
                removed.add(id(user))
                counts["int8-channel-gate"] += 1
    if not any(counts.values()):
        return {"rewrites": []}
    kept = [n for n in graph.node if id(n) not in removed]
    live = {i for n in kept + added for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "DequantizeLinear" or any(o in live for o in n.output)]
    del graph.node[:]
    graph.node.extend(_toposort(kept + added, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return {"rewrites": [{"name": name, "exact": True, "stage": "onnx-qdq", "nodes": count,
                          "description": QDQ_REWRITES[name]} for name, count in counts.items() if count]}


def _toposort(nodes: list, available: set[str]) -> list:
    ready = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        progressed = [n for n in pending if all(i in ready for i in n.input)]
        if not progressed:
            raise CbamDeployError("cbam-opt: the rewritten graph has a cycle or a missing input (a bug)")
        for n in progressed:
            ready.update(n.output)
        ordered.extend(progressed)
        taken = {id(n) for n in progressed}
        pending = [n for n in pending if id(n) not in taken]
    return ordered


def main(bundle: str, seconds: float = 20.0) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from cbam_deploy.benchstats import median_ci, ratio_ci

    source = f"{bundle}/model.int8-ort-cpu.onnx"
    variants = {"plain q/dq": None, **{name: (name,) for name in QDQ_REWRITES}, "all three": tuple(QDQ_REWRITES)}
    sessions = {}
    for label, enabled in variants.items():
        model = onnx.load(source)
        if enabled:
            rewrite_qdq_gates(model, enabled)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[label] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = sessions["plain q/dq"].run(None, {"input": x})[0]
    times = {label: [] for label in sessions}
    started = time.time()
    while time.time() - started < seconds:
        for label, session in sessions.items():
            t = time.perf_counter()
            out = session.run(None, {"input": x})[0]
            times[label].append((time.perf_counter() - t) * 1e3)
    for label, session in sessions.items():
        p50 = median_ci(times[label])
        ratio = ratio_ci(times[label], times["plain q/dq"])
        diff = float(np.abs(session.run(None, {"input": x})[0] - reference).max())
        print(f"{label:20s} p50 {p50[0]:7.2f} ms  x{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]  max |diff| {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)
