import json

import numpy as np
import onnx
import pytest
import torch
from helpers import artifact_path, onnx_io

from cbam_deploy.backends.onnx.exporter import OnnxExportOptions, export_onnx
from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
from cbam_deploy.bundle import read_manifest
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.models import count_parameters, create_model
from cbam_deploy.parity import TOLERANCES, compare_outputs, plan_cases, run_parity
from cbam_deploy.runners.torch import TorchRunner


def test_export_dynamic_batch_and_hw(tmp_path, tiny_cbam):
    path = tmp_path / "m.onnx"
    info = export_onnx(tiny_cbam, path, OnnxExportOptions(input_size=32, dynamic_hw=True))
    assert info["opset"] == 17 and info["input_shape"] == ["batch", 3, "height", "width"]
    io = onnx_io(path)
    assert io["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert io["outputs"][0]["shape"] == ["batch", 10]
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    ops = {n.op_type for n in proto.graph.node}
    assert "ArgMax" not in ops and "AveragePool" not in ops  # no size-baked pools, no max-with-indices
    runner, reference = OnnxRuntimeRunner(path), TorchRunner(tiny_cbam)
    for shape in [(1, 3, 32, 32), (5, 3, 40, 24), (3, 3, 64, 64)]:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        np.testing.assert_allclose(runner.run(x), reference.run(x), atol=1e-4, rtol=1e-4)


def test_fixed_batch_rejects_other_batches(tmp_path, tiny_cbam):
    path = tmp_path / "m.onnx"
    export_onnx(tiny_cbam, path, OnnxExportOptions(input_size=32, batch=2))
    assert onnx_io(path)["inputs"][0]["shape"] == [2, 3, 32, 32]
    with pytest.raises(Exception):
        OnnxRuntimeRunner(path).run(np.zeros((3, 3, 32, 32), np.float32))


@pytest.mark.parametrize("opset,exporter", [(12, "torchscript"), (21, "torchscript"), (17, "dynamo"), (17, "magic")])
def test_opset_and_exporter_out_of_range(tmp_path, tiny_cbam, opset, exporter):
    with pytest.raises(CbamDeployError, match="opset|exporter"):
        export_onnx(tiny_cbam, tmp_path / "m.onnx", OnnxExportOptions(input_size=32, opset=opset, exporter=exporter))
    assert list(tmp_path.iterdir()) == []


def test_dynamo_exporter_at_opset_18(tmp_path, tiny_cbam):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (extra 'dynamo')")
    path = tmp_path / "m.onnx"
    export_onnx(tiny_cbam, path, OnnxExportOptions(input_size=32, opset=18, exporter="dynamo"))
    cases = plan_cases(32, None, False)
    assert run_parity(TorchRunner(tiny_cbam), OnnxRuntimeRunner(path), cases)["passed"]


def test_failed_export_leaves_nothing(tmp_path):
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x[:, 0])[0].real  # no ONNX symbolic

    with pytest.raises(CbamDeployError, match="ONNX export"):
        export_onnx(Unexportable(), tmp_path / "m.onnx", OnnxExportOptions(input_size=8, simplify=False))
    assert list(tmp_path.iterdir()) == []


def test_bundle_manifest_and_parity(tmp_path):
    result = export_bundle(ExportOptions(model="resnet18_cbam", stem="cifar", num_classes=10,
                                         output=str(tmp_path / "b"), dynamic_hw=True))
    assert result["passed"] is True
    manifest = read_manifest(tmp_path / "b")
    assert manifest["model"]["name"] == "resnet18_cbam" and manifest["model"]["parameters"] == count_parameters(
        create_model("resnet18_cbam", num_classes=10, stem="cifar"))
    assert manifest["input"]["shape"] == ["batch", 3, "height", "width"]
    assert manifest["input"]["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert set(manifest["versions"]) >= {"python", "torch", "onnx", "onnxruntime"}
    artifact, path = artifact_path(tmp_path / "b", manifest, "onnx-fp32")
    assert artifact["format"] == "onnx" and artifact["precision"] == "fp32" and len(artifact["sha256"]) == 64
    parity = artifact["parity"]
    sizes = {(c["batch"], c["height"]) for c in parity["cases"]}
    assert (1, 32) in sizes and (4, 32) in sizes and len({c["height"] for c in parity["cases"]}) == 3
    assert parity["samples"] >= 8 + 8 and parity["max_abs_err"] < 1e-4 and parity["cosine_min"] > 0.99999
    assert not list((tmp_path / "b").glob(".*tmp"))


def test_tampered_artifact_is_refused(tmp_path):
    export_bundle(ExportOptions(model="resnet18", stem="cifar", num_classes=3, output=str(tmp_path), parity=False))
    manifest = read_manifest(tmp_path)
    with open(tmp_path / "model.onnx", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CbamDeployError, match="sha256"):
        artifact_path(tmp_path, manifest, "onnx-fp32")


def test_parity_catches_a_wrong_model(tmp_path, tiny_cbam):
    path = tmp_path / "m.onnx"
    export_onnx(tiny_cbam, path, OnnxExportOptions(input_size=32))
    proto = onnx.load(str(path))
    # corrupt one spatial-gate conv weight: a real, small, wrong graph
    target = next(i for i in proto.graph.initializer if len(i.dims) == 4 and list(i.dims)[:2] == [1, 2])
    weights = onnx.numpy_helper.to_array(target).copy()
    weights *= 1.5
    target.CopyFrom(onnx.numpy_helper.from_array(weights, target.name))
    onnx.save(proto, str(path))
    summary = run_parity(TorchRunner(tiny_cbam), OnnxRuntimeRunner(path), plan_cases(32, None, False))
    assert summary["passed"] is False and "max abs error" in summary["cases"][0]["reason"]


def test_compare_outputs_rules():
    tol = TOLERANCES["fp32"]
    ref = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, 0.49999]])
    same = compare_outputs(ref, ref + 1e-7, tol)
    assert same["passed"] and same["top1_agreement"] == 1.0
    flipped = compare_outputs(ref, ref[:, ::-1], tol)
    assert not flipped["passed"] and flipped["top1_agreement"] < 1
    near_tie = ref.copy()
    near_tie[1] = [0.49999, 0.0, 0.5]  # a 1e-5 tie flips: not a failure by itself
    assert compare_outputs(ref, near_tie, tol)["top1_agreement_decisive"] == 1.0
    assert not compare_outputs(ref, np.full_like(ref, np.nan), tol)["passed"]


def test_existing_bundle_of_another_model_needs_force(tmp_path):
    export_bundle(ExportOptions(model="resnet18", stem="cifar", num_classes=3, output=str(tmp_path), parity=False))
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(CbamDeployError, match="--force"):
        export_bundle(ExportOptions(model="resnet18_se", stem="cifar", num_classes=3, output=str(tmp_path), parity=False))
    assert (tmp_path / "manifest.json").read_text() == before
    export_bundle(ExportOptions(model="resnet18_se", stem="cifar", num_classes=3, output=str(tmp_path), parity=False, force=True))
    assert json.loads((tmp_path / "manifest.json").read_text())["model"]["name"] == "resnet18_se"


def test_unwritable_output_is_one_clear_error(tmp_path):
    from cbam_deploy.transaction import BundleUpdate

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CbamDeployError, match="cannot write bundle .*Not a directory"):  # the transaction's own check
        with BundleUpdate(blocker / "bundle", create=True):
            pass
    with pytest.raises(CbamDeployError, match="--output .*file is a file, not a folder"):  # the options: before any work
        export_bundle(ExportOptions(model="resnet18", stem="cifar", output=str(blocker / "bundle")))
    assert blocker.read_text() == "not a folder"


def test_torch_runner_fp16_and_missing_cuda(tiny_cbam):
    import copy

    import torch

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    fp32 = TorchRunner(copy.deepcopy(tiny_cbam)).run(x)
    if not torch.cuda.is_available():
        with pytest.raises(CbamDeployError, match="no CUDA GPU"):
            TorchRunner(copy.deepcopy(tiny_cbam), device="cuda")
    try:
        half = TorchRunner(copy.deepcopy(tiny_cbam), precision="fp16").run(x)
    except RuntimeError as exc:  # some CPU builds lack fp16 kernels for an op
        pytest.skip(f"this torch build has no CPU fp16 path: {exc}")
    cosine = (fp32 * half).sum() / (np.linalg.norm(fp32) * np.linalg.norm(half))
    assert half.dtype == np.float32 and cosine > 0.99
