"""The Python API, as a notebook uses it: a module defined here (CBAM written by hand, with its own names),
exported, quantized, verified and timed through ``cbam_deploy.export`` and ``cbam_deploy.Bundle``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cbam_deploy
from cbam_deploy.errors import CbamDeployError


class Attention(nn.Module):
    """CBAM as a notebook writes it: a 1x1-conv MLP on avg and max pools, then a 7x7 conv on [max, mean]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // 4, 1), nn.ReLU(), nn.Conv2d(channels // 4, channels, 1))
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Attention(16),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), Attention(32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def module() -> nn.Module:
    torch.manual_seed(3)
    net = Net().eval()
    with torch.no_grad():  # some spread in the gates, as a trained net has
        for p in net.parameters():
            p.mul_(3)
    return net


@pytest.fixture(scope="module")
def bundle(module, tmp_path_factory):
    return cbam_deploy.export(module, tmp_path_factory.mktemp("api") / "net", input_size=32, name="Net")


def test_export_quantize_verify_bench_through_the_api(module, bundle):
    assert bundle.export_result.passed is True and bundle.export_result.exit_code == 0
    assert bundle.model_name == "Net" and bundle.artifacts == ["onnx-fp32"]
    manifest = bundle.manifest
    assert manifest["model"]["source"] == "module" and manifest["model"]["module_class"].endswith("test_api.Net")
    assert manifest["model"]["gates"]["kinds"] == {"channel": 2, "spatial": 2, "joint": 0}  # found by structure
    quantized = bundle.quantize("ort-cpu", calib_data="synthetic", calib_size=32)
    assert quantized.passed is True and quantized.artifacts[0]["name"] == "int8-ort-cpu"
    assert quantized.artifacts[0]["quantization"]["gate_check"]["held"] is True
    verified = bundle.verify()
    assert verified.passed is True and verified.exit_code == 0 and verified.failure is None
    assert {r["artifact"] for r in verified.results} == {"onnx-fp32", "int8-ort-cpu"}
    assert verified.row("int8-ort-cpu")["gate_policy"]["held"] is True
    assert json.loads(json.dumps(verified.to_json()))["passed"] is True  # to_json() is JSON as --json prints it
    timed = bundle.bench(batches="1", iters=3, warmup=1, min_seconds=0.1)
    assert timed.passed is None and timed.speedup("onnx-fp32") > 0
    assert bundle.info().integrity == {"onnx-fp32": "ok", "int8-ort-cpu": "ok"}


def test_a_module_made_bundle_asks_for_its_module_and_checks_it(module, bundle):
    reopened = cbam_deploy.Bundle(bundle.path)
    with pytest.raises(CbamDeployError, match=r"exported from a module in memory .*Bundle\(.*model=module\)"):
        reopened.verify()
    assert cbam_deploy.Bundle(bundle.path, model=module).verify(artifacts="onnx-fp32").passed is True
    other = Net().eval()
    with pytest.raises(CbamDeployError, match="not the one this bundle was exported from"):
        cbam_deploy.Bundle(bundle.path, model=other)


def test_options_are_checked_before_any_work(module, tmp_path):
    with pytest.raises(CbamDeployError, match="--format"):
        cbam_deploy.export(module, tmp_path / "x", input_size=32, formats="onnx,coreml")
    with pytest.raises(CbamDeployError, match="nn.Module"):
        cbam_deploy.export(42, tmp_path / "x")
    assert not (tmp_path / "x").exists()
