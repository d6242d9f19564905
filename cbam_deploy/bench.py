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


def summarize(values_ms: list[float], batch: int) -> dict:
    data = np.asarray(values_ms)
    mean = float(data.mean())
    return {
        "batch": batch, "iterations": len(data), "mean_ms": mean, "p50_ms": float(np.percentile(data, 50)),
        "p90_ms": float(np.percentile(data, 90)), "p99_ms": float(np.percentile(data, 99)),
        "min_ms": float(data.min()), "max_ms": float(data.max()), "throughput_ips": batch * 1000.0 / mean,
    }


def machine_info() -> dict:
    """CPU model and cores; GPU name; on Jetson the model, L4T/JetPack release and power mode."""
    import os
    import platform
    import shutil
    import subprocess
    from pathlib import Path

    info: dict = {"platform": platform.platform(), "machine": platform.machine(), "cpu_cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

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


def bench_runners(runners: dict[str, Runner], shape: tuple[int, int, int], batches: list[int], iters: int | None = None,
                  min_seconds: float | None = None, warmup: int = 5, seed: int = 0) -> list[dict]:
    """Latency for every runner at every batch size, interleaved, with ratios to the runner named
    'pytorch' (the eager original, which the caller always includes)."""
    from .options import validate_bench_options

    validate_bench_options(list(batches), iters, min_seconds, warmup)
    rows = []
    for batch in batches:
        x = np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)
        count = iters
        if count is None:
            # enough rounds for min_seconds, estimated from one warm round
            for runner in runners.values():
                runner.run(x)
            start = time.perf_counter()
            for runner in runners.values():
                runner.run(x)
            per_round = time.perf_counter() - start
            count = max(5, int((5.0 if min_seconds is None else min_seconds) / max(per_round, 1e-6)))
        times = interleaved_latency(runners, x, count, warmup)
        base = float(np.mean(times["pytorch"])) if "pytorch" in times else None
        for name, values in times.items():
            row = {"runner": name, **runners[name].describe(), **summarize(values, batch)}
            if base:
                row["ratio_to_pytorch"] = row["mean_ms"] / base
                row["speedup_vs_pytorch"] = base / row["mean_ms"]
            rows.append(row)
    return rows


def markdown_report(rows: list[dict], machine: dict, title: str) -> str:
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()), "",
             "| runner | backend | precision | batch | mean ms | p50 | p90 | p99 | img/s | x PyTorch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['runner']} | {r['backend']} | {r.get('inference_precision', r['precision'])} | {r['batch']} | "
                     f"{r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['throughput_ips']:.1f} | {r.get('ratio_to_pytorch', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def plot_latency(rows: list[dict], path, title: str) -> None:
    """Latency vs batch size, one line per runner (PNG)."""
    try:
        import matplotlib
    except ImportError:
        from .errors import CbamDeployError

        raise CbamDeployError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name in dict.fromkeys(r["runner"] for r in rows):
        points = sorted((r["batch"], r["mean_ms"]) for r in rows if r["runner"] == name)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("mean latency (ms)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def bench_bundle(bundle_dir, batches: list[int] | None = None, artifacts: list[str] | None = None,
                 iters: int | None = None, min_seconds: float | None = None, warmup: int = 5,
                 threads: int | None = None) -> dict:
    """Benchmark a bundle's artifacts against its PyTorch eager original, in one run."""
    from pathlib import Path

    from .bundle import read_manifest
    from .errors import BackendUnavailable, CbamDeployError
    from .models import build_model
    from .options import check_artifact_names, validate_bench_options
    from .runners import TorchRunner, open_artifact

    validate_bench_options(list(batches or [1]), iters, min_seconds, warmup, threads)  # before any work
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    check_artifact_names(manifest, artifacts, bundle_dir)
    model = manifest["model"]
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    weights = model.get("weights")
    usable = weights and Path(weights["path"]).is_file()
    if model["source"] == "factory" and not Path(model["name"].rpartition(":")[0]).is_file():
        raise CbamDeployError(f"cannot rebuild the PyTorch model from {model['name']}: the file is gone")
    loaded = build_model(model["name"], weights["path"] if usable else None, model["num_classes"], model["stem"])
    runners: dict[str, Runner] = {"pytorch": TorchRunner(loaded.module)}
    skipped = []
    max_batch: dict[str, int] = {}
    for artifact in manifest["artifacts"]:
        if artifacts and artifact["name"] not in artifacts:
            continue
        try:
            runners[artifact["name"]] = open_artifact(bundle_dir, manifest, artifact["name"], threads=threads)
        except BackendUnavailable as exc:
            skipped.append({"artifact": artifact["name"], "reason": str(exc)})
            continue
        profile = (artifact.get("export") or {}).get("profile")
        if profile:
            max_batch[artifact["name"]] = profile["max_batch"]
    shape = manifest["input"]["shape"]
    side = int(manifest["input"]["preprocess"]["center_crop"])
    chw = (shape[1], side, side)
    if isinstance(shape[0], int):
        batches = [shape[0]]
    batches = batches or [1]
    rows = []
    for batch in batches:
        usable_runners = {n: r for n, r in runners.items() if max_batch.get(n, batch) >= batch}
        rows += bench_runners(usable_runners, chw, [batch], iters, min_seconds, warmup)
    return {"bundle": str(bundle_dir), "model": model["name"], "machine": machine_info(), "threads": threads,
            "results": rows, "skipped": skipped}
