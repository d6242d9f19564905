"""CBAM rewrites (``--cbam-opt``): exact on every zoo CBAM model, fixed and dynamic H/W, recorded
in the manifest, reversible with ``--cbam-opt off``, and INT8 accuracy on the reference model unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from official_style import randomize
from typer.testing import CliRunner

from cbam_deploy.backends.onnx.exporter import OnnxExportOptions, export_onnx
from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
from cbam_deploy.cbam_opt import BatchedMlpChannelGate, applied, optimize_for_export
from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.models import create_model, list_models
from cbam_deploy.models.layers import CBAM, ChannelGate
from cbam_deploy.models.registry import get_entry
from cbam_deploy.parity import TOLERANCES, compare_all

CBAM_ZOO = [name for name in list_models() if get_entry(name).attention == "cbam"]


def test_the_zoo_has_cbam_models():
    assert {"resnet18_cbam", "resnet50_cbam", "resnext50_32x4d_cbam"} <= set(CBAM_ZOO)


def test_rewrite_works_on_a_copy_with_the_same_parameters(tiny_cbam):
    optimized, record = optimize_for_export(tiny_cbam)
    assert optimized is not tiny_cbam
    gates = [m for m in tiny_cbam.modules() if isinstance(m, ChannelGate)]
    assert gates and all(type(m) is ChannelGate for m in gates)  # the reference model is untouched
    assert all(type(m) is BatchedMlpChannelGate for m in optimized.modules() if isinstance(m, ChannelGate))
    assert record["rewrites"][0]["name"] == "mlp-batched" and record["rewrites"][0]["modules"] == len(gates)
    reference, rewritten = tiny_cbam.state_dict(), optimized.state_dict()
    assert list(reference) == list(rewritten)
    assert all(torch.equal(reference[k], rewritten[k]) for k in reference)


def test_off_returns_the_model_itself(tiny_cbam):
    model, record = optimize_for_export(tiny_cbam, "off")
    assert model is tiny_cbam and record == {"mode": "off", "rewrites": []} and applied(record) == []
    with pytest.raises(CbamDeployError, match="--cbam-opt must be on or off"):
        optimize_for_export(tiny_cbam, "fast")


def test_one_pool_or_a_foreign_gate_is_left_as_written():
    single = CBAM(32, pool_types=("avg",))  # one pool: nothing to batch
    model, record = optimize_for_export(single)
    assert model is single and record["rewrites"] == [] and "no gate where a rewrite is exact" in record["note"]
    three = CBAM(32, pool_types=("avg", "max", "lse")).eval()
    optimized, record = optimize_for_export(three)
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), three(x), rtol=1e-5, atol=1e-6)  # k = 3: k * b2 in the fold
    assert record["rewrites"][0]["modules"] == 1


@pytest.mark.parametrize("dynamic_hw", [False, True], ids=["fixed-hw", "dynamic-hw"])
@pytest.mark.parametrize("name", CBAM_ZOO)
def test_rewritten_export_matches_the_unmodified_model(name, dynamic_hw, tmp_path):
    """The exported rewrite against the model as written, within the FP32 parity bound: batch 1 and 3,
    and for dynamic H/W two other sizes (one not square)."""
    model = randomize(create_model(name, num_classes=10, stem="cifar"), seed=3).eval()
    optimized, record = optimize_for_export(model)
    assert applied(record) == ["mlp-batched"]
    path = tmp_path / "model.onnx"
    export_onnx(optimized, path, OnnxExportOptions(input_size=32, dynamic_hw=dynamic_hw))
    gemms = sum(n.op_type == "Gemm" for n in onnx.load(str(path)).graph.node)
    assert gemms == 2 * record["rewrites"][0]["modules"] + 1  # two per gate (not four) + the classifier
    runner = OnnxRuntimeRunner(path)
    sizes = [(32, 32), (48, 40), (64, 64)] if dynamic_hw else [(32, 32)]
    generator = torch.Generator().manual_seed(0)
    for batch, (h, w) in [(1, sizes[0]), *[(3, s) for s in sizes]]:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        metrics = compare_all({"logits": expected}, {"logits": runner.infer(x.numpy())["logits"]}, TOLERANCES["fp32"],
                              {"logits": "logits"})
        assert metrics["passed"], (name, batch, h, w, metrics)


def test_cli_records_the_rewrites_and_off_exports_as_written(tmp_path):
    cli = CliRunner()
    onnx_gemms, records = {}, {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        result = cli.invoke(app, ["export", "--model", "resnet10_half_cbam", "--stem", "cifar", "--num-classes", "10",
                                  "-o", str(out), "--cbam-opt", mode, "--json"])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        onnx_record = next(a for a in manifest["artifacts"] if a["name"] == "onnx-fp32")
        assert onnx_record["parity"]["passed"] is True  # checked against the model as written
        records[mode] = onnx_record["export"]["cbam_opt"]
        onnx_gemms[mode] = sum(n.op_type == "Gemm" for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert records["on"]["mode"] == "on" and applied(records["on"]) == ["mlp-batched"]
    assert records["on"]["rewrites"][0]["exact"] is True and records["on"]["rewrites"][0]["modules"] == 4
    assert records["off"] == {"mode": "off", "rewrites": []}
    assert (onnx_gemms["on"], onnx_gemms["off"]) == (2 * 4 + 1, 4 * 4 + 1)


def test_cli_refuses_an_unknown_mode(tmp_path):
    result = CliRunner().invoke(app, ["export", "--model", "resnet10_half_cbam", "-o", str(tmp_path / "b"),
                                      "--cbam-opt", "fast"])
    assert result.exit_code == 2 and "--cbam-opt must be one of on, off" in result.output
    assert not (tmp_path / "b").exists()


def test_int8_accuracy_on_the_reference_model_is_unchanged(digits_int8, tmp_path):
    """The reference digits model quantized with the rewrites on (the session fixture, the default) and
    off: both INT8 recipes keep top-1 within a point of FP32 and of each other."""
    pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (test extra)")
    from cbam_deploy.bundle import read_manifest
    from cbam_deploy.evaluate import evaluate_bundle
    from cbam_deploy.export_job import ExportOptions, export_bundle
    from cbam_deploy.quantize import quantize_bundle
    from reference.digits import CHECKPOINT, MODEL_NAME, STEM

    on_bundle, train, test = digits_int8
    on_record = next(a for a in read_manifest(on_bundle)["artifacts"] if a["name"] == "onnx-fp32")["export"]["cbam_opt"]
    assert applied(on_record) == ["mlp-batched"]
    off_bundle = tmp_path / "off"
    export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(off_bundle),
                                parity=False, cbam_opt="off"))
    quantize_bundle(off_bundle, ["ort-cpu", "openvino"], str(train), calib_size=64, check_samples=16, use_cache=False)
    rows = {}
    for mode, bundle in (("on", on_bundle), ("off", off_bundle)):
        rows[mode] = {r["artifact"]: r for r in evaluate_bundle(bundle, test)["results"]}
    for name in ("int8-ort-cpu", "int8-openvino"):
        on, off = rows["on"][name], rows["off"][name]
        fp32 = rows["on"]["pytorch-fp32"]["top1"]
        assert fp32 - on["top1"] <= 0.01 and fp32 - off["top1"] <= 0.01, (name, on, off)
        assert abs(on["top1"] - off["top1"]) <= 0.01 and on["agreement"] >= 0.98, (name, on, off)
    assert np.isclose(rows["on"]["pytorch-fp32"]["top1"], rows["off"]["pytorch-fp32"]["top1"])
