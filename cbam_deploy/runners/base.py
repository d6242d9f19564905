"""The Runner interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    """Loads one model or artifact; ``run`` maps an NCHW float32 batch to the model's output."""

    backend: str = ""
    device: str = "cpu"
    precision: str = "fp32"

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (N, C, H, W float32) and return the first output as float32."""

    def run_batched(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """Run ``inputs`` in chunks of ``batch`` and join the outputs."""
        return np.concatenate([self.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "precision": self.precision}
