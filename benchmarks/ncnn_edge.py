"""Batch-1 ncnn latency: the project's ncnn artifact against pnnx/ncnn's defaults and the plain twin.

Per CBAM model (``--models``, default resnet50_cbam,resnet10_half_cbam), in one interleaved run:

* ``project``       cbam-deploy's pair: fp32 weights, the ``ncnn-pools`` rewrite (no Reduction layer),
                    ncnn's precision pinned to fp32;
* ``pnnx-default``  ``pnnx.export(model, ..., inputs=x)`` with its defaults (fp16 weights, CBAM pools
                    as Reduction layers), ncnn's default options (fp16 storage/arithmetic where the CPU
                    has them): what a user gets without this tool;
* ``plain``         the plain twin (the same ResNet without CBAM) converted the project's way: the
                    CBAM overhead is project / plain;
* ``project-int8``  (``--int8``) the project's INT8 pair, gates fp, synthetic calibration data.

Prints the machine (CPU model, cores, ISA flags), the date, the median latency per runner with its
bootstrap interval, and ratios of medians with paired-bootstrap intervals (``cbam_deploy.benchstats``),
each with the load verdict (other processes' CPU use, spread, drift). Not a timed test.
Usage: python benchmarks/ncnn_edge.py [--models resnet10_half_cbam] [--iters 40] [--threads 2] [--int8] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from cbam_deploy.backends.ncnn.exporter import NcnnParam, convert, ncnn_pair, quantize_int8, write_pair
from cbam_deploy.backends.ncnn.recipe import activation_table
from cbam_deploy.backends.ncnn.runner import NcnnRunner
from cbam_deploy.bench import interleaved_latency
from cbam_deploy.benchstats import LoadMonitor, machine_info, median_ci, ratio_ci, verdict, wait_until_quiet
from cbam_deploy.data import CalibrationSet
from cbam_deploy.backends.ncnn.gates import ncnn_gates
from cbam_deploy.models import create_model

SIZES = {"resnet10_half_cbam": (64, "cifar", 10)}  # model -> (side, stem, classes); the rest 224, imagenet, 1000


def _model(name: str, like: str | None = None):
    """The model, random init (seed 0), at the size and stem of ``like`` (the CBAM model it is the twin of)."""
    side, stem, classes = SIZES.get(like or name, (224, "imagenet", 1000))
    torch.manual_seed(0)
    return create_model(name, num_classes=classes, stem=stem).eval(), side


def _plain(name: str) -> str:
    return name[:-len("_cbam")] if name.endswith("_cbam") else name


def build(name: str, folder: Path, threads: int | None, int8: bool) -> tuple[dict, dict]:
    module, side = _model(name)
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    runners, facts = {}, {}
    info = ncnn_pair(module, x, ["logits"], folder, "project", second_size=None)
    facts["project"] = {"layers": info["layers"], "generic_layers": info["generic_layers"],
                        "parity_max_rel_error": info["parity_at_build"]["max_rel_error"]}
    runners["project"] = NcnnRunner(folder / "project.param", threads=threads)
    convert(module, torch.from_numpy(x), folder / "default.param", folder / "default.bin", fp16_weights=True)
    facts["pnnx-default"] = {"layers": NcnnParam.read(folder / "default.param").counts()}
    runners["pnnx-default"] = NcnnRunner(folder / "default.param", precision="fp16", threads=threads, pinned=False)
    plain, _ = _model(_plain(name), like=name)
    ncnn_pair(plain, x, ["logits"], folder, "plain", second_size=None)
    runners["plain"] = NcnnRunner(folder / "plain.param", threads=threads)
    if int8:
        calib = np.random.default_rng(1).standard_normal((32, 3, side, side)).astype(np.float32)
        data = CalibrationSet(calib, "synthetic", "synthetic", "bench")
        table = activation_table(folder / "project.param", folder / "project.bin", data, "minmax")
        param = NcnnParam.read(folder / "project.param")
        gate_layers = {n for g in ncnn_gates(param.layers) for n in g.record["ncnn_layers"]}
        q_param, q_bin, record = quantize_int8(param, (folder / "project.bin").read_bytes(),
                                               {k: v for k, v in table.items() if k not in gate_layers})
        write_pair(q_param, q_bin, folder / "int8.param", folder / "int8.bin")
        facts["project-int8"] = {"int8_layers": len(record["quantized_layers"]), "float_gate_layers": len(gate_layers)}
        runners["project-int8"] = NcnnRunner(folder / "int8.param", precision="int8", threads=threads)
    for key, runner in runners.items():
        facts.setdefault(key, {})["ran"] = {k: runner.describe()[k] for k in ("compute_precision", "threads")}
    return runners, {"input": [1, 3, side, side], "runners": facts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50_cbam,resnet10_half_cbam")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="ncnn threads (default: ncnn's, the big cores)")
    parser.add_argument("--int8", action="store_true", help="also time the project's INT8 pair (gates fp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {"machine": machine_info(), "date": datetime.date.today().isoformat(), "batch": 1, "iterations": args.iters,
              "models": {}}
    with tempfile.TemporaryDirectory(prefix="ncnn-edge-") as tmp:
        for name in args.models.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            runners, facts = build(name, folder, args.threads, args.int8)
            x = np.random.default_rng(2).standard_normal(facts["input"]).astype(np.float32)
            quiet = wait_until_quiet(30)
            with LoadMonitor() as monitor:
                times = interleaved_latency(runners, x, args.iters)
            load = monitor.report
            rows = {}
            for key, values in times.items():
                p50, low, high = median_ci(values)
                rows[key] = {"p50_ms": round(p50, 3), "ci_ms": [round(low, 3), round(high, 3)],
                             **verdict(values, load), **facts["runners"][key]}
            ratios = {}
            pairs = [("pnnx-default / project", "pnnx-default", "project"), ("cbam overhead: project / plain", "project", "plain")]
            if "project-int8" in times:
                pairs.append(("project / project-int8", "project", "project-int8"))
            for label, a, b in pairs:
                r = ratio_ci(times[a], times[b])
                ratios[label] = {"ratio": round(r[0], 3), "ci": [round(r[1], 3), round(r[2], 3)],
                                 "stable": verdict(times[a], load, r)["stable"] and verdict(times[b], load, r)["stable"]}
            report["models"][name] = {"input": facts["input"], "quiet_before": quiet, "load": load.as_dict(),
                                      "runners": rows, "ratios": ratios}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    m = report["machine"]
    print(f"{m.get('cpu', '?')}, {m['cpu_cores']} cores, ISA: {m.get('cpu_features', '?')}; {report['date']}; "
          f"batch 1, {args.iters} interleaved iterations")
    for name, result in report["models"].items():
        print(f"\n{name} {'x'.join(map(str, result['input']))} (other processes: "
              f"{result['load']['other_cpu_fraction']:.0%} of the CPUs)")
        for key, row in result["runners"].items():
            flag = "" if row["stable"] else "  UNSTABLE: " + "; ".join(row["reasons"])
            print(f"  {key:14s} {row['p50_ms']:8.2f} ms [{row['ci_ms'][0]:.2f}, {row['ci_ms'][1]:.2f}]  "
                  f"{row['ran']['compute_precision']}, {row['ran']['threads']} threads{flag}")
        for label, r in result["ratios"].items():
            print(f"  {label:32s} x{r['ratio']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
                  + ("" if r["stable"] else "  (unstable)"))


if __name__ == "__main__":
    main()
