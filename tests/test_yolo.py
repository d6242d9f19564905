"""Ultralytics YOLO detectors with CBAM as a model source: the reference YOLOv8n with three CBAM rows
(reference/yolov8n_cbam.yaml, built by Ultralytics' own parser) and its trained weights
(reference/yolov8n_cbam_shapes.pt), exported once at a small side to onnx, openvino, ncnn and executorch at
fp32 and int8, then verified, evaluated (mAP on a YOLO-format folder the test writes) and explained; a
trained checkpoint (a pickle) refused without --trust-code and loaded with it; a state dict with another
class count; the detector's parity and INT8 agreement in their own units; the output tail kept in float."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy import detection  # noqa: E402
from cbam_deploy.build import build_artifacts  # noqa: E402
from cbam_deploy.bundle import Bundle  # noqa: E402
from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.errors import CbamDeployError  # noqa: E402
from cbam_deploy.evaluate import evaluate_bundle  # noqa: E402
from cbam_deploy.explain_report import explain_bundle  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402
from cbam_deploy.fsutil import sha256_file  # noqa: E402
from cbam_deploy.gates import output_tail, tail_check  # noqa: E402
from cbam_deploy.backends.onnx.gates import onnx_graph  # noqa: E402
from cbam_deploy.loaders import ReferenceModel  # noqa: E402
from cbam_deploy.models import CodeTrust, build_model, library, state_fingerprint, ultralytics_source  # noqa: E402
from cbam_deploy.parity import TOLERANCES, compare_detections  # noqa: E402
from cbam_deploy.peers import build_peers  # noqa: E402
from cbam_deploy.verify import verify_bundle  # noqa: E402
from reference.shapes import write_shapes  # noqa: E402
from reference.train_yolo_cbam import MODEL_YAML, WEIGHTS  # noqa: E402

pytest.importorskip("ultralytics", reason="the ultralytics extra (Ultralytics' parser, exporter and metric code)")
ultralytics_source.ultralytics()  # as the tool imports it: offline, CBAM registered, PIL and torch.save left alone

SIDE = 96  # a multiple of the model's stride (32), small enough for the test's time
FORMATS = "onnx,openvino,ncnn,executorch"
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Held-out images of the shapes set (seed 1: the reference was trained on seed 0's), with YOLO labels."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, train=24, val=16, seed=1)
    return root


@pytest.fixture(scope="module")
def yolo(shapes, tmp_path_factory, monkeypatch_module):
    """The reference detector exported once: the FP32 ONNX (parity on seeded pixels and on the images), then
    every format at fp32 and int8 from the one PyTorch model."""
    out = tmp_path_factory.mktemp("yolo") / "bundle"
    result = export_bundle(ExportOptions(model=str(MODEL_YAML), weights=str(WEIGHTS), input_size=SIDE, output=str(out),
                                         calib_data=str(shapes / "images" / "val"), parity_samples=4))
    reference = ReferenceModel(Bundle.open(out), module=result.module)
    outcomes = build_artifacts(out, FORMATS, "fp32,int8", calib_data=str(shapes / "images" / "train"),
                               calib_size=16, reference=reference)
    return {"dir": out, "export": result, "outcomes": outcomes, "reference": reference}


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """A calibration cache of the module's own (nothing shared with other tests or runs)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CBAM_DEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def verified(yolo, shapes):
    return verify_bundle(yolo["dir"], data=str(shapes / "images" / "val"), samples=4, reference=yolo["reference"])


# --- the model: Ultralytics' parser, CBAM registered and scaled, prepared as its exporter prepares it ------

def test_cbam_rows_are_built_by_ultralytics_parser_at_the_model_scale(yolo):
    from ultralytics.nn.modules import CBAM, Detect

    module = yolo["export"].module
    blocks = {name: m for name, m in module.named_modules() if isinstance(m, CBAM)}
    assert sorted(blocks) == ["model.12", "model.5", "model.8"]
    # 256, 512, 1024 in the yaml, scaled by the n scale's width 0.25 as the parser scales every other row
    assert [blocks[n].channel_attention.fc.in_channels for n in ("model.5", "model.8", "model.12")] == [64, 128, 256]
    head = module.model[-1]
    assert isinstance(head, Detect) and head.export and not head.dynamic
    with torch.no_grad():
        assert tuple(module(torch.zeros(2, 3, SIDE, SIDE)).shape) == (2, 4 + 3, 12 * 12 + 6 * 6 + 3 * 3)


def test_every_cbam_gate_is_found_and_no_silu(yolo):
    bundle = Bundle.open(yolo["dir"])
    gates = bundle.model.gates
    assert gates["count"] == 6 and gates["kinds"] == {"channel": 3, "spatial": 3, "joint": 0}
    assert sorted(g["name"] for g in gates["gates"]) == sorted(
        f"model.{i}.{part}" for i in (5, 8, 12) for part in ("channel_attention", "spatial_attention"))
    proto = onnx.load(str(bundle.path_of("onnx-fp32")))
    sigmoids = [n for n in proto.graph.node if n.op_type == "Sigmoid"]
    # every Conv's SiLU, x * sigmoid(x): a Mul of the sigmoid's own input (Ultralytics names both kinds ".../act")
    muls = [n for n in proto.graph.node if n.op_type == "Mul"]
    silu = {s.name for s in sigmoids if any(s.output[0] in m.input and s.input[0] in m.input for m in muls)}
    assert len(silu) >= 50 and len(sigmoids) >= len(silu) + 6
    found = bundle.found_gates("onnx-fp32")
    assert len(found) == 6 and not any(g.sigmoid in silu for g in found)


def test_the_manifest_records_yolo_preprocessing_and_a_detections_output(yolo):
    bundle = Bundle.open(yolo["dir"])
    pre = bundle.input.raw["preprocess"]
    assert pre["mode"] == "letterbox" and pre["pad_value"] == 114 and pre["center_crop"] == SIDE
    assert pre["mean"] == [0.0, 0.0, 0.0] and pre["std"] == [1.0, 1.0, 1.0] and pre["scale"] == pytest.approx(1 / 255)
    assert [(o.name, o.kind) for o in bundle.outputs] == [("output", "detections")]
    assert bundle.model.source == "ultralytics" and bundle.model.raw["trace_batch"] == 1
    assert Path(bundle.model.spec) == MODEL_YAML.resolve() and bundle.model.weights is not None


def test_the_export_parity_runs_on_pixels_in_range_and_on_the_images(yolo):
    parity = yolo["export"].parity
    assert parity["passed"] and "uniform 8-bit pixels" in parity["inputs"]
    for case in parity["cases"]:
        assert case["kind"] == "detections" and case["max_box_err_px"] <= case["box_bound_px"] == pytest.approx(
            1e-5 + 1e-4 * SIDE)
    assert parity["images"]["passed"] and parity["images"]["max_box_err_px"] < 1e-2


# --- every format, fp32 and int8 --------------------------------------------------------------------------

def test_every_format_builds_at_fp32_and_int8(yolo):
    built = {(o.format, o.precision): o for o in yolo["outcomes"]}
    for fmt in FORMATS.split(","):
        for precision in ("fp32", "int8"):
            outcome = built[(fmt, precision)]
            assert outcome.name and not outcome.failed and not outcome.skipped, outcome
    bundle = Bundle.open(yolo["dir"])
    # ExecuTorch programs take the one batch the model's head was traced at
    assert bundle.artifact("executorch-fp32").export["bounds"]["batch"] == [1, 1]


def test_every_artifact_verifies_with_its_gates_and_output_tail(verified):
    rows = {r["artifact"]: r for r in verified["results"]}
    assert len(rows) == 8 and verified["passed"], {n: r.get("reason") for n, r in rows.items()}
    for name, row in rows.items():
        if row["precision"] == "int8":
            assert row["gate_policy"]["held"] and row["gate_policy"]["gates"] == 6, name
            assert row["output_tail"]["held"], name
            assert row["kind"] == "detections" and row["kept_fraction"] >= 0.9, name
        else:
            assert row["max_box_err_px"] <= row["box_bound_px"] and row["max_score_err"] <= row["score_bound"], name
    for name in ("onnx-fp32", "openvino-fp32", "ncnn-fp32", "int8-ort-cpu", "int8-openvino", "int8-ncnn"):
        attention = rows[name]["attention"]
        assert attention["passed"] and len(attention["gates"]) == 6, (name, attention)


def test_the_int8_recipes_keep_the_output_tail_in_float(yolo):
    bundle = Bundle.open(yolo["dir"])
    fp32 = onnx_graph(onnx.load(str(bundle.path_of("onnx-fp32"))))
    tail = output_tail(fp32)
    kinds = {op.op_type for op in tail}
    assert {"Sigmoid", "Concat", "Mul"} <= kinds and not kinds & {"Conv", "QuantizeLinear"}
    assert [op.op_type for op in tail][-1] == "Concat"  # boxes in pixels joined with the probabilities
    for name in ("int8-ort-cpu", "int8-openvino", "int8-ncnn", "int8-executorch"):
        record = bundle.artifact(name).quantization["output_tail"]
        assert record["held"] and record["ops"] >= len(tail) - 2, (name, record)


def test_verify_fails_an_int8_artifact_whose_output_tail_is_quantized(yolo, tmp_path):
    source = Bundle.open(yolo["dir"])
    copy_dir = tmp_path / "bundle"
    copy_dir.mkdir()
    for name in ("onnx-fp32", "int8-ort-cpu"):
        shutil.copy(source.path_of(name), copy_dir / source.artifact(name).path)
    path = copy_dir / source.artifact("int8-ort-cpu").path
    proto = onnx.load(str(path))
    output = proto.graph.output[0].name
    producer = next(n for n in proto.graph.node if output in n.output)
    producer.output[list(producer.output).index(output)] = "float_output"
    scale = onnx.helper.make_tensor("tail_scale", onnx.TensorProto.FLOAT, [], [1.0])
    zero = onnx.helper.make_tensor("tail_zero", onnx.TensorProto.UINT8, [], [0])
    proto.graph.initializer.extend([scale, zero])
    proto.graph.node.extend([
        onnx.helper.make_node("QuantizeLinear", ["float_output", "tail_scale", "tail_zero"], ["tail_q"], name="tail_q"),
        onnx.helper.make_node("DequantizeLinear", ["tail_q", "tail_scale", "tail_zero"], [output], name="tail_dq")])
    onnx.save(proto, str(path))
    assert tail_check(onnx_graph(proto), "tampered")["held"] is False

    def keep_two(manifest: dict) -> dict:
        manifest = copy.deepcopy(source.manifest)
        manifest["artifacts"] = [a for a in manifest["artifacts"] if a["name"] in ("onnx-fp32", "int8-ort-cpu")]
        tampered = next(a for a in manifest["artifacts"] if a["name"] == "int8-ort-cpu")
        tampered["sha256"], tampered["size_bytes"] = sha256_file(path), path.stat().st_size
        return manifest

    (copy_dir / "manifest.json").write_text(json.dumps(keep_two({})))
    result = verify_bundle(copy_dir, artifacts=["int8-ort-cpu"], samples=4, reference=yolo["reference"])
    row = result.row("int8-ort-cpu")
    assert row["passed"] is False and row["output_tail"]["held"] is False
    assert "output tail quantized" in row["reason"]


# --- eval, explain, peers -----------------------------------------------------------------------------------

def test_detector_eval_gives_map_per_artifact(yolo, shapes):
    result = evaluate_bundle(yolo["dir"], shapes / "images" / "val", reference=yolo["reference"])
    assert result["task"] == "detection" and result["images"] == 16
    rows = {r["artifact"]: r for r in result["results"]}
    reference = rows["pytorch-fp32"]["map50"]
    assert reference > 0.3  # a trained detector (chance is ~0), on held-out images at a side it was not trained at
    for name, row in rows.items():
        if row["precision"] == "fp32":
            assert row["map50"] == pytest.approx(reference, abs=0.01), name
        else:
            assert row["map50"] >= reference - 0.1 and row["detections"]["kept"] >= 0.8 * row["detections"][
                "reference_detections"], name


def test_explain_draws_every_cbam_block(yolo, shapes, tmp_path):
    image = sorted((shapes / "images" / "val").glob("*.png"))[0]
    result = explain_bundle(yolo["dir"], image, ["onnx-fp32", "int8-openvino"], tmp_path / "explain",
                            reference=yolo["reference"])
    assert sorted(result["gates"]) == [f"model.{i}.spatial_attention" for i in (12, 5, 8)]
    for name in ("onnx-fp32", "int8-openvino"):
        assert len(result["artifacts"][name]["attention"]["gates"]) == 6


def test_ultralytics_own_int8_export_is_a_peer_that_says_whether_it_quantized_the_gates(yolo, shapes, tmp_path):
    module = yolo["reference"].module_or_reason()[0]
    calib = detection.load_yolo_folder(shapes / "images" / "train", Bundle.open(yolo["dir"]).input.raw, limit=8).inputs
    example = calib[:1]
    built, skipped = build_peers(module, example, calib, tmp_path, which=["peer-ultralytics-onnx-int8"],
                                 library_peers=library("ultralytics").peers())
    assert not skipped, skipped
    peer = built["peer-ultralytics-onnx-int8"]
    gates = peer.facts["gates"]
    assert gates["read"] and gates["found"] == 6 and isinstance(gates["gates_quantized"], bool)
    assert "YOLO(model.pt).export(format='onnx'" in peer.made_by and peer.run(example).shape == (1, 7, 189)


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_importing_ultralytics_leaves_pil_and_torch_save_alone(tmp_path):
    """Ultralytics patches PIL.Image.open (an unreadable image then tries to install a HEIF plugin) and torch.save
    for the whole process when it is imported; the model source puts the originals back."""
    from PIL import Image

    from cbam_deploy.models.ultralytics_source import ultralytics

    ultralytics()
    assert Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(tmp_path / "broken.jpg")


def _best_pt(tmp_path: Path) -> Path:
    """A trained Ultralytics checkpoint as its trainer writes it: the whole model pickled in fp16, with its
    training arguments."""
    from ultralytics.nn.tasks import DetectionModel

    from cbam_deploy.models.ultralytics_source import read_model_yaml, scale_cbam_rows

    model = DetectionModel(scale_cbam_rows(read_model_yaml(MODEL_YAML)), nc=3, verbose=False)
    model.load_state_dict({k: v.float() for k, v in torch.load(WEIGHTS, weights_only=True).items()})
    model.names = {0: "circle", 1: "square", 2: "triangle"}
    path = tmp_path / "best.pt"
    torch.save({"epoch": 29, "model": model.half(), "train_args": {"imgsz": 128}, "version": "8.4.190"}, path)
    return path


def test_a_trained_checkpoint_loads_only_with_trust_code(tmp_path):
    best = _best_pt(tmp_path)
    with pytest.raises(CbamDeployError, match="pickle of the whole model.*--trust-code"):
        build_model(str(best))
    with pytest.raises(CbamDeployError, match="pickle of the whole model.*--trust-code"):
        ExportOptions(model=str(best))  # before any work
    result = runner.invoke(app, ["export", "-m", str(best), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        next(line for line in result.stderr.splitlines() if line.startswith("error:"))]
    assert not (tmp_path / "out").exists()
    loaded = build_model(str(best), trust=CodeTrust(trust_bundle=True))
    assert loaded.num_classes == 3 and loaded.default_input_size == 128 and loaded.labels == ["circle", "square",
                                                                                              "triangle"]
    from_yaml = build_model(str(MODEL_YAML), str(WEIGHTS))
    assert state_fingerprint(loaded.module) == state_fingerprint(from_yaml.module)


def test_a_state_dict_with_another_class_count_loads_or_is_refused_in_one_line(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from cbam_deploy.models.ultralytics_source import read_model_yaml, scale_cbam_rows

    cfg = scale_cbam_rows(read_model_yaml(MODEL_YAML))
    cfg["nc"] = 5
    weights = tmp_path / "five.pt"
    torch.save(DetectionModel(cfg, nc=5, verbose=False).state_dict(), weights)
    loaded = build_model(str(MODEL_YAML), str(weights))
    assert loaded.num_classes == 5 and any("nc=5" in note for note in loaded.notes)
    result = runner.invoke(app, ["export", "-m", str(MODEL_YAML), "-w", str(weights), "--num-classes", "3",
                                 "--input-size", "64", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the head of" in result.stderr and "has 5 classes" in result.stderr


# --- a detector's parity and INT8 agreement, in their own units --------------------------------------------

def _detections(rng, batch=2, anchors=84, classes=3, side=96):
    boxes = np.concatenate([rng.uniform(0, side, (batch, 2, anchors)), rng.uniform(4, side / 2, (batch, 2, anchors))], 1)
    scores = rng.uniform(0, 0.05, (batch, classes, anchors))
    scores[:, 1, 5], scores[:, 2, 40] = 0.9, 0.8  # two confident detections per image
    return np.concatenate([boxes, scores], 1).astype(np.float32)


def test_a_correct_detector_export_passes_and_a_wrong_one_fails():
    rng = np.random.default_rng(0)
    reference = _detections(rng)
    close = reference + rng.normal(0, 1e-5, reference.shape).astype(np.float32)  # within 1e-5 + 1e-4 px and prob
    assert compare_detections(reference, close, TOLERANCES["fp32"], 96)["passed"]
    shifted = reference.copy()
    shifted[:, 0] += 0.5  # half a pixel: a wrong anchor offset
    result = compare_detections(reference, shifted, TOLERANCES["fp32"], 96)
    assert not result["passed"] and "boxes off by" in result["reason"]
    dimmed = reference.copy()
    dimmed[:, 4:] *= 0.99
    assert "class probabilities" in compare_detections(reference, dimmed, TOLERANCES["fp32"], 96)["reason"]


def test_int8_agreement_counts_the_detections_kept_lost_and_added():
    rng = np.random.default_rng(1)
    reference = _detections(rng)
    same = detection.agreement(reference, reference + 0.1)
    assert same["passed"] and (same["reference_detections"], same["kept"], same["lost"], same["extra"]) == (4, 4, 0, 0)
    lost = reference.copy()
    lost[0, 6, 40] = 0.1  # one detection (class 2 at anchor 40) falls under the score threshold
    result = detection.agreement(reference, lost)
    assert (result["kept"], result["lost"]) == (3, 1) and not result["passed"] and "kept 3 of" in result["reason"]
    moved = reference.copy()
    moved[1, :2, 5] += 40  # one box lands elsewhere: lost there, added here
    result = detection.agreement(reference, moved)
    assert (result["kept"], result["lost"], result["extra"]) == (3, 1, 1) and not result["passed"]
