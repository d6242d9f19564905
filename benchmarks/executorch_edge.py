"""Batch-1 ExecuTorch (XNNPACK) latency: cbam-deploy's .pte against ExecuTorch's documented defaults and
the plain twin, in one interleaved run per model.

For each model (default resnet50_cbam at 224 and resnet10_half_cbam, CIFAR stem, at 64):

* ``project``   cbam-deploy's program: ``xnnpack-pools`` rewrite, dynamic batch 1..8 (what the build makes);
* ``default``   ExecuTorch's documented path: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner),
                static shape, no rewrite (``peer-executorch-fp32``);
* ``plain``     the same network without CBAM, the same rewrite and bounds (the CBAM overhead's denominator);
* ``plain-default`` the plain twin on ExecuTorch's documented path;
* with ``--int8``: cbam-deploy's INT8 .pte with gates fp and with gates int8 (synthetic calibration: a
  latency, not an accuracy, measurement) and ExecuTorch's PT2E defaults (``peer-executorch-pt2e-int8``).

Printed: the machine (CPU model, cores, ISA) and the date, each program's delegate partitions and the
ops left outside them, medians with 95% intervals, and ratios of medians with paired-bootstrap
intervals (``cbam_deploy.benchstats``): project vs default, and CBAM overhead (cbam / plain twin) per
path, with the stability verdict. Not a timed test: run it on a quiet machine.

Usage: python benchmarks/executorch_edge.py [--models resnet10_half_cbam] [--iters 50] [--threads N] [--int8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path

import numpy as np
import torch

from cbam_deploy.backends.executorch.exporter import Bounds, export_pte
from cbam_deploy.backends.executorch.recipe import quantize_pte
from cbam_deploy.backends.executorch.runner import ExecuTorchRunner
from cbam_deploy.bench import interleaved_latency
from cbam_deploy.benchstats import LoadMonitor, machine_info, median_ci, ratio_ci, verdict, wait_until_quiet
from cbam_deploy.data import load_calibration
from cbam_deploy.export_job import make_input_spec
from cbam_deploy.torch_gates import find_gates
from cbam_deploy.models import build_model
from cbam_deploy.peers import build_peers

SETUPS = {"resnet10_half_cbam": ("cifar", 64)}  # others: imagenet stem, 224


def _model(name: str, stem: str):
    return build_model(name, None, 10 if stem == "cifar" else None, stem, "logits").module.eval()


def _programs(name: str, workdir: Path, int8: bool, threads: int | None) -> tuple[dict, dict, np.ndarray]:
    """{label: runner}, {label: (partitions, outside)} and the input, for one CBAM model and its plain twin."""
    stem, size = SETUPS.get(name, ("imagenet", 224))
    plain_name = name.replace("_cbam", "")
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    bounds = Bounds((1, 8), (size, size), (size, size))
    runners, facts = {}, {}
    for label, model_name in (("project", name), ("plain", plain_name)):
        model = _model(model_name, stem)
        path = workdir / f"{model_name}.pte"
        info = export_pte(model, path, bounds)
        runners[f"{name}/{label}"] = ExecuTorchRunner(path, threads=threads)
        facts[f"{name}/{label}"] = (info["partitions"], info["outside_delegate"])
        peers, skipped = build_peers(model, x, None, workdir / f"peer-{model_name}", threads=threads,
                                     which=["peer-executorch-fp32"])
        default = f"{name}/{'default' if label == 'project' else 'plain-default'}"
        if skipped:
            print(f"{default}: not built: {skipped[0]['reason']}")
        else:
            runners[default] = peers["peer-executorch-fp32"]
            described = runners[default].describe()
            facts[default] = (described["partitions"], described["outside_delegate"])
    if int8:
        model = _model(name, stem)
        expected = find_gates(model, torch.zeros(1, 3, size, size)).describe()["gates"]
        data = load_calibration("synthetic", make_input_spec(size, shape=[1, 3, size, size]), 32)
        for gates in ("fp", "int8"):
            path = workdir / f"{name}-int8-gates-{gates}.pte"
            result = quantize_pte(model, path, data, bounds, gates, expected)
            runners[f"{name}/project-int8-gates-{gates}"] = ExecuTorchRunner(path, threads=threads)
            facts[f"{name}/project-int8-gates-{gates}"] = (result.info["export"]["partitions"],
                                                         result.info["export"]["outside_delegate"])
        peers, skipped = build_peers(model, x, data.inputs, workdir / "peer-int8", threads=threads,
                                     which=["peer-executorch-pt2e-int8"])
        if skipped:
            print(f"{name}/default-int8: not built: {skipped[0]['reason']}")
        else:
            runners[f"{name}/default-int8"] = peers["peer-executorch-pt2e-int8"]
            described = runners[f"{name}/default-int8"].describe()
            facts[f"{name}/default-int8"] = (described["partitions"], described["outside_delegate"])
    return runners, facts, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50_cbam,resnet10_half_cbam")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="XNNPACK threads (default: ExecuTorch's)")
    parser.add_argument("--int8", action="store_true", help="also INT8: gates fp, gates int8, PT2E defaults")
    args = parser.parse_args()
    machine = machine_info()
    print(f"{dt.date.today().isoformat()}  {machine.get('cpu')}  {machine.get('cpu_cores')} cores  "
          f"ISA: {machine.get('cpu_features')}  ({machine.get('machine')})")
    table = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="cbam-et-bench-") as tmp:
            runners, facts, x = _programs(name, Path(tmp), args.int8, args.threads)
            quiet = wait_until_quiet(30)
            with LoadMonitor() as monitor:
                times = interleaved_latency(runners, x, args.iters)
            load = monitor.report
        threads = next(iter(runners.values())).threads()
        print(f"\n{name}: batch 1, input {tuple(x.shape)}, {args.iters} interleaved rounds, XNNPACK threads {threads}, "
              f"quiet wait {quiet}")
        for label, samples in times.items():
            median, low, high = median_ci(samples)
            partitions, outside = facts[label]
            shown = ", ".join(f"{op} x{n}" for op, n in outside.items()) or "nothing"
            print(f"  {label:40s} {median:8.2f} ms [{low:.2f}, {high:.2f}]  partitions {partitions:3d}  outside: {shown}")
        pairs = [("project vs ExecuTorch defaults (latency ratio)", f"{name}/project", f"{name}/default"),
                 ("CBAM overhead, project (cbam / plain twin)", f"{name}/project", f"{name}/plain"),
                 ("CBAM overhead, ExecuTorch defaults", f"{name}/default", f"{name}/plain-default")]
        if args.int8:
            pairs += [("INT8 gates fp vs PT2E defaults", f"{name}/project-int8-gates-fp", f"{name}/default-int8"),
                      ("INT8 gates int8 vs PT2E defaults", f"{name}/project-int8-gates-int8", f"{name}/default-int8"),
                      ("INT8 gates fp / gates int8", f"{name}/project-int8-gates-fp", f"{name}/project-int8-gates-int8")]
        for title, a, b in pairs:
            if a not in times or b not in times:
                continue
            ratio = ratio_ci(times[a], times[b])
            stable = verdict(times[a], load, ratio)
            table.append((name, title, ratio, stable["stable"], stable["reasons"]))
            print(f"  {title:48s} {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]"
                  f"{'' if stable['stable'] else '  UNSTABLE: ' + '; '.join(stable['reasons'])}")
    print("\nsummary (ratios of medians, 95% paired-bootstrap intervals; speed-up = 1 / ratio, for the "
          "comparisons against ExecuTorch's defaults)")
    print(f"{'model':20s} {'comparison':50s} {'ratio':>7s} {'interval':>18s} {'speed-up':>9s} stable")
    for name, title, (ratio, low, high), stable, _ in table:
        speedup = f"{1 / ratio:8.2f}x" if "defaults" in title and "overhead" not in title else f"{'-':>9s}"
        print(f"{name:20s} {title:50s} {ratio:7.3f} [{low:6.3f}, {high:6.3f}] {speedup} {'yes' if stable else 'no'}")
    if not table:
        print("no comparison could be made")


if __name__ == "__main__":
    main()
