"""One open per command. In an export that builds a format x precision matrix with INT8, in verify and in
explain, each artifact's files are hashed once, its graph parsed once, its runner made once, and the
PyTorch model built at most once; a repeat fails the test and names what was repeated."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
from PIL import Image

from cbam_deploy import bundle as bundle_module
from cbam_deploy import export_job as export_module
from cbam_deploy import fsutil, loaders
from cbam_deploy.explain_report import explain_bundle
from cbam_deploy.export_job import ExportOptions
from cbam_deploy.formats import Runtime, rows
from cbam_deploy.pipeline import run_export
from cbam_deploy.verify import verify_bundle

pytest.importorskip("openvino", reason="the matrix includes OpenVINO IR")


def _inode(path) -> tuple:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


class Counts(collections.Counter):
    def repeated(self) -> dict:
        return {f"{kind} of {key}": n for (kind, key), n in self.items() if n > 1}


def install_counter(monkeypatch) -> Counts:
    """Counts, per file (device and inode: a staged file and the committed one are the same), the hashes,
    graph parses and runner opens, and counts the PyTorch model builds."""
    counts = Counts()

    def counted(kind: str, key_of, call):
        def wrapper(*args, **kwargs):
            counts[(kind, key_of(*args, **kwargs))] += 1
            return call(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(bundle_module, "sha256_no_follow",
                        counted("sha256", lambda path: _inode(path), bundle_module.sha256_no_follow))
    monkeypatch.setattr(fsutil, "sha256_file", counted("sha256", lambda path: _inode(path), fsutil.sha256_file))
    for row in rows():
        cls = type(row)
        if "read_graph" in cls.__dict__:
            monkeypatch.setattr(cls, "read_graph", counted("graph", lambda self, path: _inode(path), cls.read_graph))
    monkeypatch.setattr(Runtime, "open", counted("runner", lambda self, path, *a, **k: (self.name, _inode(path)),
                                                 Runtime.open))
    for module in (export_module, loaders):
        monkeypatch.setattr(module, "build_model", counted("model build", lambda *a, **k: "model", module.build_model))

    return counts


@pytest.fixture
def counting(monkeypatch) -> Counts:
    return install_counter(monkeypatch)


def test_export_with_a_matrix_opens_everything_once(tmp_path, counting):
    out = tmp_path / "bundle"
    result = run_export(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(out), formats="onnx,openvino",
                                      precisions="fp32,int8", calib_data="synthetic"))
    built = [r["artifact"] for r in result["summary"]["rows"] if r.get("artifact") and r["format"] != "pytorch"]
    assert {"onnx-fp32", "openvino-fp32", "int8-ort-cpu", "int8-openvino"} <= set(built)
    assert counting[("model build", "model")] == 1
    assert sum(n for (kind, _), n in counting.items() if kind == "runner") >= 4
    assert counting.repeated() == {}


def test_verify_and_explain_open_everything_once(tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    run_export(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(out), formats="onnx,openvino",
                             precisions="fp32,int8", calib_data="synthetic"))
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    for command in (lambda: verify_bundle(out), lambda: explain_bundle(out, image, output_dir=tmp_path / "page")):
        with monkeypatch.context() as patch:
            counts = install_counter(patch)
            command()
            assert counts[("model build", "model")] == 1
            assert sum(n for (kind, _), n in counts.items() if kind == "graph") >= 3  # every artifact's graph, once
            assert counts.repeated() == {}


def test_the_counter_sees_a_repeat(tmp_path, monkeypatch):
    """The check can fail: an artifact opened through two bundle objects (two commands) is counted twice."""
    out = tmp_path / "bundle"
    export_module.export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(out), parity=False))
    monkeypatch.setattr(fsutil, "_WRITTEN", {})  # as a later command, in another process, finds the bundle
    counts = install_counter(monkeypatch)
    for _ in range(2):
        loaders.open_artifact(out, bundle_module.Bundle.open(out), "onnx-fp32")
    assert any(key.startswith("runner of") for key in counts.repeated())
    assert any(key.startswith("sha256 of") for key in counts.repeated())
