"""cbam-deploy explain: Grad-CAM, every CBAM gate per stage and the attention parity of each artifact,
as PNG overlays and one self-contained HTML page, on the trained reference digits model with INT8
artifacts (random-init zoo models have constant spatial maps)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbam_deploy.cli import app  # noqa: E402
from cbam_deploy.explain_report import explain_bundle  # noqa: E402
from cbam_deploy.export_job import ExportOptions, export_bundle  # noqa: E402

pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (test extra)")
pytest.importorskip("captum", reason="Grad-CAM comes from captum (explain extra)")
from reference.digits import CHECKPOINT  # noqa: E402

GATES = [f"layer{i}.0.cbam.SpatialGate" for i in range(1, 5)]
ARTIFACTS = ["onnx-fp32", "int8-ort-cpu", "int8-openvino"]


@pytest.fixture(scope="module")
def digits(digits_int8, tmp_path_factory):
    pytest.importorskip("openvino", reason="the int8-openvino artifact needs OpenVINO and NNCF")
    bundle, train, test = digits_int8
    root = tmp_path_factory.mktemp("explain")
    image = sorted((test / "3").glob("*.png"))[0]
    result = explain_bundle(bundle, image, output_dir=root / "page")
    return {"root": root, "bundle": bundle, "image": image, "result": result}


def _html(result) -> str:
    return Path(result["page"]).read_text(encoding="utf-8")


def test_every_file_is_written_and_every_png_is_a_valid_image(digits):
    result = digits["result"]
    files = [Path(f) for f in result["files"]]
    assert Path(result["page"]) in files and Path(result["maps"]) in files
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    pngs = [f for f in files if f.suffix == ".png"]
    # input, Grad-CAM, 4 spatial gates x (PyTorch + 3 artifacts), 4 channel gates x (PyTorch + 3 artifacts)
    assert len(pngs) == 2 + 4 * 4 + 4 * 4
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 0 and image.height > 0
    with Image.open(Path(result["output_dir"]) / "input.png") as image:
        assert min(image.size) >= 160  # 32 px digits are upscaled to be readable
    assert not list(Path(result["output_dir"]).glob(".*.tmp"))  # atomic writes leave nothing behind


def test_page_is_self_contained_and_names_every_stage_and_artifact(digits):
    result = digits["result"]
    page = _html(result)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 + 4 * 4 + 4 * 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.width > 0
    for name in GATES + ARTIFACTS + ["pytorch-fp32", "Grad-CAM"]:
        assert name in page, name
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert f"<h3>{stage} " in page


def test_fp32_onnx_maps_equal_pytorch(digits):
    result = digits["result"]
    maps = np.load(result["maps"])
    assert max(float(maps[f"spatial/pytorch-fp32/{g}"].std()) for g in GATES) > 0.01  # real maps, not a constant
    for gate in GATES:
        reference, onnx = maps[f"spatial/pytorch-fp32/{gate}"], maps[f"spatial/onnx-fp32/{gate}"]
        assert reference.shape == onnx.shape == tuple(result["gate_shapes"][gate])
        assert np.abs(reference - onnx).max() < 1e-4
        assert result["artifacts"]["onnx-fp32"]["attention"]["gates"][gate]["max_abs_err"] < 1e-4
    assert result["artifacts"]["onnx-fp32"]["attention"]["passed"] is True


def test_int8_artifacts_get_a_parity_figure_per_stage_on_the_page(digits):
    result = digits["result"]
    page = _html(result)
    for name in ("int8-ort-cpu", "int8-openvino"):
        row = result["artifacts"][name]
        assert row["precision"] == "int8" and row["top1_agrees"] is True
        channel = {g.replace("SpatialGate", "ChannelGate") for g in GATES}
        assert set(row["attention"]["gates"]) == set(GATES) | channel and set(row["files"]) == set(GATES)
        assert set(row["channel_files"]) == channel
        for gate in channel:
            stage = row["attention"]["gates"][gate]
            assert stage["kind"] == "channel" and 0.9 < stage["cosine"] <= 1.0 and 0.0 <= stage["top_overlap"] <= 1.0
            assert f"cosine {stage['cosine']:.4f}" in page
        for stage in (row["attention"]["gates"][g] for g in GATES):
            assert 0.5 < stage["correlation"] <= 1.0 and 0.0 <= stage["top_iou"] <= 1.0 and stage["max_abs_err"] > 0
            assert f"corr {stage['correlation']:.4f}" in page and f"IoU {stage['top_iou']:.3f}" in page
        assert len(result["predictions"][name]) == 5


def test_grad_cam_has_the_image_size_and_is_finite(digits):
    result = digits["result"]
    cam = np.load(result["maps"])["gradcam"]
    assert cam.shape == (32, 32) and list(cam.shape) == result["gradcam"]["shape"]
    assert np.isfinite(cam).all() and cam.max() > 0 and cam.min() >= 0
    assert result["gradcam"]["layer"] == "layer4" and result["gradcam"]["layer_shape"] == [4, 4]
    assert result["gradcam"]["target"] == result["predictions"]["pytorch-fp32"][0]["class"] == 3
    channel = np.load(result["maps"])["channel/pytorch-fp32/layer4.0.cbam.ChannelGate"]
    assert channel.shape == (256,) and 0 < channel.min() and channel.max() < 1.0 + 1e-6


def test_cli_prints_where_the_page_is(digits, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["explain", str(digits["bundle"]), "--image", str(digits["image"]),
                                      "--artifact", "int8-ort-cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"page: {out / 'index.html'}" in " ".join(result.output.split())
    assert "layer3.0.cbam.SpatialGate" in result.output and "int8-openvino" not in result.output
    assert (out / "index.html").is_file() and (out / "spatial-layer1.0.cbam.SpatialGate-int8-ort-cpu.png").is_file()

    as_json = CliRunner().invoke(app, ["explain", str(digits["bundle"]), "--image", str(digits["image"]),
                                       "--artifact", "onnx-fp32", "-o", str(out), "--json"])
    assert as_json.exit_code == 0
    assert list(json.loads(as_json.stdout)["artifacts"]) == ["onnx-fp32"]


def test_default_folder_and_bad_arguments(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = explain_bundle(digits["bundle"], digits["image"], artifacts=["onnx-fp32"])
    assert Path(result["page"]) == Path("explain") / "bundle" / "index.html" and Path(result["page"]).is_file()
    runner = CliRunner()
    for args, words in ((["--artifact", "nope"], "no artifact 'nope'"),
                        (["--image", str(tmp_path / "missing.png")], "does not exist")):
        call = ["explain", str(digits["bundle"]), "--image", str(digits["image"]), *args]
        bad = runner.invoke(app, call)
        assert bad.exit_code == 2 and words in bad.output, bad.output
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    bad = runner.invoke(app, ["explain", str(digits["bundle"]), "--image", str(not_an_image)])
    assert bad.exit_code == 2 and "not an image" in bad.output


def test_a_model_without_spatial_gates_gets_a_page_saying_so(digits, tmp_path):
    bundle = tmp_path / "plain"
    export_bundle(ExportOptions(model="resnet10_half", stem="cifar", output=str(bundle), parity=False))
    result = CliRunner().invoke(app, ["explain", str(bundle), "--image", str(digits["image"]), "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "no attention gates" in " ".join(result.output.split())
    page = (tmp_path / "p" / "index.html").read_text()
    assert "no attention gates" in page and "Grad-CAM" in page and "SpatialGate" not in page
    assert (tmp_path / "p" / "gradcam.png").is_file()


def test_a_stand_in_reference_shows_artifact_maps_without_grad_cam(digits, tmp_path):
    """The checkpoint is gone: the FP32 ONNX stands in for PyTorch; the INT8 maps are compared with it."""
    weights = tmp_path / "weights.pth"
    shutil.copy(CHECKPOINT, weights)
    bundle = tmp_path / "bundle"
    shutil.copytree(digits["bundle"], bundle)
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["weights"]["path"] = str(tmp_path / "gone.pth")
    manifest_path.write_text(json.dumps(manifest))
    result = explain_bundle(bundle, digits["image"], ["int8-ort-cpu"], tmp_path / "out")
    assert result["reference"] == "onnx-fp32" and result["gradcam"] is None
    assert len(result["channel_gates"]) == 4  # read from the FP32 ONNX, like the maps
    assert result["artifacts"]["int8-ort-cpu"]["attention"]["min_channel_overlap"] >= 0.5
    assert any("could not be rebuilt" in note for note in result["notes"])
    assert result["artifacts"]["int8-ort-cpu"]["attention"]["min_correlation"] > 0.9
