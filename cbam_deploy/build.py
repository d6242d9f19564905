"""Build the bundle's other artifacts from its FP32 ONNX, for every backend of the table
(``cbam_deploy.backends``): each backend's ``build`` per precision, INT8 through its quantize recipe.
What cannot be built here is returned as skipped, with its reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backends import BuildOptions
from .backends import formats as backend_formats
from .backends import get as get_backend
from .bundle import artifact_name
from .errors import BackendUnavailable, CbamDeployError
from .transaction import BundleUpdate

PRECISIONS = ("fp32", "fp16", "int8")


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
                    trt: TensorRTOptions | None = None, trust=None) -> list[BuildOutcome]:
    bundle_dir = Path(bundle_dir)
    formats = comma_list(formats, "format", backend_formats())
    precisions = comma_list(precisions, "precision", PRECISIONS)
    outcomes: list[BuildOutcome] = []
    if "int8" in precisions:
        from .quantize import quantize_bundle

        for fmt in formats:
            target = get_backend(fmt).quantize_recipe
            if not calib_data:
                outcomes.append(BuildOutcome(fmt, "int8", skipped="INT8 needs --calib-data (images, .npy/.npz or 'synthetic')"))
                continue
            try:
                quantize_bundle(bundle_dir, [target], calib_data, calib_size=calib_size, gates=gates, trust=trust)
            except BackendUnavailable as exc:
                outcomes.append(BuildOutcome(fmt, "int8", skipped=str(exc)))
                continue
            if fmt != "tensorrt":  # the tensorrt Q/DQ ONNX becomes an engine below
                outcomes.append(BuildOutcome(fmt, "int8", artifact_name("int8", "int8", target, gates)))
    for fmt in formats:
        backend = get_backend(fmt)
        for precision in precisions:
            if fmt == "tensorrt" and precision == "int8" and not calib_data:
                continue  # already reported above
            if precision == "int8" and fmt != "tensorrt":
                continue  # the recipe's output is the artifact (above)
            if precision not in backend.precisions:
                outcomes.append(BuildOutcome(fmt, precision, skipped=f"{backend.title} is not built in {precision} here"))
                continue
            missing = backend.probe()
            if missing:
                outcomes.append(BuildOutcome(fmt, precision, skipped=missing))
                continue
            outcomes.append(backend.build(bundle_dir, precision, BuildOptions(gates=gates, trt=trt)))
    return outcomes


def commit_artifact(update: BundleUpdate, source_sha: str) -> None:
    """Commit the artifacts built in ``update`` (``update.add_artifact``), unless the ONNX they were
    built from was replaced meanwhile."""

    def check(current: dict) -> dict:
        onnx_now = next((a for a in current["artifacts"] if a["name"] == "onnx-fp32"), None)
        if onnx_now is None or onnx_now["sha256"] != source_sha:
            built = ", ".join(a["name"] for a in update.added)
            raise CbamDeployError(f"bundle {update.bundle_dir} was re-exported while {built} was built from it; "
                                  "build again")
        return current

    update.commit(check)
