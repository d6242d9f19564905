"""Fault injection for bundles: signals at every phase of a write, a full disk, a read-only bundle,
overlapping commands. Every case checks the promise: afterwards the bundle is the old valid one or the
new valid one (never a mix), nothing temporary is left once it is next opened, and the user saw one
line, not a traceback.

Phases are reached with ``transaction.faultpoint``: the command under test, started as a real
``cbam-deploy`` process, pauses at the named point; the test then signals it (or runs another
command) and lets it go on.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cbam_deploy.bundle import read_manifest
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.fsutil import sha256_file
from cbam_deploy.export_job import ExportOptions, export_bundle
from cbam_deploy.transaction import LOCK_NAME, STAGING_PREFIX
from helpers import artifact_path

MODEL = ["--model", "resnet10_half_cbam", "--stem", "cifar"]


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, umask: int | None = None, wait: bool = True):
    command = [sys.executable, "-c", "from cbam_deploy.cli import main; main()", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    proc = subprocess.Popen(command, env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def paused_at(point: str, marker: Path, *args: str) -> subprocess.Popen:
    """Start a command that stops at ``point`` and wait until it is there."""
    proc = cli(*args, env={"CBAM_DEPLOY_FAULTPOINT": point, "CBAM_DEPLOY_FAULT_MARKER": str(marker)}, wait=False)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"command ended before reaching {point}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.05)
    return proc


def leftovers(bundle: Path) -> list[str]:
    return sorted(n for n in os.listdir(bundle) if n.startswith(STAGING_PREFIX) or n.endswith(".tmp"))


def check_valid(bundle: Path) -> dict:
    """The bundle as a later command sees it: readable, every artifact matching its sha256, nothing
    stray left, no file in the folder that the manifest does not name."""
    manifest = read_manifest(bundle)  # finishes or discards what a killed command left
    for artifact in manifest["artifacts"]:
        artifact_path(bundle, manifest, artifact["name"])
    assert leftovers(bundle) == []
    named = {"manifest.json", LOCK_NAME} | {a["path"] for a in manifest["artifacts"]} | {
        name for a in manifest["artifacts"] for name in a.get("companion_files", {})}
    assert set(os.listdir(bundle)) <= named, set(os.listdir(bundle)) - named
    return manifest


def one_line_no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory) -> Path:
    """A bundle with an FP32 ONNX (fixed 32x32) and an INT8 artifact, to be re-exported over."""
    from cbam_deploy.quantize import quantize_bundle

    root = tmp_path_factory.mktemp("old") / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(root), parity_samples=2))
    quantize_bundle(root, ["ort-cpu"], "synthetic", calib_size=8, check_samples=8, use_cache=False)
    return root


def copy_of(bundle: Path, tmp_path: Path) -> tuple[Path, str]:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target, sha256_file(target / "model.onnx")


# (phase, signal, what the bundle must be afterwards)
EXPORT_CASES = [
    ("exported", signal.SIGINT, "old"), ("exported", signal.SIGKILL, "old"),
    ("parity-done", signal.SIGINT, "old"), ("parity-done", signal.SIGKILL, "old"),
    ("before-commit", signal.SIGINT, "old"), ("before-commit", signal.SIGKILL, "old"),
    # after COMMIT is written: SIGINT is held back until the commit is applied, SIGKILL is rolled forward
    ("committed", signal.SIGINT, "new"), ("committed", signal.SIGKILL, "new"),
    ("apply", signal.SIGINT, "new"), ("apply", signal.SIGKILL, "new"),
]


@pytest.mark.parametrize("phase,sig,expect", EXPORT_CASES, ids=[f"{p}-{s.name}" for p, s, _ in EXPORT_CASES])
def test_export_over_a_bundle_interrupted_at_every_phase(old_bundle, tmp_path, phase, sig, expect):
    bundle, old_sha = copy_of(old_bundle, tmp_path)
    marker = tmp_path / "marker"
    proc = paused_at(phase, marker, "export", *MODEL, "--dynamic-hw", "-o", str(bundle))
    proc.send_signal(sig)
    if sig == signal.SIGINT:
        marker.unlink()  # a held-back SIGINT lets the commit finish first
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130), err
    if sig == signal.SIGINT:
        one_line_no_traceback(err)
        assert "interrupted" in err
    manifest = check_valid(bundle)
    onnx = next(a for a in manifest["artifacts"] if a["name"] == "onnx-fp32")
    if expect == "old":
        assert onnx["sha256"] == old_sha and manifest["input"]["shape"][2] == 32
        assert [a["name"] for a in manifest["artifacts"]] == ["onnx-fp32", "int8-ort-cpu"]
    else:
        assert onnx["sha256"] != old_sha and manifest["input"]["shape"][2] == "height"
        # the INT8 artifact was built from the old ONNX: gone from the manifest and from the folder
        assert [a["name"] for a in manifest["artifacts"]] == ["onnx-fp32"]
        assert not (bundle / "model.int8-ort-cpu.onnx").exists()


@pytest.mark.parametrize("phase,sig", [("exported", signal.SIGINT), ("parity-done", signal.SIGKILL),
                                       ("apply", signal.SIGKILL)])
def test_first_export_interrupted_leaves_nothing_or_a_whole_bundle(tmp_path, phase, sig):
    bundle = tmp_path / "new"
    marker = tmp_path / "marker"
    proc = paused_at(phase, marker, "export", *MODEL, "-o", str(bundle))
    proc.send_signal(sig)
    if sig == signal.SIGINT:
        marker.unlink()
    proc.communicate(timeout=120)
    if phase == "apply":  # killed after the commit point: the next command finishes it
        assert check_valid(bundle)["model"]["name"] == "resnet10_half_cbam"
    elif sig == signal.SIGINT:
        assert not bundle.exists()  # the folder it created is gone again
    else:
        with pytest.raises(CbamDeployError, match="not a bundle"):
            read_manifest(bundle)
        rc, _, err = cli("export", *MODEL, "-o", str(bundle))  # a new export over the remains just works
        assert rc == 0, err
        check_valid(bundle)


def test_reexport_keeps_artifacts_of_an_identical_onnx_and_removes_stale_ones(old_bundle, tmp_path):
    bundle, old_sha = copy_of(old_bundle, tmp_path)
    same = export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(bundle), parity=False))
    assert same["removed_artifacts"] == [] and same["artifacts"][0]["sha256"] == old_sha  # the export is deterministic
    assert [a["name"] for a in check_valid(bundle)["artifacts"]] == ["onnx-fp32", "int8-ort-cpu"]
    changed = export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(bundle), parity=False,
                                          batch=2))
    assert changed["removed_artifacts"] == ["int8-ort-cpu"]
    assert [a["name"] for a in check_valid(bundle)["artifacts"]] == ["onnx-fp32"]
    assert not (bundle / "model.int8-ort-cpu.onnx").exists()


def test_disk_full_during_export_keeps_the_old_bundle(old_bundle, tmp_path):
    """A real full disk where this machine lets the test mount a small tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    size = sum(f.stat().st_size for f in old_bundle.iterdir()) + (1 << 20)  # room for the old bundle only
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; test_disk_full_while_committing covers ENOSPC by injection")
    try:
        bundle, old_sha = copy_of(old_bundle, mount)
        rc, _, err = cli("export", *MODEL, "--dynamic-hw", "-o", str(bundle))
        assert rc == 2 and "No space left on device" in err, err
        one_line_no_traceback(err)
        manifest = check_valid(bundle)
        assert manifest["artifacts"][0]["sha256"] == old_sha and len(manifest["artifacts"]) == 2
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_disk_full_while_committing(old_bundle, tmp_path, monkeypatch, command):
    """ENOSPC injected at the last write before the commit point (the staged manifest)."""
    import cbam_deploy.transaction as transaction
    from cbam_deploy.quantize import quantize_bundle

    bundle, old_sha = copy_of(old_bundle, tmp_path)
    before = json.loads((bundle / "manifest.json").read_text())
    real = transaction.write_bytes_atomic

    def full_disk(path, data):
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(transaction, "write_bytes_atomic", full_disk)
    with pytest.raises(CbamDeployError, match="left as it was: No space left on device"):
        if command == "export":
            export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(bundle), parity=False, batch=2))
        else:
            quantize_bundle(bundle, ["ort-cpu"], "synthetic", calib_size=8, check_samples=8, use_cache=False,
                            gates="int8")
    assert json.loads((bundle / "manifest.json").read_text()) == before
    assert check_valid(bundle)["artifacts"][0]["sha256"] == old_sha
    assert not (bundle / "model.int8-ort-cpu-gates-int8.onnx").exists()


def test_quantize_and_verify_at_once_keep_both_results(old_bundle, tmp_path):
    bundle, _ = copy_of(old_bundle, tmp_path)
    marker = tmp_path / "marker"
    verify = paused_at("verified", marker, "verify", str(bundle))  # has read the manifest and measured
    rc, _, err = cli("quantize", str(bundle), "--calib-data", "synthetic", "--calib-size", "8", "--gates", "int8",
                     "--no-cache")
    assert rc == 0, err
    marker.unlink()
    _, err = verify.communicate(timeout=120)
    assert verify.returncode == 0, err
    manifest = check_valid(bundle)
    names = [a["name"] for a in manifest["artifacts"]]
    assert names == ["onnx-fp32", "int8-ort-cpu", "int8-ort-cpu-gates-int8"]  # quantize's artifact survived verify
    assert manifest["artifacts"][0]["verify"]["passed"] is True  # and verify's verdict survived quantize


def test_export_while_quantizing_refuses_the_stale_int8(old_bundle, tmp_path):
    bundle, _ = copy_of(old_bundle, tmp_path)
    marker = tmp_path / "marker"
    quantize = paused_at("quantized", marker, "quantize", str(bundle), "--calib-data", "synthetic", "--calib-size", "8",
                         "--gates", "int8", "--no-cache")
    rc, _, err = cli("export", *MODEL, "--batch", "2", "-o", str(bundle))
    assert rc == 0, err
    marker.unlink()
    _, err = quantize.communicate(timeout=120)
    assert quantize.returncode == 2 and "re-exported while quantizing" in err
    one_line_no_traceback(err)
    manifest = check_valid(bundle)
    assert [a["name"] for a in manifest["artifacts"]] == ["onnx-fp32"] and manifest["input"]["shape"][0] == 2


def test_two_exports_at_once_leave_one_whole_bundle(tmp_path):
    bundle = tmp_path / "b"
    procs = [cli("export", *MODEL, *extra, "-o", str(bundle), wait=False) for extra in ([], ["--batch", "2"])]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    manifest = check_valid(bundle)
    assert manifest["input"]["shape"][0] in ("batch", 2)


def test_verify_on_a_bundle_it_cannot_write_reports_and_says_so(old_bundle, tmp_path, monkeypatch):
    import cbam_deploy.transaction as transaction
    from typer.testing import CliRunner

    from cbam_deploy.cli import app

    bundle, _ = copy_of(old_bundle, tmp_path)
    before = (bundle / "manifest.json").read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(transaction, "_make_staging", read_only)
    result = CliRunner().invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "Read-only file system" in result.output and "could not be updated" in result.output
    assert "pass" in result.output and "Traceback" not in result.output
    assert (bundle / "manifest.json").read_bytes() == before


def test_leftovers_of_a_killed_command_are_cleaned_by_the_next_one(old_bundle, tmp_path):
    bundle, old_sha = copy_of(old_bundle, tmp_path)
    (bundle / ".manifest.json.abc123.tmp").write_text("half a manifest from an old version")
    dead = bundle / (STAGING_PREFIX + "dead")
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half an onnx")
    assert check_valid(bundle)["artifacts"][0]["sha256"] == old_sha


def test_relative_weights_are_found_from_another_folder_and_a_lost_checkpoint_never_passes(tmp_path):
    from cbam_deploy.models import create_model

    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(3)
    torch.save(create_model("resnet10_half_cbam", num_classes=10, stem="cifar").state_dict(), work / "ckpt.pth")
    rc, _, err = cli("export", *MODEL, "--weights", "ckpt.pth", "-o", "b", cwd=work)
    assert rc == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rc, out, err = cli("verify", str(work / "b"), "--json", cwd=elsewhere)
    result = json.loads(out)
    assert rc == 0 and result["reference"] == "pytorch-fp32" and result["passed"] is True, err
    assert result["results"][0]["max_abs_err"] > 0  # a real comparison, not the ONNX against itself

    (work / "ckpt.pth").unlink()
    rc, out, err = cli("verify", str(work / "b"), "--json", cwd=elsewhere)
    result = json.loads(out)
    assert result["reference"].startswith("onnx-fp32 (stand-in: checkpoint")
    row = result["results"][0]
    assert row["passed"] is None and "no independent reference" in row["skipped"]
    assert result["passed"] is None
    assert read_manifest(work / "b")["artifacts"][0]["verify"]["reference"] == "pytorch-fp32"  # the real check stays


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_bundle_files_follow_the_umask(tmp_path, umask, mode):
    bundle = tmp_path / "b"
    rc, _, err = cli("export", *MODEL, "--no-parity", "-o", str(bundle), umask=umask)
    assert rc == 0, err
    for name in ("model.onnx", "manifest.json"):
        assert (bundle / name).stat().st_mode & 0o777 == mode, name


def test_random_init_zoo_model_is_verified_against_pytorch_not_itself(old_bundle):
    from cbam_deploy.verify import verify_bundle

    result = verify_bundle(old_bundle, artifacts=["onnx-fp32"])
    assert result["reference"] == "pytorch-fp32" and result["passed"] is True
    assert 0 < result["results"][0]["max_abs_err"] < 1e-4
    assert np.isfinite(result["results"][0]["cosine_min"])
