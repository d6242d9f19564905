"""What every format's build shares: its options, its outcome, and the commit that refuses a source
ONNX replaced meanwhile."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CbamDeployError
from ..transaction import BundleUpdate


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
    """What a build may need beyond the bundle: the INT8 gate policy, TensorRT's profile options."""

    gates: str | None = None
    trt: TensorRTOptions | None = None


@dataclass
class BuildOutcome:
    format: str
    precision: str
    name: str | None = None
    skipped: str | None = None


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
