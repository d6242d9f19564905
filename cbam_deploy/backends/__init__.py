"""The builds, one module per format: each row of the formats table (``cbam_deploy.formats``) with
the function that builds that format's artifacts from the bundle's FP32 ONNX.

``build(bundle_dir, precision, options) -> BuildOutcome`` commits what it built as one transaction,
or returns the outcome as skipped, with the reason, where this machine cannot build it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from ..formats import Format
from ..formats import formats as formats
from ..formats import get as get_format
from . import onnxruntime, openvino, tensorrt
from .executorch import build as executorch_build
from .base import BuildOptions, BuildOutcome

BUILDERS: dict[str, Callable[[Path, str, BuildOptions], BuildOutcome]] = {
    "onnx": onnxruntime.build,
    "openvino": openvino.build,
    "tensorrt": tensorrt.build,
    "executorch": executorch_build.build,
}


@dataclass(frozen=True)
class Backend(Format):
    """A format's row and its build."""

    build: Callable[[Path, str, BuildOptions], BuildOutcome] | None = None


def get(fmt: str) -> Backend:
    row = get_format(fmt)
    return Backend(**{f.name: getattr(row, f.name) for f in fields(Format)}, build=BUILDERS[fmt])


def all_backends() -> list[Backend]:
    return [get(fmt) for fmt in formats()]
