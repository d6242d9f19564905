"""Runtimes as an axis: one ONNX artifact under onnxruntime's providers and under
OpenVINO; selection, refusal, parity between runtimes, bench rows per runtime, verify, and the
providers that really ran (onnxruntime's silent fallback detected). The ort-openvino tests run where
onnxruntime-openvino is installed (another venv: see the module's last tests)."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbam_deploy import runtimes
from cbam_deploy.backends.onnx import plugin as onnx_plugin
from cbam_deploy.backends.onnx.runner import CPU_EP, OnnxRuntimeRunner, fallback_note
from cbam_deploy.bench import bench_bundle
from cbam_deploy.bundle import read_manifest
from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.loaders import open_artifact
from cbam_deploy.parity import TOLERANCES
from cbam_deploy.report import markdown_report
from cbam_deploy.runtimes import RuntimeUnavailable, available_runtimes, default_runtime, select_runtime
from cbam_deploy.verify import verify_bundle

HAS = set(available_runtimes())
needs_openvino = pytest.mark.skipif("openvino" not in HAS, reason="OpenVINO is not installed")
needs_ovep = pytest.mark.skipif("ort-openvino" not in HAS, reason="onnxruntime-openvino is not installed here")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtimes") / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(root), parity=False))
    return root


@pytest.fixture
def probes(monkeypatch):
    """Pretend this machine has the given onnxruntime providers and CUDA devices."""
    def pretend(providers: tuple[str, ...], gpus: int = 0, tensorrt: bool = False):
        monkeypatch.setattr(onnx_plugin, "ort_providers", lambda: providers)
        monkeypatch.setattr(onnx_plugin, "cuda_devices", lambda: gpus)
        real = onnx_plugin.has_module
        monkeypatch.setattr(onnx_plugin, "has_module", lambda name: tensorrt if name.startswith("tensorrt") else real(name))
        monkeypatch.setattr(onnx_plugin, "has_library", lambda name: tensorrt)
    return pretend


def _x(batch: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def test_runtime_table():
    table = {name: r.formats for name, r in runtimes.runtimes().items()}
    assert table == {"ort-cpu": ("onnx",), "ort-cuda": ("onnx",), "ort-tensorrt": ("onnx",), "ort-openvino": ("onnx",),
                     "openvino": ("onnx", "openvino"), "tensorrt": ("tensorrt",), "ncnn": ("ncnn",), "executorch": ("executorch",)}
    assert "ort-cpu" in HAS  # onnxruntime is a dependency
    assert default_runtime("openvino") == "openvino" and default_runtime("tensorrt") == "tensorrt"
    assert all(f"{n} (" in runtimes.runtime_help() for n in table)


def test_default_is_the_best_available_and_ort_cpu_on_a_cpu_only_machine(probes):
    probes(("AzureExecutionProvider", CPU_EP))  # the plain onnxruntime wheel: nothing changes for its users
    assert default_runtime("onnx") == "ort-cpu"
    probes(("OpenVINOExecutionProvider", CPU_EP))
    assert default_runtime("onnx") == "ort-openvino"
    probes(("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_EP), gpus=0)  # onnxruntime-gpu, no GPU
    assert default_runtime("onnx") == "ort-cpu"
    probes(("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_EP), gpus=1, tensorrt=False)
    assert default_runtime("onnx") == "ort-cuda"
    probes(("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_EP), gpus=1, tensorrt=True)
    assert default_runtime("onnx") == "ort-tensorrt"


def test_default_runtime_of_this_machine_opens_the_onnx(bundle):
    runner = open_artifact(bundle, read_manifest(bundle), "onnx-fp32")
    described = runner.describe()
    assert described["runtime"] == default_runtime("onnx")
    assert described["providers_active"][0] == described["providers_requested"][0]


def test_unavailable_runtime_is_refused_in_one_line_naming_the_available_ones(bundle, probes):
    probes(("AzureExecutionProvider", CPU_EP))
    with pytest.raises(RuntimeUnavailable) as caught:
        open_artifact(bundle, read_manifest(bundle), "onnx-fp32", runtime="ort-cuda")
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert "ort-cuda is not available here" in message and "onnxruntime-gpu" in message
    assert "available here: ort-cpu" in message
    with pytest.raises(CbamDeployError, match="unknown runtime 'ort-gpu'.*runtimes: ort-cpu, ort-cuda"):
        select_runtime("onnx", "ort-gpu")


def test_runtime_that_does_not_run_the_format_is_refused(bundle):
    with pytest.raises(CbamDeployError, match="runtime tensorrt does not run onnx artifacts.*onnx runs under ort-cpu"):
        open_artifact(bundle, read_manifest(bundle), "onnx-fp32", runtime="tensorrt")
    with pytest.raises(CbamDeployError, match="runtime ort-cpu does not run openvino artifacts"):
        select_runtime("openvino", "ort-cpu")


def test_cli_refuses_a_missing_runtime_before_any_work(bundle, probes):
    probes(("AzureExecutionProvider", CPU_EP))
    cli = CliRunner()
    for args in (["bench", str(bundle), "--runtime", "ort-cpu,ort-tensorrt"], ["verify", str(bundle), "--runtime", "ort-cuda"],
                 ["verify", str(bundle), "--runtime", "nope"]):
        result = cli.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
        assert "available here: ort-cpu" in result.stderr
    help_text = cli.invoke(app, ["bench", "--help"]).stdout
    assert "--runtime" in help_text and "ort-openvino" in help_text


def test_describe_reports_the_providers_that_ran(bundle):
    described = open_artifact(bundle, read_manifest(bundle), "onnx-fp32", runtime="ort-cpu").describe()
    assert described["runtime"] == "ort-cpu" and described["backend"] == "onnxruntime"
    assert described["providers_requested"] == described["providers_active"] == [CPU_EP]
    assert described["fallback"] is None
    if described["node_placement"] is not None:  # onnxruntime 1.24+ says which provider took each node
        assert set(described["node_placement"]) == {CPU_EP} and described["node_placement"][CPU_EP] > 50


@pytest.mark.skipif("CUDAExecutionProvider" in onnx_plugin.ort_providers(), reason="this onnxruntime has the CUDA EP")
def test_silent_fallback_of_a_missing_provider_is_detected(bundle):
    with pytest.warns(UserWarning, match="not in available provider names"):  # onnxruntime's only sign: a warning
        runner = OnnxRuntimeRunner(bundle / "model.onnx", providers=["CUDAExecutionProvider", CPU_EP])
    described = runner.describe()
    assert described["providers_requested"] == ["CUDAExecutionProvider", CPU_EP]
    assert described["providers_active"] == [CPU_EP] and described["device"] == "cpu"
    assert "CUDAExecutionProvider was asked for but onnxruntime did not load it" in described["fallback"]


def test_fallback_note_for_nodes_placed_elsewhere():
    ov, cuda = "OpenVINOExecutionProvider", "CUDAExecutionProvider"
    assert fallback_note([ov, CPU_EP], [ov, CPU_EP], {ov: collections.Counter(Conv=40)}) is None
    note = fallback_note([ov, CPU_EP], [ov, CPU_EP], {ov: collections.Counter(Conv=40), CPU_EP: collections.Counter(Inverse=1)})
    assert note == f"1 of 41 nodes ran elsewhere than {ov}: 1 on {CPU_EP} (Inverse)"
    note = fallback_note([cuda, CPU_EP], [cuda, CPU_EP], {cuda: collections.Counter(), CPU_EP: collections.Counter(Conv=3)})
    assert note.startswith(f"{cuda} is active but took no node")
    assert "cannot report node placement" in fallback_note([ov, CPU_EP], [ov, CPU_EP], None)
    assert fallback_note([CPU_EP], [CPU_EP], None) is None


@needs_openvino
def test_openvino_runs_the_onnx_and_matches_onnxruntime(bundle):
    manifest = read_manifest(bundle)
    ort_runner = open_artifact(bundle, manifest, "onnx-fp32", runtime="ort-cpu")
    ov_runner = open_artifact(bundle, manifest, "onnx-fp32", runtime="openvino")
    described = ov_runner.describe()
    assert described["runtime"] == "openvino" and described["model_source"] == "onnx"
    assert described["inference_precision"] in ("f32", "float32")  # pinned: never a silent bf16
    bound = TOLERANCES["fp32"]
    for batch in (1, 4):
        expected, got = ort_runner.infer(_x(batch)), ov_runner.infer(_x(batch))
        assert list(got) == list(expected) == [o["name"] for o in manifest["outputs"]]
        for name in expected:
            assert got[name].shape == expected[name].shape
            assert np.abs(got[name] - expected[name]).max() <= bound.atol + bound.rtol * np.abs(expected[name]).max()


@needs_openvino
def test_bench_one_onnx_under_two_runtimes_in_one_run(bundle):
    result = bench_bundle(bundle, [1, 2], artifacts=["onnx-fp32"], iters=3, warmup=1, runtime="ort-cpu,openvino")
    assert result["runtimes"] == ["ort-cpu", "openvino"]
    rows = {(r["runner"], r["batch"]): r for r in result["results"]}
    assert set(rows) == {(n, b) for n in ("pytorch", "onnx-fp32@ort-cpu", "onnx-fp32@openvino") for b in (1, 2)}
    for batch in (1, 2):
        on_ort, on_ov = rows[("onnx-fp32@ort-cpu", batch)], rows[("onnx-fp32@openvino", batch)]
        assert on_ort["runtime"] == "ort-cpu" and on_ort["providers_active"] == [CPU_EP] and on_ort["fallback"] is None
        assert on_ov["runtime"] == "openvino" and on_ov["backend"] == "openvino"
        assert on_ort["iterations"] == on_ov["iterations"] == 3 and "ratio_to_pytorch" in on_ov  # same rounds
    report = markdown_report(result, "t")
    assert "| onnx-fp32@openvino | openvino | fp32 |" in report


def test_bench_with_one_runtime_keeps_the_artifact_names(bundle):
    result = bench_bundle(bundle, [1], artifacts=["onnx-fp32"], iters=2, warmup=1, runtime="ort-cpu")
    assert [r["runner"] for r in result["results"]] == ["pytorch", "onnx-fp32"]
    assert result["results"][1]["runtime"] == "ort-cpu" and result["results"][1]["providers_active"] == [CPU_EP]


@needs_openvino
def test_verify_under_openvino_passes(bundle):
    result = verify_bundle(bundle, runtime="openvino")
    assert result["passed"] is True and result["reference"] == "pytorch-fp32"
    row = next(r for r in result["results"] if r["artifact"] == "onnx-fp32")
    assert row["passed"] is True and row["runtime"] == "openvino"
    cli = CliRunner().invoke(app, ["verify", str(bundle), "--runtime", "openvino", "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["results"][0]["runtime"] == "openvino"


def test_serve_config_checks_its_runtime():
    from cbam_deploy.serve.app import ServeConfig

    ServeConfig("b", runtime="ort-cpu").check()
    with pytest.raises(CbamDeployError, match="unknown runtime"):
        ServeConfig("b", runtime="onnxruntime").check()
    with pytest.raises(CbamDeployError, match="serve takes one runtime"):
        ServeConfig("b", runtime="ort-cpu,openvino").check()


# ---- where onnxruntime-openvino is installed (it replaces the onnxruntime wheel, so in another venv)

@needs_ovep
def test_ort_openvino_ep_runs_every_node_and_matches_ort_cpu(bundle):
    manifest = read_manifest(bundle)
    runner = open_artifact(bundle, manifest, "onnx-fp32", runtime="ort-openvino")
    described = runner.describe()
    assert described["providers_active"][0] == "OpenVINOExecutionProvider" and described["fallback"] is None
    expected = open_artifact(bundle, manifest, "onnx-fp32", runtime="ort-cpu").run(_x())
    bound = TOLERANCES["fp32"]
    assert np.abs(runner.run(_x()) - expected).max() <= bound.atol + bound.rtol * np.abs(expected).max()


@needs_ovep
def test_ort_openvino_ep_partial_fallback_is_detected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Inverse", ["r"], ["i"], domain="com.microsoft"),
             helper.make_node("Add", ["i", "i"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 3])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    runner = runtimes.runtimes()["ort-openvino"].open(tmp_path / "m.onnx")
    described = runner.describe()
    assert described["providers_active"][0] == "OpenVINOExecutionProvider"  # listed as active...
    assert described["node_placement"].get(CPU_EP, 0) >= 1  # ...but com.microsoft Inverse ran on the CPU EP
    assert "ran elsewhere than OpenVINOExecutionProvider" in described["fallback"] and "Inverse" in described["fallback"]
