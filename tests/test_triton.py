"""The Triton repository writer; every config.pbtxt is parsed with Triton's own model-config protobuf,
and the rules each backend applies at load (read from the backends' sources, see serve/triton.py)
are checked on the text: instance kinds, OpenVINO's fixed batch and ignored parameters, TensorRT's
profile and release."""

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
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.serve.triton import check_kind, model_config, write_repository  # noqa: E402


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=10, output=str(out), parity=False))
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
            # the backend reads only its own parameters: no INFERENCE_PRECISION_HINT that would do nothing
            assert set(config.parameters) == {"PERFORMANCE_HINT", "ENABLE_BATCH_PADDING"}
            assert config.parameters["ENABLE_BATCH_PADDING"].string_value == "YES"  # else batches < 16 fail
            assert any("bf16" in w for w in entry["warnings"])


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


def _engine(min_batch=1, triton_release=None):
    return {"name": "tensorrt-fp16", "format": "tensorrt", "precision": "fp16", "sha256": "ab" * 32,
            "export": {"tensorrt": "10.8.0.43", "triton_release": triton_release,
                       "profile": {"min_batch": min_batch, "opt_batch": 4, "max_batch": 8}}}


DYNAMIC = {"input": {"name": "input", "shape": ["batch", 3, 32, 32]}, "outputs": [{"name": "logits", "shape": ["batch", 10]}]}


def test_tensorrt_config_rejects_a_min_batch_triton_cannot_send_and_checks_the_release():
    with pytest.raises(CbamDeployError, match="--min-batch 2, but Triton sends batches from 1"):
        model_config(DYNAMIC, _engine(min_batch=2), "m", 8, 1, 100)
    fixed = {"input": {"name": "input", "shape": [2, 3, 32, 32]}, "outputs": [{"name": "logits", "shape": [2, 10]}]}
    assert "max_batch_size: 0" in model_config(fixed, _engine(min_batch=2), "m", 8, 1, 100)  # full shapes: no batching
    warnings = []
    model_config(DYNAMIC, _engine(triton_release="25.01"), "m", 8, 1, 100, triton_release="25.01", warnings=warnings)
    assert warnings == []
    with pytest.raises(CbamDeployError, match="tritonserver 24.08 cannot load it.*TRITON_RELEASE=24.08"):
        model_config(DYNAMIC, _engine(triton_release="25.01"), "m", 8, 1, 100, triton_release="24.08")
    warnings = []
    model_config(DYNAMIC, _engine(), "m", 8, 1, 100, triton_release="25.01", warnings=warnings)
    assert len(warnings) == 1 and "cannot be checked" in warnings[0] and "10.8.0.43" in warnings[0]
    warnings = []
    model_config(DYNAMIC, _engine(triton_release="25.01"), "m", 8, 1, 100, warnings=warnings)
    assert "tritonserver:25.01-py3" in warnings[0]
    with pytest.raises(CbamDeployError, match="like 25.01"):
        model_config(DYNAMIC, _engine(), "m", 8, 1, 100, triton_release="r25.01")


@pytest.mark.parametrize("fmt,kind,ok", [
    ("onnx", None, "KIND_CPU"), ("onnx", "KIND_GPU", "KIND_GPU"), ("onnx", "KIND_CPU", "KIND_CPU"),
    ("tensorrt", None, "KIND_GPU"), ("tensorrt", "KIND_CPU", None),
    ("openvino", None, "KIND_CPU"), ("openvino", "KIND_GPU", None),
])
def test_kind_is_checked_per_backend(fmt, kind, ok):
    artifact = {"name": f"{fmt}-x", "format": fmt}
    if ok is None:
        with pytest.raises(CbamDeployError, match=f"does not fit artifact {fmt}-x"):
            check_kind(artifact, kind)
    else:
        assert check_kind(artifact, kind) == ok


def test_openvino_config_text_for_batch_one_and_fixed_batch():
    ir = {"name": "openvino-fp32", "format": "openvino", "precision": "fp32", "sha256": "cd" * 32}
    one = text_format.Parse(model_config(DYNAMIC, ir, "m", 1, 1, 100), model_config_pb2.ModelConfig())
    assert one.max_batch_size == 1 and set(one.parameters) == {"PERFORMANCE_HINT"}  # nothing to pad
    fixed = {"input": {"name": "input", "shape": [4, 3, 32, 32]}, "outputs": [{"name": "logits", "shape": [4, 10]}]}
    config = text_format.Parse(model_config(fixed, ir, "m", 8, 1, 100), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 0 and "ENABLE_BATCH_PADDING" not in config.parameters
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_a_bad_artifact_writes_nothing_and_staging_stays_outside_the_repository(bundle, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(CbamDeployError, match="--kind KIND_GPU does not fit artifact openvino-fp32"):
        write_repository(bundle, repo, ["onnx-fp32", "openvino-fp32"], kind="KIND_GPU")
    assert not repo.exists()  # every config is checked before the first file is written
    write_repository(bundle, repo, ["onnx-fp32", "openvino-fp32"])
    assert sorted(p.name for p in repo.iterdir()) == [f"{read_manifest(bundle)['model']['name']}-{a}"
                                                     for a in ("onnx-fp32", "openvino-fp32")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # staging folders beside it are gone too


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
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".cbam-triton-")]
    bad = runner.invoke(app, ["triton", str(bundle), "-o", str(repo), "--artifact", "nope"])
    assert bad.exit_code == 2 and "no artifact 'nope'" in bad.stderr


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    from cbam_deploy.fsutil import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "old").write_text("old")
    (tmp_path / "b" / "new").write_text("new")
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE): the two-rename fallback is tested below")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["new"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["old"]
    with pytest.raises(FileNotFoundError):
        exchange(tmp_path / "a", tmp_path / "missing")


def test_replacing_a_model_never_leaves_its_folder_missing(bundle, tmp_path):
    """A poller (Triton's repository scan, say) watches the model folder while it is replaced ten times."""
    import threading

    from cbam_deploy.fsutil import exchange

    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "other").mkdir()
    if not exchange(probe, tmp_path / "other"):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE)")
    repo = tmp_path / "repo"
    model = write_repository(bundle, repo, ["onnx-fp32"])[0]["model"]
    folder = repo / model / "1" / "model.onnx"
    stop, missing, checks = threading.Event(), [], [0]

    def poll():
        while not stop.is_set():
            checks[0] += 1
            if not folder.exists():
                missing.append(checks[0])

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        for batch in range(1, 11):
            write_repository(bundle, repo, ["onnx-fp32"], max_batch=batch)
    finally:
        stop.set()
        watcher.join()
    assert checks[0] > 10 and missing == []
    assert parse(repo / model / "config.pbtxt").max_batch_size == 10


def test_replacement_falls_back_to_two_renames(bundle, tmp_path, monkeypatch):
    import cbam_deploy.fsutil as fsutil

    repo = tmp_path / "repo"
    model = write_repository(bundle, repo, ["onnx-fp32"])[0]["model"]
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)  # a system without RENAME_EXCHANGE
    write_repository(bundle, repo, ["onnx-fp32"], max_batch=3)
    assert parse(repo / model / "config.pbtxt").max_batch_size == 3
    assert sorted(p.name for p in repo.iterdir()) == [model]
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".cbam-triton-")]
