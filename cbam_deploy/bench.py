"""Latency measurement a skeptic can trust: every runner in the same process and run, interleaved
round by round, so a noisy shared machine hits them alike; medians with bootstrap intervals, ratios
of medians to PyTorch eager from the same rounds (paired bootstrap), and a stability verdict per row
(spread, drift, other processes' CPU use, steal, frequency; see ``benchstats``).

Rounds: at least ``min_seconds`` of measuring, then more until every ratio's 95% interval is
narrower than ``TARGET_CI_WIDTH`` of the ratio or ``max_seconds`` is spent."""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import batch_limit
from .benchstats import LoadMonitor, LoadReport, machine_info, median_ci, ratio_ci, verdict, wait_until_quiet
from .bundle import Bundle, check_artifact_names
from .checks import check_int, check_number, check_output_file, parse_batches
from .data import SYNTHETIC, load_calibration
from .errors import BackendUnavailable, CbamDeployError
from .formats import get as get_format
from .loaders import model_spec_to_run, open_artifact
from .models import CodeTrust, build_model, library
from .peers import build_peers
from .runners.base import Runner
from .runners.torch import TorchRunner
from .progress import NULL
from .results import Result
from .runtimes import fitting, parse_runtimes


class BenchResult(Result):
    """Latency and throughput of every artifact next to PyTorch eager, measured in the same rounds:
    ``results`` (one row per runner and batch: medians, intervals, the ratio to PyTorch and its
    interval, a stability verdict), the machine, whether the whole run was ``stable``, what was skipped;
    with twins, ``overhead`` and ``cbam_opt_compare``. ``passed`` is None: a bench judges no artifact."""

    command = "bench"

    @property
    def results(self) -> list[dict]:
        return self["results"]

    @property
    def stable(self) -> bool:
        return self["stable"]

    def speedup(self, runner: str, batch: int = 1) -> float | None:
        """The runner's speed-up over PyTorch eager at ``batch`` (a ratio of medians)."""
        row = next((r for r in self.results if r["runner"] == runner and r.get("batch") == batch), None)
        return row.get("speedup_vs_pytorch") if row else None

TARGET_CI_WIDTH = 0.06


class UnstableMeasurement(CbamDeployError):
    """``bench --strict``: a row's measurement was disturbed (its reasons are in the message)."""

    exit_code = 5


def interleaved_latency(runners: dict[str, Runner], batch: np.ndarray, iters: int = 30, warmup: int = 5,
                        device_times: dict[str, list[float]] | None = None,
                        rng: np.random.Generator | None = None, on_round=None) -> dict[str, list[float]]:
    """Milliseconds per run for each runner; the runners take turns, one call each per round, in a new
    random order every round (seeded). Not a rotation: a rotation keeps who-follows-whom fixed, and a
    runner always following PyTorch eager ran 10% slower than the same file following another runner
    (resnet50_cbam, docs/measurements.md). A runner's ``settle_seconds`` (PyTorch's) is waited out, untimed, after its call.
    Device compute times (CUDA events) go into ``device_times`` where a runner has them; ``on_round`` is
    called after each round (a progress bar)."""
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
        if on_round is not None:
            on_round()
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
            warmup: int, on_round=None) -> tuple[dict[str, list[float]], dict[str, list[float]], LoadReport | None]:
    """Interleaved rounds: ``iters`` exactly, or adaptively (see the module doc), under a LoadMonitor."""
    device_times: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    with LoadMonitor() as monitor:
        if iters is not None:
            times = interleaved_latency(runners, x, iters, warmup, device_times, rng, on_round)
        else:
            start = time.perf_counter()
            times = interleaved_latency(runners, x, 5, warmup, device_times, rng, on_round)
            while True:
                spent = time.perf_counter() - start
                if spent >= max_seconds or (spent >= min_seconds and _narrow_enough(times)):
                    break
                per_round = spent / len(next(iter(times.values())))
                chunk = max(3, int(min(max_seconds - spent, max(min_seconds - spent, 1.0)) / max(per_round, 1e-6)))
                more = interleaved_latency(runners, x, chunk, 0, device_times, rng, on_round)
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
    options = check_bench_options(list(batches), iters=iters, min_seconds=min_seconds, warmup=warmup,
                                  max_seconds=max_seconds, strict=strict, retries=retries)
    return [row for batch in options.batches for row in _bench_batch(runners, shape, batch, options, seed)]


def _bench_batch(runners: dict[str, Runner], shape: tuple[int, int, int], batch: int, options: BenchOptions,
                 seed: int = 0, progress=None) -> list[dict]:
    """``bench_runners`` at one batch size, with checked options."""
    min_seconds = 5.0 if options.min_seconds is None else options.min_seconds
    max_seconds = options.max_seconds if options.max_seconds is not None else 4 * min_seconds
    x = np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)
    for attempt in range(options.retries + 1):
        with (progress or NULL).task(f"timing {len(runners)} runner(s) at batch {batch}", options.iters) as step:
            times, device_times, load = measure(runners, x, options.iters, min_seconds, max_seconds, options.warmup,
                                                step)
        rows = _rows(runners, times, device_times, load, batch, attempt)
        if all(r["stability"]["stable"] for r in rows):
            break
    unstable = [r for r in rows if not r["stability"]["stable"]]
    if options.strict and unstable:
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


@dataclass(frozen=True)
class BenchOptions:
    """``bench``'s options once checked (``check_bench_options`` makes them; nothing checks them again)."""

    batches: list[int]
    runtimes: list[str] | None = None
    artifacts: list[str] | None = None
    iters: int | None = None
    min_seconds: float | None = None
    max_seconds: float | None = None
    warmup: int = 5
    threads: int | None = None
    strict: bool = False
    retries: int = 0
    wait_quiet: float = 0.0
    peers: bool = False
    calib_data: str | None = None
    markdown: str | None = None
    plot: str | None = None


@dataclass
class Twin:
    """A second bundle timed in the same rounds as the bench's own: its runners are named ``prefix`` +
    artifact (``artifacts``: those of its artifacts, None: all), with its PyTorch model as ``prefix`` +
    'pytorch' when ``pytorch``; each of the bench's rows is paired with its namesake here
    (``overhead_rows``)."""

    prefix: str
    bundle_dir: Path
    artifacts: list[str] | None = None
    pytorch: bool = False


def bench_bundle(bundle_dir, batches: str | list[int] | None = None, artifacts: list[str] | None = None,
                 iters: int | None = None, min_seconds: float | None = None, warmup: int = 5,
                 threads: int | None = None, max_seconds: float | None = None, strict: bool = False,
                 retries: int = 0, wait_quiet: float = 0.0, peers: bool = False, calib_data: str | None = None,
                 runtime: str | list[str] | None = None, markdown: str | None = None, plot: str | None = None,
                 trust: CodeTrust | None = None, reference=None, progress=None) -> BenchResult:
    """Benchmark a bundle's artifacts against its PyTorch eager original, in one run; with ``peers``
    also what a user gets from the engines' own documented paths (``calib_data``: the images for the
    INT8 peers). The plain twin (``--overhead``) and the other ``--cbam-opt`` mode are built by
    ``pipeline.bench_with_twins``, which hands them to ``bench_checked``.

    ``runtime``: a comma list (or list) of runtimes (see ``cbam_deploy.runtimes``); each artifact runs
    under every listed runtime that runs its format, interleaved in the same rounds, its rows named
    ``artifact@runtime`` when it runs under more than one. Default: the best runtime for each format.
    ``markdown``, ``plot``: where the caller will write the reports (checked here, before any measuring)."""
    bundle, options = open_for_bench(bundle_dir, batches=batches, artifacts=artifacts, iters=iters,
                                     min_seconds=min_seconds, warmup=warmup, threads=threads, max_seconds=max_seconds,
                                     strict=strict, retries=retries, wait_quiet=wait_quiet, peers=peers,
                                     calib_data=calib_data, runtime=runtime, markdown=markdown, plot=plot)
    return bench_checked(bundle, options, trust, module=reference.module_or_reason()[0] if reference else None,
                         progress=progress)


def open_for_bench(bundle_dir, **options) -> tuple[Bundle, BenchOptions]:
    """The bundle and its bench options, every option and artifact name checked (once, before any work)."""
    checked = check_bench_options(**options)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    check_artifact_names(bundle, checked.artifacts, bundle.directory)
    return bundle, checked


def bench_checked(bundle: Bundle, options: BenchOptions, trust: CodeTrust | None = None, twins: list[Twin] = (),
                  calib=None, module=None, progress=None) -> BenchResult:
    """``bench_bundle`` with its options checked (``open_for_bench``); ``twins`` are timed in the same
    rounds and paired with the bundle's rows (``result["paired"][prefix]``, see ``overhead_rows``);
    ``calib``: calibration images already loaded (``bench_calibration``), for the INT8 peers; ``module``:
    the PyTorch model when the command has it already (an export)."""
    threads = options.threads
    if threads is not None:
        torch.set_num_threads(threads)
    module = module if module is not None else _pytorch_model(bundle, trust)
    runners: dict[str, Runner] = {"pytorch": TorchRunner(module)}
    skipped: list[dict] = []
    limits: dict[str, tuple[int, int, str]] = {}  # runner -> (smallest, largest batch of one call, what bounds it)
    _open_artifacts(bundle, options.artifacts, threads, "", runners, skipped, limits, options.runtimes)
    side = bundle.input.side
    chw = (bundle.input.channels, side, side)
    batches = [bundle.fixed_batch] if bundle.fixed_batch else options.batches
    with tempfile.TemporaryDirectory(prefix="cbam-bench-") as tmp:
        if options.peers:
            calib = calib if calib is not None else bench_calibration(bundle, options.calib_data)
            example = np.random.default_rng(0).standard_normal((1, *chw), dtype=np.float32)
            source = library(bundle.model.source)
            built, peer_skips = build_peers(module, example, None if calib is None else calib.inputs, Path(tmp) / "peers",
                                            threads, library_peers=source.peers() if source is not None else None)
            runners.update(built)
            for name, runner in built.items():  # a peer exported for one batch runs only at that batch
                bounds = getattr(runner, "facts", {}).get("batch_bounds")
                if bounds:
                    limits[name] = (int(bounds[0]), int(bounds[1]), "its exported batch")
            skipped += [{"artifact": s["peer"], "reason": s["reason"]} for s in peer_skips]
        for twin in twins:
            twin_bundle = Bundle.open(twin.bundle_dir)
            if twin.pytorch:
                runners[twin.prefix + "pytorch"] = TorchRunner(_pytorch_model(twin_bundle))
            _open_artifacts(twin_bundle, twin.artifacts, threads, twin.prefix, runners, skipped, limits, options.runtimes)
        quiet = wait_until_quiet(options.wait_quiet) if options.wait_quiet > 0 else None
        rows = []
        for batch in batches:
            # an engine is timed only at batches its profile runs in one call (never split or padded)
            usable = {n: r for n, r in runners.items() if n not in limits or limits[n][0] <= batch <= limits[n][1]}
            skipped += [{"artifact": n, "reason": f"batch {batch} is outside {limits[n][2]} {list(limits[n][:2])}"}
                        for n in runners if n not in usable]
            rows += _bench_batch(usable, chw, batch, options, progress=progress)
    prefixes = tuple(t.prefix for t in twins)
    result = BenchResult({"bundle": str(bundle.directory), "model": bundle.model.name, "machine": machine_info(),
                          "threads": threads,
                          "results": [r for r in rows if not (prefixes and r["runner"].startswith(prefixes))],
                          "skipped": skipped, "stable": all(r["stability"]["stable"] for r in rows),
                          "waited_for_quiet": quiet, "runtimes": options.runtimes, "cbam_opt": bundle.cbam_opt})
    if twins:
        result.add("paired", {t.prefix: overhead_rows(rows, t.prefix) for t in twins})
    return result


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


def _pytorch_model(bundle: Bundle, trust: CodeTrust | None = None):
    """The eager model for timing: with its checkpoint when it is there (weights do not change the
    time, so a lost checkpoint falls back to the architecture's seeded init). A factory model only with
    ``trust`` (``models.CodeTrust``): the PyTorch row is what every ratio is measured against."""
    model = bundle.model
    spec = pytorch_spec(bundle, trust)
    if model.source == "factory" and not Path(spec.rpartition(":")[0]).is_file():
        raise CbamDeployError(f"cannot rebuild the PyTorch model from {spec}: the file is gone")
    usable = model.weights is not None and Path(model.weights.path).is_file()
    return build_model(spec, model.weights.path if usable else None, model.num_classes, model.stem,
                       model.outputs_mode, model.factory_sha256).module


def pytorch_spec(bundle: Bundle, trust: CodeTrust | None = None) -> str:
    spec, why_not = model_spec_to_run(bundle.model, trust)
    if spec is None:
        raise CbamDeployError(f"bench times every artifact against the PyTorch original, which is not rebuilt here: "
                              f"{why_not}")
    return spec


def _open_artifacts(bundle: Bundle, names: list[str] | None, threads: int | None, prefix: str,
                    runners: dict, skipped: list, limits: dict, runtimes: list[str] | None = None) -> None:
    """A runner per artifact and runtime (``runtimes`` None: the default one, rows named as the artifact)."""
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
            limit = batch_limit(bundle, artifact)
            if limit is not None:
                limits[name] = (*limit, get_format(artifact.format).bounds_name)


def bench_calibration(bundle: Bundle, calib_data: str | None, size: int = 128):
    """Calibration images for peers and twins: --calib-data, else the source the bundle's INT8
    artifacts were calibrated on (when it is still there); None when there is neither."""
    source = calib_data or next((a.calibration["source"] for a in bundle.artifacts
                                 if a.calibration and (a.calibration["source"] == SYNTHETIC
                                                       or Path(a.calibration["source"]).exists())), None)
    return load_calibration(source, bundle.input.raw, size) if source else None


def check_bench_options(batches: str | list[int] | None = None, artifacts: list[str] | None = None,
                        iters: int | None = None, min_seconds: float | None = 5.0, warmup: int = 5,
                        threads: int | None = None, max_seconds: float | None = None, strict: bool = False,
                        retries: int = 0, wait_quiet: float = 0.0, peers: bool = False, calib_data: str | None = None,
                        runtime: str | list[str] | None = None, markdown: str | None = None,
                        plot: str | None = None) -> BenchOptions:
    """Every option of ``bench_bundle``, and the report paths, before any export or measuring (a typo
    must not cost the whole run). The one place bench's options are checked."""
    batch = batches if batches is not None else [1]
    parsed = parse_batches(batch) if isinstance(batch, str) else parse_batches(",".join(map(str, batch)))
    check_int("--iters", iters, 1, allow_none=True)
    if min_seconds is not None:
        check_number("--min-seconds", min_seconds)
    check_int("--warmup", warmup, 0)
    check_int("--threads", threads, 1, allow_none=True)
    check_output_file("--markdown", markdown)
    check_output_file("--plot", plot)
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise CbamDeployError("--plot needs matplotlib: pip install matplotlib")
    check_int("--retries", retries, 0, 10)
    runtimes = parse_runtimes(runtime)  # an unknown or missing runtime
    if max_seconds is not None:
        check_number("--max-seconds", max_seconds)
    if wait_quiet < 0:
        raise CbamDeployError(f"--wait-quiet must be >= 0 seconds, got {wait_quiet}")
    return BenchOptions(parsed, runtimes, artifacts, iters, min_seconds, max_seconds, warmup, threads, strict, retries,
                        wait_quiet, peers, calib_data, markdown, plot)
