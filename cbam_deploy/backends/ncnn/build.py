"""ncnn artifacts (.param + .bin), converted by pnnx from the PyTorch model the bundle was made from.

pnnx traces the module itself (not the ONNX), so the model is rebuilt (``BuildOptions.pytorch_model``,
given by ``cbam_deploy.build``) under the same trust rules as ``verify``: a zoo model or a checkpoint of one, or a factory the user names
(``--model file.py:factory``) or trusts (``--trust-code``); otherwise the build is skipped with the
reason. Only the .param and .bin enter the bundle (pnnx's other files stay in a temporary folder),
committed as one transaction."""

from __future__ import annotations

from pathlib import Path

from ...bundle import Bundle
from ...errors import BackendUnavailable
from ...transaction import BundleUpdate
from ..base import BuildOptions, BuildOutcome, commit_artifact
from .exporter import PINNED, example_input, ncnn_pair, require_ncnn, require_pnnx


def trusted_module(options: BuildOptions):
    """The bundle's PyTorch model (``options.pytorch_model``); BackendUnavailable with the reason where
    it cannot be rebuilt here (an untrusted factory, a missing checkpoint)."""
    module, why = options.pytorch_model() if options.pytorch_model else (None, "no way to rebuild it was given")
    if module is None:
        raise BackendUnavailable(f"ncnn is converted from the PyTorch model, which is not available here: {why}")
    return module


def build(bundle_dir: Path, precision: str, options: BuildOptions) -> BuildOutcome:
    """The fp32 pair (weights fp32, runtime precision pinned to fp32), committed as one transaction."""
    if precision != "fp32":
        return BuildOutcome("ncnn", precision, skipped="ncnn is built in fp32 here (INT8 comes from the ncnn quantize "
                                                       "recipe); fp16 is a runtime choice of ncnn that cbam-deploy pins off")
    try:
        require_ncnn()
        require_pnnx()
        bundle = Bundle.open(bundle_dir)
        module = trusted_module(options)
    except BackendUnavailable as exc:
        return BuildOutcome("ncnn", precision, skipped=str(exc))
    example, second = example_input(bundle)
    names = [o.name for o in bundle.outputs]
    with BundleUpdate(bundle_dir) as update:
        source, _ = bundle.snapshot("onnx-fp32", update)  # the bundle's identity: a re-export meanwhile is refused
        staged = update.stage_artifact("ncnn", "fp32")
        info = ncnn_pair(module, example, names, staged.parent, staged.stem, second_size=second)
        if info["generic_layers"]:
            info["generic_note"] = ("layers without an optimised (packed) ncnn kernel are left: "
                                    + ", ".join(f"{k} x{v}" for k, v in info["generic_layers"].items()))
        info["precision_pinned"] = {"weights": "fp32", "runtime": PINNED}
        artifact = update.add_artifact("ncnn", "fp32", source_sha256=source.sha256, export=info,
                                       cbam_opt={"mode": "on", "rewrites": [info["rewrite"]]} if "rewrite" in info else None)
        if artifact.get("cbam_opt") is None:
            artifact.pop("cbam_opt")
        commit_artifact(update, source.sha256)
    return BuildOutcome("ncnn", precision, artifact["name"])


__all__ = ["build", "example_input", "trusted_module"]
