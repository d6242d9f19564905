import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from cbam_deploy.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_models_json_lists_the_zoo():
    result = invoke("models", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["resnet50_cbam"]["parameters"] == 28_089_624 and rows["resnet50_cbam"]["gflops"] > 4


def test_export_json_prints_one_document(tmp_path):
    result = invoke("export", "--model", "resnet18_cbam", "--stem", "cifar", "--num-classes", "10",
                    "--output", tmp_path / "b", "--batch", "dynamic", "--dynamic-hw", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["passed"] is True and summary["parity"]["samples"] >= 16
    assert summary["artifacts"][0]["path"].endswith("model.onnx")
    info = invoke("info", tmp_path / "b")
    assert info.exit_code == 0 and "onnx-fp32" in info.stdout and "pass" in info.stdout


def test_export_table_for_people(tmp_path):
    result = invoke("export", "-m", "resnet18", "--stem", "cifar", "--batch", "3", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert "parity" in result.stdout and "pass" in result.stdout and "[3, 3, 32, 32]" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["export", "--model", "resnet50cbam"], "Did you mean: resnet50_cbam"),
    (["export", "--model", "resnet18", "--opset", "9"], "opset 9 is out of range"),
    (["export", "--model", "resnet18", "--batch", "zero"], "--batch must be"),
    (["export", "--model", "resnet18", "--weights", "/nonexistent.pth"], "does not exist"),
    (["info", "/nonexistent-bundle"], "not a bundle"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    result = invoke(*args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 3


def test_wrong_num_classes_and_corrupt_checkpoint(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in
                __import__("cbam_deploy.models", fromlist=["x"]).create_model("resnet18", num_classes=5).state_dict().items()},
               weights)
    bad = invoke("export", "-m", "resnet18", "-w", weights, "--num-classes", "7", "-o", tmp_path / "b")
    assert bad.exit_code == 2 and "fc.weight: checkpoint (5, 512) vs model (7, 512)" in bad.stderr
    assert not (tmp_path / "b").exists()
    corrupt = tmp_path / "c.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    result = invoke("export", "-m", "resnet18", "-w", corrupt, "-o", tmp_path / "c")
    assert result.exit_code == 2 and "cannot read checkpoint" in result.stderr and not (tmp_path / "c").exists()


def test_factory_that_raises(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text("def make():\n    raise ValueError('bad config')\n")
    result = invoke("export", "--model", f"{factory}:make", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "raised ValueError: bad config" in result.stderr
    assert not (tmp_path / "out").exists()


def test_factory_model_exports(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text(
        "import torch\nfrom cbam_deploy.models import CBAM\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), CBAM(32), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(32, 4))\n"
    )
    result = invoke("export", "--model", f"{factory}:make", "--input-size", "64", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


def test_console_script_is_installed():
    exe = shutil.which("cbam-deploy", path=os.path.dirname(sys.executable)) or shutil.which("cbam-deploy")
    assert exe, "the cbam-deploy console script is not on PATH: install the package (pip install -e .)"
    done = subprocess.run([exe, "export", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown model 'nope'" in done.stderr and "Traceback" not in done.stderr
