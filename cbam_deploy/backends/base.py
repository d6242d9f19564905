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
    batch range bounds an ExecuTorch program's dynamic batch too), and, for a format made from the
    PyTorch model rather than the ONNX, ``pytorch_model()``: (the bundle's model rebuilt under the
    user's trust, None) or (None, why it cannot be rebuilt here) (``loaders.rebuild_model``)."""

    gates: str | None = None
    trt: TensorRTOptions | None = None
    pytorch_model: Callable[[], tuple] | None = None


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
