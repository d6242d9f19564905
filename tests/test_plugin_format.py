"""A format is a plug-in. TorchScript, written entirely in tests/plugins/ (its package and its row, nothing
in cbam_deploy changed), registered as a third-party package registers it (an installed distribution's
entry point in the group ``cbam_deploy.formats``), goes through export, verify (the gate policy and
attention parity each say in one line why they cannot read its gates), bench, profile (one line), serve,
triton and info, from fresh processes that find it by its entry point alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbam_deploy import formats

PLUGINS = Path(__file__).parent / "plugins"
ENTRY_POINT = "torchscript = torchscript_format.plugin:FORMAT"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plug-in 'installed': a folder on the path holding its package's metadata with its entry point."""
    site = tmp_path_factory.mktemp("site-packages")
    dist = site / "cbam_deploy_torchscript-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cbam-deploy-torchscript\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[cbam_deploy.formats]\n{ENTRY_POINT}\n")
    paths = [str(site), str(PLUGINS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    sys.path[:0] = paths
    formats.discover(refresh=True)
    yield env
    formats.unregister("torchscript")
    for path in paths:
        sys.path.remove(path)


def cli(env: dict, *args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-c", "from cbam_deploy.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def bundle(installed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "bundle"
    code, stdout, stderr = cli(installed, "export", "--model", "resnet10_half_cbam", "--stem", "cifar", "-o", str(out),
                               "--format", "onnx,torchscript", "--precision", "fp32", "--json")
    assert code == 0, stderr[-2000:]
    rows = {r["artifact"]: r for r in json.loads(stdout)["summary"]["rows"] if r.get("artifact")}
    assert rows["torchscript-fp32"]["passed"] is True and rows["torchscript-fp32"]["latency_ms"] > 0
    return out


def test_the_registry_finds_it_by_its_entry_point(installed):
    assert "torchscript" in formats.formats() and "torchscript" in formats.all_runtimes()
    assert formats.failed() == {}
    assert formats.get("torchscript").reads_gates is False and formats.get("torchscript").profiles is False


def test_export_builds_it_and_verify_judges_it_saying_what_it_cannot_read(installed, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = next(a for a in manifest["artifacts"] if a["name"] == "torchscript-fp32")
    assert record["path"] == "model.torchscript-fp32.ts" and (bundle / record["path"]).is_file()
    assert record["export"]["exporter"] == "torch.jit.trace"
    code, stdout, stderr = cli(installed, "verify", str(bundle), "--artifact", "torchscript-fp32", "--json")
    assert code == 0, stderr[-2000:]
    row = json.loads(stdout)["results"][0]
    assert row["passed"] is True and row["max_abs_err"] < 1e-4
    assert row["attention"]["passed"] is None and "keeps no graph" in row["attention"]["skipped"]


def test_bench_times_it_and_profile_says_why_not_in_one_line(installed, bundle):
    code, stdout, stderr = cli(installed, "bench", str(bundle), "--artifact", "torchscript-fp32", "--iters", "3",
                               "--warmup", "1", "--min-seconds", "0.1", "--json")
    assert code == 0, stderr[-2000:]
    assert "torchscript-fp32" in {r["runner"] for r in json.loads(stdout)["results"]}
    code, _, stderr = cli(installed, "profile", str(bundle), "--artifact", "torchscript-fp32")
    assert code == 2 and "torch.jit gives no per-operator times" in stderr and len(stderr.strip().splitlines()) == 1


def test_serve_triton_and_info(installed, bundle, tmp_path):
    from serving import running_server

    from cbam_deploy.serve.app import ServeConfig, create_app

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    app = create_app(ServeConfig(str(bundle), artifact="torchscript-fp32", max_batch=4))
    with running_server(app) as url:
        import urllib.request

        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        request = urllib.request.Request(f"http://{url}/v2/models/{app.state.model_name}/infer", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    served = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(answer["outputs"][0]["shape"])
    from cbam_deploy.loaders import open_artifact

    direct = open_artifact(bundle, json.loads((bundle / "manifest.json").read_text()), "onnx-fp32").run(x)
    assert np.abs(served - direct).max() < 1e-4
    code, _, stderr = cli(installed, "triton", str(bundle), "-o", str(tmp_path / "repo"), "--artifact", "torchscript-fp32")
    assert code == 0, stderr[-2000:]
    model = next((tmp_path / "repo").iterdir())
    assert 'platform: "pytorch_libtorch"' in (model / "config.pbtxt").read_text() and (model / "1" / "model.pt").is_file()
    code, stdout, _ = cli(installed, "info", str(bundle), "--json")
    assert code == 0
    assert {a["name"]: a["integrity"] for a in json.loads(stdout)["artifacts"]}["torchscript-fp32"] == "ok"
