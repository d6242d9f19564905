"""One Runner interface over the inference backends: ``run(batch) -> outputs``.

Implementations here: ``TorchRunner`` (the eager original) and ``OnnxRuntimeRunner``. OpenVINO and
TensorRT runners arrive with their exporters.
"""

from .base import Runner
from .onnxruntime import OnnxRuntimeRunner
from .torch import TorchRunner

__all__ = ["OnnxRuntimeRunner", "Runner", "TorchRunner"]
