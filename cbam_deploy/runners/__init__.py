"""One Runner interface over the inference backends: ``infer(batch) -> outputs``.

``TorchRunner`` (the eager original), ``OnnxRuntimeRunner``, ``OpenVINORunner`` and
``TensorRTRunner`` (``runners.openvino``, ``runners.tensorrt``: their libraries are optional).
Which runner opens which artifact is ``cbam_deploy.runtimes``; opening a bundle's artifact, and
rebuilding the PyTorch original a bundle was made from, is ``cbam_deploy.loaders``.
"""

from __future__ import annotations

from .base import Runner
from .onnxruntime import OnnxRuntimeRunner
from .torch import TorchRunner

__all__ = ["OnnxRuntimeRunner", "Runner", "TorchRunner"]
