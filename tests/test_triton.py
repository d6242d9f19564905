"""The Triton repository writer; every config.pbtxt is parsed with Triton's own model-config protobuf."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (test extra)")
from google.protobuf import text_format  # noqa: E402

from cbam_deploy.build import build_artifacts  # noqa: E402
from cbam_deploy.bundle import read_manifest  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.fsutil import sha256_file  # noqa: E402
from cbam_deploy.pipeline import ExportRequest, export_bundle  # noqa: E402
from cbam_deploy.serve.triton import model_config, write_repository  # noqa: E402


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "b"
    export_bundle(ExportRequest(model="resnet10_half_cbam", stem="cifar", num_classes=10, output=str(out), parity=False))
    build_artifacts(out, "onnx,openvino", "fp32,int8", calib_data="synthetic", calib_size=8)
    return out


def test_onnx_fp32_int8_and_openvino_configs(bundle, tmp_path):
    written = write_repository(bundle, tmp_path / "repo", ["onnx-fp32", "int8-ort-cpu", "openvino-fp32"], max_batch=16,
                               instances=2)
    manifest = read_manifest(bundle)
    for entry in written:
        config = parse(Path(entry["config"]))
        artifact = next(a for a in manifest["artifacts"] if a["name"] == entry["artifact"])
        assert config.name == entry["model"] == Path(entry["path"]).name
        assert config.max_batch_size == 16
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("input", model_config_pb2.TYPE_FP32, manifest["input"]["shape"][1:])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
        assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        version = Path(entry["path"]) / "1"
        if artifact["format"] == "onnx":
            assert config.platform == "onnxruntime_onnx"
            assert sha256_file(version / "model.onnx") == artifact["sha256"]
        else:
            assert config.backend == "openvino" and (version / "model.bin").is_file()
            assert sha256_file(version / "model.xml") == artifact["sha256"]
            assert config.parameters["INFERENCE_PRECISION_HINT"].string_value == "f32"


def test_tensorrt_and_fixed_batch_configs():
    manifest = {"input": {"name": "input", "shape": [4, 3, 224, 224]},
                "outputs": [{"name": "logits", "shape": [4, 1000]}]}
    engine = {"name": "tensorrt-fp16", "format": "tensorrt", "precision": "fp16", "sha256": "ab" * 32,
              "export": {"profile": {"min_batch": 1, "opt_batch": 4, "max_batch": 8}}}
    config = text_format.Parse(model_config(manifest, engine, "m", 8, 1, 100), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0  # fixed batch: dims carry it
    assert list(config.input[0].dims) == [4, 3, 224, 224] and not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    dynamic = {**manifest, "input": {"name": "input", "shape": ["batch", 3, "height", "width"]},
               "outputs": [{"name": "logits", "shape": ["batch", 1000]}]}
    config = text_format.Parse(model_config(dynamic, engine, "m", 8, 1, 100), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [3, -1, -1]
    with pytest.raises(CbamDeployError, match="exceeds the engine's profile"):
        model_config(dynamic, engine, "m", 16, 1, 100)


def test_cli_and_replacement(bundle, tmp_path):
    repo = tmp_path / "repo"
    runner = CliRunner()
    first = runner.invoke(app, ["triton", str(bundle), "-o", str(repo), "--json"])
    assert first.exit_code == 0, first.output
    model = json.loads(first.stdout)[0]["model"]
    second = runner.invoke(app, ["triton", str(bundle), "-o", str(repo), "--max-batch", "4"])
    assert second.exit_code == 0 and "tritonserver --model-repository" in second.stdout
    assert parse(repo / model / "config.pbtxt").max_batch_size == 4
    assert sorted(p.name for p in repo.iterdir()) == [model]  # no staging leftovers
    bad = runner.invoke(app, ["triton", str(bundle), "-o", str(repo), "--artifact", "nope"])
    assert bad.exit_code == 2 and "no artifact 'nope'" in bad.stderr
