"""Loaders: open a bundle's artifact under a runtime (its sha256 checked first), and rebuild the
PyTorch original the bundle was made from (the reference every check compares with), running a
factory's code only where the user trusts it."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .formats import root_row
from .manifest import ROOT_ARTIFACT
from .errors import CbamDeployError
from .fsutil import UnsafePath, sha256_no_follow
from .models import build_model, factory_to_run, is_factory_spec, library, match_state_summary, state_fingerprint
from .runners.base import Runner
from .runners.torch import TorchRunner
from .runtimes import select_runtime

__all__ = ["ReferenceModel", "is_stand_in", "model_spec_to_run", "open_artifact", "reference_runner", "untrusted_code"]


def open_artifact(bundle_dir: str | Path | None, manifest, name: str, threads: int | None = None,
                  runtime: str | None = None) -> Runner:
    """A runner for one artifact of a bundle (a ``Bundle`` or a manifest dict; its sha256 checked
    first), under ``runtime`` (a runtime's name; default: the best this machine has for the artifact's
    format). A runtime that is missing here, or does not run that format, is refused in one line. Given
    an open ``Bundle``, the runner is made once per command (``Bundle.memo``) and reused."""
    bundle = Bundle.of(manifest)
    if bundle_dir is not None and bundle.directory != Path(bundle_dir):  # the folder given wins (a staging folder)
        bundle = Bundle(bundle.manifest, bundle_dir)
    artifact = bundle.artifact(name)
    chosen = select_runtime(artifact.format, runtime)
    return bundle.memo("runner", name, lambda: chosen.open(bundle.path_of(name), artifact.precision, threads),
                       chosen.name, threads)


def model_spec_to_run(model, trust=None) -> tuple[str | None, str]:
    """What ``models.build_model`` may be given to rebuild a bundle's model (``bundle.ModelInfo``):
    the zoo name, or a factory the user trusts (``models.CodeTrust``); else (None, why not). A manifest
    that names Python code (a factory, whatever its ``source`` says) never gets it run by itself."""
    source = library(model.source)
    if source is not None:  # a library rebuilds it from its spec; a spec whose files hold code only when trusted
        why = source.needs_trust(model.spec)
        if why and not (trust is not None and (trust.trust_bundle or trust.factory == model.spec)):
            return None, f"{why}: pass --trust-code to rebuild it (only for a bundle you trust)"
        return model.spec, ""
    if model.source == "module":
        return None, (f"it was exported from a module in memory ({model.raw.get('module_class') or model.name}), "
                      "which nothing can rebuild from the bundle: hand it over again (cbam_deploy.Bundle(path, "
                      "model=module)), or export a FILE.py:FACTORY that makes it")
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
    same seeded init (checked against the state fingerprint recorded at export; where the exact sha256
    differs, as it can when another CPU's torch rebuilds the init, against the tolerant
    ``state_summary``, and the label says so). A factory model is
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
                loaded = _rebuild(bundle, spec, str(path), trust)
                return TorchRunner(loaded.module), "pytorch-fp32"
            except CbamDeployError as exc:
                reason = f"the model could not be rebuilt: {exc}"
        else:
            reason = f"checkpoint {path} missing or changed"
    elif model.init:
        loaded = _rebuild(bundle, spec, None, trust)
        if state_fingerprint(loaded.module) == model.init["state_sha256"]:
            return TorchRunner(loaded.module), "pytorch-fp32"
        # another CPU's torch may rebuild the seeded init with different last bits: the same model
        match = match_state_summary(loaded.module, model.init.get("state_summary"))
        if match.matched:
            return TorchRunner(loaded.module), f"pytorch-fp32 ({match.describe()})"
        reason = (f"random init: this torch rebuilds different weights from the same seed ({match.reason})"
                  if model.source == "zoo" else
                  f"{model.spec} now makes a model whose weights differ from the exported one's (its state sha256 "
                  f"changed: the files it loads, or its code; {match.reason})")
    else:
        reason = "no checkpoint: a random-init model that cannot be rebuilt"
    if bundle_dir is None:
        raise CbamDeployError(f"cannot rebuild the PyTorch model ({reason})")
    # on the root format's reference runtime whatever else this machine has: never in TF32 or bf16
    return (open_artifact(bundle_dir, bundle, ROOT_ARTIFACT, runtime=root_row().reference_runtime),
            f"{ROOT_ARTIFACT} (stand-in: {reason})")


def _rebuild(bundle: Bundle, spec: str, weights: str | None, trust):
    """The bundle's model built again, made ready for the bundle's input side (a detector's anchors)."""
    model = bundle.model
    loaded = build_model(spec, weights, model.num_classes, model.stem, model.outputs_mode, trust, model.factory_sha256)
    loaded.prepare_for(bundle.input.side, bundle.input.dynamic_hw)
    return loaded


def is_stand_in(reference: Runner) -> bool:
    """Whether the reference is the bundle's ONNX rather than the PyTorch original."""
    return not isinstance(reference, TorchRunner)


class ReferenceModel:
    """The PyTorch original of a bundle for one command, rebuilt at most once (``reference_runner``), and
    only where its code is trusted; an export hands over the module it has just exported (``module``),
    so nothing is rebuilt at all. Every build, INT8 recipe and check of the command asks this one."""

    def __init__(self, bundle, trust=None, module=None) -> None:
        self.bundle = bundle
        self.trust = trust
        self._made = (TorchRunner(module), "pytorch-fp32") if module is not None else None

    @classmethod
    def handed_over(cls, bundle, module) -> ReferenceModel:
        """The reference a caller hands over (the module a bundle was exported from, in a notebook): it must
        be the same model as at export (its state fingerprint, exact or within the tolerance), else one
        error saying so."""
        init = Bundle.of(bundle).model.init or {}
        if state_fingerprint(module) != init.get("state_sha256"):
            match = match_state_summary(module, init.get("state_summary"))
            if not match.matched:
                raise CbamDeployError(f"the module handed over is not the one this bundle was exported from: "
                                      f"{match.reason or 'its weights differ'}")
        return cls(bundle, module=module.eval())

    def runner(self) -> tuple[Runner, str]:
        """(the reference's runner, its label): PyTorch, or the FP32 ONNX standing in (``is_stand_in``)."""
        if self._made is None:
            self._made = reference_runner(self.bundle, trust=self.trust)
        return self._made

    @property
    def stand_in(self) -> bool:
        return is_stand_in(self.runner()[0])

    def module_or_reason(self) -> tuple[object, str]:
        """(the PyTorch module, "") or (None, why it cannot be had here)."""
        runner, label = self.runner()
        if is_stand_in(runner):
            return None, label.partition("stand-in: ")[2].rstrip(")") or label
        return runner.model, ""
