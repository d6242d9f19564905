"""The ``Bundle`` object: typed views of the manifest, lookups that name what there is, the integrity
check, ``BundleUpdate.add_artifact`` (name, file, sha256 and size from the one naming scheme), and the
rule that every file a bundle holds is named by its manifest."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import artifact_path

from cbam_deploy.build import build_artifacts
from cbam_deploy.bundle import ArtifactRecord, Bundle, OutputSpec
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.fsutil import sha256_file
from cbam_deploy.loaders import open_artifact
from cbam_deploy.manifest import MANIFEST_NAME
from cbam_deploy.transaction import LOCK_NAME, BundleUpdate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small classifier bundle with every artifact this machine builds: the FP32 ONNX, OpenVINO IR in
    fp32 and fp16 (.xml + .bin), and INT8 from the ort-cpu and openvino recipes."""
    out = tmp_path_factory.mktemp("bundle-object") / "b"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=10, output=str(out), parity=False))
    outcomes = build_artifacts(out, "onnx,openvino", "fp32,fp16,int8", calib_data="synthetic", calib_size=8)
    return out, outcomes


def _files_named_by_the_manifest(folder: Path) -> set[str]:
    """Every file ``manifest.json`` names (read as plain JSON): artifacts and their companion files."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return {name for a in manifest["artifacts"] for name in [a["path"], *a.get("companion_files", {})]}


def _files_on_disk(folder: Path) -> set[str]:
    """Every file under the bundle folder, relative to it, except the manifest and the lock file."""
    found = set()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative not in (MANIFEST_NAME, LOCK_NAME):
                found.add(relative)
    return found


def test_every_file_in_the_bundle_is_in_the_manifest(built, tmp_path):
    out, outcomes = built
    bundle = Bundle.open(out)
    built_names = {o.name for o in outcomes if o.name}
    assert built_names <= set(bundle.artifact_names)
    assert _files_on_disk(out) == _files_named_by_the_manifest(out) == bundle.files
    assert bundle.check_integrity() == {name: "ok" for name in bundle.artifact_names}
    for artifact in bundle.artifacts:  # sizes and digests of every file, companions included
        assert artifact.size_bytes == sum((out / f).stat().st_size for f in artifact.files)
        assert all(sha256_file(out / f) == digest for f, digest in artifact.files.items())
        if artifact.format == "openvino":  # the IR's weights are a companion of its .xml
            assert artifact.companion_files == {Path(artifact.path).with_suffix(".bin").name:
                                                sha256_file(out / Path(artifact.path).with_suffix(".bin"))}
        else:
            assert artifact.companion_files == {}
    if "openvino-fp16" in built_names:
        assert {"model.openvino-fp16.xml", "model.openvino-fp16.bin", "model.int8-openvino.bin"} <= _files_on_disk(out)
    # a re-export with another ONNX drops the artifacts built from the old one: their files go too
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=10, input_size=64,
                                         output=str(copy), parity=False))
    assert set(result["removed_artifacts"]) == set(bundle.artifact_names) - {"onnx-fp32"}
    assert _files_on_disk(copy) == _files_named_by_the_manifest(copy) == {"model.onnx"}


def test_typed_views_of_the_manifest(built):
    out, _ = built
    bundle = Bundle.open(out)
    assert bundle.directory == out
    assert bundle.input.name == "input" and bundle.input.shape == ["batch", 3, 32, 32]
    assert (bundle.input.dtype, bundle.input.layout, bundle.input.color) == ("float32", "NCHW", "RGB")
    assert bundle.input.side == 32 and bundle.input.channels == 3 and not bundle.input.dynamic_hw
    assert bundle.input.preprocess.center_crop == 32 and len(bundle.input.preprocess.mean) == 3
    assert bundle.input.raw is bundle.manifest["input"]  # what the data layer reads
    assert bundle.outputs == [OutputSpec("logits", ["batch", 10], "float32", "logits")]
    assert bundle.classification_output == bundle.outputs[0] and bundle.output_kinds == {"logits": "logits"}
    assert bundle.fixed_batch is None
    assert bundle.model.name == "resnet10_half_cbam" and bundle.model.num_classes == 10 and bundle.model.stem == "cifar"
    assert bundle.model.spec == "resnet10_half_cbam" and not bundle.model.trained and bundle.model.init["state_sha256"]
    assert bundle.model.gate_list  # the gates the finder found, for the INT8 gate policy
    first = bundle.artifact()
    assert isinstance(first, ArtifactRecord) and first.name == "onnx-fp32" and first.path == "model.onnx"
    assert first.format == "onnx" and first.precision == "fp32" and first.export["opset"] == 17
    int8 = bundle.artifact("int8-ort-cpu")
    assert int8.source_sha256 == first.sha256 and int8.quantization["recipe"] == "ort-cpu"
    assert int8.calibration["source"] == "synthetic" and int8.parity["precision"] == "int8"
    assert bundle.path_of("int8-ort-cpu") == out / "model.int8-ort-cpu.onnx"
    assert artifact_path(out, bundle.manifest, "int8-ort-cpu") == (int8.raw, out / "model.int8-ort-cpu.onnx")
    # a manifest file opens the bundle of its folder; a dict (what older callers pass) is taken as it is
    assert Bundle.open(out / MANIFEST_NAME).directory == out
    assert Bundle.of(bundle) is bundle and Bundle.of(str(out)).artifact_names == bundle.artifact_names
    assert Bundle.of(json.loads((out / MANIFEST_NAME).read_text()), out).input == bundle.input


def test_lookups_name_what_the_bundle_has(built, tmp_path):
    out, _ = built
    bundle = Bundle.open(out)
    with pytest.raises(CbamDeployError, match=r"has no artifact 'nope'; it has onnx-fp32, .*int8-ort-cpu"):
        bundle.artifact("nope")
    with pytest.raises(CbamDeployError, match="has no artifact 'nope'"):
        bundle.path_of("nope")
    with pytest.raises(CbamDeployError, match="without its bundle folder"):
        Bundle(bundle.manifest).path_of("onnx-fp32")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.int8-ort-cpu.onnx", "ab") as fh:
        fh.write(b"\0")
    (copy / "model.openvino-fp32.bin").unlink()  # a companion gone: the IR is missing
    damaged = Bundle.open(copy)
    states = damaged.check_integrity()
    assert states["int8-ort-cpu"] == "changed" and states["onnx-fp32"] == "ok"
    if "openvino-fp32" in states:
        assert states["openvino-fp32"] == "missing"
    with pytest.raises(CbamDeployError, match="does not match the sha256"):
        damaged.path_of("int8-ort-cpu")
    assert damaged.path_of("int8-ort-cpu", verify_hash=False) == copy / "model.int8-ort-cpu.onnx"


def test_add_artifact_records_name_file_hash_and_size_and_commit_adds_it(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = Bundle.open(copy)
    with BundleUpdate(copy) as update:
        staged = update.stage_artifact("onnx", "fp16")  # the name and file come from the naming scheme
        assert staged == update.path("model.onnx-fp16.onnx")
        with pytest.raises(CbamDeployError, match="artifact onnx-fp16: its file model.onnx-fp16.onnx was not written"):
            update.add_artifact("onnx", "fp16")
        shutil.copyfile(copy / "model.onnx", staged)
        record = update.add_artifact("onnx", "fp16", note="a test")
        assert record == {"name": "onnx-fp16", "path": "model.onnx-fp16.onnx", "format": "onnx", "precision": "fp16",
                          "sha256": sha256_file(staged), "size_bytes": staged.stat().st_size, "note": "a test"}
        committed = update.commit(lambda manifest: manifest)
    after = Bundle.open(copy)
    assert committed == after.manifest
    assert after.artifact_names == before.artifact_names + ["onnx-fp16"]  # appended; the others unchanged
    assert after.artifact("onnx-fp16").raw == record
    assert _files_on_disk(copy) == _files_named_by_the_manifest(copy) == after.files
    assert after.check_integrity()["onnx-fp16"] == "ok"


def test_onnx_external_data_is_a_companion_of_its_artifact(built, tmp_path):
    """An ONNX that keeps its weights in an external-data file (as one over 2 GB must): that file is a
    companion in the manifest, checked, moved in with the ONNX, and the artifact runs."""
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with BundleUpdate(copy) as update:
        staged = update.stage_artifact("onnx", "fp16")
        proto = onnx.load(str(copy / "model.onnx"))
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx-fp16.onnx.data", size_threshold=1024)
        record = update.add_artifact("onnx", "fp16")
        data = update.path("model.onnx-fp16.onnx.data")
        assert record["companion_files"] == {"model.onnx-fp16.onnx.data": sha256_file(data)}
        assert record["size_bytes"] == staged.stat().st_size + data.stat().st_size
        update.commit(lambda manifest: manifest)
    bundle = Bundle.open(copy)
    assert _files_on_disk(copy) == _files_named_by_the_manifest(copy) == bundle.files
    assert "model.onnx-fp16.onnx.data" in bundle.files
    assert bundle.check_integrity()["onnx-fp16"] == "ok"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    expected = open_artifact(copy, bundle, "onnx-fp32").run(x)[0]
    np.testing.assert_allclose(open_artifact(copy, bundle, "onnx-fp16").run(x)[0], expected, rtol=1e-5, atol=1e-6)
    # a Triton repository gets the data file beside model.onnx, where onnxruntime looks for it
    from cbam_deploy.backends.onnx.runner import OnnxRuntimeRunner
    from cbam_deploy.serve.triton import write_repository

    written = write_repository(copy, tmp_path / "repo", ["onnx-fp16"])
    version = Path(written[0]["path"]) / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx-fp16.onnx.data"]
    np.testing.assert_allclose(OnnxRuntimeRunner(version / "model.onnx").run(x)[0], expected, rtol=1e-5, atol=1e-6)
    # commands that build from it work on a snapshot that keeps the data file beside the ONNX
    with BundleUpdate(copy) as update:
        _, snapshot = Bundle.open(copy).snapshot("onnx-fp16", update)
        assert snapshot.name == "model.onnx-fp16.onnx" and (snapshot.parent / "model.onnx-fp16.onnx.data").is_file()
        np.testing.assert_allclose(OnnxRuntimeRunner(snapshot).run(x)[0], expected, rtol=1e-5, atol=1e-6)
    assert _files_on_disk(copy) == _files_named_by_the_manifest(copy)  # nothing of the snapshot left behind
    (copy / "model.onnx-fp16.onnx.data").write_bytes(b"torn")
    assert Bundle.open(copy).check_integrity()["onnx-fp16"] == "changed"
