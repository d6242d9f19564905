"""onnxruntime, CPU execution provider by default; any EPs (with their options) on request.

onnxruntime falls back silently: an EP whose libraries fail to load is dropped from the session, and
nodes an EP cannot take go to the next provider (at last the CPU one). After creating the session the
runner compares the providers asked for with those active and, where this onnxruntime can say so
(``get_provider_graph_assignment_info``, onnxruntime 1.24+), counts the nodes each provider took;
``describe()`` reports both and a ``fallback`` note (None when everything ran where it was asked to)."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import psutil

from ...errors import CbamDeployError
from ...formats import Extra
from ...runners.base import Runner

ONNXRUNTIME = Extra("onnxruntime", ("onnxruntime",), "pip install onnxruntime")

CPU_EP = "CPUExecutionProvider"
_ONNX_FLOATS = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}
_GPU_EPS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_names(providers: list) -> list[str]:
    """The EP names of an onnxruntime ``providers`` list (names or (name, options) pairs)."""
    return [p[0] if isinstance(p, (tuple, list)) else p for p in providers]


def node_placement(session) -> dict[str, collections.Counter] | None:
    """{provider: Counter(op type)} of the nodes each provider was given; None where this onnxruntime
    cannot tell (older than 1.24, or the session was made without recording it)."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # no such method, or recording was not enabled
        return None
    placement: dict[str, collections.Counter] = {}
    for subgraph in subgraphs:
        placement.setdefault(subgraph.ep_name, collections.Counter()).update(n.op_type for n in subgraph.get_nodes())
    return placement


def fallback_note(requested: list[str], active: list[str], placement: dict[str, collections.Counter] | None) -> str | None:
    """What ran elsewhere than asked: None when every node ran on the first provider asked for."""
    wanted = requested[0]
    if wanted not in active:
        return (f"{wanted} was asked for but onnxruntime did not load it (its libraries or device are missing): "
                f"everything ran on {', '.join(active)}")
    if placement is None:
        return None if wanted == CPU_EP and active == [CPU_EP] else \
            "unknown: this onnxruntime cannot report node placement (1.24+ can)"
    total = sum(sum(c.values()) for c in placement.values())
    elsewhere = {ep: ops for ep, ops in placement.items() if ep != wanted and sum(ops.values())}
    if not elsewhere:
        return None
    moved = sum(sum(ops.values()) for ops in elsewhere.values())
    detail = "; ".join(f"{sum(ops.values())} on {ep} ({', '.join(sorted(ops))})" for ep, ops in elsewhere.items())
    if moved == total:
        return f"{wanted} is active but took no node: all {total} ran elsewhere: {detail}"
    return f"{moved} of {total} nodes ran elsewhere than {wanted}: {detail}"


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, providers: list | None = None, threads: int | None = None,
                 precision: str = "fp32", profile_dir: str | Path | None = None) -> None:
        ort = ONNXRUNTIME.require()  # a machine that runs only engines or IR may lack onnxruntime
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between runs: a spinning thread pool steals the CPU from whatever runs
        # next (another runner in an interleaved benchmark, the server's other work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):  # which provider took which node
            options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if profile_dir is not None:  # onnxruntime's own profiler: per-node kernel times (see node_times)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "ort-profile")
        providers = list(providers or [CPU_EP])
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise CbamDeployError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads
        self.providers_requested = provider_names(providers)
        self.providers_active = list(self.session.get_providers())
        placement = node_placement(self.session)
        self.node_placement = None if placement is None else {ep: sum(c.values()) for ep, c in placement.items()}
        self.fallback = fallback_note(self.providers_requested, self.providers_active, placement)
        # where the work really ran: the first active provider that took nodes
        ran_on = next((ep for ep in self.providers_active if placement is None or (placement.get(ep) or {})), CPU_EP)
        self.device = "cuda:0" if ran_on in _GPU_EPS else "cpu"
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.asarray(out, dtype=np.float32) for name, out in zip(self.output_names, outs)}

    def threads(self) -> int | None:
        """intra-op threads: as set, or onnxruntime's default (one per physical core)."""
        if self.device != "cpu":
            return None
        if self._threads:
            return self._threads
        return psutil.cpu_count(logical=False) or os.cpu_count()

    def computed_precision(self) -> str | None:
        """On the CPU provider, the float type of the graph's outputs: onnxruntime's CPU kernels compute
        in the tensors' own types and convert nothing by themselves. None for INT8 graphs and for the
        other providers (TensorRT and OpenVINO may pick lower precisions of their own)."""
        if self.precision == "int8" or self.device != "cpu" or self.providers_active[0] != CPU_EP:
            return None
        return _ONNX_FLOATS.get(self.session.get_outputs()[0].type)

    def describe(self) -> dict:
        return {**super().describe(), "runtime": getattr(self, "runtime", None) or _runtime_name(self.providers_requested),
                "providers_requested": self.providers_requested, "providers_active": self.providers_active,
                "node_placement": self.node_placement, "fallback": self.fallback}

    def node_times(self, skip_runs: int = 0) -> list[tuple[str, str, float]]:
        """(node name, op type, microseconds) for every kernel run after the first ``skip_runs`` runs;
        needs ``profile_dir``. Ends the profiling session."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if 0 < skip_runs <= len(runs) else 0
        return [(e["name"][: -len("_kernel_time")].removeprefix("fused "), e.get("args", {}).get("op_name", "?"), float(e["dur"]))
                for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]


def _runtime_name(requested: list[str]) -> str:
    """The runtime table's name for a provider list made outside it (peers, profile)."""
    return {"CPUExecutionProvider": "ort-cpu", "CUDAExecutionProvider": "ort-cuda", "TensorrtExecutionProvider":
            "ort-tensorrt", "OpenVINOExecutionProvider": "ort-openvino"}.get(requested[0], "ort:" + requested[0])
