"""ExecuTorch (.pte, XNNPACK): export + verify fp32 and INT8 with the gate policy checked, every CBAM
op in the one XNNPACK partition (zoo and third-party styles), the runner's refusals (a shape
outside the export bounds, a damaged .pte) and the missing extra, each in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cbam_deploy.backends.executorch.exporter import Bounds, export_pte, probe
from cbam_deploy.bundle import Bundle
from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.torch_gates import find_gates

ROOT = Path(__file__).resolve().parents[1]
MISSING = probe()
needs_executorch = pytest.mark.skipif(MISSING is not None, reason=f"ExecuTorch extra not installed: {MISSING}")
# lowering every zoo CBAM model takes tens of minutes on 2 cores: run with CBAM_DEPLOY_SWEEP=1
sweep = pytest.mark.skipif(not os.environ.get("CBAM_DEPLOY_SWEEP"),
                           reason="sweeps full-size networks (tens of minutes on 2 cores): set CBAM_DEPLOY_SWEEP=1")


def _styles():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cbam_styles_et", ROOT / "tests" / "data" / "cbam_styles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def et_bundle(tmp_path_factory):
    """resnet10_half_cbam (CIFAR stem, 32 px, dynamic batch) exported with the executorch format in fp32
    and INT8 (gates fp, synthetic calibration), as 'cbam-deploy export' does it."""
    if MISSING:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("et") / "bundle"
    result = CliRunner().invoke(app, ["export", "--model", "resnet10_half_cbam", "--num-classes", "10", "--stem", "cifar",
                                      "--input-size", "32", "--output", str(out), "--format", "executorch",
                                      "--precision", "fp32,int8", "--calib-data", "synthetic", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@needs_executorch
def test_export_fp32_and_int8_one_partition_and_verified(et_bundle):
    out, summary = et_bundle
    rows = {r["artifact"]: r for r in summary["summary"]["rows"] if r.get("artifact")}
    assert rows["executorch-fp32"]["passed"] is True and rows["int8-executorch"]["passed"] is True
    assert rows["executorch-fp32"]["latency_ms"] > 0
    bundle = Bundle.open(out)
    for name in ("executorch-fp32", "int8-executorch"):
        export = bundle.artifact(name).export
        assert export["partitions"] == 1 and export["outside_delegate"] == {}, export
        assert export["bounds"] == {"channels": 3, "batch": [1, 8], "height": [32, 32], "width": [32, 32]}
        rewrite = export["rewrites"][0]
        assert rewrite["name"] == "xnnpack-pools" and rewrite["ops"]["amax"] == 8 and rewrite["ops"]["mean"] == 5
    fp32 = bundle.artifact("executorch-fp32")
    assert fp32.parity is None or "passed" not in fp32.parity or fp32.parity["passed"] is not False
    assert [r["name"] for r in fp32.export["cbam_opt"]["rewrites"]] == ["xnnpack-pools"]  # never mlp-batched
    check = bundle.artifact("int8-executorch").quantization["gate_check"]
    assert check["policy"] == "fp" and check["held"] is True and check["gates"] == 8
    assert all(not g["sigmoid_quantized"] and not g["multiply_quantized"] and not g["quantized_layers"]
               for g in check["per_gate"])


@needs_executorch
def test_verify_checks_parity_and_the_recorded_gate_policy(et_bundle):
    out, _ = et_bundle
    result = CliRunner().invoke(app, ["verify", str(out), "--artifact", "int8-executorch", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["artifact"]: r for r in json.loads(result.stdout)["results"]}
    int8 = rows["int8-executorch"]  # (executorch-fp32 was verified by the export: its summary row)
    assert int8["passed"] is True and int8["gate_policy"]["held"] is True
    assert "opaque" in int8["gate_policy"]["note"]
    assert "delegate call" in int8["attention"]["skipped"]  # said why: a .pte gives no gate maps


@needs_executorch
def test_bench_reports_partitions_and_profile_says_why_not(et_bundle):
    out, _ = et_bundle
    result = CliRunner().invoke(app, ["bench", str(out), "--artifact", "executorch-fp32", "--iters", "3", "--warmup",
                                      "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["runner"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["executorch-fp32"]["partitions"] == 1 and rows["executorch-fp32"]["outside_delegate"] == {}
    assert rows["executorch-fp32"]["p50_ms"] > 0
    result = CliRunner().invoke(app, ["profile", str(out), "--artifact", "executorch-fp32"])
    assert result.exit_code == 2 and "ETDump" in result.output


@needs_executorch
def test_runner_refuses_shapes_outside_the_bounds_in_one_line(et_bundle):
    out, _ = et_bundle
    from cbam_deploy.loaders import open_artifact

    runner = open_artifact(out, Bundle.open(out), "executorch-fp32")
    assert runner.describe()["partitions"] == 1 and runner.threads() >= 1
    assert runner.infer(np.zeros((8, 3, 32, 32), np.float32))["logits"].shape == (8, 10)
    for shape, word in (((9, 3, 32, 32), "batch 1..8"), ((1, 3, 33, 32), "height 32"), ((1, 3, 32, 16), "width 32")):
        with pytest.raises(CbamDeployError) as caught:
            runner.infer(np.zeros(shape, np.float32))
        assert word in str(caught.value) and "\n" not in str(caught.value)


@needs_executorch
def test_serve_runs_the_pte_over_http(et_bundle):
    """cbam-deploy serve with the .pte (the same Runner interface): infer over HTTP matches the runner;
    a batch past the export bound is never formed (the batcher is capped at it)."""
    pytest.importorskip("starlette", reason="serving is the 'serve' extra")
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the test extra")
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import running_server

    from cbam_deploy.serve.app import ServeConfig, create_app

    out, _ = et_bundle
    app = create_app(ServeConfig(str(out), artifact="executorch-fp32", max_batch=32, batch_timeout_ms=5))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with running_server(app) as url:
        client = httpclient.InferenceServerClient(url=url)
        request = httpclient.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        got = client.infer(app.state.model_name, [request]).as_numpy("logits")
    assert app.state.runner.describe()["backend"] == "executorch"
    assert np.abs(got - app.state.runner.infer(x)["logits"]).max() < 1e-6


@needs_executorch
def test_damaged_pte_refused_in_one_line(et_bundle, tmp_path):
    out, _ = et_bundle
    from cbam_deploy.backends.executorch.runner import ExecuTorchRunner

    record = Bundle.open(out).artifact("executorch-fp32")
    source = out / record.path
    for name, damage in (("truncated", lambda data: data[: len(data) // 3]),
                         ("garbage", lambda data: b"\0" * 64 + data[64:])):
        target = tmp_path / f"{name}.pte"
        target.write_bytes(damage(source.read_bytes()))
        shutil.copy(str(source) + ".json", str(target) + ".json")
        with pytest.raises(CbamDeployError) as caught:
            ExecuTorchRunner(target)
        assert "ExecuTorch cannot load" in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "nosidecar.pte").write_bytes(source.read_bytes())
    with pytest.raises(CbamDeployError, match="sidecar"):
        ExecuTorchRunner(tmp_path / "nosidecar.pte")


@needs_executorch
def test_triton_refuses_a_pte_with_the_reason(et_bundle, tmp_path):
    out, _ = et_bundle
    result = CliRunner().invoke(app, ["triton", str(out), "--output", str(tmp_path / "repo"), "--artifact",
                                      "executorch-fp32"])
    assert result.exit_code != 0
    assert "not servable in Triton/KServe" in result.output
    assert not (tmp_path / "repo" / "resnet10_half_cbam").exists()


@needs_executorch
@pytest.mark.parametrize("style", ["yolo_detector"])  # the other styles: the slow sweep below
def test_third_party_cbam_lowers_into_one_partition(style, tmp_path):
    """Pools written as AdaptiveMaxPool2d, torch.max(x, 1, keepdim=True)[0], x.amax(1), view(b, c) ... are
    found by structure and rewritten exactly: one XNNPACK partition, nothing outside."""
    model = getattr(_styles(), style)()
    info = export_pte(model, tmp_path / "m.pte", Bounds((1, 4), (64, 64), (64, 64)))
    assert (info["partitions"], info["outside_delegate"]) == (1, {}), info
    from cbam_deploy.backends.executorch.runner import ExecuTorchRunner

    x = torch.randn(3, 3, 64, 64)
    runner = ExecuTorchRunner(tmp_path / "m.pte")
    got = runner.infer(x.numpy())
    assert runner.computed_precision() == "fp32"  # an fp32 program: XNNPACK computes in its tensors' dtype
    with torch.no_grad():
        ref = model(x)
    ref = [ref] if torch.is_tensor(ref) else list(ref.values()) if isinstance(ref, dict) else list(ref)
    assert max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got.values(), ref)) < 1e-5


@needs_executorch
def test_gate_policy_int8_holds_and_a_broken_policy_fails(tmp_path, monkeypatch):
    from cbam_deploy.backends.executorch import recipe
    from cbam_deploy.data import load_calibration
    from cbam_deploy.export_job import make_input_spec

    model = _tiny_cbam()
    expected = find_gates(model, torch.zeros(1, 3, 32, 32)).describe()["gates"]
    bounds = Bounds((1, 4), (32, 32), (32, 32))
    data = load_calibration("synthetic", make_input_spec(32, shape=[1, 3, 32, 32]), 8)
    result = recipe.quantize_pte(model, tmp_path / "int8.pte", data, bounds, "int8", expected)
    check = result.info["gate_check"]
    assert check["held"] and check["gates"] == len(expected) >= 2
    assert all(g["sigmoid_quantized"] and g["multiply_quantized"] for g in check["per_gate"])
    # the fault: a quantizer without the policy's clean-up lets observers into the gates under --gates fp
    original = recipe._policy_quantizer
    monkeypatch.setattr(recipe, "_policy_quantizer", lambda cls, nodes, gates, rewritten, *rest: original(cls, set(), gates, True, *rest))
    with pytest.raises(CbamDeployError, match="--gates fp does not hold"):
        recipe.quantize_pte(model, tmp_path / "fp.pte", data, bounds, "fp", expected)
    assert not (tmp_path / "fp.pte").exists()  # nothing written for a build that broke the policy


def _tiny_cbam():
    from cbam_deploy.models.layers import CBAM

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), CBAM(16, 4),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


@needs_executorch
def test_dynamic_height_and_width_within_bounds_exact_beyond_refused(tmp_path):
    """Dynamic batch, H and W: one partition; any shape inside the bounds exact (the max pools take the
    bound as their window, clamped to the input); a side past the bound refused before it runs."""
    from cbam_deploy.backends.executorch.runner import ExecuTorchRunner

    model = _tiny_cbam()
    info = export_pte(model, tmp_path / "dyn.pte", Bounds((1, 4), (16, 64), (16, 64)))
    assert (info["partitions"], info["outside_delegate"]) == (1, {}), info
    runner = ExecuTorchRunner(tmp_path / "dyn.pte")
    for shape in ((1, 3, 64, 64), (3, 3, 40, 24), (4, 3, 16, 63)):
        x = np.random.default_rng(sum(shape)).standard_normal(shape, dtype=np.float32)
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        assert np.abs(runner.run(x) - reference).max() < 1e-5, shape
    with pytest.raises(CbamDeployError, match="height 16..64; got 65"):
        runner.run(np.zeros((1, 3, 65, 32), np.float32))


@needs_executorch
def test_executorch_default_peer_leaves_cbam_pools_outside(tmp_path):
    """ExecuTorch's documented path (no rewrite): the pools stay outside the delegate, in several calls;
    on third-party code such as torch.max(x, 1, keepdim=True)[0] it does not lower at all (said why)."""
    from cbam_deploy.peers import build_peers

    model = _tiny_cbam()
    example = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    runners, skipped = build_peers(model, example, None, tmp_path, which=["peer-executorch-fp32",
                                                                         "peer-executorch-pt2e-int8"])
    assert [s["peer"] for s in skipped] == ["peer-executorch-pt2e-int8"]  # no calibration data given
    info = runners["peer-executorch-fp32"].describe()
    assert info["partitions"] > 1 and info["outside_delegate"].get("aten.amax.default") == 2, info
    assert "to_edge_transform_and_lower" in info["made_by"]
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    assert np.abs(runners["peer-executorch-fp32"].run(x) - reference).max() < 1e-5
    with pytest.raises(CbamDeployError, match="exported for inputs of shape"):
        runners["peer-executorch-fp32"].run(x[:, :, :16])
    _, skipped = build_peers(_styles().yolo_detector(), np.zeros((1, 3, 64, 64), np.float32), None, tmp_path,
                             which=["peer-executorch-fp32"])
    assert "amax" in skipped[0]["reason"]


def test_missing_extra_reported_in_one_line(tmp_path):
    """With executorch removed from the interpreter (sys.modules entry None: import fails), the
    format's probe and the runtime give the one install line."""
    code = (
        "import sys; sys.modules['executorch'] = None\n"
        "from cbam_deploy.formats import get\n"
        "from cbam_deploy.runtimes import available_runtimes, runtimes\n"
        "from cbam_deploy.errors import CbamDeployError\n"
        "print(get('executorch').probe())\n"
        "print('executorch' in available_runtimes())\n"
        "try:\n"
        "    runtimes()['executorch'].open(sys.argv[1])\n"
        "except CbamDeployError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pte")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].endswith("pip install 'cbam-deploy[executorch]'") and lines[1] == "False"
    assert lines[2].startswith("refused:") and "pip install 'cbam-deploy[executorch]'" in lines[2]
    assert len(lines) == 3


@pytest.mark.slow
@sweep
@needs_executorch
@pytest.mark.parametrize("outputs", ["logits", "features"])
def test_every_zoo_cbam_model_lowers_into_one_partition(outputs, tmp_path):
    from cbam_deploy.models import build_model
    from cbam_deploy.models.registry import get_entry, list_models

    names = [name for name in list_models() if get_entry(name).attention == "cbam"]
    assert names
    for name in names:
        model = build_model(name, None, 10, "imagenet", outputs).module.eval()
        info = export_pte(model, tmp_path / f"{name}.pte", Bounds((1, 2), (64, 64), (64, 64)))
        assert (info["partitions"], info["outside_delegate"]) == (1, {}), (name, info)


@pytest.mark.slow
@sweep
@needs_executorch
@pytest.mark.parametrize("style", ["third_party_resnet", "neutral_names", "official_layout"])
def test_other_third_party_styles_lower_into_one_partition(style, tmp_path):
    test_third_party_cbam_lowers_into_one_partition(style, tmp_path)
