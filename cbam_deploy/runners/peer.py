"""What every peer of ``bench --peers`` shares: the runner that wraps what a library built
(``PeerRunner``), what each peer is built from (``PeerSource``), and the helpers their builders use.
The peers themselves live with their engines: PyTorch's in ``cbam_deploy.peers``, each format's in
its row (``formats.Format.peers``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import BackendUnavailable
from .base import Runner

NEEDS_CALIBRATION = "needs calibration data (--calib-data)"


class PeerRunner(Runner):
    """A peer: ``run`` calls what the library built; ``describe`` adds how it was made and what it took."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], backend: str, precision: str, made_by: str,
                 threads: Callable[[], int | None], facts: dict | None = None) -> None:
        self._run = run
        self._threads = threads
        self.backend = backend
        self.precision = precision
        self.made_by = made_by
        self.facts = dict(facts or {})

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The first output (peers are timed, not compared output by output)."""
        return {"output": np.asarray(self._run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)}

    def threads(self) -> int | None:
        return self._threads()

    def describe(self) -> dict:
        return {**super().describe(), "made_by": self.made_by, **self.facts}


class PeerSource:
    """What every builder starts from; the OpenVINO conversion is shared by the two OpenVINO peers."""

    def __init__(self, module: torch.nn.Module, example: np.ndarray, calib: np.ndarray | None, workdir: Path,
                 threads: int | None) -> None:
        self.module = module.eval()
        self.example = np.ascontiguousarray(example, dtype=np.float32)
        self.calib = None if calib is None else np.ascontiguousarray(calib, dtype=np.float32)
        self.workdir = workdir
        self.threads = threads
        self._cache: dict[str, object] = {}

    def example_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.example.copy())

    def example_text(self) -> str:
        return f"torch.randn{tuple(self.example.shape)}"

    def calibration(self) -> np.ndarray:
        if self.calib is None or not len(self.calib):
            raise Skip(NEEDS_CALIBRATION)
        return self.calib

    def cached(self, key: str, make: Callable[[], object]) -> object:
        """What several peers of one engine share (one OpenVINO conversion for its fp32 and INT8 peers)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


class Skip(Exception):
    """A peer that cannot be built here for a known reason (the message)."""


def require(name: str, hint: str):
    try:
        return __import__(name)
    except ImportError:
        raise BackendUnavailable(hint) from None


def timed(call: Callable, *args, **kwargs):
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return result, round(time.perf_counter() - started, 3)
