"""The formats registry: one row per format, read by naming, build, Triton and the CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.formats import Format, formats, get, rows
from cbam_deploy.manifest import artifact_file
from cbam_deploy.runtimes import default_runtime, runtimes


def test_every_backend_is_complete_and_consistent():
    assert formats() == ("onnx", "openvino", "tensorrt", "ncnn", "executorch")
    for backend in rows():
        assert (backend.root or type(backend).make is not Format.make) and backend.int8_recipe
        assert (backend.triton is not None) != bool(backend.no_triton)  # served by Triton, or one line saying why not
        assert backend.preferred_runtimes and all(backend.name in runtimes()[r].formats for r in backend.preferred_runtimes)
        assert default_runtime(backend.name) in backend.preferred_runtimes
        assert artifact_file(f"{backend.name}-fp16", backend.name).endswith("." + backend.extension)
    assert get("openvino").companions("model.openvino-fp32.xml") == ("model.openvino-fp32.bin",)
    assert get("tensorrt").companions("model.tensorrt-fp16.engine") == ("model.tensorrt-fp16.engine.json",)
    assert get("executorch").companions("model.executorch-fp32.pte") == ("model.executorch-fp32.pte.json",)
    assert "not servable in Triton/KServe" in get("executorch").no_triton
    assert get("ncnn").companions("model.ncnn-fp32.param") == ("model.ncnn-fp32.bin",)
    with pytest.raises(CbamDeployError, match="unknown artifact format"):
        get("tflite")


def test_the_cli_and_triton_read_the_table(tmp_path):
    from cbam_deploy.serve.triton import model_config

    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    assert all(fmt in help_text for fmt in formats())
    manifest = {"input": {"name": "input", "shape": ["batch", 3, 32, 32]},
                "outputs": [{"name": "logits", "shape": ["batch", 10]}]}
    artifact = {"name": "onnx-fp32", "format": "onnx", "precision": "fp32", "sha256": "0" * 64}
    assert get("onnx").triton.config_line in model_config(manifest, artifact, "m", 8, 1, 100)


def test_a_format_without_its_library_is_skipped_by_its_probe(tmp_path):
    from cbam_deploy.build import build_artifacts
    from cbam_deploy.export_job import ExportOptions, export_bundle

    if get("tensorrt").probe() is None:
        pytest.skip("TensorRT is installed here")
    bundle = tmp_path / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(bundle), parity=False))
    outcomes = build_artifacts(bundle, "tensorrt", "fp32")
    assert outcomes[0].skipped and "TensorRT" in outcomes[0].skipped


def test_an_openvino_ir_whose_output_has_no_name_runs(tmp_path):
    """An IR converted from a PyTorch module without output names (as Ultralytics' exporter writes one) has an
    output port with no name: the runner names it as the exporters do instead of failing on it."""
    import numpy as np
    import torch

    ov = pytest.importorskip("openvino")
    from cbam_deploy.backends.openvino.runner import OpenVINORunner

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Sigmoid()).eval()
    model = ov.convert_model(module, example_input=torch.zeros(1, 3, 8, 8))
    assert not model.outputs[0].get_names()  # the case itself
    ov.save_model(model, str(tmp_path / "unnamed.xml"), compress_to_fp16=False)
    runner = OpenVINORunner(tmp_path / "unnamed.xml")
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out = runner.infer(x)
    assert runner.output_names == ["output"]
    with torch.no_grad():
        np.testing.assert_allclose(out["output"], module(torch.from_numpy(x)).numpy(), atol=1e-5)
