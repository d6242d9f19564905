"""Loaders: open a bundle's artifact under a runtime (its sha256 checked first), and rebuild the
PyTorch original the bundle was made from (the reference every check compares with)."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .errors import CbamDeployError
from .fsutil import sha256_file
from .models import build_model, state_fingerprint
from .runners import Runner, TorchRunner
from .runtimes import select_runtime

__all__ = ["is_stand_in", "open_artifact", "reference_runner"]


def open_artifact(bundle_dir: str | Path | None, manifest, name: str, threads: int | None = None,
                  runtime: str | None = None) -> Runner:
    """A runner for one artifact of a bundle (a ``Bundle`` or a manifest dict; its sha256 checked
    first), under ``runtime`` (a name from ``cbam_deploy.runtimes.RUNTIMES``; default: the best this
    machine has for the artifact's format). A runtime that is missing here, or does not run that
    format, is refused in one line."""
    bundle = Bundle.of(manifest)
    if bundle_dir is not None and bundle.directory != Path(bundle_dir):  # the folder given wins (a staging folder)
        bundle = Bundle(bundle.manifest, bundle_dir)
    path = bundle.path_of(name)
    artifact = bundle.artifact(name)
    return select_runtime(artifact.format, runtime).open(path, artifact.precision, threads)


def reference_runner(manifest, bundle_dir: str | Path | None = None) -> tuple[Runner, str]:
    """The PyTorch FP32 original, rebuilt from the manifest (a ``Bundle`` or a manifest dict): the
    checkpoint (by its absolute path, checked against its sha256), or for a random-init zoo model the
    same seeded init (checked against the state fingerprint recorded at export). Where neither is
    possible the bundle's FP32 ONNX (checked against PyTorch at export) stands in; the label says so,
    and ``is_stand_in`` tells callers not to count a comparison of that ONNX with itself as a pass."""
    bundle = Bundle.of(manifest, bundle_dir)
    bundle_dir = bundle_dir if bundle_dir is not None else bundle.directory
    model = bundle.model
    if model.weights is not None:
        path = Path(model.weights.path)
        if path.is_file() and sha256_file(path) == model.weights.sha256:
            try:
                loaded = build_model(model.spec, str(path), model.num_classes, model.stem, model.outputs_mode)
                return TorchRunner(loaded.module), "pytorch-fp32"
            except CbamDeployError as exc:
                reason = f"the model could not be rebuilt: {exc}"
        else:
            reason = f"checkpoint {path} missing or changed"
    elif model.init:
        loaded = build_model(model.spec, None, model.num_classes, model.stem, model.outputs_mode)
        if state_fingerprint(loaded.module) == model.init["state_sha256"]:
            return TorchRunner(loaded.module), "pytorch-fp32"
        reason = "random init: this torch rebuilds different weights from the same seed"
    else:
        reason = "no checkpoint: a random-init model that cannot be rebuilt"
    if bundle_dir is None:
        raise CbamDeployError(f"cannot rebuild the PyTorch model ({reason})")
    # on onnxruntime's CPU provider whatever else this machine has: a reference must not compute in TF32
    return open_artifact(bundle_dir, bundle, "onnx-fp32", runtime="ort-cpu"), f"onnx-fp32 (stand-in: {reason})"


def is_stand_in(reference: Runner) -> bool:
    """Whether the reference is the bundle's ONNX rather than the PyTorch original."""
    return not isinstance(reference, TorchRunner)
