"""Gates found by what they are: five CBAM implementations written as people write them
(tests/data/cbam_styles.py), each exported, quantized for ort-cpu and OpenVINO under both gate
policies, verified and explained. Every gate must be found with its kind, no SiLU or hard-swish
counted, the policy must hold on the built graph (checked here on the Q/DQ ONNX and the IR directly,
not only by the library's own check), verify must report parity for every gate and explain must draw
every map. And a promise broken on purpose (a gate quantized in an artifact that says ``gates fp``)
is caught by verify, which names the gate."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from cbam_deploy.bundle import read_manifest
from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.fsutil import sha256_file
from cbam_deploy.backends.onnx.gates import onnx_gates
from cbam_deploy.torch_gates import find_gates
from cbam_deploy.models import CodeTrust
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.quantize import quantize_bundle
from cbam_deploy.scopes import name_module_path, node_module_path
from cbam_deploy.verify import verify_bundle

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))

import cbam_styles  # noqa: E402
from helpers import write_manifest  # noqa: E402

STYLES = list(cbam_styles.EXPECTED)
SIZE = 32


def _spec(style: str) -> str:
    return f"{DATA / 'cbam_styles.py'}:{style}"


def _trust(style: str) -> CodeTrust:
    return CodeTrust(factory=_spec(style))  # the factory named again: its code may rebuild the model


def _batch(style: str):
    return 1 if style == "official_layout" else None  # pools sized from x.size(): no dynamic batch (see the file)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CBAM_DEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("style", STYLES)
def test_every_gate_is_found_by_its_structure(style):
    model = getattr(cbam_styles, style)()
    report = find_gates(model, torch.zeros(1, 3, SIZE, SIZE))
    assert report.error is None
    kinds = Counter(g["kind"] for g in report.gates)
    assert kinds == cbam_styles.EXPECTED[style], [g["name"] for g in report.gates]
    assert len({g["name"] for g in report.gates}) == len(report.gates)
    for gate in report.gates:
        assert gate["pools"], gate  # fed by pooled descriptors
        pools = {p.split("(")[1] for p in gate["pools"]}
        assert pools == ({"H,W)"} if gate["kind"] == "channel" else {"C)"}), gate
    # the sigmoids of SiLU / hard-swish written out are in the graph, and not counted
    if style == "yolo_detector":
        assert not any(g["name"].startswith("act") for g in report.gates)
        assert all(g["multiply"]["inside_gate_module"] for g in report.gates)  # Ultralytics multiplies inside
    if style == "se_eca":
        assert [g["family"] for g in report.gates] == ["se", "eca"]
        assert report.gates[0]["sigmoid"]["op"] == "hardsigmoid"
    if style in ("third_party_resnet", "neutral_names"):
        assert not any(g["multiply"]["inside_gate_module"] for g in report.gates)  # the parent multiplies


def test_silu_and_hardswish_alone_are_no_gates():
    class Act(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.silu = torch.nn.SiLU()

        def forward(self, x):
            y = self.silu(self.conv(x))
            y = y * torch.sigmoid(y)
            return y * torch.nn.functional.hardsigmoid(y)

    report = find_gates(Act().eval()).describe()
    assert report["count"] == 0 and "no attention gates" in report["note"]


def _independent_onnx_check(path: Path, gates: list[dict], policy: str) -> None:
    """Q/DQ placement read straight off the graph: a gate's sigmoid (found by its module scope) is
    quantized when its input comes from a DequantizeLinear or its output (through reshapes) goes into
    a QuantizeLinear."""
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    modules = {g["sigmoid"]["module"] for g in gates}
    sigmoids = [n for n in graph.node if n.op_type in ("Sigmoid", "HardSigmoid") and node_module_path(n) in modules]
    assert len(sigmoids) >= len(gates)
    for node in sigmoids:
        source = producers.get(node.input[0])
        quantized = source is not None and source.op_type == "DequantizeLinear"
        frontier = list(node.output)
        while frontier:
            for consumer in consumers.get(frontier.pop(), []):
                if consumer.op_type == "QuantizeLinear":
                    quantized = True
                elif consumer.op_type in ("Reshape", "Unsqueeze", "Expand", "Transpose"):
                    frontier.extend(consumer.output)
        assert quantized is (policy == "int8"), (path.name, node.name)


def _independent_ir_check(xml: Path, gates: list[dict], policy: str) -> None:
    """FakeQuantize placement read straight off the IR: the gating multiply that a gate's sigmoid
    feeds (through reshapes) takes that operand from a FakeQuantize exactly under --gates int8."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    modules = {g["sigmoid"]["module"] for g in gates}
    checked = 0
    for op in model.get_ops():
        if op.get_type_name() not in ("Sigmoid", "HSigmoid", "HardSigmoid"):
            continue
        if name_module_path(op.get_friendly_name()) not in modules:
            continue
        frontier, quantized = [op], False
        while frontier:
            for target in frontier.pop().output(0).get_target_inputs():
                node = target.get_node()
                if node.get_type_name() == "FakeQuantize":
                    quantized = True
                elif node.get_type_name() in ("Reshape", "Unsqueeze", "Broadcast", "Transpose"):
                    frontier.append(node)
        assert quantized is (policy == "int8"), (xml.name, op.get_friendly_name())
        checked += 1
    assert checked >= len(gates)


_BUILT: dict = {}


def _build(style, tmp_path_factory):
    """One style exported and quantized for ort-cpu and OpenVINO under both gate policies (once per
    test module run)."""
    if style not in _BUILT:
        _BUILT[style] = _export_and_quantize(style, tmp_path_factory)
    return _BUILT[style]


@pytest.fixture(scope="module", params=STYLES)
def built(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """The third-party CBAM ResNet (the multiply outside the gate modules), built."""
    return _build("third_party_resnet", tmp_path_factory)


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    return _build("yolo_detector", tmp_path_factory)


def _export_and_quantize(style, tmp_path_factory):
    root = tmp_path_factory.mktemp(style)
    bundle = root / "bundle"
    export_bundle(ExportOptions(model=_spec(style), output=str(bundle), input_size=SIZE, batch=_batch(style),
                                parity_samples=2))
    results = {}
    for policy in ("fp", "int8"):
        quantized = quantize_bundle(bundle, ["ort-cpu", "openvino"], "synthetic", calib_size=8, calib_batch=4,
                                    check_samples=4, gates=policy, use_cache=False, trust=_trust(style))
        results[policy] = quantized["artifacts"]
    return style, bundle, results


def test_int8_policy_holds_on_the_built_graph(built):
    style, bundle, results = built
    manifest = read_manifest(bundle)
    gates = manifest["model"]["gates"]["gates"]
    assert Counter(g["kind"] for g in gates) == cbam_styles.EXPECTED[style]
    for policy, artifacts in results.items():
        assert {a["name"] for a in artifacts} == (
            {"int8-ort-cpu", "int8-openvino"} if policy == "fp" else {"int8-ort-cpu-gates-int8", "int8-openvino-gates-int8"})
        for artifact in artifacts:
            check = artifact["quantization"]["gate_check"]
            assert artifact["quantization"]["gates"] == policy
            assert check["held"] is True and check["policy"] == policy and check["gates"] == len(gates), check
            for row in check["per_gate"]:
                assert row["found"] and row["sigmoid_quantized"] is row["multiply_quantized"] is (policy == "int8"), row
                if policy == "fp":
                    assert row["quantized_layers"] == []
            path = bundle / artifact["path"]
            if artifact["format"] == "onnx":
                _independent_onnx_check(path, gates, policy)
            else:
                _independent_ir_check(path, gates, policy)


def test_verify_reports_attention_parity_for_every_gate(built):
    style, bundle, _ = built
    expected = cbam_styles.EXPECTED[style]
    result = verify_bundle(bundle, samples=4, trust=_trust(style))
    assert result["passed"] is True, [(r["artifact"], r.get("reason")) for r in result["results"]]
    for row in result["results"]:
        attention = row["attention"]
        counts = {k: v for k, v in attention["counts"].items() if v}
        assert counts == expected, (row["artifact"], attention["counts"])
        assert attention["passed"] is True
        for gate, stage in attention["gates"].items():
            assert stage["found"], (row["artifact"], gate)
            assert ("cosine" in stage) is (stage["kind"] == "channel")
        if row["precision"] == "int8":
            assert row["gate_policy"]["held"] is True


def test_explain_renders_every_gate(built, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from cbam_deploy.explain_report import explain_bundle

    style, bundle, _ = built
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(image)
    result = explain_bundle(bundle, image, artifacts=["onnx-fp32", "int8-ort-cpu", "int8-openvino"],
                            output_dir=tmp_path / "out", trust=_trust(style))
    gates = read_manifest(bundle)["model"]["gates"]["gates"]
    spatial = [g["name"] for g in gates if g["kind"] == "spatial"]
    channel = [g["name"] for g in gates if g["kind"] == "channel"]
    assert sorted(result["gates"]) == sorted(spatial) and sorted(result["channel_gates"]) == sorted(channel)
    maps = np.load(result["maps"])
    for name in ("int8-ort-cpu", "int8-openvino"):
        row = result["artifacts"][name]
        assert sorted(row["files"]) == sorted(spatial) and sorted(row["channel_files"]) == sorted(channel)
        for gate in channel:
            assert maps[f"channel/{name}/{gate}"].shape == maps[f"channel/pytorch-fp32/{gate}"].shape
        for file in list(row["files"].values()) + list(row["channel_files"].values()):
            assert Path(file).is_file() and Path(file).stat().st_size > 1000
    page = Path(result["page"]).read_text()
    assert all(g in page for g in spatial + channel) and "gate not found" not in page


def test_a_gate_quantized_anyway_fails_verify_by_name(third_party, tmp_path):
    """Build, on purpose, an INT8 artifact that says --gates fp but has one gate's sigmoid output
    quantized (a Q/DQ pair inserted after it): verify must fail it and name that gate, and only it."""
    _, bundle, _ = third_party
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest = read_manifest(broken)
    victim = next(g for g in manifest["model"]["gates"]["gates"] if g["kind"] == "channel")
    path = broken / "model.int8-ort-cpu.onnx"
    proto = onnx.load(str(path))
    sigmoid = next(n for n in proto.graph.node if n.op_type == "Sigmoid"
                   and node_module_path(n) == victim["sigmoid"]["module"])
    scale = onnx.numpy_helper.from_array(np.array(1 / 255, np.float32), "victim_scale")
    zero = onnx.numpy_helper.from_array(np.array(0, np.uint8), "victim_zero")
    proto.graph.initializer.extend([scale, zero])
    original = sigmoid.output[0]
    for node in proto.graph.node:
        node.input[:] = [f"{original}_dq" if i == original else i for i in node.input]
    index = list(proto.graph.node).index(sigmoid)
    proto.graph.node.insert(index + 1, onnx.helper.make_node("QuantizeLinear", [original, "victim_scale", "victim_zero"],
                                                             [f"{original}_q"], name="victim/QuantizeLinear"))
    proto.graph.node.insert(index + 2, onnx.helper.make_node("DequantizeLinear", [f"{original}_q", "victim_scale",
                                                                                 "victim_zero"],
                                                             [f"{original}_dq"], name="victim/DequantizeLinear"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
    artifact["sha256"] = sha256_file(path)  # a wrong artifact, not a torn file
    write_manifest(broken, manifest)

    trust = _trust("third_party_resnet")
    row = verify_bundle(broken, artifacts=["int8-ort-cpu"], samples=4, trust=trust)["results"][0]
    assert row["passed"] is False and row["gate_policy"]["held"] is False
    assert victim["name"] in row["reason"] and "sigmoid" in row["reason"]
    assert row["gate_policy"]["broken"] == [f"{victim['name']}: sigmoid and multiply quantized under --gates fp"]
    others = [g["name"] for g in manifest["model"]["gates"]["gates"] if g["name"] != victim["name"]]
    assert not any(f"{name}:" in row["reason"] for name in others)

    # the same on OpenVINO: the IR built with gates int8 put where the manifest promises gates fp
    for suffix in (".xml", ".bin"):
        shutil.copyfile(broken / f"model.int8-openvino-gates-int8{suffix}", broken / f"model.int8-openvino{suffix}")
    manifest = read_manifest(broken)
    artifact = next(a for a in manifest["artifacts"] if a["name"] == "int8-openvino")
    artifact["sha256"] = sha256_file(broken / "model.int8-openvino.xml")
    for companion in artifact.get("companion_files", {}) or {}:
        artifact["companion_files"][companion] = sha256_file(broken / companion)
    write_manifest(broken, manifest)
    row = verify_bundle(broken, artifacts=["int8-openvino"], samples=4, trust=trust)["results"][0]
    assert row["passed"] is False and len(row["gate_policy"]["broken"]) == len(manifest["model"]["gates"]["gates"])
    assert all(g["name"] in row["reason"] for g in manifest["model"]["gates"]["gates"])


def test_cbam_opt_applies_only_where_exact(third_party, yolo):
    reasons = {}
    for style, bundle, _ in (third_party, yolo):
        record = read_manifest(bundle)["artifacts"][0]["export"]["cbam_opt"]
        assert record["rewrites"] == [] and len(record["gates"]) == sum(cbam_styles.EXPECTED[style].values())
        assert all(g["applied"] == [] and g["not_applied"] for g in record["gates"])
        reasons.update({g["gate"]: g["not_applied"] for g in record["gates"]})
    assert "nothing to batch" in reasons["cbam1.channel_attention"]  # Ultralytics: one pool
    assert "would not be exact" in reasons["layer1.0.ca"]  # two pools, but the user's own forward
    assert reasons["layer1.0.sa"] == "spatial gate: no rewrite for it"


def test_cbam_opt_on_the_zoo_records_every_gate(tmp_path):
    from cbam_deploy.cbam_opt import optimize_for_export
    from cbam_deploy.models import create_model

    model = create_model("resnet18_cbam", num_classes=10, stem="cifar").eval()
    report = find_gates(model).describe()
    _, record = optimize_for_export(model, "on", report)
    applied = [g["gate"] for g in record["gates"] if g["applied"]]
    assert len(applied) == 8 and all(g.endswith("ChannelGate") for g in applied)
    assert record["rewrites"][0]["modules"] == 8
    assert all(g["not_applied"] == "spatial gate: no rewrite for it" for g in record["gates"] if not g["applied"])


def test_profile_rolls_up_foreign_gates(third_party):
    """The multiply-outside style: its gates' time is counted, the multiplies in the blocks included."""
    _, bundle, _ = third_party
    from cbam_deploy.profile import profile_bundle

    from cbam_deploy.profile import categorize, gate_index

    index = gate_index(onnx_gates(onnx.load(str(bundle / "model.onnx")), read_manifest(bundle)["model"]["gates"]["gates"]))
    assert categorize("/layer1/layer1.0/Mul", "Mul", index)[0] == "channel gate"  # in the block, not in ca
    assert categorize("/layer1/layer1.0/Mul_1", "Mul", index)[0] == "spatial gate"
    assert categorize("/layer1/layer1.0/Add", "Add", index)[0] == "other"  # the residual add is no gate's
    result = profile_bundle(bundle, artifacts=["onnx-fp32", "int8-openvino"], runs=2, warmup=1)
    for row in result["results"]:
        shares = {c["category"]: c["ms"] for c in row["categories"]}
        assert shares["channel gate"] > 0 and shares["spatial gate"] > 0, (row["artifact"], shares)


# --- foreign checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["state_dict", "model", "net", "bare"])
def test_foreign_checkpoints_load(tmp_path, wrap):
    """Checkpoints as the third-party codebases save them: DataParallel's ``module.`` prefix, wrapped
    in ``state_dict`` / ``model`` / ``net`` (or bare), loaded into the factory's model."""
    trained = cbam_styles.third_party_resnet()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    payload = state if wrap == "bare" else {wrap: state, "epoch": 3, "best_prec1": 0.5}
    ckpt = tmp_path / "ckpt.pth"
    torch.save(payload, ckpt)
    result = export_bundle(ExportOptions(model=_spec("third_party_resnet"), weights=str(ckpt), input_size=SIZE,
                                         output=str(tmp_path / "b"), parity_samples=2))
    assert result["passed"] is True
    assert result["model"]["weights"]["sha256"] == sha256_file(ckpt)
    from cbam_deploy.loaders import reference_runner

    rebuilt = reference_runner(read_manifest(tmp_path / "b"), tmp_path / "b", trust=_trust("third_party_resnet"))[0].model
    for key, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_a_whole_pickled_model_is_refused_with_one_line(tmp_path):
    ckpt = tmp_path / "whole.pth"
    torch.save(cbam_styles.third_party_resnet(), ckpt)
    out = tmp_path / "b"
    with pytest.raises(CbamDeployError) as caught:
        export_bundle(ExportOptions(model=_spec("third_party_resnet"), weights=str(ckpt), input_size=SIZE,
                                    output=str(out)))
    assert len(str(caught.value).splitlines()) == 1 and "state_dict" in str(caught.value)
    assert not out.exists()
    cli = CliRunner().invoke(app, ["export", "--model", _spec("third_party_resnet"), "--weights", str(ckpt),
                                   "--input-size", str(SIZE), "-o", str(out)])
    assert cli.exit_code != 0 and "Traceback" not in cli.output and not out.exists()


def test_the_new_user_flow_on_the_cli(tmp_path):
    """export --model file.py:factory, quantize --target ort-cpu, verify --json: gates found, policy
    held, attention parity for every gate."""
    runner = CliRunner()
    out = tmp_path / "b"
    exported = runner.invoke(app, ["export", "--model", _spec("neutral_names"), "--input-size", str(SIZE), "-o", str(out),
                                   "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["model"]["gates"]["kinds"] == {"channel": 2, "spatial": 2, "joint": 0}
    quantized = runner.invoke(app, ["quantize", str(out), "--target", "ort-cpu", "--calib-data", "synthetic",
                                    "--calib-size", "8", "--model", _spec("neutral_names"), "--json"])
    assert quantized.exit_code == 0, quantized.output
    check = json.loads(quantized.stdout)["artifacts"][0]["quantization"]["gate_check"]
    assert check["held"] is True and check["gates"] == 4
    verified = runner.invoke(app, ["verify", str(out), "--model", _spec("neutral_names"), "--json"])
    assert verified.exit_code == 0, verified.output
    rows = {r["artifact"]: r for r in json.loads(verified.stdout)["results"]}
    assert rows["int8-ort-cpu"]["attention"]["counts"] == {"spatial": 2, "channel": 2, "joint": 0, "not_found": 0}
    assert rows["int8-ort-cpu"]["gate_policy"]["held"] is True


def test_a_model_torch_export_cannot_trace_still_gets_its_policy(tmp_path):
    """The manifest says why the model's gates could not be listed; the INT8 policy still finds and
    keeps the gate in the ONNX graph, and verify says why it has no PyTorch maps to compare."""
    bundle = tmp_path / "b"
    exported = export_bundle(ExportOptions(model=_spec("untraceable"), output=str(bundle), input_size=SIZE,
                                           parity_samples=2))
    assert exported["passed"] is True
    gates = exported["model"]["gates"]
    assert gates["count"] == 0 and "torch.export could not trace" in gates["error"]
    quantized = quantize_bundle(bundle, ["ort-cpu"], "synthetic", calib_size=8, check_samples=4, use_cache=False,
                                trust=_trust("untraceable"))
    check = quantized["artifacts"][0]["quantization"]["gate_check"]
    assert check["held"] is True and check["gates"] == 1 and check["per_gate"][0]["gate"] == "gate"
    row = next(r for r in verify_bundle(bundle, samples=4, trust=_trust("untraceable"))["results"]
               if r["artifact"] == "int8-ort-cpu")
    assert row["gate_policy"]["held"] is True
    assert row["attention"]["passed"] is None and "could not trace" in row["attention"]["skipped"]
