"""Latency measurement a skeptic can trust: every runner in the same process and run, interleaved
round by round, so a noisy shared machine hits them alike; medians with bootstrap intervals, ratios
of medians to PyTorch eager from the same rounds (paired bootstrap), and a stability verdict per row
(spread, drift, other processes' CPU use, steal, frequency; see ``benchstats``).

Rounds: at least ``min_seconds`` of measuring, then more until every ratio's 95% interval is
narrower than ``TARGET_CI_WIDTH`` of the ratio or ``max_seconds`` is spent."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .benchstats import LoadMonitor, LoadReport, median_ci, ratio_ci, verdict
from .errors import CbamDeployError
from .runners.base import Runner

if TYPE_CHECKING:
    from .bundle import Bundle, ModelInfo

TARGET_CI_WIDTH = 0.06


class UnstableMeasurement(CbamDeployError):
    """``bench --strict``: a row's measurement was disturbed (its reasons are in the message)."""

    exit_code = 5


def interleaved_latency(runners: dict[str, Runner], batch: np.ndarray, iters: int = 30, warmup: int = 5,
                        device_times: dict[str, list[float]] | None = None,
                        rng: np.random.Generator | None = None) -> dict[str, list[float]]:
    """Milliseconds per run for each runner; the runners take turns, one call each per round, in a new
    random order every round (seeded). Not a rotation: a rotation keeps who-follows-whom fixed, and a
    runner always following PyTorch eager ran 10% slower than the same file following another runner
    (resnet50_cbam, docs/measurements.md). A runner's ``settle_seconds`` (PyTorch's) is waited out, untimed, after its call.
    Device compute times (CUDA events) go into ``device_times`` where a runner has them."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    rng = rng if rng is not None else np.random.default_rng(0)
    for _ in range(iters):
        for index in rng.permutation(len(order)):
            name, runner = order[index]
            total, compute = runner.run_timed(batch)
            times[name].append(total)
            if compute is not None and device_times is not None:
                device_times.setdefault(name, []).append(compute)
            if runner.settle_seconds:
                time.sleep(runner.settle_seconds)
    return times


def summarize(values_ms: list[float], batch: int) -> dict:
    data = np.asarray(values_ms)
    p50, low, high = median_ci(data)
    return {
        "batch": batch, "iterations": len(data), "p50_ms": p50, "p50_ci_ms": [low, high],
        "p90_ms": float(np.percentile(data, 90)), "p99_ms": float(np.percentile(data, 99)),
        "mean_ms": float(data.mean()), "min_ms": float(data.min()), "max_ms": float(data.max()),
        "throughput_ips": batch * 1000.0 / p50,
    }


def _narrow_enough(times: dict[str, list[float]]) -> bool:
    if "pytorch" not in times:
        return True
    for name, values in times.items():
        if name == "pytorch":
            continue
        ratio, low, high = ratio_ci(values, times["pytorch"], resamples=500)
        if (high - low) / ratio > TARGET_CI_WIDTH:
            return False
    return True


def measure(runners: dict[str, Runner], x: np.ndarray, iters: int | None, min_seconds: float, max_seconds: float,
            warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]], LoadReport | None]:
    """Interleaved rounds: ``iters`` exactly, or adaptively (see the module doc), under a LoadMonitor."""
    device_times: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    with LoadMonitor() as monitor:
        if iters is not None:
            times = interleaved_latency(runners, x, iters, warmup, device_times, rng)
        else:
            start = time.perf_counter()
            times = interleaved_latency(runners, x, 5, warmup, device_times, rng)
            while True:
                spent = time.perf_counter() - start
                if spent >= max_seconds or (spent >= min_seconds and _narrow_enough(times)):
                    break
                per_round = spent / len(next(iter(times.values())))
                chunk = max(3, int(min(max_seconds - spent, max(min_seconds - spent, 1.0)) / max(per_round, 1e-6)))
                more = interleaved_latency(runners, x, chunk, 0, device_times, rng)
                for name in times:
                    times[name] += more[name]
    return times, device_times, monitor.report


def bench_runners(runners: dict[str, Runner], shape: tuple[int, int, int], batches: list[int], iters: int | None = None,
                  min_seconds: float | None = None, warmup: int = 5, seed: int = 0, max_seconds: float | None = None,
                  strict: bool = False, retries: int = 0) -> list[dict]:
    """Latency for every runner at every batch size, interleaved, with ratios of medians (and their
    intervals) to the runner named 'pytorch' (the eager original, which the caller includes), and a
    stability verdict per row. An unstable batch is measured again up to ``retries`` times; with
    ``strict`` a row still unstable then is an ``UnstableMeasurement``."""
    from .options import validate_bench_options

    validate_bench_options(list(batches), iters, min_seconds, warmup)
    min_seconds = 5.0 if min_seconds is None else min_seconds
    max_seconds = max_seconds if max_seconds is not None else 4 * min_seconds
    rows = []
    for batch in batches:
        x = np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)
        for attempt in range(retries + 1):
            times, device_times, load = measure(runners, x, iters, min_seconds, max_seconds, warmup)
            batch_rows = _rows(runners, times, device_times, load, batch, attempt)
            if all(r["stability"]["stable"] for r in batch_rows):
                break
        rows += batch_rows
    unstable = [r for r in rows if not r["stability"]["stable"]]
    if strict and unstable:
        raise UnstableMeasurement("unstable measurement (--strict): " + "; ".join(
            f"{r['runner']} batch {r['batch']}: {', '.join(r['stability']['reasons'])}" for r in unstable))
    return rows


def _rows(runners: dict[str, Runner], times: dict[str, list[float]], device_times: dict[str, list[float]],
          load: LoadReport | None, batch: int, attempt: int) -> list[dict]:
    rows = []
    for name, values in times.items():
        row = {"runner": name, "runtime": getattr(runners[name], "runtime", None), **runners[name].describe(),
               **summarize(values, batch),
               "timer": "host perf_counter (end to end)", "attempt": attempt + 1,
               "samples_ms": [round(v, 4) for v in values]}
        if name in device_times:
            compute = median_ci(device_times[name])
            row.update(timer="host perf_counter (end to end) + CUDA events (compute)", compute_p50_ms=compute[0],
                       compute_p50_ci_ms=[compute[1], compute[2]], copy_p50_ms=row["p50_ms"] - compute[0])
        ratio = None
        if "pytorch" in times:
            ratio = ratio_ci(values, times["pytorch"])
            row["ratio_to_pytorch"] = ratio[0]
            row["ratio_ci"] = [ratio[1], ratio[2]]
            row["speedup_vs_pytorch"] = 1 / ratio[0]
        row["stability"] = verdict(values, load, ratio if name != "pytorch" else None)
        row["load"] = load.as_dict() if load else None
        rows.append(row)
    return rows


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
              "amx_bf16", "asimddp", "i8mm", "bf16")


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


COLUMNS = ("runner", "runtime", "precision", "batch", "threads", "p50 ms [95% CI]", "p90", "p99", "img/s",
           "x PyTorch [95% CI]", "stable")


_SHORT = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f16": "fp16"}


def row_cells(r: dict) -> list[str]:
    """One row of the table (CLI and markdown): medians and ratios of medians with their intervals."""
    low, high = r["p50_ci_ms"]
    ratio = (f"{r['ratio_to_pytorch']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]"
             if "ratio_to_pytorch" in r else "-")
    stable = "yes" if r["stability"]["stable"] else "NO"
    computes = _SHORT.get(r.get("inference_precision"), r.get("inference_precision"))
    precision = r["precision"] + (f" ({computes})" if computes and computes != r["precision"] else "")
    return [r["runner"], r.get("runtime") or r["backend"], precision, str(r["batch"]),
            str(r.get("threads") or "-"), f"{r['p50_ms']:.2f} [{low:.2f}, {high:.2f}]", f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}", f"{r['throughput_ips']:.1f}", ratio, stable]


OVERHEAD_COLUMNS = ("engine", "batch", "attention p50 ms", "plain p50 ms", "overhead [95% CI]", "stable")


def overhead_cells(o: dict) -> list[str]:
    return [o["engine"], str(o["batch"]), f"{o['attention_p50_ms']:.2f}", f"{o['plain_p50_ms']:.2f}",
            f"{o['overhead']:.2f} [{o['overhead_ci'][0]:.2f}, {o['overhead_ci'][1]:.2f}]", "yes" if o["stable"] else "NO"]


def compare_heading(result: dict, between: str = "/") -> tuple[str, tuple[str, ...]]:
    """Title and columns of the ``--cbam-opt-compare`` table (rows: ``overhead_cells``)."""
    from .cbam_opt import applied

    mode, other = result["cbam_opt"].get("mode", "off"), result["cbam_opt_compare"]["other"]
    title = (f"--cbam-opt {mode} {between} {other} ({', '.join(applied(result['cbam_opt'])) or 'no rewrites'}), "
             "same engine, same rounds")
    return title, ("engine", "batch", f"{mode} p50 ms", f"{other} p50 ms", f"{mode}/{other} [95% CI]", "stable")


def fallback_notes(rows: list[dict]) -> list[str]:
    """Rows whose runtime ran (some) nodes elsewhere than asked (onnxruntime's silent fallback), one line each."""
    seen = {}
    for r in rows:
        if r.get("fallback"):
            seen.setdefault(r["runner"], f"{r['runner']}: {r['fallback']}")
    return list(seen.values())


def unstable_notes(rows: list[dict]) -> list[str]:
    """Why each unstable row is unstable, one line per row."""
    return [f"{r['runner']} (batch {r['batch']}): {'; '.join(r['stability']['reasons'])}"
            for r in rows if not r["stability"]["stable"]]


def _markdown_table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_report(result: dict, title: str) -> str:
    lines = [f"# {title}", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()), ""]
    lines += _markdown_table(COLUMNS, [row_cells(r) for r in result["results"]])
    if result.get("overhead"):
        lines += ["", f"Attention overhead ({result['model']} / {result['overhead']['plain']}):", ""]
        lines += _markdown_table(OVERHEAD_COLUMNS, [overhead_cells(o) for o in result["overhead"]["rows"]])
    if result.get("cbam_opt_compare"):
        title, columns = compare_heading(result, "over")
        lines += ["", title + ":", ""]
        lines += _markdown_table(columns, [overhead_cells(o) for o in result["cbam_opt_compare"]["rows"]])
    fallbacks = fallback_notes(result["results"])
    if fallbacks:
        lines += ["", "Runtimes that did not run everything where asked:", ""] + [f"- {n}" for n in fallbacks]
    notes = unstable_notes(result["results"])
    if notes:
        lines += ["", "Unstable rows (not to be quoted):", ""] + [f"- {n}" for n in notes]
    made = [r for r in result["results"] if r.get("made_by")]
    if made:
        lines += ["", "How each peer was made:", ""] + [f"- {r['runner']}: {r['made_by']}" for r in made]
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
        points = sorted((r["batch"], r["p50_ms"], *r["p50_ci_ms"]) for r in rows if r["runner"] == name)
        ax.errorbar([p[0] for p in points], [p[1] for p in points],
                    yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], marker="o", capsize=3, label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms), 95% interval")
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
                 threads: int | None = None, max_seconds: float | None = None, strict: bool = False,
                 retries: int = 0, wait_quiet: float = 0.0, peers: bool = False, overhead: bool = False,
                 calib_data: str | None = None, runtime: str | list[str] | None = None,
                 cbam_opt_compare: bool = False, trust=None) -> dict:
    """Benchmark a bundle's artifacts against its PyTorch eager original, in one run; with ``peers``
    also what a user gets from the engines' own documented paths; with ``overhead`` the same engines
    on the model's plain twin (resnet50 for resnet50_cbam), for a cbam/plain ratio per engine; with
    ``cbam_opt_compare`` the same model exported with the other ``--cbam-opt`` mode and built with the
    same recipes, for an on/off ratio per engine (rows ``cbam-opt-off:ARTIFACT``, or ``-on:``).

    ``runtime``: a comma list (or list) of runtimes (see ``cbam_deploy.runtimes``); each artifact runs
    under every listed runtime that runs its format, interleaved in the same rounds, its rows named
    ``artifact@runtime`` when it runs under more than one. Default: the best runtime for each format."""
    import tempfile
    from pathlib import Path

    from .benchstats import wait_until_quiet
    from .bundle import Bundle
    from .options import check_artifact_names, validate_bench_options
    from .runners import TorchRunner
    from .runtimes import parse_runtimes

    validate_bench_options(list(batches or [1]), iters, min_seconds, warmup, threads)  # before any work
    runtimes = parse_runtimes(runtime)
    bundle_dir = Path(bundle_dir)
    bundle = Bundle.open(bundle_dir)
    check_artifact_names(bundle, artifacts, bundle_dir)
    model = bundle.model
    twin = plain_twin(model) if overhead else None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    module = _pytorch_model(bundle, trust)
    runners: dict[str, Runner] = {"pytorch": TorchRunner(module)}
    skipped: list[dict] = []
    limits: dict[str, tuple[int, int] | None] = {}
    _open_artifacts(bundle, artifacts, threads, "", runners, skipped, limits, runtimes)
    side = bundle.input.side
    chw = (bundle.input.channels, side, side)
    batches = [bundle.fixed_batch] if bundle.fixed_batch else (batches or [1])
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        calib = _calibration(bundle, calib_data) if (peers or overhead or cbam_opt_compare) else None
        if peers:
            from .peers import build_peers

            example = np.random.default_rng(0).standard_normal((1, *chw), dtype=np.float32)
            built, peer_skips = build_peers(module, example, None if calib is None else calib.inputs, Path(tmp) / "peers",
                                            threads)
            runners.update(built)
            skipped += [{"artifact": s["peer"], "reason": s["reason"]} for s in peer_skips]
        if twin:
            opened = list(dict.fromkeys(r.partition("@")[0] for r in runners))  # each artifact once, whatever its runtimes
            twin_bundle = Bundle.open(_build_twin(bundle, twin, calib, Path(tmp) / "plain",
                                                  [r for r in opened if bundle.has_artifact(r)], skipped, trust=trust))
            runners["plain:pytorch"] = TorchRunner(_pytorch_model(twin_bundle))
            _open_artifacts(twin_bundle, None, threads, "plain:", runners, skipped, limits, runtimes)
        other_mode = None
        if cbam_opt_compare:
            other_mode = "off" if bundle.cbam_opt.get("mode") == "on" else "on"
            mine = [name for name in dict.fromkeys(r.partition("@")[0] for r in runners) if bundle.has_artifact(name)]
            other = Bundle.open(_build_twin(bundle, None, calib, Path(tmp) / f"cbam-opt-{other_mode}", mine, skipped,
                                            cbam_opt=other_mode, trust=trust))
            _open_artifacts(other, mine, threads, f"cbam-opt-{other_mode}:", runners, skipped, limits, runtimes)
        quiet = wait_until_quiet(wait_quiet) if wait_quiet > 0 else None
        rows = []
        for batch in batches:
            # an engine is timed only at batches its profile runs in one call (never split or padded)
            usable = {n: r for n, r in runners.items() if limits.get(n) is None or limits[n][0] <= batch <= limits[n][1]}
            skipped += [{"artifact": n, "reason": f"batch {batch} is outside its TensorRT profile {list(limits[n])}"}
                        for n in runners if n not in usable]
            rows += bench_runners(usable, chw, [batch], iters, min_seconds, warmup, max_seconds=max_seconds,
                                  strict=strict, retries=retries)
    result = {"bundle": str(bundle_dir), "model": model.name, "machine": machine_info(), "threads": threads,
              "results": [r for r in rows if not r["runner"].startswith(("plain:", "cbam-opt-"))], "skipped": skipped,
              "stable": all(r["stability"]["stable"] for r in rows), "waited_for_quiet": quiet, "runtimes": runtimes}
    result["cbam_opt"] = bundle.cbam_opt
    if twin:
        result["overhead"] = {"plain": twin, "rows": overhead_rows(rows)}
    if other_mode:
        result["cbam_opt_compare"] = {"other": other_mode, "rows": overhead_rows(rows, f"cbam-opt-{other_mode}:")}
    return result


def plain_twin(model: ModelInfo) -> str:
    """The zoo model without attention (resnet50 for resnet50_cbam)."""
    from .models.registry import get_entry, list_models

    if model.source != "zoo":
        raise CbamDeployError("--overhead compares a zoo model with its plain twin; this bundle is a factory model")
    entry = get_entry(model.name)
    if entry.attention is None or entry.family not in list_models():
        raise CbamDeployError(f"--overhead: {model.name} has no attention, so no plain twin to compare with")
    return entry.family


def overhead_rows(rows: list[dict], prefix: str = "plain:") -> list[dict]:
    """Per engine and batch: latency of the bundle's artifact over its counterpart named ``prefix`` +
    artifact (the plain twin, or the other --cbam-opt mode), from the same rounds."""
    out = []
    by_key = {(r["runner"], r["batch"]): r for r in rows}
    for r in rows:
        if ":" in r["runner"].partition("@")[0]:  # plain:..., cbam-opt-off:..., peer rows have no colon
            continue
        plain = by_key.get((prefix + r["runner"], r["batch"]))
        if plain is None:
            continue
        _, low, high = ratio_ci(r["samples_ms"], plain["samples_ms"])  # the rows keep samples rounded to 0.1 us
        ratio = r["p50_ms"] / plain["p50_ms"]  # so the estimate is the one the rows print
        low, high = min(low, ratio), max(high, ratio)
        out.append({"engine": r["runner"], "batch": r["batch"], "attention_p50_ms": r["p50_ms"],
                    "plain_p50_ms": plain["p50_ms"], "overhead": ratio, "overhead_ci": [low, high],
                    "stable": r["stability"]["stable"] and plain["stability"]["stable"]})
    return out


def _pytorch_model(bundle: Bundle, trust=None):
    """The eager model for timing: with its checkpoint when it is there (weights do not change the
    time, so a lost checkpoint falls back to the architecture's seeded init). A factory model only with
    ``trust`` (``models.CodeTrust``): the PyTorch row is what every ratio is measured against."""
    from pathlib import Path

    from .models import build_model

    model = bundle.model
    spec = _spec_to_run(bundle, trust)
    if model.source == "factory" and not Path(spec.rpartition(":")[0]).is_file():
        raise CbamDeployError(f"cannot rebuild the PyTorch model from {spec}: the file is gone")
    usable = model.weights is not None and Path(model.weights.path).is_file()
    return build_model(spec, model.weights.path if usable else None, model.num_classes, model.stem,
                       model.outputs_mode).module


def _spec_to_run(bundle: Bundle, trust=None) -> str:
    from .runners import model_spec_to_run

    spec, why_not = model_spec_to_run(bundle.model, trust)
    if spec is None:
        raise CbamDeployError(f"bench times every artifact against the PyTorch original, which is not rebuilt here: "
                              f"{why_not}")
    return spec


def _open_artifacts(bundle: Bundle, names: list[str] | None, threads: int | None, prefix: str,
                    runners: dict, skipped: list, limits: dict, runtimes: list[str] | None = None) -> None:
    """A runner per artifact and runtime (``runtimes`` None: the default one, rows named as the artifact)."""
    from .errors import BackendUnavailable
    from .runners import open_artifact
    from .runtimes import fitting

    for artifact in bundle.artifacts:
        if names and artifact.name not in names:
            continue
        chosen = [None] if runtimes is None else fitting(artifact.format, runtimes)
        if not chosen:
            skipped.append({"artifact": prefix + artifact.name,
                            "reason": f"no runtime of --runtime {','.join(runtimes)} runs {artifact.format} artifacts"})
            continue
        for runtime in chosen:
            name = prefix + artifact.name + (f"@{runtime}" if len(chosen) > 1 else "")
            try:
                runners[name] = open_artifact(bundle.directory, bundle, artifact.name, threads=threads, runtime=runtime)
            except BackendUnavailable as exc:
                skipped.append({"artifact": name, "reason": str(exc)})
                continue
            if artifact.format == "tensorrt":
                from .exporters.tensorrt import profile_batch_limit

                limits[name] = profile_batch_limit(bundle, artifact.raw)


def _calibration(bundle: Bundle, calib_data: str | None, size: int = 128):
    """Calibration images for peers and the plain twin: --calib-data, else the source the bundle's
    INT8 artifacts were calibrated on (when it is still there); None when there is neither."""
    from pathlib import Path

    from .data import SYNTHETIC, load_calibration

    source = calib_data or next((a.calibration["source"] for a in bundle.artifacts
                                 if a.calibration and (a.calibration["source"] == SYNTHETIC
                                                       or Path(a.calibration["source"]).exists())), None)
    return load_calibration(source, bundle.input.raw, size) if source else None


def _build_twin(bundle: Bundle, twin: str | None, calib, out: "Path", artifacts: list[str], skipped: list,
                cbam_opt: str = "on", trust=None) -> "Path":
    """The plain twin (``twin``: its zoo name), or the bundle's own model again (``twin`` None: with its
    weights, exported with ``cbam_opt``), exported and built like the bundle: same input, batch, opset and
    exporter; the same INT8 recipes on the same calibration data."""
    from pathlib import Path

    from .build import build_artifacts
    from .pipeline import ExportRequest, export_bundle
    from .quantize import quantize_bundle

    export = bundle.artifact().export or {}
    model = bundle.model
    weights = model.weights.path if twin is None and model.weights and Path(model.weights.path).is_file() else None
    export_bundle(ExportRequest(model=twin or _spec_to_run(bundle, trust), weights=weights, num_classes=model.num_classes, stem=model.stem,
                                cbam_opt=cbam_opt, outputs=model.outputs_mode or "logits", output=str(out),
                                input_size=bundle.input.side, batch=bundle.fixed_batch,
                                dynamic_hw=bundle.input.dynamic_hw, opset=export.get("opset", 17), parity=False))
    for name in artifacts:
        artifact = bundle.artifact(name)
        if artifact.format == "openvino" and artifact.precision in ("fp32", "fp16"):
            build_artifacts(out, "openvino", artifact.precision)
        elif artifact.precision == "int8" and artifact.quantization:
            if calib is None:
                skipped.append({"artifact": f"{out.name}:{name}", "reason": "no calibration data for the "
                                f"{out.name} build's INT8 (give --calib-data)"})
                continue
            q = artifact.quantization
            quantize_bundle(out, [q["recipe"]], calib.source, calib_size=len(calib.inputs), method=q["method"],
                            gates=q["gates"], check_samples=8, trust=trust)
    return out
