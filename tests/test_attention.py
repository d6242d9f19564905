"""Attention parity: every CBAM spatial gate of each artifact against PyTorch FP32, on the trained
reference digits model (random-init zoo models have constant gates: the official init zeroes the
spatial gate's BN weight), and a deliberately collapsed gate caught even where logits agree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.attention import THRESHOLDS, artifact_maps, compare_maps, torch_maps  # noqa: E402
from cbam_deploy.bundle import read_manifest  # noqa: E402
from helpers import write_manifest  # noqa: E402
from cbam_deploy.data import load_calibration  # noqa: E402
from cbam_deploy.fsutil import sha256_file  # noqa: E402
from cbam_deploy.backends.onnx.gates import onnx_gates  # noqa: E402
from cbam_deploy.loaders import reference_runner  # noqa: E402
from cbam_deploy.scopes import node_module_path  # noqa: E402
from cbam_deploy.verify import verify_bundle  # noqa: E402

pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (test extra)")

GATES = [f"layer{i}.0.cbam.SpatialGate" for i in range(1, 5)]


@pytest.fixture(scope="module")
def digits(digits_int8):
    bundle, _, test = digits_int8
    manifest = read_manifest(bundle)
    x = load_calibration(str(test), manifest["input"], 16, seed=3).inputs
    return bundle, manifest, x, reference_runner(manifest, bundle)[0].model


def test_every_spatial_gate_is_found_in_the_graphs(digits):
    bundle, manifest, _, model = digits
    assert sorted(torch_maps(model, np.zeros((1, 3, 32, 32), np.float32))) == GATES
    for name in ("model.onnx", "model.int8-ort-cpu.onnx"):
        found = onnx_gates(onnx.load(str(bundle / name)), manifest["model"]["gates"]["gates"])
        assert sorted(g.name for g in found if g.kind == "spatial") == GATES


def test_fp32_onnx_maps_equal_pytorch(digits):
    bundle, manifest, x, model = digits
    reference, candidate = torch_maps(model, x), artifact_maps(bundle, manifest, "onnx-fp32", x)
    assert max(reference[gate].std() for gate in GATES) > 0.05  # real maps, not the constant 0.5 of a random init
    for gate in GATES:
        assert reference[gate].shape == candidate[gate].shape and reference[gate].std() > 0
        np.testing.assert_allclose(candidate[gate], reference[gate], atol=1e-5)
    assert compare_maps(reference, candidate, "fp32")["min_correlation"] > 0.99999


def test_int8_artifacts_get_a_parity_figure_per_gate(digits):
    bundle, manifest, x, model = digits
    reference = torch_maps(model, x)
    for name in ("int8-ort-cpu", "int8-openvino"):
        parity = compare_maps(reference, artifact_maps(bundle, manifest, name, x), "int8")
        assert set(parity["gates"]) == set(GATES)
        for stage in parity["gates"].values():
            assert 0.9 < stage["correlation"] < 1.0 and 0.5 < stage["top_iou"] <= 1.0 and stage["max_abs_err"] > 0
        assert parity["passed"] is True


def test_verify_records_attention_parity_for_every_artifact(digits):
    bundle, *_ = digits
    rows = {r["artifact"]: r for r in verify_bundle(bundle)["results"]}
    assert rows["onnx-fp32"]["attention"]["min_correlation"] > 0.9999
    assert rows["int8-openvino"]["attention"]["passed"] is True
    recorded = {a["name"]: a for a in read_manifest(bundle)["artifacts"]}
    assert set(GATES) < set(recorded["int8-ort-cpu"]["verify"]["attention"]["gates"])  # channel gates too
    assert recorded["int8-ort-cpu"]["verify"]["attention"]["counts"] == {"spatial": 4, "channel": 4, "joint": 0,
                                                                         "not_found": 0}


def test_a_collapsed_spatial_gate_is_caught(digits, tmp_path):
    """Zero the 7x7 conv of layer3's spatial gate in the INT8 artifact: the map goes constant."""
    import shutil

    bundle, *_ = digits
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    path = broken / "model.int8-ort-cpu.onnx"
    proto = onnx.load(str(path))
    conv = next(n for n in proto.graph.node
                if n.op_type == "Conv" and (node_module_path(n) or "").startswith("layer3.0.cbam.SpatialGate.spatial"))
    weight = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    weight.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(weight)), weight.name))
    onnx.save(proto, str(path))
    manifest = read_manifest(broken)
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
    artifact["sha256"] = sha256_file(path)  # a wrong model, not a torn file
    write_manifest(broken, manifest)
    row = next(r for r in verify_bundle(broken, artifacts=["int8-ort-cpu"])["results"])
    assert row["passed"] is False and row["attention"]["passed"] is False
    assert "layer3.0.cbam.SpatialGate" in row["reason"]
    assert row["attention"]["gates"]["layer3.0.cbam.SpatialGate"]["correlation"] < THRESHOLDS["int8"][0]
    assert row["attention"]["gates"]["layer1.0.cbam.SpatialGate"]["correlation"] > THRESHOLDS["int8"][0]
