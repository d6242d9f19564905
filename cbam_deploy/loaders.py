"""Loaders: open a bundle's artifact under a runtime (its sha256 checked first), and rebuild the
PyTorch original the bundle was made from (the reference every check compares with), running a
factory's code only where the user trusts it."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .errors import CbamDeployError
from .fsutil import UnsafePath, sha256_no_follow
from .models import build_model, factory_to_run, is_factory_spec, state_fingerprint
from .runners.base import Runner
from .runners.torch import TorchRunner
from .runtimes import select_runtime

__all__ = ["is_stand_in", "model_spec_to_run", "open_artifact", "reference_runner", "untrusted_code"]


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


def model_spec_to_run(model, trust=None) -> tuple[str | None, str]:
    """What ``models.build_model`` may be given to rebuild a bundle's model (``bundle.ModelInfo``):
    the zoo name, or a factory the user trusts (``models.CodeTrust``); else (None, why not). A manifest
    that names Python code (a factory, whatever its ``source`` says) never gets it run by itself."""
    if model.source == "factory" or is_factory_spec(model.spec) or model.factory:
        return factory_to_run(model.spec, model.factory_sha256, trust)
    if trust is not None and trust.factory is not None:
        raise CbamDeployError(f"--model {trust.factory}: this bundle's model is the zoo model {model.name}, not a "
                              "factory; leave --model out")
    return model.spec, ""


def untrusted_code(manifest, trust=None) -> str | None:
    """Why the bundle's PyTorch model may not be rebuilt here (its code is not trusted), or None."""
    return model_spec_to_run(Bundle.of(manifest).model, trust)[1] or None


def reference_runner(manifest, bundle_dir: str | Path | None = None, trust=None) -> tuple[Runner, str]:
    """The PyTorch FP32 original, rebuilt from the manifest (a ``Bundle`` or a manifest dict): the
    checkpoint (by its absolute path, checked against its sha256), or for a random-init zoo model the
    same seeded init (checked against the state fingerprint recorded at export). A factory model is
    rebuilt only with ``trust`` (``models.CodeTrust``): code from a bundle never runs by itself. Where
    the model cannot be rebuilt the bundle's FP32 ONNX (checked against PyTorch at export) stands in;
    the label says so, and ``is_stand_in`` tells callers not to count a comparison of that ONNX with
    itself as a pass."""
    bundle = Bundle.of(manifest, bundle_dir)
    bundle_dir = bundle_dir if bundle_dir is not None else bundle.directory
    model = bundle.model
    spec, reason = model_spec_to_run(model, trust)
    if spec is None:
        reason = f"not rebuilt: {reason}"
    elif model.weights is not None:
        path = Path(model.weights.path)
        try:  # a regular file (not a FIFO or a device), by its recorded sha256, loaded with weights_only
            matches = sha256_no_follow(path) == model.weights.sha256
        except (OSError, UnsafePath):
            matches = False
        if matches:
            try:
                loaded = build_model(spec, str(path), model.num_classes, model.stem, model.outputs_mode,
                                     model.factory_sha256)
                return TorchRunner(loaded.module), "pytorch-fp32"
            except CbamDeployError as exc:
                reason = f"the model could not be rebuilt: {exc}"
        else:
            reason = f"checkpoint {path} missing or changed"
    elif model.init:
        loaded = build_model(spec, None, model.num_classes, model.stem, model.outputs_mode, model.factory_sha256)
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
