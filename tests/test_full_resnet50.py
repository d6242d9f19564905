"""One full-size export: resnet50_cbam from an official-format checkpoint, parity against PyTorch."""

import pytest
import torch
from official_style import OfficialStyleResNet, randomize
from test_checkpoint import save_official

from cbam_deploy.export_job import ExportOptions, export_bundle


@pytest.mark.slow
def test_official_resnet50_cbam_checkpoint_exports_with_parity(tmp_path):
    official = randomize(OfficialStyleResNet(50), seed=11)
    weights = tmp_path / "RESNET50_CBAM_new_name_wrap.pth"
    save_official(official, weights)
    result = export_bundle(ExportOptions(model="resnet50_cbam", weights=str(weights), output=str(tmp_path / "bundle")))
    assert result["model"]["num_classes"] == 1000 and result["model"]["parameters"] == 28_089_624
    assert result["model"]["weights"]["stripped_prefixes"] == ["module."]
    assert result["passed"] is True
    parity = result["parity"]
    assert {c["batch"] for c in parity["cases"]} == {1, 4} and parity["top1_agreement"] == 1.0
    # the official-style model itself agrees with the exported bundle's source model
    x = torch.randn(1, 3, 224, 224)
    from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
    onnx_out = OnnxRuntimeRunner(tmp_path / "bundle" / "model.onnx").run(x.numpy())
    with torch.no_grad():
        ref = official.eval()(x).numpy()
    assert abs(onnx_out - ref).max() <= 1e-4 * max(1.0, abs(ref).max())
