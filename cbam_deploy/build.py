"""Build the bundle's other artifacts for every format of the table (``cbam_deploy.formats``): each
format's build (``backends/<format>/build.py``, listed in ``BUILDERS``) per precision, INT8 through
its quantize recipe.
What cannot be built here is returned as skipped, with its reason."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from .backends.base import BuildOptions, BuildOutcome, TensorRTOptions
from .backends.executorch import build as executorch_build
from .backends.ncnn import build as ncnn_build
from .backends.onnx import build as onnx_build
from .backends.openvino import build as openvino_build
from .backends.tensorrt import build as tensorrt_build
from .bundle import Bundle
from .checks import parse_list
from .bundle import Bundle
from .errors import BackendUnavailable
from .formats import Format
from .formats import formats as backend_formats
from .formats import get as get_format
from .loaders import is_stand_in, reference_runner
from .manifest import artifact_name
from .quantize import quantize_bundle

# each format's build (backends/<format>/build.py): build(bundle_dir, precision, options) -> BuildOutcome
BUILDERS: dict[str, Callable[[Path, str, BuildOptions], BuildOutcome]] = {
    "onnx": onnx_build.build,
    "openvino": openvino_build.build,
    "tensorrt": tensorrt_build.build,
    "ncnn": ncnn_build.build,
    "executorch": executorch_build.build,
}


@dataclass(frozen=True)
class Backend(Format):
    """A format's row and its build."""

    build: Callable[[Path, str, BuildOptions], BuildOutcome] | None = None


def get_backend(fmt: str) -> Backend:
    row = get_format(fmt)
    return Backend(**{f.name: getattr(row, f.name) for f in fields(Format)}, build=BUILDERS[fmt])


def all_backends() -> list[Backend]:
    return [get_backend(fmt) for fmt in backend_formats()]

PRECISIONS = ("fp32", "fp16", "int8")


def _pytorch_model(bundle_dir: Path, trust):
    """For builds that convert the PyTorch model (``BuildOptions.pytorch_model``): the bundle's model,
    rebuilt as ``verify`` rebuilds it (factory code only under ``trust``), or (None, why not)."""
    def rebuild() -> tuple[object, str]:
        reference, label = reference_runner(Bundle.open(bundle_dir), trust=trust)
        return (None, label) if is_stand_in(reference) else (reference.model, "")
    return rebuild


def build_artifacts(bundle_dir: str | Path, formats: str | list[str], precisions: str | list[str],
                    calib_data: str | None = None, calib_size: int = 128, gates: str | None = None,
                    trt: TensorRTOptions | None = None, trust=None) -> list[BuildOutcome]:
    bundle_dir = Path(bundle_dir)
    formats = parse_list(formats, "--format", backend_formats())
    precisions = parse_list(precisions, "--precision", PRECISIONS)
    outcomes: list[BuildOutcome] = []
    if "int8" in precisions:
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
            outcomes.append(backend.build(bundle_dir, precision, BuildOptions(gates=gates, trt=trt,
                                                                              pytorch_model=_pytorch_model(bundle_dir, trust))))
    return outcomes
