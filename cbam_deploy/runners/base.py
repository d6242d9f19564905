"""The Runner interface every backend implements."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from ..outputs import concat_outputs


class Runner(ABC):
    """Loads one model or artifact; ``infer`` maps an NCHW float32 batch to every output, by name, in
    the model's order (see ``cbam_deploy.outputs``); ``run`` gives the first output alone."""

    backend: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    # bench waits this long (untimed) after each of this runner's calls before the next runner's, so
    # that the threads it leaves busy do not slow whoever runs next
    settle_seconds: float = 0.0

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch (N, C, H, W float32); every output as float32, by name."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output (a classifier's logits)."""
        return next(iter(self.infer(batch).values()))

    def infer_batched(self, inputs: np.ndarray, batch: int) -> dict[str, np.ndarray]:
        """``infer`` in chunks of ``batch``, outputs joined along the batch axis."""
        return concat_outputs([self.infer(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])

    def run_batched(self, inputs: np.ndarray, batch: int) -> np.ndarray:
        """Run ``inputs`` in chunks of ``batch`` and join the first output."""
        return np.concatenate([self.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])

    def run_timed(self, batch: np.ndarray) -> tuple[float, float | None]:
        """(end-to-end milliseconds on the host clock, device compute milliseconds or None). GPU
        runners measure compute with CUDA events, so the copies can be reported apart."""
        start = time.perf_counter()
        self.infer(batch)
        return (time.perf_counter() - start) * 1e3, None

    def threads(self) -> int | None:
        """Compute threads the backend uses (None when it does not say)."""
        return None

    def computed_precision(self) -> str | None:
        """The precision the runtime really computes in (fp32, fp16, bf16), as the runtime itself reports
        it once the model is compiled; None when the runtime does not say (then it is ``precision``)."""
        return None

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "precision": self.precision, "threads": self.threads()}
