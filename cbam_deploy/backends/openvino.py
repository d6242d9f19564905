"""OpenVINO IR artifacts (.xml + .bin), converted from the bundle's FP32 ONNX, run by OpenVINO."""

from __future__ import annotations

from pathlib import Path

from . import Backend, BuildOptions, TritonFragment, register


def build(bundle_dir: Path, precision: str, options: BuildOptions):
    """fp32/fp16 IR from the FP32 ONNX, committed as one transaction."""
    from ..build import BuildOutcome, commit_artifact
    from ..bundle import Bundle
    from ..errors import BackendUnavailable
    from ..exporters.openvino import export_ir
    from ..transaction import BundleUpdate

    if precision not in ("fp32", "fp16"):
        return BuildOutcome("openvino", precision, skipped="OpenVINO INT8 IR comes from the openvino quantize recipe")
    bundle = Bundle.open(bundle_dir)
    bundle.path_of("onnx-fp32")
    with BundleUpdate(bundle_dir) as update:
        source, onnx_path = bundle.snapshot("onnx-fp32", update)
        try:
            info = export_ir(onnx_path, update.stage_artifact("openvino", precision), precision)
        except BackendUnavailable as exc:
            return BuildOutcome("openvino", precision, skipped=str(exc))
        hint = {"fp32": "f32", "fp16": "f16"}[precision]
        artifact = update.add_artifact("openvino", precision, source_sha256=source.sha256,
                                       export={**info, "inference_precision_hint": hint})
        commit_artifact(update, source.sha256)
    return BuildOutcome("openvino", precision, artifact["name"])


def probe() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("openvino") else "OpenVINO is not installed: pip install 'cbam-deploy[openvino]'"


BACKEND = register(Backend(
    format="openvino", title="OpenVINO IR", extension="xml", precisions=("fp32", "fp16"), quantize_recipe="openvino",
    preferred_runtimes=("openvino",),
    triton=TritonFragment('backend: "openvino"', ("model.xml", "model.bin"), "KIND_CPU", ("KIND_CPU",)),
    build=build, probe=probe, companions=lambda xml: (Path(xml).with_suffix(".bin").name,),  # the weights
))
