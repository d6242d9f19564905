"""The ExecuTorch build: an fp32 ``.pte`` (XNNPACK delegate) from the bundle's PyTorch model.

ExecuTorch programs come from ``torch.export``, not from the ONNX, so the build takes the PyTorch
model from ``options.pytorch_model()``: the builds table (``cbam_deploy.build``) rebuilds it with the
same trust rules as ``verify`` (through ``loaders``): a zoo model by its recorded weights or
seeded init, a factory only with ``--model file.py:factory`` / ``--trust-code``. Where it cannot be
rebuilt the build is skipped with the reason. The artifact is still tied to the bundle's FP32 ONNX (its
``source_sha256``): a re-export that changes the ONNX drops it, as it drops every derived artifact.

Input bounds: a fixed dim of the bundle stays fixed; a dynamic batch spans ``--min-batch``..``--max-batch``
(the options TensorRT's profile reads too); a dynamic height/width spans half to twice the export
size. ``xnnpack-pools`` is applied unless the bundle was exported with ``--cbam-opt off`` (then the
program is ExecuTorch's documented default path); ``mlp-batched`` is never applied here (it does
not lower to XNNPACK).
"""

from __future__ import annotations

from pathlib import Path

from ...bundle import Bundle
from ...errors import BackendUnavailable
from ...transaction import BundleUpdate
from ..base import BuildOptions, BuildOutcome, commit_artifact
from .exporter import default_bounds, export_pte

MLP_BATCHED_NOTE = "mlp-batched is not applied: its sum over the batch axis and scaled bias do not lower to XNNPACK"


def bounds_for(bundle: Bundle, options: BuildOptions):
    trt = options.trt
    return default_bounds(list(bundle.input.shape), bundle.input.side, trt.min_batch if trt else 1,
                          trt.max_batch if trt else 8)


def cbam_opt_record(bundle: Bundle, rewrite: dict | None) -> dict:
    mode = bundle.cbam_opt.get("mode", "on")
    record = {"mode": mode, "rewrites": [rewrite] if rewrite else []}
    if mode == "on":
        record["note"] = MLP_BATCHED_NOTE
    return record


def build(bundle_dir: Path, precision: str, options: BuildOptions) -> BuildOutcome:
    """The fp32 .pte and its sidecar, committed as one transaction."""
    if precision != "fp32":
        return BuildOutcome("executorch", precision, skipped="ExecuTorch INT8 comes from the executorch quantize recipe")
    bundle = Bundle.open(bundle_dir)
    bundle.path_of("onnx-fp32")
    if options.pytorch_model is None:
        return BuildOutcome("executorch", precision, skipped="ExecuTorch programs are made from the PyTorch model, "
                            "and none was given to this build")
    module, why = options.pytorch_model()
    if module is None:
        return BuildOutcome("executorch", precision, skipped=f"ExecuTorch programs are made from the PyTorch model, "
                            f"which is {why}")
    bounds = bounds_for(bundle, options)
    rewrite = bundle.cbam_opt.get("mode", "on") == "on"
    with BundleUpdate(bundle_dir) as update:
        source, _ = bundle.snapshot("onnx-fp32", update)
        try:
            info = export_pte(module, update.stage_artifact("executorch", precision), bounds, rewrite=rewrite)
        except BackendUnavailable as exc:
            return BuildOutcome("executorch", precision, skipped=str(exc))
        info["cbam_opt"] = cbam_opt_record(bundle, info["rewrites"][0] if info["rewrites"] else None)
        artifact = update.add_artifact("executorch", precision, source_sha256=source.sha256, export=info)
        commit_artifact(update, source.sha256)
    return BuildOutcome("executorch", precision, artifact["name"])


__all__ = ["bounds_for", "build", "cbam_opt_record"]
