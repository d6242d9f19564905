"""The benchmark statistics: intervals on known distributions, the paired ratio, drift and spread,
and the load monitor seeing a CPU that the test keeps busy on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from cbam_deploy.benchstats import LoadMonitor, drift, median_ci, ratio_ci, spread, verdict


def test_median_interval_of_a_known_normal_has_the_textbook_width_and_covers_the_median():
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for trial in range(40):
        sample = rng.normal(100.0, 10.0, 400)
        median, low, high = median_ci(sample, seed=trial, resamples=1000)
        covered += low <= 100.0 <= high
        widths.append(high - low)
    # the median's standard error is sigma * sqrt(pi / 2) / sqrt(n) = 0.627; a 95% interval is ~2.46 wide
    assert 2.0 < np.mean(widths) < 2.9
    assert covered >= 34  # ~95% of 40, with room for chance


def test_ratio_of_medians_from_interleaved_rounds_recovers_the_true_ratio():
    rng = np.random.default_rng(1)
    load = rng.lognormal(0.0, 0.4, 300)  # the machine's noise, shared by both sides of a round
    reference = 100.0 * load
    candidate = 50.0 * load * rng.normal(1.0, 0.02, 300)
    ratio, low, high = ratio_ci(candidate, reference)
    assert low <= 0.5 <= high and abs(ratio - 0.5) < 0.01
    assert high - low < 0.02  # pairing cancels the shared noise


def test_spread_and_drift_flag_what_they_should():
    flat = np.full(60, 10.0) + np.random.default_rng(2).normal(0, 0.1, 60)
    assert verdict(flat)["stable"]
    slowing = np.linspace(10, 20, 60)
    result = verdict(slowing)
    assert not result["stable"] and drift(slowing) > 0.25 and any("drift" in r for r in result["reasons"])
    spiky = flat.copy()
    spiky[::5] = 40.0
    assert spread(spiky) > 0.5 and any("spread" in r for r in verdict(spiky)["reasons"])


def test_load_monitor_sees_other_processes_busy_on_purpose():
    burners = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
               for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        with LoadMonitor(interval=0.2) as monitor:
            time.sleep(1.5)
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()
    report = monitor.report
    assert report.other_cpu > 0.6 and report.own_cpu < 0.2
    result = verdict(np.full(30, 5.0), report)
    assert not result["stable"] and any("other processes" in r for r in result["reasons"])
