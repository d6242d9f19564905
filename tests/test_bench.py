"""bench's statistics end to end (intervals, ratios of medians, verdicts, --strict, --overhead) and
the profile roll-up, on the small reference-sized network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbam_deploy.bench import UnstableMeasurement, bench_bundle, bench_runners
from cbam_deploy.cli import app
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.pipeline import bench_with_twins
from cbam_deploy.profile import CATEGORIES, categorize, gate_index, profile_bundle
from cbam_deploy.quantize import quantize_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(root), parity=False))
    quantize_bundle(root, ["ort-cpu", "openvino"], "synthetic", calib_size=16, check_samples=8, use_cache=False)
    return root


def test_rows_carry_medians_intervals_ratios_threads_and_a_verdict(bundle):
    result = bench_bundle(bundle, [1], iters=15, warmup=1)
    rows = {r["runner"]: r for r in result["results"]}
    assert set(rows) == {"pytorch", "onnx-fp32", "int8-ort-cpu", "int8-openvino"}
    for row in rows.values():
        low, high = row["p50_ci_ms"]
        assert low <= row["p50_ms"] <= high and len(row["samples_ms"]) == 15
        assert row["threads"] and row["threads"] >= 1
        assert set(row["stability"]) >= {"stable", "reasons", "spread", "drift"}
        assert row["load"]["cores"] == os.cpu_count()
        ratio = float(np.median(row["samples_ms"]) / np.median(rows["pytorch"]["samples_ms"]))
        assert row["ratio_to_pytorch"] == pytest.approx(ratio, rel=1e-4)  # a ratio of medians, not of means
        assert row["ratio_ci"][0] <= row["ratio_to_pytorch"] <= row["ratio_ci"][1]
    assert isinstance(result["stable"], bool)


def test_strict_fails_a_run_disturbed_on_purpose(bundle):
    from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner

    runners = {"pytorch": OnnxRuntimeRunner(bundle / "model.onnx"), "onnx-fp32": OnnxRuntimeRunner(bundle / "model.onnx")}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        with pytest.raises(UnstableMeasurement, match="other processes used"):
            bench_runners(runners, (3, 32, 32), [1], iters=200, warmup=1, strict=True)
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()


def test_overhead_pairs_each_engine_with_the_plain_twin(bundle):
    result = bench_with_twins(bundle, [1], iters=8, warmup=1, overhead=True)
    assert result["overhead"]["plain"] == "resnet10_half"
    rows = {o["engine"]: o for o in result["overhead"]["rows"]}
    assert set(rows) == {"pytorch", "onnx-fp32", "int8-ort-cpu", "int8-openvino"}
    for row in rows.values():
        assert row["overhead_ci"][0] <= row["overhead"] <= row["overhead_ci"][1]
        assert row["overhead"] == pytest.approx(row["attention_p50_ms"] / row["plain_p50_ms"], rel=1e-4)
    assert not any(r["runner"].startswith("plain:") for r in result["results"])


def test_cbam_opt_compare_pairs_each_engine_with_the_other_mode(bundle, tmp_path):
    """The bundle (exported with the default --cbam-opt on) against the same model exported with
    --cbam-opt off and built with the same recipes, in the same rounds; CLI table and markdown too."""
    result = bench_with_twins(bundle, [1], iters=6, warmup=1, cbam_opt_compare=True)
    assert result["cbam_opt"]["mode"] == "on" and [r["name"] for r in result["cbam_opt"]["rewrites"]] == ["mlp-batched"]
    assert result["cbam_opt_compare"]["other"] == "off"
    rows = {o["engine"]: o for o in result["cbam_opt_compare"]["rows"]}
    assert set(rows) == {"onnx-fp32", "int8-ort-cpu", "int8-openvino"}  # pytorch runs the module as written either way
    for row in rows.values():
        assert row["overhead_ci"][0] <= row["overhead"] <= row["overhead_ci"][1]
        assert row["overhead"] == pytest.approx(row["attention_p50_ms"] / row["plain_p50_ms"], rel=1e-4)
    assert not any(r["runner"].startswith("cbam-opt-") for r in result["results"])
    md = tmp_path / "r.md"
    cli = CliRunner().invoke(app, ["bench", str(bundle), "--iters", "4", "--warmup", "1", "--artifact", "onnx-fp32",
                                   "--cbam-opt-compare", "--markdown", str(md)])
    assert cli.exit_code == 0, cli.output
    assert "--cbam-opt on / off (mlp-batched)" in cli.output and "--cbam-opt on over off" in md.read_text()


def test_overhead_refuses_a_model_without_attention(tmp_path):
    from cbam_deploy.errors import CbamDeployError

    plain = tmp_path / "plain"
    export_bundle(ExportOptions(model="resnet10_half", stem="cifar", output=str(plain), parity=False))
    with pytest.raises(CbamDeployError, match="no attention"):
        bench_with_twins(plain, [1], iters=2, warmup=0, overhead=True)


def test_cli_bench_json_and_markdown(bundle, tmp_path):
    md = tmp_path / "r.md"
    result = CliRunner().invoke(app, ["bench", str(bundle), "--iters", "4", "--warmup", "1", "--artifact", "onnx-fp32",
                                      "--json", "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["runner"] for r in data["results"]] == ["pytorch", "onnx-fp32"]
    assert "x PyTorch [95% CI]" in md.read_text() and "p50 ms [95% CI]" in md.read_text()


def test_categorize_by_module_and_op():
    modules = gate_index([{"name": "layer1.0.cbam.ChannelGate", "kind": "channel", "module": "layer1.0.cbam.ChannelGate"},
                          {"name": "layer1.0.cbam.SpatialGate", "kind": "spatial", "module": "layer1.0.cbam.SpatialGate"}])
    assert categorize("/layer1/layer1.0/cbam/ChannelGate/mlp/mlp.1/Gemm", "FusedGemm", modules)[0] == "channel gate"
    assert categorize("/layer1/layer1.0/cbam/SpatialGate/spatial/conv/Conv", "Conv", modules)[0] == "spatial gate"
    assert categorize("/layer1/layer1.0/conv1/Conv_token_28", "QLinearConv", modules)[0] == "conv"
    assert categorize("/layer1/layer1.0/cbam/ChannelGate/ReduceMax_acdb_abcd_x", "Reorder", modules)[0] == "layout"
    assert categorize("onnx::Conv_264_DequantizeLinear", "DequantizeLinear", modules)[0] == "quantize/dequantize"
    assert categorize("/fc/Gemm", "Gemm", modules)[0] == "other"


def test_profile_rolls_up_every_artifact_and_draws_it(bundle, tmp_path):
    result = profile_bundle(bundle, runs=3, warmup=1)
    assert [r["artifact"] for r in result["results"]] == ["onnx-fp32", "int8-ort-cpu", "int8-openvino"]
    for row in result["results"]:
        shares = {c["category"]: c["ms"] for c in row["categories"]}
        assert list(shares) == list(CATEGORIES)
        assert sum(shares.values()) == pytest.approx(row["total_ms"]) and row["total_ms"] > 0
        assert shares["conv"] > 0 and shares["channel gate"] > 0 and shares["spatial gate"] > 0
    png = tmp_path / "p.png"
    cli = CliRunner().invoke(app, ["profile", str(bundle), "--runs", "2", "--warmup", "0", "--plot", str(png)])
    assert cli.exit_code == 0, cli.output
    assert "spatial gate" in cli.stdout
    with Image.open(png) as image:
        assert image.size[0] > 300


def test_rounds_shuffle_who_follows_whom_and_wait_out_settle_time():
    """A rotation keeps every runner behind the same neighbour (a runner always right after PyTorch ran
    10% slower); rounds are shuffled instead, and a runner's settle time is waited out, untimed."""
    import time as _time

    from cbam_deploy.bench import interleaved_latency
    from cbam_deploy.runners.base import Runner

    calls: list[tuple[str, float]] = []

    class Recorder(Runner):
        def __init__(self, name: str, settle: float = 0.0) -> None:
            self.name, self.settle_seconds = name, settle

        def infer(self, batch):
            calls.append((self.name, _time.perf_counter()))
            return {"output": batch[:, :1, 0, 0]}

    runners = {n: Recorder(n, 0.02 if n == "a" else 0.0) for n in "abcd"}
    times = interleaved_latency(runners, np.zeros((1, 3, 4, 4), np.float32), iters=40, warmup=0)
    assert all(len(v) == 40 for v in times.values())
    rounds = [[name for name, _ in calls[i:i + 4]] for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    behind = {(r[i], r[i + 1]) for r in rounds for i in range(3)}
    assert behind == {(x, y) for x in "abcd" for y in "abcd" if x != y}  # every order of neighbours occurred
    gaps = [calls[i + 1][1] - calls[i][1] for i in range(len(calls) - 1) if calls[i][0] == "a" and (i + 1) % 4]
    assert gaps and min(gaps) >= 0.02 and max(times["a"]) < 20  # the wait is not in a's time


def test_bench_model_checks_its_options_once(monkeypatch):
    """One place validates bench's options: bench --model checks them before its export, and the bench
    after the export does not check them again."""
    import cbam_deploy.bench as bench
    import cbam_deploy.pipeline as pipeline

    calls, real = [], bench.check_bench_options

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "check_bench_options", counted)
    monkeypatch.setattr(bench, "check_bench_options", counted)
    result = pipeline.bench_model("resnet10_half_cbam", batches="1", iters=2, warmup=0, artifacts=["onnx-fp32"])
    assert [r["runner"] for r in result["results"]] == ["pytorch", "onnx-fp32"]
    assert len(calls) == 1
