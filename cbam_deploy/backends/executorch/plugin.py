"""The ExecuTorch format's row: a ``.pte`` with the XNNPACK delegate (and its sidecar: input bounds, output
names, partitions), made from the PyTorch model with ``torch.export`` (fp32 by the build, INT8 by the
PT2E ``executorch`` recipe); batch bounds from the sidecar's record; its gate policy checked on the PT2E
program it was lowered from (the delegate payload is opaque); no gate maps and no per-op profile from
the Python runtime; not servable in Triton or KServe."""

from __future__ import annotations

from pathlib import Path

from ...calib.recipes import RecipeResult
from ...formats import Format, Recipe, Runtime
from ..base import TensorRTOptions
from .exporter import EXECUTORCH, NO_GATE_MAPS, NO_PROFILE, default_bounds, export_pte, sidecar_path
from .peers import PEERS
from .recipe import quantize_pte
from .runner import ExecuTorchRunner

MLP_BATCHED_NOTE = "mlp-batched is not applied: its sum over the batch axis and scaled bias do not lower to XNNPACK"


def _open(path: Path, precision: str, threads: int | None):
    return ExecuTorchRunner(path, precision=precision, threads=threads)


def bounds_for(bundle, options=None):
    """The input bounds of a program made for the bundle: its fixed dims fixed, a dynamic batch over the
    batch profile's range (``--min-batch``..``--max-batch``), a dynamic H/W from half to twice its side. A
    model whose traced graphs hold one batch (``model.trace_batch``: a YOLO head) gets that batch alone."""
    trt = (options.trt if options is not None else None) or TensorRTOptions()
    low, high = trt.min_batch, trt.max_batch
    traced = bundle.model.raw.get("trace_batch")
    if isinstance(traced, int) and traced > 0:
        low = high = traced
    return default_bounds(list(bundle.input.shape), bundle.input.side, low, high)


def cbam_opt_record(bundle, rewrite: dict | None) -> dict:
    mode = bundle.cbam_opt.get("mode", "on")
    record = {"mode": mode, "rewrites": [rewrite] if rewrite else []}
    if mode == "on":
        record["note"] = MLP_BATCHED_NOTE
    return record


def _pt2e(job) -> RecipeResult:
    bounds = bounds_for(job.bundle)
    result = quantize_pte(job.module, job.out_path, job.data, bounds, job.gates, job.expected, job.method,
                          min(job.calib_batch, bounds.batch[1]),
                          job.cache_dir / "executorch" if job.cache_dir else None, job.source_sha, rewrite=job.rewrite)
    result.export = result.info.pop("export")
    return result


class ExecuTorchFormat(Format):
    name = "executorch"
    title = "ExecuTorch program (XNNPACK)"
    extension = "pte"
    precisions = ("fp32", "int8")
    int8_recipe = "executorch"
    build_source = "pytorch"
    made_from_pytorch = "ExecuTorch programs are made from the PyTorch model"
    extra = EXECUTORCH
    runtimes = (Runtime("executorch", ("executorch",), "ExecuTorch runtime with the XNNPACK delegate (CPU: x86 and ARM)",
                        EXECUTORCH.probe, _open),)
    preferred_runtimes = ("executorch",)
    recipes = (Recipe("executorch", "executorch", "PT2E with ExecuTorch's XNNPACK quantizer, from the PyTorch model",
                      _pt2e, methods=("minmax",), from_pytorch=True,
                      refusal="the executorch recipe (PT2E) calibrates with minmax observers only"),)
    no_triton = ("ExecuTorch programs (.pte) are not servable in Triton/KServe (no backend there runs them); serve them "
                 "with 'cbam-deploy serve'")
    no_gates = NO_GATE_MAPS
    no_profile = NO_PROFILE

    def companions(self, path: Path) -> tuple[str, ...]:
        return (sidecar_path(path).name,)  # input bounds, output names, partitions

    def make(self, job) -> dict:
        info = export_pte(job.module, job.out_path, bounds_for(job.bundle, job.options),
                          rewrite=job.bundle.cbam_opt.get("mode", "on") == "on")
        info["cbam_opt"] = cbam_opt_record(job.bundle, info["rewrites"][0] if info["rewrites"] else None)
        return info

    def check_policy(self, artifact, graph, found, expected, policy) -> dict:
        """The check made at build on the PT2E-converted program: the .pte's XNNPACK payload is opaque."""
        recorded = (artifact.quantization or {}).get("gate_check")
        if not isinstance(recorded, dict) or recorded.get("policy") != policy:
            return {"policy": policy, "held": None, "skipped": "no gate check recorded with the artifact: build it again"}
        return {**recorded, "note": "checked at build on the PT2E-converted program; the .pte's XNNPACK payload is "
                                    "opaque to the runtime"}

    def batch_bounds(self, artifact: dict) -> tuple[int, int] | None:
        bounds = (artifact.get("export") or {}).get("bounds")
        return (int(bounds["batch"][0]), int(bounds["batch"][1])) if bounds else None

    def summary(self, artifact) -> dict:
        export = artifact.export or {}
        outside = ", ".join(f"{op} x{n}" for op, n in (export.get("outside_delegate") or {}).items())
        return {"partitions": export.get("partitions"), "outside_delegate": export.get("outside_delegate"),
                "note": f"{export.get('partitions')} delegate partition(s); outside the delegate: {outside or 'nothing'}"}

    def peers(self) -> dict:
        return dict(PEERS)


FORMAT = ExecuTorchFormat()
