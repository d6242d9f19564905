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

from cbam_deploy.attention import CHANNEL_THRESHOLDS, THRESHOLDS, artifact_maps, compare_maps, torch_maps  # noqa: E402
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


def _break_channel_gate(bundle, tmp_path, how: str):
    """A copy of the bundle whose INT8 ONNX has layer3's channel gate (128 channels) broken: its sigmoid
    replaced by a constant 0.5 (HardSigmoid with slope 0), or its profile permuted (the output rows of
    the MLP's last layer shuffled, so every channel gets another channel's weight)."""
    import shutil

    broken = tmp_path / how
    shutil.copytree(bundle, broken)
    path = broken / "model.int8-ort-cpu.onnx"
    proto = onnx.load(str(path))
    manifest = read_manifest(broken)
    gate = next(g for g in onnx_gates(proto, manifest["model"]["gates"]["gates"]) if g.name == "layer3.0.cbam.ChannelGate")
    sigmoid = next(n for n in proto.graph.node if gate.sigmoid_tensor in n.output)
    if how == "constant":
        sigmoid.op_type = "HardSigmoid"
        del sigmoid.attribute[:]
        sigmoid.attribute.extend([onnx.helper.make_attribute("alpha", 0.0), onnx.helper.make_attribute("beta", 0.5)])
    else:
        producers = {o: n for n in proto.graph.node for o in n.output}
        initializers = {i.name: i for i in proto.graph.initializer}
        node = producers[sigmoid.input[0]]
        while not any(i in initializers for i in node.input):  # back to the MLP's last layer (Gemm/MatMul/Conv)
            node = producers[node.input[0]]
        channels = 128
        order = np.random.default_rng(0).permutation(channels)
        for name in node.input:
            if name in initializers:
                array = onnx.numpy_helper.to_array(initializers[name])
                axis = next(a for a, n in enumerate(array.shape) if n == channels)
                initializers[name].CopyFrom(onnx.numpy_helper.from_array(np.take(array, order, axis=axis), name))
    onnx.save(proto, str(path))
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
    artifact["sha256"] = sha256_file(path)  # a wrong model, not a torn file
    write_manifest(broken, manifest)
    return broken


@pytest.mark.parametrize("how", ["constant", "permuted"])
def test_a_broken_channel_gate_fails_attention_parity(digits, tmp_path, how):
    """A channel gate stuck at 0.5, or with its profile permuted, in the INT8 artifact: verify fails it
    and names it; no gate upstream of it fails (the spatial gate right after it in the same block sees
    the feature map the broken gate scaled, and may fail with it). The constant leaves no error PyTorch's profile does not explain, so its
    ranking is judged; the permutation's error is as large as the profile's spread, so it is judged on
    its cosine, which a profile of this spread (about 0.3 around 0.5) does not survive."""
    bundle, *_ = digits
    broken = _break_channel_gate(bundle, tmp_path, how)
    row = next(r for r in verify_bundle(broken, artifacts=["int8-ort-cpu"])["results"])
    assert row["passed"] is False and row["attention"]["passed"] is False
    stages = row["attention"]["gates"]
    failed = [g for g in stages if g in row["attention"]["reason"]]
    assert failed[0] == "layer3.0.cbam.ChannelGate", row["attention"]["reason"]
    assert set(failed) <= {"layer3.0.cbam.ChannelGate", "layer3.0.cbam.SpatialGate"}, row["attention"]["reason"]
    assert bool(stages["layer3.0.cbam.ChannelGate"].get("flat")) is (how == "permuted")
    intact = stages["layer1.0.cbam.ChannelGate"]
    assert not intact.get("flat") and intact["spread"] > 10 * intact["error"]


def test_a_flat_profile_is_judged_on_cosine_alone_and_a_collapsed_one_is_not():
    """Profiles of an untrained model: channel gates within a few hundredths of 0.5. Noise as large as
    that spread makes the top-k ranking noise: the gate passes on its cosine, and its record says so. A
    gate stuck at a constant has no such noise (its error is nothing PyTorch's profile does not
    explain): its ranking is judged and fails."""
    rng = np.random.default_rng(0)
    reference = {"gate": 0.5 + 0.02 * rng.standard_normal((8, 64))}
    kinds = {"gate": "channel"}
    noisy = compare_maps(reference, {"gate": reference["gate"] + 0.04 * rng.standard_normal((8, 64))}, "int8",
                         kinds=kinds)
    stage = noisy["gates"]["gate"]
    assert noisy["passed"] is True and stage["ranked_samples"] == 0 and "judged on cosine alone" in stage["flat"]
    assert stage["top_overlap"] < CHANNEL_THRESHOLDS["int8"][1] < stage["cosine"]  # the overlap alone would fail it
    assert noisy["min_channel_overlap"] is None
    stuck = compare_maps(reference, {"gate": np.full((8, 64), 0.5)}, "int8", kinds=kinds)
    assert stuck["passed"] is False and stuck["gates"]["gate"]["ranked_samples"] == 8
    assert not stuck["gates"]["gate"].get("flat") and stuck["gates"]["gate"]["cosine"] > CHANNEL_THRESHOLDS["int8"][0]
    # a small error on the same profile: ranked and passing
    fine = compare_maps(reference, {"gate": reference["gate"] + 0.001 * rng.standard_normal((8, 64))}, "int8",
                        kinds=kinds)
    assert fine["passed"] is True and fine["gates"]["gate"]["ranked_samples"] == 8


def test_a_flat_spatial_map_is_judged_on_cosine_alone():
    rng = np.random.default_rng(1)
    reference = {"map": 0.5 + 0.003 * rng.standard_normal((4, 1, 8, 8))}
    noisy = compare_maps(reference, {"map": reference["map"] + 0.004 * rng.standard_normal((4, 1, 8, 8))}, "int8",
                         kinds={"map": "spatial"})
    stage = noisy["gates"]["map"]
    assert noisy["passed"] is True and stage["flat"] and stage["correlation"] < THRESHOLDS["int8"][0]
    assert "cosine" not in stage and stage["map_cosine"] > CHANNEL_THRESHOLDS["int8"][0]
