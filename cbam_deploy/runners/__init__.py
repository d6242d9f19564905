"""One Runner interface over the inference backends: ``run(batch) -> outputs``.

``TorchRunner`` (the eager original), ``OnnxRuntimeRunner``, ``OpenVINORunner`` (imported when
used). ``open_artifact`` picks the runner for a bundle artifact; ``reference_runner`` rebuilds the
PyTorch original a bundle was made from.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CbamDeployError
from .base import Runner
from .onnxruntime import OnnxRuntimeRunner
from .torch import TorchRunner

__all__ = ["OnnxRuntimeRunner", "Runner", "TorchRunner", "open_artifact", "reference_runner"]


def open_artifact(bundle_dir: str | Path, manifest: dict, name: str, threads: int | None = None) -> Runner:
    """A runner for one artifact of a bundle (its sha256 checked first)."""
    from ..bundle import artifact_path

    artifact, path = artifact_path(bundle_dir, manifest, name)
    if artifact["format"] == "onnx":
        return OnnxRuntimeRunner(path, threads=threads, precision=artifact["precision"])
    if artifact["format"] == "openvino":
        from .openvino import OpenVINORunner

        return OpenVINORunner(path, precision=artifact["precision"], threads=threads)
    if artifact["format"] == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(path, precision=artifact["precision"])
    raise CbamDeployError(f"no runner for artifact format {artifact['format']!r}")


def reference_runner(manifest: dict, bundle_dir: str | Path | None = None) -> tuple[Runner, str]:
    """The PyTorch FP32 original, rebuilt from the manifest (model, stem, classes, checkpoint with its
    sha256). Where there is no checkpoint (random init) or it is gone, the bundle's FP32 ONNX
    (itself parity-checked against PyTorch at export) stands in, and the label says so."""
    from ..fsutil import sha256_file
    from ..models import build_model

    model = manifest["model"]
    weights = model.get("weights")
    usable = weights is not None and Path(weights["path"]).is_file() and sha256_file(weights["path"]) == weights["sha256"]
    if usable:
        try:
            loaded = build_model(model["name"], weights["path"], model["num_classes"], model["stem"])
            return TorchRunner(loaded.module), "pytorch-fp32"
        except CbamDeployError:
            pass
    if bundle_dir is None:
        raise CbamDeployError("cannot rebuild the PyTorch model: its checkpoint is missing or changed")
    reason = "no checkpoint: random init" if weights is None else "checkpoint missing or changed"
    return open_artifact(bundle_dir, manifest, "onnx-fp32"), f"onnx-fp32 (stand-in, {reason})"
