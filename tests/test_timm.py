"""timm networks as model sources: ``--model timm:NAME?KEY=VALUE&...`` through export (ONNX, OpenVINO), INT8
and verify, timm's data config as the preprocessing, timm's checkpoint files read safely, and every bad spec
refused in one line.

The network is timm's own ResNet-18 with CBAM in its blocks (``block_args.attn_layer=cbam``), at a quarter of
its width (``channels``) and 64x64, so that the whole module stays small; one bundle serves the module."""

from __future__ import annotations

import argparse
import pickle
import socket
import sys

import pytest
import torch
from typer.testing import CliRunner

timm = pytest.importorskip("timm", reason="the timm extra is not installed (pip install 'cbam-deploy[timm]')")

import cbam_deploy  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.export_job import input_spec  # noqa: E402
from cbam_deploy.formats import root_row  # noqa: E402
from cbam_deploy.models import build_model, read_checkpoint, state_fingerprint  # noqa: E402
from cbam_deploy.models.timm_source import parse_spec  # noqa: E402

# zero_init_last=false: timm zeroes each block's last BN by default, which leaves a fresh network's CBAM maps
# flat; with it off every gate of the random init has something to rank
SPEC = "timm:resnet18?block_args.attn_layer=cbam&channels=[32,64,128,256]&zero_init_last=false"
SMALL = "timm:resnet18?block_args.attn_layer=cbam&channels=[16,32,64,128]"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """SPEC exported to ONNX (parity checked), its OpenVINO IR built, then INT8 for onnxruntime."""
    made = cbam_deploy.export(SPEC, tmp_path_factory.mktemp("timm") / "resnet18-cbam", input_size=64, num_classes=3)
    built = made.build("openvino")
    quantized = made.quantize("ort-cpu", calib_data="synthetic", calib_size=32)
    return made, built, quantized


def test_a_timm_cbam_network_through_export_int8_and_verify(bundle):
    made, built, quantized = bundle
    assert made.export_result.passed is True
    assert [(b.name, b.skipped, b.failed) for b in built] == [("openvino-fp32", None, None)]
    assert set(made.artifacts) == {"onnx-fp32", "openvino-fp32", "int8-ort-cpu"}
    model = made.manifest["model"]
    assert model["source"] == "timm" and model["name"] == SPEC and model["num_classes"] == 3
    assert model["weights"] is None and model["init"]["seed"] == 0  # rebuilt from the seed, checked by its sha256
    assert "pretrained=False" in model["notes"][0] and "block_args={'attn_layer': 'cbam'}" in model["notes"][0]
    # timm's CbamModule, found by what it computes: one channel and one spatial gate in each of the 8 blocks
    assert model["gates"]["kinds"] == {"channel": 8, "spatial": 8, "joint": 0}
    assert quantized.passed is True
    gate_check = quantized.artifacts[0]["quantization"]["gate_check"]
    assert gate_check["held"] is True and gate_check["gates"] == 16

    # a fresh open with no trust given: the library call is rebuilt from the manifest's values alone
    verified = cbam_deploy.Bundle(made.path).verify()
    assert verified["reference"] == "pytorch-fp32"  # the seeded rebuild has the recorded state sha256
    assert verified.passed is True
    for name in ("onnx-fp32", "openvino-fp32", "int8-ort-cpu"):
        row = verified.row(name)
        assert row["passed"] is True, (name, row)
        assert row["attention"]["passed"] is True, (name, row["attention"])
        assert row["attention"]["counts"] == {"channel": 8, "spatial": 8, "joint": 0, "not_found": 0}, name
    assert verified.row("int8-ort-cpu")["gate_policy"]["held"] is True


def test_timms_data_config_is_the_preprocessing_and_the_users_options_win(bundle):
    made = bundle[0]
    # resnet18's pretrained config (a1_in1k): bicubic, crop_pct 0.95, ImageNet mean/std
    assert made.manifest["input"]["preprocess"] == {
        "mode": "crop", "resize_shorter": round(64 / 0.95), "center_crop": 64, "interpolation": "bicubic",
        "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    loaded = build_model(SMALL + "&pretrained_cfg=tv_in1k", num_classes=3)  # another tag, another config
    assert loaded.default_input_size == 224  # timm's input size when --input-size is left out
    record = input_spec(loaded, root_row().export_options(input_size=224))["preprocess"]
    assert (record["interpolation"], record["resize_shorter"]) == ("bilinear", 256)  # tv_in1k: crop_pct 0.875
    overrides = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "interpolation": "nearest"}
    record = input_spec(loaded, root_row().export_options(input_size=224), overrides)["preprocess"]
    assert record["mean"] == [0.5] * 3 and record["std"] == [0.25] * 3
    assert (record["interpolation"], record["resize_shorter"]) == ("nearest", 224)


def test_the_spec_spelling():
    parsed = parse_spec('timm:resnet50?block_args.attn_layer=cbam&drop_rate=0.1&block_args.x=3&a=true&b=none'
                        '&c="7"&d=[1,2]&e=')
    assert parsed.name == "resnet50"
    assert parsed.kwargs == {"block_args": {"attn_layer": "cbam", "x": 3}, "drop_rate": 0.1, "a": True, "b": None,
                             "c": "7", "d": [1, 2], "e": "", "exportable": True}
    assert parse_spec("timm:resnet50.a1_in1k").kwargs == {"exportable": True}
    assert parse_spec("timm:resnet50?exportable=false&pretrained=false").kwargs == {"exportable": False}


def test_no_network_is_touched_and_the_seeded_init_rebuilds_the_same_model(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    first = build_model(SMALL, num_classes=5)
    torch.manual_seed(123)  # the caller's RNG state does not matter
    second = build_model(SMALL, num_classes=5)
    assert attempts == []
    assert state_fingerprint(first.module) == state_fingerprint(second.module)
    assert first.num_classes == 5 and first.module.fc.out_features == 5
    other = build_model(SMALL + "&zero_init_last=false", num_classes=5)
    assert state_fingerprint(other.module) != state_fingerprint(first.module)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SMALL network after one SGD step (trained weights differ from the seeded init), written by timm's
    CheckpointSaver with EMA weights, and as a .pth state dict and a .safetensors file."""
    from safetensors.torch import save_file
    from timm.utils import CheckpointSaver, ModelEmaV3

    folder = tmp_path_factory.mktemp("timm-checkpoints")
    torch.manual_seed(7)
    model = timm.create_model("resnet18", pretrained=False, block_args={"attn_layer": "cbam"},
                              channels=[16, 32, 64, 128], num_classes=4)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    ema.update(model)
    model.eval()
    args = argparse.Namespace(model="resnet18", num_classes=4, lr=0.5, model_kwargs={"block_args": {"attn_layer": "cbam"}})
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=0, metric=0.25)
    files = {"saver": next(folder.glob("checkpoint-*.pth.tar")), "pth": folder / "weights.pth",
             "safetensors": folder / "weights.safetensors"}
    torch.save(model.state_dict(), files["pth"])
    save_file(model.state_dict(), str(files["safetensors"]))
    return model, files


@pytest.mark.parametrize("kind", ["pth", "safetensors", "saver"])
def test_each_timm_checkpoint_format_loads_into_the_timm_model(trained, kind):
    model, files = trained
    loaded = build_model(SMALL, weights=str(files[kind]))  # num_classes inferred from the classifier (fc)
    assert loaded.num_classes == 4 and loaded.checkpoint is not None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)
    assert loaded.weights_label == str(files[kind].resolve())
    assert "init" not in loaded.describe()  # the weights are the checkpoint's: its path and sha256 are recorded


def test_a_checkpoint_saver_file_is_read_with_its_args_as_data(trained):
    model, files = trained
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(files["saver"], weights_only=True)  # what plain weights-only loading says of it
    checkpoint = read_checkpoint(files["saver"])
    assert checkpoint.wrapper_key == "state_dict"
    assert checkpoint.metadata == {"epoch": 0, "arch": "resnet18", "metric": 0.25, "version": 2}
    assert checkpoint.notes == ["the file also holds EMA weights ('state_dict_ema'); 'state_dict' is taken"]
    assert checkpoint.describe()["notes"] == checkpoint.notes
    for key, value in model.state_dict().items():
        assert torch.equal(checkpoint.state_dict[key], value), key
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # admitted for that one load only
    safetensors = read_checkpoint(files["safetensors"])
    assert safetensors.describe()["format"] == "safetensors" and safetensors.wrapper_key is None


def test_a_checkpoint_saver_file_that_holds_code_is_still_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "checkpoint-1.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "args": argparse.Namespace(model="resnet18"),
                "state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": Payload()}, path)
    with pytest.raises(CbamDeployError, match=r"refused to load checkpoint .*import/run \S*print,") as error:
        read_checkpoint(path)
    assert "argparse.Namespace" not in str(error.value)


def test_a_damaged_safetensors_file_is_one_line(tmp_path, trained):
    _, files = trained
    damaged = tmp_path / "weights.safetensors"
    damaged.write_bytes(files["safetensors"].read_bytes()[:200])
    with pytest.raises(CbamDeployError, match="corrupt or truncated safetensors file") as error:
        read_checkpoint(damaged)
    assert "\n" not in str(error.value)


def test_a_checkpoint_of_another_network_says_so(trained):
    _, files = trained
    with pytest.raises(CbamDeployError, match=r"another network than timm:resnet18\?channels.*its arch: resnet18"):
        build_model("timm:resnet18?channels=[16,32,64,128]", weights=str(files["saver"]))  # no CBAM in it


BAD_SPECS = [
    ("unknown-model", "timm:resnet18x", "timm 1.0.31 has no model 'resnet18x'. Did you mean: resnet18"),
    ("unknown-tag", "timm:resnet18.nope", "has no pretrained tag 'nope'"),
    ("kwarg-timm-refuses", "timm:resnet18?attn_layer=cbam",
     "(TypeError: ResNet.__init__() got an unexpected keyword argument 'attn_layer'); a ResNet takes its attention "
     "through its blocks: timm:resnet18?block_args.attn_layer=cbam"),
    ("bad-attention-name", "timm:resnet18?block_args.attn_layer=nope", "AssertionError: Invalid attn module (nope)"),
    ("not-key-value", "timm:resnet18?block_args", "'block_args' is not KEY=VALUE"),
    ("pretrained", "timm:resnet18?pretrained=true", "nothing is downloaded; pass your weights with --weights FILE"),
    ("num-classes", "timm:resnet18?num_classes=3", "set the classifier size with --num-classes"),
    ("bad-json", "timm:resnet18?channels=[1,2", "the value of channels is not valid JSON"),
]


def _one_error_line(args: list[str], tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) <= 2, result.stderr  # and "exporting ..."
    assert list(tmp_path.iterdir()) == []  # nothing written
    return errors[0]


@pytest.mark.parametrize("spec,needle", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_a_bad_timm_spec_is_one_line(spec, needle, tmp_path, monkeypatch):
    line = _one_error_line(["export", "--model", spec, "--input-size", "64", "-o", "out"], tmp_path, monkeypatch)
    assert needle in line, line


def test_timm_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    for name in [n for n in list(sys.modules) if n == "timm" or n.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # what an installation without timm imports
    line = _one_error_line(["export", "--model", SMALL, "-o", "out"], tmp_path, monkeypatch)
    assert "needs timm, which is not installed: pip install 'cbam-deploy[timm]'" in line, line
