"""What every format's build and INT8 recipe share: their options, the jobs a row is handed, their
outcome, and the one build skeleton (open, stage, make, record, commit) each format fills with its
``make`` step (``formats.Format.make``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..errors import BackendUnavailable
from ..formats import Format, Recipe
from ..manifest import ROOT_ARTIFACT, artifact_name
from ..transaction import BundleUpdate, commit_from_source


@dataclass
class TensorRTOptions:
    """The batch profile (also the batch bounds of an ExecuTorch program) and an engine builder's knobs."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_mb: int = 2048
    timing_cache: str | None = None
    dla_core: int | None = None


@dataclass(frozen=True)
class BuildOptions:
    """What a build may need beyond the bundle: the INT8 gate policy, the batch profile and engine knobs
    (``trt``), and for formats built from the PyTorch model, ``pytorch_model``: a call giving (the
    bundle's model rebuilt under the user's trust, "") or (None, why it cannot be), made by
    ``cbam_deploy.build`` (a format package never rebuilds models itself)."""

    gates: str | None = None
    trt: TensorRTOptions | None = None
    pytorch_model: Callable[[], tuple[object, str]] | None = None


@dataclass
class BuildOutcome:
    format: str
    precision: str
    name: str | None = None
    skipped: str | None = None
    failed: str | None = None
    seconds: float | None = None
    size_bytes: int | None = None


@dataclass
class BuildJob:
    """What a format's ``make`` step is handed: the bundle as opened, the precision, where to write the
    artifact's file (its companions beside it), the checked source (a snapshot of the FP32 ONNX, or of
    the INT8 recipe's artifact for a format built from one), the PyTorch model for formats built from
    it, the options, and ``update`` for intermediates (``update.path(name)``, never committed unless
    recorded). ``record`` gathers fields for the artifact's manifest record beside ``export``."""

    bundle: Bundle
    precision: str
    out_path: Path
    source_path: Path | None
    module: Any
    options: BuildOptions
    update: BundleUpdate
    record: dict = field(default_factory=dict)


@dataclass
class RecipeJob:
    """What an INT8 recipe (``formats.Recipe.run``) is handed: the bundle, the recipe and its resolved
    method and gate policy, the checked FP32 ONNX snapshot, the calibration set (decoded once for every
    target), the gates the PyTorch model has, the batch, the recipe's cache folder (None: no cache),
    where to write the artifact, the PyTorch model (``from_pytorch`` recipes), whether the bundle's
    CBAM rewrites are on, and ``update`` for intermediates."""

    bundle: Bundle
    recipe: Recipe
    method: str
    gates: str
    fp32_path: Path
    source_sha: str
    data: Any
    expected: list | None
    calib_batch: int
    cache_dir: Path | None
    out_path: Path
    module: Any
    rewrite: bool
    update: BundleUpdate


def commit_artifact(update: BundleUpdate, source_sha: str) -> None:
    """Commit the artifacts built in ``update`` (``update.add_artifact``), unless the ONNX they were
    built from was replaced meanwhile."""
    built = ", ".join(a["name"] for a in update.added)
    commit_from_source(update, source_sha, f"{built} was built from it", "build again")


def build_artifact(row: Format, bundle: Bundle, precision: str, options: BuildOptions) -> BuildOutcome:
    """The one build skeleton: check what cannot be built here (one line each), snapshot the source in a
    ``BundleUpdate``, let the format ``make`` its file(s), record and commit them as one transaction."""
    if row.root and precision == "fp32":  # the export made it
        return BuildOutcome(row.name, precision, ROOT_ARTIFACT)
    why = row.skip_build(precision) or row.probe()
    if why:
        return BuildOutcome(row.name, precision, skipped=why)
    module = None
    if row.build_source == "pytorch":
        module, why = options.pytorch_model() if options.pytorch_model else (None, "no way to rebuild it was given")
        if module is None:
            made = row.made_from_pytorch or f"{row.title} is made from the PyTorch model"
            return BuildOutcome(row.name, precision, skipped=f"{made}, which is not available here: {why}")
    source_name = ROOT_ARTIFACT
    if precision == "int8" and row.int8_from_recipe_artifact:
        source_name = artifact_name(row.name, "int8", row.int8_recipe, options.gates)  # the recipe's artifact
    with BundleUpdate(bundle.directory) as update:
        root_record = bundle.artifact(ROOT_ARTIFACT)
        _, source_path = bundle.snapshot(source_name, update)
        job = BuildJob(bundle, precision, update.stage_artifact(row.name, precision), source_path, module, options,
                       update)
        try:
            export = row.make(job)
        except BackendUnavailable as exc:
            return BuildOutcome(row.name, precision, skipped=str(exc))
        artifact = update.add_artifact(row.name, precision, source_sha256=root_record.sha256, export=export, **job.record)
        commit_artifact(update, root_record.sha256)
    return BuildOutcome(row.name, precision, artifact["name"], size_bytes=artifact.get("size_bytes"))
