"""onnxruntime, CPU execution provider by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CbamDeployError
from .base import Runner


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CbamDeployError("onnxruntime is not installed: pip install onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between runs: a spinning thread pool steals the CPU from whatever runs
        # next (another runner in an interleaved benchmark, the server's other work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise CbamDeployError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.device = "cpu" if self.session.get_providers()[0] == "CPUExecutionProvider" else self.session.get_providers()[0]
        self.precision = precision

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)
