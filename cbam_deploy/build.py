"""Build the bundle's other artifacts from its FP32 ONNX: OpenVINO IR and TensorRT engines in
fp32/fp16/int8, INT8 ONNX. What cannot be built here is returned as skipped, with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bundle import artifact_file, artifact_name, artifact_path, new_artifact, read_manifest, snapshot_artifact, upsert_artifact
from .errors import BackendUnavailable, CbamDeployError
from .transaction import BundleUpdate

FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
QUANT_TARGET = {"onnx": "ort-cpu", "openvino": "openvino", "tensorrt": "tensorrt"}


@dataclass
class TensorRTOptions:
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 2048
    timing_cache: str | None = None
    dla_core: int | None = None


@dataclass
class BuildOutcome:
    format: str
    precision: str
    name: str | None = None
    skipped: str | None = None


def comma_list(value: str | list[str], what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """'a,b' -> ['a', 'b'], checked against ``allowed`` when given; the error names the option."""
    items = value if isinstance(value, list) else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad or not items:
        choices = f" of {', '.join(allowed)}" if allowed else ""
        raise CbamDeployError(f"--{what} takes a comma list{choices}; got {', '.join(bad) or 'nothing'}")
    return items


def build_artifacts(bundle_dir: str | Path, formats: str | list[str], precisions: str | list[str],
                    calib_data: str | None = None, calib_size: int = 128, gates: str | None = None,
                    trt: TensorRTOptions | None = None) -> list[BuildOutcome]:
    bundle_dir = Path(bundle_dir)
    formats = comma_list(formats, "format", FORMATS)
    precisions = comma_list(precisions, "precision", PRECISIONS)
    outcomes: list[BuildOutcome] = []
    if "int8" in precisions:
        from .quantize import quantize_bundle

        for fmt in formats:
            target = QUANT_TARGET[fmt]
            if not calib_data:
                outcomes.append(BuildOutcome(fmt, "int8", skipped="INT8 needs --calib-data (images, .npy/.npz or 'synthetic')"))
                continue
            try:
                quantize_bundle(bundle_dir, [target], calib_data, calib_size=calib_size, gates=gates)
            except BackendUnavailable as exc:
                outcomes.append(BuildOutcome(fmt, "int8", skipped=str(exc)))
                continue
            if fmt != "tensorrt":  # the tensorrt Q/DQ ONNX becomes an engine below
                outcomes.append(BuildOutcome(fmt, "int8", artifact_name("int8", "int8", target, gates)))
    for fmt in formats:
        for precision in precisions:
            if fmt == "onnx" and precision == "fp32":
                outcomes.append(BuildOutcome("onnx", "fp32", "onnx-fp32"))
            elif fmt == "onnx" and precision == "fp16":
                outcomes.append(BuildOutcome("onnx", "fp16", skipped="onnxruntime's CPU provider has no fast fp16 kernels; "
                                             "fp16 is built as OpenVINO IR or a TensorRT engine"))
            elif fmt == "openvino" and precision in ("fp32", "fp16"):
                outcomes.append(_build_openvino(bundle_dir, precision))
            elif fmt == "tensorrt":
                if precision == "int8" and not calib_data:
                    continue  # already reported above
                outcomes.append(_build_tensorrt(bundle_dir, precision, trt or TensorRTOptions(), gates))
    return outcomes


def _commit_artifact(update: BundleUpdate, source_sha: str, artifact: dict) -> None:
    """Commit one built artifact, unless the ONNX it was built from was replaced meanwhile."""
    artifact["source_sha256"] = source_sha

    def merge(current: dict) -> dict:
        onnx_now = next((a for a in current["artifacts"] if a["name"] == "onnx-fp32"), None)
        if onnx_now is None or onnx_now["sha256"] != source_sha:
            raise CbamDeployError(f"bundle {update.bundle_dir} was re-exported while {artifact['name']} was built "
                                  "from it; build again")
        upsert_artifact(current, artifact)
        return current

    update.commit(merge)


def _build_openvino(bundle_dir: Path, precision: str) -> BuildOutcome:
    from .exporters.openvino import export_ir

    manifest = read_manifest(bundle_dir)
    artifact_path(bundle_dir, manifest, "onnx-fp32")
    name = artifact_name("openvino", precision)
    with BundleUpdate(bundle_dir) as update:
        source, onnx_path = snapshot_artifact(bundle_dir, manifest, "onnx-fp32", update)
        xml = update.path(artifact_file(name, "openvino"))
        try:
            info = export_ir(onnx_path, xml, precision)
        except BackendUnavailable as exc:
            return BuildOutcome("openvino", precision, skipped=str(exc))
        _commit_artifact(update, source["sha256"], new_artifact(
            update.staging, name, "openvino", precision, (xml.with_suffix(".bin").name,),
            export={**info, "inference_precision_hint": {"fp32": "f32", "fp16": "f16"}[precision]}))
    return BuildOutcome("openvino", precision, name)


def _build_tensorrt(bundle_dir: Path, precision: str, options: TensorRTOptions, gates: str | None = None) -> BuildOutcome:
    from .exporters.tensorrt import (Profile, build_engine, current_gpu, default_timing_cache, fp16_onnx, parse_version,
                                     plan_build, require_tensorrt, sidecar)

    try:
        trt = require_tensorrt()
        current_gpu()
    except BackendUnavailable as exc:
        return BuildOutcome("tensorrt", precision, skipped=str(exc))
    manifest = read_manifest(bundle_dir)
    plan = plan_build(parse_version(trt.__version__), precision, options.dla_core)
    name = artifact_name("tensorrt", precision)
    with BundleUpdate(bundle_dir) as update:
        onnx_fp32, _ = artifact_path(bundle_dir, manifest, "onnx-fp32", verify_hash=False)
        if plan.onnx_variant == "qdq":
            _, source = snapshot_artifact(bundle_dir, manifest, artifact_name("int8", "int8", "tensorrt", gates), update)
        else:
            _, source = snapshot_artifact(bundle_dir, manifest, "onnx-fp32", update)
            if plan.onnx_variant == "fp16":
                fp16_path = update.path(".source.fp16.onnx")  # an intermediate: not committed
                fp16_onnx(source, fp16_path)
                source = fp16_path
        engine = update.path(artifact_file(name, "tensorrt"))
        profile = Profile(options.min_batch, options.opt_batch, options.max_batch)
        timing_cache = Path(options.timing_cache) if options.timing_cache else default_timing_cache()
        metadata = build_engine(source, engine, precision, manifest["input"]["shape"], profile, options.workspace_mb,
                                timing_cache, options.dla_core, bundle_dir=bundle_dir)
        _commit_artifact(update, onnx_fp32["sha256"], new_artifact(
            update.staging, name, "tensorrt", precision, (sidecar(engine).name,), export=metadata))
    return BuildOutcome("tensorrt", precision, name)
