"""Statistics a skeptic trusts for latency: medians with bootstrap intervals, ratios of medians from
interleaved rounds (paired bootstrap), and a stability verdict that says when a measurement was
disturbed (spread, drift, other processes' CPU use read from the OS, steal, frequency changes), and
the facts of the machine a measurement ran on (``machine_info``: CPU model, cores, ISA, GPU, Jetson).

Means are not used for anything a user reads: one stall on a shared machine moves a mean by more
than the difference between two engines, while it barely moves a median.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

CONFIDENCE = 0.95
RESAMPLES = 2000
# The verdict's thresholds: a row is "unstable" past any of them.
MAX_SPREAD = 0.5          # (p90 - p50) / p50
MAX_DRIFT = 0.25          # last third's median vs first third's, either way
MAX_OTHER_CPU = 0.20      # other processes' CPU use, as a fraction of all cores
MAX_STEAL = 0.05          # hypervisor steal, as a fraction of all cores
MAX_CI_WIDTH = 0.15       # (high - low) / ratio of a ratio's interval


def median_ci(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median and its percentile-bootstrap interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    boots = np.median(data[rng.integers(0, data.size, (resamples, data.size))], axis=1)
    return _with_estimate(float(np.median(data)), boots, confidence)


def ratio_ci(candidate, reference, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
             seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high) of median(candidate) / median(reference). The two were measured in the same
    interleaved rounds, so rounds are resampled jointly (a paired bootstrap): a stall that hit one
    round hits both sides of it."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    if a.size == b.size:
        index = rng.integers(0, a.size, (resamples, a.size))
        boots = np.median(a[index], axis=1) / np.median(b[index], axis=1)
    else:
        boots = (np.median(a[rng.integers(0, a.size, (resamples, a.size))], axis=1)
                 / np.median(b[rng.integers(0, b.size, (resamples, b.size))], axis=1))
    return _with_estimate(float(np.median(a) / np.median(b)), boots, confidence)


def _with_estimate(estimate: float, boots: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(estimate, low, high): the percentile interval, stretched to hold the estimate itself (with few
    samples a median's bootstrap distribution is lumpy and its percentiles can miss the estimate)."""
    alpha = (1 - confidence) / 2
    low, high = float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))
    return estimate, min(low, estimate), max(high, estimate)


def spread(values) -> float:
    data = np.asarray(values, dtype=np.float64)
    p50 = float(np.percentile(data, 50))
    return (float(np.percentile(data, 90)) - p50) / p50 if p50 > 0 else 0.0


def drift(values) -> float:
    """Median of the last third over median of the first third, minus 1 (0 when too few samples)."""
    data = np.asarray(values, dtype=np.float64)
    third = data.size // 3
    if third < 3:
        return 0.0
    return float(np.median(data[-third:]) / np.median(data[:third]) - 1)


@dataclass
class LoadReport:
    """What the OS saw while a measurement ran."""

    seconds: float
    cores: int
    own_cpu: float            # this process, in cores (1.0 = one core busy throughout)
    other_cpu: float          # everything else, as a fraction of all cores
    steal: float | None       # fraction of all cores taken by the hypervisor (Linux VMs)
    freq_mhz: tuple[float, float] | None  # lowest and highest current frequency seen
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "cores": self.cores, "own_cpu_cores": round(self.own_cpu, 2),
                "other_cpu_fraction": round(self.other_cpu, 3),
                "steal_fraction": None if self.steal is None else round(self.steal, 3),
                "cpu_mhz_range": None if self.freq_mhz is None else [round(f) for f in self.freq_mhz],
                "notes": self.notes}


class LoadMonitor:
    """Measure other processes' CPU use (system busy time minus this process's) while a block runs.
    Uses psutil where installed; otherwise /proc/stat on Linux; elsewhere reports nothing."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._freqs: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.report: LoadReport | None = None

    @staticmethod
    def _system() -> tuple[float, float, float | None] | None:
        """(busy seconds, total seconds, steal seconds) summed over all cores."""
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        total = sum(t)
        return total - idle, total, getattr(t, "steal", None)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def _sample_freq(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                freq = psutil.cpu_freq()
            except Exception:
                return
            if freq and freq.current:
                self._freqs.append(freq.current)

    def __enter__(self) -> LoadMonitor:
        self._start_wall = time.perf_counter()
        self._start_sys = self._system()
        self._start_own = self._own()
        self._thread = threading.Thread(target=self._sample_freq, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        seconds = time.perf_counter() - self._start_wall
        cores = os.cpu_count() or 1
        own = (self._own() - self._start_own) / max(seconds, 1e-9)
        end = self._system()
        notes = []
        if self._start_sys is None or end is None:
            other, steal = 0.0, None
            notes.append("the OS's CPU counters are not readable here: other processes' load is unknown")
        else:
            busy = end[0] - self._start_sys[0]
            total = max(end[1] - self._start_sys[1], 1e-9)
            # total is core-seconds; own is cores; both as fractions of the machine
            other = max(0.0, busy / total - own / cores)
            steal = None if end[2] is None or self._start_sys[2] is None else (end[2] - self._start_sys[2]) / total
        freq = (min(self._freqs), max(self._freqs)) if self._freqs else None
        self.report = LoadReport(seconds, cores, own, other, steal, freq, len(self._freqs), notes)


def verdict(values, load: LoadReport | None = None, ratio: tuple[float, float, float] | None = None) -> dict:
    """Whether one row's measurement can be trusted, with every reason it cannot."""
    reasons = []
    s, d = spread(values), drift(values)
    if s > MAX_SPREAD:
        reasons.append(f"spread: p90 is {s:.0%} above p50")
    if abs(d) > MAX_DRIFT:
        reasons.append(f"drift: the last third ran {d:+.0%} against the first")
    if ratio is not None and ratio[0] > 0 and (ratio[2] - ratio[1]) / ratio[0] > MAX_CI_WIDTH:
        reasons.append(f"wide interval: x{ratio[1]:.2f}..x{ratio[2]:.2f}")
    if load is not None:
        if load.other_cpu > MAX_OTHER_CPU:
            reasons.append(f"other processes used {load.other_cpu:.0%} of the CPUs")
        if load.steal is not None and load.steal > MAX_STEAL:
            reasons.append(f"the hypervisor stole {load.steal:.0%} of the CPUs")
        if load.freq_mhz and load.freq_mhz[1] > 0 and load.freq_mhz[0] / load.freq_mhz[1] < 0.8:
            reasons.append(f"CPU frequency moved {load.freq_mhz[0]:.0f}..{load.freq_mhz[1]:.0f} MHz")
    return {"stable": not reasons, "reasons": reasons, "spread": round(s, 3), "drift": round(d, 3)}


def wait_until_quiet(max_seconds: float, window: float = 1.0) -> dict:
    """Wait (up to ``max_seconds``) until other processes use less than ``MAX_OTHER_CPU`` of the CPUs
    over a ``window``; says whether it got there."""
    start = time.perf_counter()
    while True:
        with LoadMonitor(interval=window) as monitor:
            time.sleep(window)
        waited = time.perf_counter() - start
        other = monitor.report.other_cpu
        if other <= MAX_OTHER_CPU or waited >= max_seconds:
            return {"waited_s": round(waited, 1), "quiet": other <= MAX_OTHER_CPU, "other_cpu_fraction": round(other, 3)}


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
              "amx_bf16", "asimddp", "i8mm", "bf16")


def machine_info() -> dict:
    """CPU model and cores; GPU name; on Jetson the model, L4T/JetPack release and power mode."""
    info: dict = {"platform": platform.platform(), "machine": platform.machine(), "cpu_cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key in ("model name", "hardware") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            elif key in ("flags", "features") and "cpu_features" not in info:
                flags = set(line.split(":", 1)[1].split())
                # what decides the INT8/BF16 kernels the engines pick, detected rather than assumed
                info["cpu_features"] = " ".join(f for f in _ISA_FLAGS if f in flags) or "none of note"
    except OSError:
        pass
    try:
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        info["l4t"] = tegra.read_text().splitlines()[0].strip()
        model = Path("/proc/device-tree/model")
        if model.is_file():
            info["jetson_model"] = model.read_bytes().rstrip(b"\x00").decode(errors="replace")
        if shutil.which("nvpmodel"):
            try:
                done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
                info["power_mode"] = " ".join(done.stdout.split())
            except (OSError, subprocess.SubprocessError):
                pass
    return info
