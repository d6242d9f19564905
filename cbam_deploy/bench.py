"""Latency measurement: every runner in the same process and run, interleaved, so that a noisy
shared machine hits them alike and ratios against PyTorch stay meaningful."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .runners.base import Runner


def interleaved_latency(runners: dict[str, Runner], batch: np.ndarray, iters: int = 30, warmup: int = 5) -> dict[str, list[float]]:
    """Milliseconds per run for each runner; the runners take turns, one call each per round."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(iters):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(batch)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}
