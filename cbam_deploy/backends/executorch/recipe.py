"""The ExecuTorch INT8 recipe (quantize target ``executorch``): PT2E with the XNNPACK quantizer.

The PyTorch model is exported within its bounds and rewritten (``xnnpack-pools``), then
``prepare_pt2e`` with ``XNNPACKQuantizer`` (int8 weights symmetric per output channel, int8
activations per tensor, minmax observers), calibrated on the calibration set, ``convert_pt2e``,
exported again with the same dynamic shapes and lowered to XNNPACK, as ExecuTorch documents.

The gate policy covers every gate the finder (``cbam_deploy.gates``) finds in the exported program,
each as a whole (its pools and layers, sigmoid, reshapes, multiply): ``--gates fp`` keeps all of
those nodes out of the quantizer's annotation (``set_filter_function``); ``--gates int8`` lets it
annotate them. The policy is then checked on the converted PT2E program, the one lowered into the
.pte (its Q/DQ pairs around each gate); the .pte itself cannot be checked: the XNNPACK delegate's
payload is opaque to the Python runtime. A gate that breaks the policy fails the build, by name.

The output tail (``gates.output_tail``: a detector's box decode, the concatenation of its pixel boxes with
its probabilities, its final sigmoid) stays in float: its nodes and the weighted layers feeding it are left
unannotated (XNNPACK has no int8 convolution with a float output), and the converted program is checked free
of Q/DQ there (``quantization.output_tail``).

Calibration cache: the calibrated observers' state, keyed by the model (the bundle's FP32 ONNX
sha256), the bounds, the rewrite, the data fingerprint, the method and the policy; a hit skips the
calibration passes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ...calib.recipes import RecipeResult
from ...data import CalibrationSet
from ...errors import CbamDeployError
from ...fsutil import atomic_path
from ...gates import nodes_of
from ...torch_gates import check_program_policy, check_program_tail, program_gates, program_tail
from .exporter import Bounds, export_program, export_pte, import_extra, output_names

CACHE_VERSION = 2  # 2: the output tail in float
METHODS = ("minmax",)
CHECKED_ON = "the PT2E-converted program (what is lowered into the .pte; the delegate payload is opaque)"


def _pt2e():
    """(prepare_pt2e, convert_pt2e, XNNPACKQuantizer, get_symmetric_quantization_config, MinMaxObserver)."""
    pt2e, observers, xnn = import_extra("PT2E quantization", "torchao.quantization.pt2e.quantize_pt2e",
                                        "torchao.quantization.pt2e.observer",
                                        "executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    return pt2e.prepare_pt2e, pt2e.convert_pt2e, xnn.XNNPACKQuantizer, xnn.get_symmetric_quantization_config, \
        observers.MinMaxObserver


def _config(get_config, minmax):
    """XNNPACK's symmetric per-channel config, activations observed by min/max."""
    config = get_config(is_per_channel=True)
    act = replace(config.input_activation, observer_or_fake_quant_ctr=minmax.with_args(eps=2 ** -12))
    out = replace(config.output_activation, observer_or_fake_quant_ctr=minmax.with_args(eps=2 ** -12)) \
        if config.output_activation is not None else None
    return replace(config, input_activation=act, output_activation=out)


def _policy_quantizer(quantizer_cls, gate_nodes: set, gates: str, rewritten: bool = True, tail: set = frozenset(),
                      boundary: set = frozenset()):
    """The XNNPACK quantizer with the gate policy: under ``fp`` the filter keeps every gate node out of
    the patterns it annotates, and what ``propagate_annotation`` then spreads into the gate through
    its reshapes and concatenations (observers on the gate layers' inputs) is taken back off.
    After ``xnnpack-pools`` no 1x1 adaptive average pool is left (each is a mean over H, W, whose
    node still carries the pool module's source, which the adaptive-pool annotator would take for
    its own op and reject), so that pattern is not annotated."""
    class GatePolicyQuantizer(quantizer_cls):
        SUPPORTED_PATTERNS = [p for p in quantizer_cls.SUPPORTED_PATTERNS
                              if not (rewritten and p.name == "adaptive_avg_pool2d")]

        def annotate(self, model):
            model = super().annotate(model)
            for node in model.graph.nodes:
                # the tail, and the layers feeding it (XNNPACK has no int8 conv with a float output), stay float
                if node.name in tail or node.name in boundary or (gates == "fp" and node.name in gate_nodes):
                    node.meta.pop("quantization_annotation", None)
            return model
    return GatePolicyQuantizer


def cache_key(model_sha: str, bounds: Bounds, rewrite: bool, data: CalibrationSet, method: str, gates: str) -> str:
    text = json.dumps({"v": CACHE_VERSION, "model": model_sha, "bounds": bounds.describe(), "rewrite": rewrite,
                       "data": data.fingerprint, "n": len(data.inputs), "target": "executorch", "method": method,
                       "gates": gates, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _observer_state(prepared: nn.Module) -> dict:
    return {k: v for k, v in prepared.state_dict().items() if "activation_post_process" in k}


def quantize_pte(module: nn.Module, out_path: Path, data: CalibrationSet, bounds: Bounds, gates: str,
                 expected: list[dict] | None, method: str = "minmax", batch: int = 8, cache_dir: Path | None = None,
                 model_sha: str = "", rewrite: bool = True) -> RecipeResult:
    """Write the INT8 .pte (and its sidecar) at ``out_path``; raise when the gate policy does not hold."""
    if method not in METHODS:
        raise CbamDeployError(f"the executorch recipe calibrates with {', '.join(METHODS)} only, not {method}")
    prepare_pt2e, convert_pt2e, quantizer_cls, get_config, minmax = _pt2e()
    started = time.perf_counter()
    names = output_names(module, bounds)
    program, rewrite_record = export_program(module, bounds, rewrite)
    found = program_gates(program, expected)
    if expected:
        missing = [g["name"] for g in expected if g["name"] not in {f.name for f in found}]
        if missing:
            raise CbamDeployError(f"the gate policy cannot be applied: gate(s) {', '.join(missing)} not found in the "
                                  "exported program")
    gate_nodes = set(nodes_of(found))
    tail, boundary = (set(names) for names in program_tail(program))
    quantizer = _policy_quantizer(quantizer_cls, gate_nodes, gates, rewrite, tail, boundary)().set_global(
        _config(get_config, minmax))
    kept_float = (gate_nodes if gates == "fp" else set()) | tail | boundary
    quantizer.set_filter_function(lambda node: node.name not in kept_float)
    graph_module = program.module()
    absent = gate_nodes - {n.name for n in graph_module.graph.nodes}
    if absent:  # the filter matches by node name: they must survive .module()
        raise CbamDeployError(f"internal: gate nodes {sorted(absent)[:3]} lost their names in the exported module")
    prepared = prepare_pt2e(graph_module, quantizer)
    batch = max(1, min(batch, bounds.batch[1]))
    if bounds.batch[0] == bounds.batch[1]:
        batch = bounds.batch[0]
    cache_path, cache_hit = None, False
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_path = cache_dir / f"{cache_key(model_sha, bounds, rewrite, data, method, gates)}.pt"
        if cache_path.is_file():
            try:
                state = torch.load(cache_path, weights_only=True)
                current = _observer_state(prepared)
                if set(state) == set(current):
                    prepared.load_state_dict(state, strict=False)
                    cache_hit = True
            except Exception:  # a damaged entry: calibrate again and overwrite it
                cache_hit = False
    if not cache_hit:
        with torch.no_grad():
            for chunk in data.batches(batch):
                if len(chunk) < bounds.batch[0]:
                    continue
                prepared(torch.from_numpy(chunk))
        if cache_path is not None:
            with atomic_path(cache_path) as tmp:
                torch.save(_observer_state(prepared), tmp)
    converted = convert_pt2e(prepared)
    example = bounds.example()
    with torch.no_grad():
        quantized = torch.export.export(converted, (example,), dynamic_shapes=bounds.dynamic_shapes(), strict=False)
    check = check_program_policy(quantized, expected if expected is not None else [g.record for g in found], gates,
                                 CHECKED_ON)
    if not check["held"]:
        raise CbamDeployError(f"{out_path.name}: the gate policy --gates {gates} does not hold: "
                              + "; ".join(check["broken"][:4]))
    tail_record = check_program_tail(quantized, CHECKED_ON)
    if tail_record["held"] is False:
        raise CbamDeployError(f"{out_path.name}: the output tail is quantized: {tail_record['broken'][0]}")
    try:
        export = export_pte(module, out_path, bounds, precision="int8", program=quantized, rewrites=rewrite_record,
                            names=names)
    except CbamDeployError:
        raise
    except Exception as exc:  # ExecuTorch's lowering raises what its passes raise
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CbamDeployError(f"ExecuTorch could not lower the INT8 program: {type(exc).__name__}: {text}") from None
    q_nodes = sum(1 for n in quantized.graph.nodes if "quantize_per_tensor" in str(n.target)
                  and "dequantize" not in str(n.target))
    info = {
        "recipe": "executorch", "method": method, "gates": gates,
        "quantizer": "PT2E XNNPACKQuantizer (torchao prepare_pt2e/convert_pt2e)",
        "activations": "int8 per tensor (affine), minmax observers",
        "weights": "int8 symmetric, per output channel",
        "gate_nodes": len(gate_nodes), "excluded_nodes": len(gate_nodes) if gates == "fp" else 0,
        "gate_check": check, "output_tail": {**tail_record, "excluded_nodes": len(tail), "float_layers": len(boundary)},
        "quantize_nodes": q_nodes,
        "calibration_cache": {"path": str(cache_path), "hit": cache_hit} if cache_path is not None else
                             {"path": None, "hit": False, "reason": "disabled"},
        "export": export, "calibration_seconds": round(time.perf_counter() - started, 2),
    }
    return RecipeResult(out_path, "executorch", info)


__all__ = ["CHECKED_ON", "METHODS", "RecipeResult", "cache_key", "quantize_pte"]
