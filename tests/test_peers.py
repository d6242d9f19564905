"""bench --peers: the peers built on the fly from the PyTorch model (cbam_deploy.peers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbam_deploy.errors import CbamDeployError
from cbam_deploy.peers import NEEDS_CALIBRATION, all_peers, build_peers
from cbam_deploy.runners.base import Runner

INT8_PEERS = ("peer-openvino-nncf-int8", "peer-ort-quantize-static")
NOT_EXECUTORCH = tuple(name for name in all_peers() if not name.startswith("peer-executorch"))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model():
    from official_style import randomize

    from cbam_deploy.models import create_model

    return randomize(create_model("resnet10_half_cbam", num_classes=10, stem="cifar"), seed=1).eval()


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    rng = np.random.default_rng(0)
    example = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    calib = rng.standard_normal((16, 3, 32, 32), dtype=np.float32)
    # the ExecuTorch peers are built in tests/test_executorch.py, on a smaller model
    return build_peers(model, example, calib, tmp_path_factory.mktemp("peers"), which=list(NOT_EXECUTORCH))


def test_every_peer_builds_or_says_why(built):
    runners, skipped = built
    assert set(runners) | {s["peer"] for s in skipped} == set(NOT_EXECUTORCH)
    assert not set(runners) & {s["peer"] for s in skipped}
    for s in skipped:
        assert s["reason"]
    # this machine has all the libraries (and a C++ compiler for inductor): every peer must build here
    assert not skipped, skipped


def test_peers_match_the_torch_model(model, built):
    runners, _ = built
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)  # not the example's batch
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    for name, runner in runners.items():
        assert isinstance(runner, Runner)
        out = runner.run(x)
        assert out.dtype == np.float32 and out.shape == reference.shape, name
        info = runner.describe()
        if info["precision"] == "int8":
            floor = 0.9
        elif info.get("inference_precision") in ("bf16", "bfloat16", "f16", "float16"):
            floor = 0.99  # OpenVINO's default inference precision on CPUs with bf16
        else:
            floor = 0.999
            scale = float(np.abs(reference).max())
            assert float(np.abs(out - reference).max()) < 1e-3 * max(scale, 1.0), name
        assert _cosine(out, reference) >= floor, (name, _cosine(out, reference))


def test_describe_says_how_each_peer_was_made(built):
    runners, _ = built
    for name, runner in runners.items():
        info = runner.describe()
        for key in ("backend", "device", "precision", "threads", "made_by", "build_seconds"):
            assert key in info, (name, key)
        assert isinstance(info["made_by"], str) and len(info["made_by"]) > 20
    calls = {"peer-torch-compile": "torch.compile(model)", "peer-openvino-fp32": "openvino.convert_model",
             "peer-openvino-nncf-int8": "nncf.quantize", "peer-ort-quantize-static": "quantize_static",
             "peer-pnnx-ncnn": "pnnx.export"}
    for name, call in calls.items():
        if name in runners:
            assert call in runners[name].describe()["made_by"]
    if "peer-torch-compile" in runners:
        assert runners["peer-torch-compile"].describe()["compile_seconds"] > 0
    for name in ("peer-openvino-fp32", "peer-openvino-nncf-int8"):
        if name in runners:  # what OpenVINO really computes in, read back from the compiled model
            info = runners[name].describe()
            assert info["inference_precision"] and info["inference_precision"] in info["made_by"]
            assert "no config" in info["made_by"]


def test_the_torchao_pt2e_peer_runs_int8_kernels_from_the_x86_inductor_quantizer(model, built, tmp_path):
    """PyTorch's own INT8 path: PT2E with X86InductorQuantizer, then torch.compile with freezing; the
    compile must have turned the convolutions into oneDNN int8 ones (inductor's qconv weight-prepack
    pattern fired for each), not float ones with Q/DQ around them."""
    runners, _ = built
    info = runners["peer-torchao-pt2e-int8"].describe()
    assert info["precision"] == "int8" and info["calibration_samples"] == 16 and info["torchao"]
    assert "X86InductorQuantizer" in info["made_by"] and "freezing=True" in info["made_by"]
    assert info["int8_kernels"].get("qconv_weight_prepack_matcher_count", 0) >= 10, info["int8_kernels"]
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    assert build_peers(model, example, None, tmp_path, which=["peer-torchao-pt2e-int8"]) == (
        {}, [{"peer": "peer-torchao-pt2e-int8", "reason": NEEDS_CALIBRATION}])


def test_without_calibration_the_int8_peers_are_skipped(model, tmp_path):
    example = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    runners, skipped = build_peers(model, example, None, tmp_path, which=["peer-openvino-fp32", *INT8_PEERS])
    assert {s["peer"]: s["reason"] for s in skipped} == {name: NEEDS_CALIBRATION for name in INT8_PEERS}
    assert "--calib-data" in NEEDS_CALIBRATION
    assert set(runners) <= {"peer-openvino-fp32"}


def test_threads_reach_the_libraries_that_take_them(model, tmp_path):
    rng = np.random.default_rng(0)
    example = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    calib = rng.standard_normal((4, 3, 32, 32), dtype=np.float32)
    runners, skipped = build_peers(model, example, calib, tmp_path, threads=1,
                                   which=["peer-openvino-fp32", "peer-ort-quantize-static"])
    assert not skipped, skipped
    assert runners["peer-openvino-fp32"].threads() == runners["peer-ort-quantize-static"].threads() == 1
    assert "config={'INFERENCE_NUM_THREADS': 1}" in runners["peer-openvino-fp32"].describe()["made_by"]
    assert "intra_op_num_threads=1" in runners["peer-ort-quantize-static"].describe()["made_by"]


def test_a_failing_build_is_skipped_not_raised(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot run this")

    example = np.zeros((1, 3, 8, 8), dtype=np.float32)
    runners, skipped = build_peers(Broken(), example, example, tmp_path,
                                   which=["peer-openvino-fp32", "peer-ort-quantize-static"])
    assert runners == {}
    assert [s["peer"] for s in skipped] == ["peer-openvino-fp32", "peer-ort-quantize-static"]
    assert all(s["reason"].startswith("build failed: ") for s in skipped)


def test_a_missing_library_is_skipped(model, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    example = np.zeros((1, 3, 32, 32), dtype=np.float32)
    runners, skipped = build_peers(model, example, example, tmp_path, which=["peer-ort-quantize-static"])
    assert runners == {}
    assert skipped == [{"peer": "peer-ort-quantize-static", "reason": "onnxruntime is not installed: pip install onnxruntime"}]


def test_unknown_peer_names_are_a_user_error(model, tmp_path):
    with pytest.raises(CbamDeployError, match="unknown peer"):
        build_peers(model, np.zeros((1, 3, 32, 32), dtype=np.float32), None, tmp_path, which=["peer-nope"])


def test_peer_building_keeps_stdout_clean(model, tmp_path, capfd):
    """--json output goes to stdout: NNCF's progress bars and onnxruntime's messages must not."""
    rng = np.random.default_rng(0)
    example = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    calib = rng.standard_normal((4, 3, 32, 32), dtype=np.float32)
    capfd.readouterr()
    runners, skipped = build_peers(model, example, calib, tmp_path, which=list(INT8_PEERS))
    assert not skipped, skipped
    assert capfd.readouterr().out == ""
