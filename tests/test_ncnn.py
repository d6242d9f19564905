"""The ncnn format (pnnx conversion, ncnn runtime): export + verify in fp32 and INT8, the ncnn-pools
rewrite (no generic layer left, on the zoo and on third-party CBAM code), dynamic H/W, the batch loop,
the INT8 gate policy checked on the .param, damaged files and the missing extra refused in one line.
Small on purpose: resnet10_half_cbam at 32x32."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("ncnn", reason="the ncnn extra is not installed: pip install 'cbam-deploy[ncnn]'")
pytest.importorskip("pnnx", reason="the ncnn extra is not installed: pip install 'cbam-deploy[ncnn]'")

from cbam_deploy.backends.ncnn.exporter import NcnnParam, ncnn_pair  # noqa: E402
from cbam_deploy.backends.ncnn.runner import NcnnRunner  # noqa: E402
from cbam_deploy.bundle import Bundle  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.backends.ncnn.gates import check_ncnn_policy  # noqa: E402
from cbam_deploy.torch_gates import find_gates  # noqa: E402
from cbam_deploy.loaders import reference_runner  # noqa: E402
from cbam_deploy.verify import verify_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import cbam_styles  # noqa: E402
cli = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """resnet10_half_cbam (CIFAR stem, 4 classes, 32x32, dynamic H/W) exported by the CLI with the
    ncnn artifacts in fp32 and INT8 (gates fp, synthetic calibration)."""
    out = tmp_path_factory.mktemp("ncnn") / "bundle"
    result = cli.invoke(app, ["export", "-m", "resnet10_half_cbam", "--stem", "cifar", "--num-classes", "4",
                              "--dynamic-hw", "-o", str(out), "--format", "ncnn", "--precision", "fp32,int8",
                              "--calib-data", "synthetic", "--no-parity", "--json"])
    assert result.exit_code == 0, result.output
    return out


def _artifact(bundle_dir: Path, name: str) -> dict:
    return next(a for a in json.loads((bundle_dir / "manifest.json").read_text())["artifacts"] if a["name"] == name)


def test_fp32_every_cbam_pool_on_an_optimised_layer_and_exact(bundle):
    record = _artifact(bundle, "ncnn-fp32")
    info = record["export"]
    assert record["path"] == "model.ncnn-fp32.param" and set(record["companion_files"]) == {"model.ncnn-fp32.bin"}
    assert not [p for p in bundle.iterdir() if p.name.startswith("model.") and "pnnx" in p.name]  # no side files
    assert info["pnnx_layers"]["Reduction"] == 17  # pnnx's own mapping: every pool a generic Reduction
    assert info["generic_layers"] == {}
    assert "Reduction" not in info["layers"]
    rewrite = record["cbam_opt"]["rewrites"][0]
    assert (rewrite["name"], rewrite["hw_pools"], rewrite["channel_pools"], rewrite["reductions_left"]) == \
        ("ncnn-pools", 9, 8, [])
    assert "Reduction" not in (bundle / record["path"]).read_text()
    assert info["precision_pinned"]["runtime"]["use_fp16_storage"] is False
    assert info["input_shape_policy"]["hw"].startswith("any H, W")
    reference, label = reference_runner(Bundle.open(bundle))
    assert label == "pytorch-fp32"
    runner = NcnnRunner(bundle / record["path"])
    assert runner.describe()["compute_precision"] == "fp32" and runner.describe()["ncnn_options"]["use_fp16_arithmetic"] is False
    rng = np.random.default_rng(3)
    for shape in ((3, 3, 32, 32), (2, 3, 64, 48)):  # batch > 1 (looped), and another H, W than the traced one
        x = rng.standard_normal(shape, dtype=np.float32)
        got, expected = runner.infer(x), reference.infer(x)
        assert set(got) == set(expected) == {"logits"}
        assert got["logits"].shape == expected["logits"].shape
        assert float(np.abs(got["logits"] - expected["logits"]).max()) < 1e-5


def test_int8_gate_policy_on_the_artifact_and_verify(bundle):
    record = _artifact(bundle, "int8-ncnn")
    check = record["quantization"]["gate_check"]
    assert check["held"] and check["gates"] == 8 and check["policy"] == "fp"
    param = NcnnParam.read(bundle / record["path"])
    gate_layers = set(record["quantization"]["gate_layers"])
    assert len(gate_layers) == 20  # 4 channel gates x 4 inner products (the shared MLP, twice) + 4 spatial convs
    for layer in param.layers:
        if layer.type in ("Convolution", "InnerProduct"):
            assert (layer.int(8) == 2) == (layer.name not in gate_layers), layer.name
    assert record["parity"]["passed"] and record["parity"]["cosine_mean"] > 0.99
    result = verify_bundle(bundle, artifacts=["ncnn-fp32", "int8-ncnn"])
    rows = {r["artifact"]: r for r in result["results"]}
    assert rows["ncnn-fp32"]["passed"] and rows["int8-ncnn"]["passed"], rows
    assert rows["int8-ncnn"]["gate_policy"]["held"] is True
    for name in ("ncnn-fp32", "int8-ncnn"):  # gate maps read from ncnn's blobs
        attention = rows[name]["attention"]
        assert attention["passed"] and attention["counts"] == {"spatial": 4, "channel": 4, "joint": 0, "not_found": 0}

    # an artifact that breaks the policy: a gate layer given int8 scales
    victim = sorted(gate_layers)[0]
    for layer in param.layers:
        if layer.name == victim:
            layer.params["8"] = "2"
    expected = Bundle.open(bundle).model.gate_list
    broken = check_ncnn_policy(param.layers, expected, "fp", "tampered")
    assert broken["held"] is False and any(victim in line for line in broken["broken"])
    unquantized = check_ncnn_policy(NcnnParam.read(bundle / _artifact(bundle, "ncnn-fp32")["path"]).layers, expected,
                                    "int8", "fp32 model")
    assert unquantized["held"] is False and len(unquantized["broken"]) == 8


def test_quantize_target_ncnn_gates_int8(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    result = cli.invoke(app, ["quantize", str(copy), "--target", "ncnn", "--gates", "int8", "--calib-data", "synthetic",
                              "--calib-size", "16", "--json"])
    assert result.exit_code == 0, result.output
    record = _artifact(copy, "int8-ncnn-gates-int8")
    assert record["quantization"]["gate_check"]["held"]
    param = NcnnParam.read(copy / record["path"])
    assert all(layer.int(8) == 2 for layer in param.layers if layer.type in ("Convolution", "InnerProduct"))


@pytest.mark.parametrize("style", ["third_party_resnet", "neutral_names"])
def test_third_party_cbam_code_maps_to_optimised_layers(style, tmp_path):
    module = getattr(cbam_styles, style)().eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    info = ncnn_pair(module, x, ["logits"], tmp_path, "m", second_size=(64, 48))
    assert info["pnnx_layers"].get("Reduction", 0) > 0 and "Reduction" not in info["layers"]
    assert info["generic_layers"] == {} and info["rewrite"]["reductions_left"] == []
    assert info["input_shape_policy"]["hw"].startswith("any H, W")
    param = NcnnParam.read(tmp_path / "m.param")
    expected = find_gates(module, torch.from_numpy(x)).describe()["gates"]
    check = check_ncnn_policy(param.layers, expected, "fp", style)  # every gate found by structure, none quantized
    assert check["held"] and check["gates"] == len(expected) == 4


def test_third_party_resnet18_benchmark_style(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "styles"))
    try:
        from third_party_resnet18 import resnet18_cbam
    finally:
        sys.path.pop(0)
    module = resnet18_cbam(num_classes=10).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    info = ncnn_pair(module, x, ["logits"], tmp_path, "m", second_size=None)
    assert info["generic_layers"] == {} and "Reduction" not in info["layers"]
    assert info["rewrite"]["channel_pools"] == 16 and info["input_shape_policy"]["hw"].startswith("fixed 32x32")


def test_fixed_size_refused_in_one_line(tmp_path):
    from cbam_deploy.models import create_model

    module = create_model("resnet10_half_cbam", num_classes=4, stem="cifar").eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    ncnn_pair(module, x, ["logits"], tmp_path, "m", second_size=None)  # a bundle with a fixed input
    runner = NcnnRunner(tmp_path / "m.param")
    assert runner.run(x).shape == (1, 4)
    with pytest.raises(CbamDeployError, match=r"built for 3x32x32 .* got 3x64x64") as caught:
        runner.run(np.zeros((1, 3, 64, 64), np.float32))
    assert "\n" not in str(caught.value)
    with pytest.raises(CbamDeployError, match="N x C x H x W"):
        runner.run(np.zeros((3, 32, 32), np.float32))


@pytest.mark.parametrize("fault", ["truncated-param", "truncated-bin", "garbage-param", "longer-bin", "missing-bin"])
def test_damaged_files_refused_in_one_line(bundle, tmp_path, fault):
    record = _artifact(bundle, "ncnn-fp32")
    param, binary = tmp_path / "m.param", tmp_path / "m.bin"
    shutil.copyfile(bundle / record["path"], param)
    shutil.copyfile(bundle / "model.ncnn-fp32.bin", binary)
    if fault == "truncated-param":
        param.write_text("\n".join(param.read_text().splitlines()[:40]))
    elif fault == "truncated-bin":
        binary.write_bytes(binary.read_bytes()[:100_000])
    elif fault == "garbage-param":
        param.write_bytes(b"\x00\x01not a param\xff" * 10)
    elif fault == "longer-bin":
        binary.write_bytes(binary.read_bytes() + b"\0" * 64)
    else:
        binary.unlink()
    with pytest.raises(CbamDeployError) as caught:
        NcnnRunner(param)
    assert "\n" not in str(caught.value) and ("ncnn" in str(caught.value) or ".param" in str(caught.value))


def test_damaged_artifact_refused_by_the_cli(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "model.ncnn-fp32.bin").write_bytes((copy / "model.ncnn-fp32.bin").read_bytes()[:5000])
    result = cli.invoke(app, ["verify", str(copy), "--artifact", "ncnn-fp32"])
    assert result.exit_code != 0
    assert "model.ncnn-fp32.bin" in result.output


def test_missing_extra_reported_in_one_line(bundle, tmp_path):
    """The ncnn library removed (sys.modules['ncnn'] = None makes its import fail): the probe, the build
    and the runner each say so in one line, naming the extra."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    script = f"""
import sys
sys.modules['ncnn'] = None
from cbam_deploy.build import build_artifacts
from cbam_deploy.formats import get
from cbam_deploy.runtimes import runtimes
from cbam_deploy.errors import BackendUnavailable
print('PROBE', get('ncnn').probe())
print('RUNTIME', runtimes()['ncnn'].probe())
print('BUILD', build_artifacts({str(copy)!r}, 'ncnn', 'fp32')[0].skipped)
from cbam_deploy.backends.ncnn.runner import NcnnRunner
try:
    NcnnRunner({str(copy / 'model.ncnn-fp32.param')!r})
except BackendUnavailable as exc:
    print('RUNNER', exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ")[0].isupper())
    assert set(lines) == {"PROBE", "RUNTIME", "BUILD", "RUNNER"}
    for key, line in lines.items():
        assert "pip install 'cbam-deploy[ncnn]'" in line, (key, line)


def test_not_servable_in_triton(bundle, tmp_path):
    result = cli.invoke(app, ["triton", str(bundle), "--artifact", "ncnn-fp32", "-o", str(tmp_path / "repo")])
    assert result.exit_code != 0
    assert "not servable in Triton/KServe" in result.output


def test_served_with_the_same_runner(bundle):
    """serve opens the ncnn artifact through the runtimes table, like any other: a request through the
    Open Inference Protocol gives the runner's answer."""
    import tritonclient.http as httpclient
    from serving import running_server

    from cbam_deploy.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(str(bundle), artifact="ncnn-fp32", max_batch=4, batch_timeout_ms=5))
    with running_server(app) as url:
        client = httpclient.InferenceServerClient(url=url)
        x = np.random.default_rng(5).standard_normal((2, 3, 32, 32), dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(app.state.model_name, [tensor])
        assert app.state.runner.backend == "ncnn"
        np.testing.assert_allclose(result.as_numpy("logits"), NcnnRunner(bundle / "model.ncnn-fp32.param").run(x),
                                   rtol=1e-5, atol=1e-6)


def test_factory_model_built_only_when_trusted(tmp_path):
    """A bundle made from a factory (Python code): the ncnn build needs that code run again, so without
    the factory named (or --trust-code) it is skipped with the reason; named, it is built."""
    from cbam_deploy.build import build_artifacts
    from cbam_deploy.export_job import ExportOptions, export_bundle
    from cbam_deploy.models import CodeTrust

    spec = f"{ROOT / 'tests' / 'data' / 'cbam_styles.py'}:third_party_resnet"
    out = tmp_path / "b"
    export_bundle(ExportOptions(model=spec, output=str(out), input_size=32, parity=False))
    skipped = build_artifacts(out, "ncnn", "fp32")[0]
    assert skipped.name is None and "ncnn is converted from the PyTorch model" in skipped.skipped
    assert "--trust-code" in skipped.skipped and "\n" not in skipped.skipped
    built = build_artifacts(out, "ncnn", "fp32", trust=CodeTrust(factory=spec))[0]
    assert built.name == "ncnn-fp32", built.skipped
    info = _artifact(out, "ncnn-fp32")["export"]
    assert info["generic_layers"] == {} and info["rewrite"]["channel_pools"] == 4


def test_a_size_baked_into_a_reshape_fixes_the_input(tmp_path):
    """The detector style flattens its maps with the traced size (pnnx writes it into a Reshape): the
    check at a second size finds it, the size is fixed in the .param, and the runner refuses others."""
    module = cbam_styles.yolo_detector().eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    info = ncnn_pair(module, x, ["p3", "p4"], tmp_path, "m", second_size=(64, 48))
    assert info["input_shape_policy"]["hw"].startswith("fixed 32x32 (at another size:")
    assert info["generic_layers"] == {} and info["rewrite"]["channel_pools"] == 4
    runner = NcnnRunner(tmp_path / "m.param")
    with torch.inference_mode():
        expected = [t.numpy() for t in module(torch.from_numpy(x))]
    got = runner.infer(x)
    assert list(got) == ["p3", "p4"]
    for value, reference in zip(got.values(), expected):
        assert value.shape == reference.shape and float(np.abs(value - reference).max()) < 1e-5
    with pytest.raises(CbamDeployError, match="built for 3x32x32"):
        runner.infer(np.zeros((1, 3, 64, 48), np.float32))


def test_the_runner_reports_the_precision_ncnn_computes_in(bundle):
    """verify judges by what ran: the pinned runner says fp32, ncnn's own defaults say what the loaded
    net's options hold (fp16 where this CPU has it), read back from the net, not from the claim."""
    param = bundle / "model.ncnn-fp32.param"
    pinned = NcnnRunner(param, precision="fp32")
    assert pinned.computed_precision() == "fp32"
    defaults = NcnnRunner(param, precision="fp32", pinned=False)
    opt = defaults.net.opt
    expected = "fp16" if opt.use_fp16_arithmetic or opt.use_fp16_storage else "bf16" if opt.use_bf16_storage else "fp32"
    assert defaults.computed_precision() == expected
    int8 = bundle / _artifact(bundle, "int8-ncnn")["path"]
    assert NcnnRunner(int8, precision="int8").computed_precision() is None
