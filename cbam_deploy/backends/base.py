"""What every format's build shares: its options, its outcome, and the commit that refuses a source
ONNX replaced meanwhile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..transaction import BundleUpdate, commit_from_source


@dataclass
class TensorRTOptions:
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 2048
    timing_cache: str | None = None
    dla_core: int | None = None


@dataclass(frozen=True)
class BuildOptions:
    """What a build may need beyond the bundle: the INT8 gate policy, TensorRT's profile options (whose
    batch range bounds an ExecuTorch program's dynamic batch too), and for formats converted from the
    PyTorch model (ncnn, executorch), ``pytorch_model``: a call giving (the bundle's
    model rebuilt under the user's trust, "") or (None, why it cannot be), made by ``cbam_deploy.build``
    (a format package never rebuilds models itself: that is ``loaders``, a floor above it)."""

    gates: str | None = None
    trt: TensorRTOptions | None = None
    pytorch_model: Callable[[], tuple[object, str]] | None = None


@dataclass
class BuildOutcome:
    format: str
    precision: str
    name: str | None = None
    skipped: str | None = None


def commit_artifact(update: BundleUpdate, source_sha: str) -> None:
    """Commit the artifacts built in ``update`` (``update.add_artifact``), unless the ONNX they were
    built from was replaced meanwhile."""
    built = ", ".join(a["name"] for a in update.added)
    commit_from_source(update, source_sha, f"{built} was built from it", "build again")
