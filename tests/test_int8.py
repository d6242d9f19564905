"""INT8: calibration data, recipes per target, the gate policy, the cache, and accuracy on the
reference digits CBAM model (trained by reference/train_digits.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.bundle import read_manifest  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.evaluate import evaluate_bundle  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.backends.onnx.gates import onnx_gates  # noqa: E402
from cbam_deploy.gates import nodes_of  # noqa: E402
from cbam_deploy.torch_gates import find_gates  # noqa: E402
from cbam_deploy.quantize import quantize_bundle  # noqa: E402
from reference.digits import CHECKPOINT, MODEL_NAME, STEM, write_image_folder  # noqa: E402

pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (test extra)")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    test = write_image_folder(root / "test", "test")
    train = write_image_folder(root / "train", "train")
    bundle = root / "bundle"
    result = export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(bundle)))
    assert result["passed"]
    return {"test": test, "train": train, "bundle": bundle, "root": root}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CBAM_DEPLOY_CACHE", str(tmp_path / "cache"))


def test_reference_model_reaches_97_percent(digits):
    result = evaluate_bundle(digits["bundle"], digits["test"])
    rows = {r["artifact"]: r for r in result["results"]}
    assert result["images"] == 360 and result["classes"] == 10
    assert rows["pytorch-fp32"]["top1"] >= 0.97
    assert rows["onnx-fp32"]["agreement"] == 1.0


@pytest.mark.parametrize("gates", ["int8", "fp"])
def test_every_recipe_keeps_accuracy(digits, gates):
    targets = ["ort-cpu", "tensorrt"]
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        targets.append("openvino")
    except ImportError:
        pass
    result = quantize_bundle(digits["bundle"], targets, str(digits["train"]), calib_size=128, gates=gates)
    assert result["passed"], result
    evaluation = evaluate_bundle(digits["bundle"], digits["test"])
    rows = {r["artifact"]: r for r in evaluation["results"]}
    fp32 = rows["pytorch-fp32"]["top1"]
    for artifact in result["artifacts"]:
        row = rows[artifact["name"]]
        assert artifact["quantization"]["gates"] == gates
        assert fp32 - row["top1"] <= 0.010, (artifact["name"], row)
        assert row["agreement"] >= 0.98, (artifact["name"], row)
        if gates == "fp":
            assert artifact["quantization"]["excluded_nodes"] > 0


def _initializer(model, name):
    return next((onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name), None)


def test_tensorrt_recipe_is_symmetric_per_channel_without_bias(digits):
    quantize_bundle(digits["bundle"], ["tensorrt"], str(digits["train"]), calib_size=32, gates="int8")
    model = onnx.load(str(digits["bundle"] / "model.int8-tensorrt-gates-int8.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 17  # TensorRT 8.5 parses it
    producers = {out: node for node in model.graph.node for out in node.output}
    per_channel = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = _initializer(model, node.input[2])
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if node.op_type == "Conv":
            weight_dq = producers[node.input[1]]
            assert weight_dq.op_type == "DequantizeLinear"
            scale = _initializer(model, weight_dq.input[1])
            weight = _initializer(model, weight_dq.input[0])
            assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
            per_channel += 1
            if len(node.input) > 2:  # bias stays float
                assert node.input[2] not in producers or producers[node.input[2]].op_type != "DequantizeLinear"
    assert per_channel > 5


def test_ort_cpu_recipe_is_u8s8(digits):
    quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=32, gates="int8")
    model = onnx.load(str(digits["bundle"] / "model.int8-ort-cpu-gates-int8.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}
    kinds = set()
    for node in model.graph.node:
        if node.op_type == "Conv":
            activation_dq = producers[node.input[0]]
            weight_dq = producers[node.input[1]]
            kinds.add((_initializer(model, activation_dq.input[2]).dtype, _initializer(model, weight_dq.input[0]).dtype))
    assert kinds == {(np.dtype(np.uint8), np.dtype(np.int8))}


def test_gates_fp_keeps_gate_nodes_unquantized(digits):
    quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=32, gates="fp")
    manifest = read_manifest(digits["bundle"])
    model = onnx.load(str(digits["bundle"] / "model.int8-ort-cpu.onnx"))  # fp is the default policy
    gate_names = set(nodes_of(onnx_gates(model, manifest["model"]["gates"]["gates"])))
    producers = {out: node for node in model.graph.node for out in node.output}
    gate_ops = [n for n in model.graph.node if n.name in gate_names]
    assert {"Gemm", "Sigmoid", "Mul", "Conv"} <= {n.op_type for n in gate_ops}
    for node in gate_ops:
        if node.op_type in ("Gemm", "Conv"):  # the MLP and the 7x7 conv take float weights, not int8
            assert producers.get(node.input[1]) is None or producers[node.input[1]].op_type != "DequantizeLinear", node.name
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
    assert artifact["quantization"]["gate_check"]["held"] is True and artifact["quantization"]["gate_check"]["gates"] == 8


def test_gate_discovery_on_zoo_models():
    from collections import Counter

    from cbam_deploy.models import create_model

    def kinds(name):
        return Counter(g["kind"] for g in find_gates(create_model(name, num_classes=10, stem="cifar")).gates)

    assert kinds("resnet18_cbam") == {"channel": 8, "spatial": 8}
    assert kinds("resnet18_bam") == {"joint": 3}
    assert kinds("resnet18_se") == {"channel": 8}
    names = [g["name"] for g in find_gates(create_model("resnet18_cbam", num_classes=10, stem="cifar")).gates]
    assert names[:2] == ["layer1.0.cbam.ChannelGate", "layer1.0.cbam.SpatialGate"]
    plain = find_gates(create_model("resnet18", num_classes=10, stem="cifar")).describe()
    assert plain["count"] == 0 and "no attention gates" in plain["note"]


def test_gate_discovery_in_graph(tmp_path):
    from cbam_deploy.backends.onnx.exporter import OnnxExportOptions, export_onnx
    from cbam_deploy.models import create_model

    model = create_model("resnet18_cbam", num_classes=10, stem="cifar")
    export_onnx(model, tmp_path / "m.onnx", OnnxExportOptions(input_size=32))
    graph = onnx.load(str(tmp_path / "m.onnx"))
    found = onnx_gates(graph, find_gates(model).gates)
    names = nodes_of(found)
    assert all("/cbam/" in n for n in names)
    per_block = {n.split("/cbam/")[0] for n in names}
    assert len(per_block) == 8 and len(found) == 16
    ops = {n.op_type for n in graph.graph.node if n.name in names}
    assert {"ReduceMean", "ReduceMax", "Gemm", "Sigmoid", "Mul", "Concat", "Conv"} <= ops
    assert sorted(n.op_type for n in graph.graph.node if n.op_type == "Sigmoid") == ["Sigmoid"] * 16


def test_gate_discovery_with_dynamo_metadata(tmp_path):
    pytest.importorskip("onnxscript")
    from cbam_deploy.backends.onnx.exporter import OnnxExportOptions, export_onnx
    from cbam_deploy.models import create_model

    model = create_model("resnet10_half_cbam", num_classes=10, stem="cifar")
    export_onnx(model, tmp_path / "m.onnx", OnnxExportOptions(input_size=32, opset=18, exporter="dynamo"))
    graph = onnx.load(str(tmp_path / "m.onnx"))
    expected = find_gates(model).gates
    found = onnx_gates(graph, expected)
    assert sorted(g.name for g in found) == sorted(g["name"] for g in expected) and len(found) == 8
    names = set(nodes_of(found))
    ops = [n.op_type for n in graph.graph.node if n.name in names]
    assert ops.count("Sigmoid") == 8 and "Conv" in ops  # 4 blocks x (channel + spatial sigmoid)
    assert all(n.op_type != "Sigmoid" for n in graph.graph.node if n.name not in names)


def test_calibration_cache_hits_on_second_run(digits):
    first = quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=16)
    sha = first["artifacts"][0]["sha256"]
    assert first["artifacts"][0]["quantization"]["calibration_cache"]["hit"] is False
    second = quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=16)
    assert second["artifacts"][0]["quantization"]["calibration_cache"]["hit"] is True
    assert second["artifacts"][0]["sha256"] == sha
    other_data = quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=16, seed=1)
    assert other_data["artifacts"][0]["quantization"]["calibration_cache"]["hit"] is False
    forced = quantize_bundle(digits["bundle"], ["ort-cpu"], str(digits["train"]), calib_size=16, use_cache=False)
    assert forced["artifacts"][0]["quantization"]["calibration_cache"]["hit"] is False


def test_quantize_and_eval_cli(digits):
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(digits["bundle"]), "--target", "ort-cpu", "--calib-data",
                                 str(digits["train"]), "--calib-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["artifacts"][0]["name"] == "int8-ort-cpu" and summary["calibration"]["kind"] == "images"
    evaluation = runner.invoke(app, ["eval", str(digits["bundle"]), "--artifact", "int8-ort-cpu", "--data",
                                     str(digits["test"]), "--json"])
    assert evaluation.exit_code == 0, evaluation.output
    rows = json.loads(evaluation.stdout)["results"]
    assert [r["artifact"] for r in rows] == ["pytorch-fp32", "int8-ort-cpu"] and rows[1]["top1"] > 0.97
    table = runner.invoke(app, ["eval", str(digits["bundle"]), "--data", str(digits["test"]), "--limit", "50"])
    assert table.exit_code == 0 and "onnx-fp32" in table.stdout and "top-5" in table.stdout


@pytest.mark.parametrize("args,needle", [
    (["--target", "gpu"], "unknown target"),
    (["--method", "kl"], "unknown calibration method"),
    (["--target", "openvino", "--method", "entropy"], "no entropy"),
    (["--gates", "half"], "--gates"),
])
def test_quantize_bad_options(digits, args, needle):
    result = CliRunner().invoke(app, ["quantize", str(digits["bundle"]), "--calib-data", "synthetic", *args])
    assert result.exit_code == 2 and needle in result.stderr


def test_export_int8_with_synthetic_data_is_marked(tmp_path):
    result = CliRunner().invoke(app, ["export", "-m", "resnet10_half_cbam", "--stem", "cifar", "-o", str(tmp_path),
                                      "--int8", "--calib-data", "synthetic", "--json"])
    manifest = read_manifest(tmp_path)
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
    assert artifact["calibration"]["kind"] == "synthetic" and artifact["calibration"]["fit_for_production"] is False
    assert "synthetic" in artifact["parity"]["warning"]
    assert "not judged" in artifact["parity"]["note"]  # random weights: top-1 reported, cosine judged
    assert result.exit_code in (0, 3)
    assert json.loads(result.stdout)["int8"]["artifacts"][0]["parity"]["passed"] == (result.exit_code == 0)


def test_int8_verdict_rules():
    from cbam_deploy.parity import compare_int8

    reference = np.array([[1.0, 0.99, 0.0], [0.0, 1.0, 0.99]] * 5)
    flipped = np.array([[0.99, 1.0, 0.0], [0.0, 1.0, 0.99]] * 5)  # half the rows flip a near tie
    trained = compare_int8(reference, flipped)
    assert not trained["passed"] and "top-1 agreement" in trained["reason"]
    untrained = compare_int8(reference, flipped, judge_top1=False)
    assert untrained["passed"] and untrained["top1_agreement"] == 0.5
    assert not compare_int8(reference, -reference, judge_top1=False)["passed"]


def test_export_int8_needs_data(tmp_path):
    result = CliRunner().invoke(app, ["export", "-m", "resnet18", "-o", str(tmp_path), "--int8"])
    assert result.exit_code == 2 and "--calib-data" in result.stderr


def test_imagenet_sized_model_calibrates_on_real_photos(tmp_path):
    skimage = pytest.importorskip("skimage", reason="scikit-image ships the sample photographs")
    photos = Path(skimage.__file__).parent / "data"
    from cbam_deploy.data import load_calibration

    export_bundle(ExportOptions(model="resnet18_cbam", output=str(tmp_path / "b"), parity=False))
    manifest = read_manifest(tmp_path / "b")
    data = load_calibration(str(photos), manifest["input"], size=6)
    assert data.inputs.shape == (6, 3, 224, 224) and data.kind == "images" and np.isfinite(data.inputs).all()
    result = quantize_bundle(tmp_path / "b", ["ort-cpu"], str(photos), calib_size=6, check_samples=4)
    artifact = result["artifacts"][0]
    assert artifact["calibration"]["samples"] == 6 and artifact["parity"]["samples"] == 4
    assert artifact["parity"]["reference"] == "pytorch-fp32"  # the seeded random init is rebuilt exactly
