"""A bundle from elsewhere is untrusted input. Crafted bundles and options against the real CLI:
symlinks inside a bundle (absolute, relative, a linked folder, the manifest itself, a FIFO), a
manifest whose factory would run code, names that would escape their folder, values that would break
YAML or pbtxt, a manifest nested too deep, Ctrl-C at startup, during imports and inside explain, an
explain re-run interrupted, a killed triton run, a plot path that cannot be written, and 20 KB names
over gRPC. Each case checks the exit code, the one line printed, and that nothing was read or
written outside its place."""

from __future__ import annotations

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
from typer.testing import CliRunner

from cbam_deploy.cli import app
from cbam_deploy.fsutil import sha256_file
from cbam_deploy.export_job import ExportOptions, export_bundle

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers

def cli(*args, cwd: Path | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def process(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """The real entry point (``python -m cbam_deploy``: the console script's ``cbam_deploy.__main__``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "cbam_deploy", *map(str, args)], env=full_env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def paused_at(point: str, marker: Path, *args, cwd: Path | None = None) -> subprocess.Popen:
    proc = process(*args, env={"CBAM_DEPLOY_FAULTPOINT": point, "CBAM_DEPLOY_FAULT_MARKER": str(marker)}, cwd=cwd)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended before reaching {point}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.02)
    return proc


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_error(err: str, *words: str) -> str:
    """The one line a bad input gets: no traceback, one non-empty line, naming what is wrong."""
    assert "Traceback" not in err, err
    shown = lines(err)
    assert len(shown) == 1, err
    for word in words:
        assert word in shown[0], (word, shown[0])
    return shown[0]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what 'nothing was written' is checked against."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def clean_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", output=str(out), parity=False))
    return out


@pytest.fixture
def world(clean_bundle, tmp_path) -> dict:
    """A copy of the bundle, and beside it a folder 'outside' with another real ONNX in it."""
    bundle = tmp_path / "bundle"
    shutil.copytree(clean_bundle, bundle, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    stranger = outside / "other.onnx"
    shutil.copyfile(clean_bundle / "model.onnx", stranger)
    with open(stranger, "ab") as handle:  # a different file (still a loadable ONNX: trailing bytes are ignored)
        handle.write(b"\0")
    return {"root": tmp_path, "bundle": bundle, "outside": outside, "stranger": stranger}


def point_at(world: dict, how: str) -> None:
    """Make the bundle's model.onnx lead to the outside ONNX, and its sha256 match that file."""
    bundle, stranger = world["bundle"], world["stranger"]
    (bundle / "model.onnx").unlink()
    if how == "absolute":
        (bundle / "model.onnx").symlink_to(stranger)
    elif how == "relative":
        (bundle / "model.onnx").symlink_to(Path("..") / "outside" / stranger.name)
    elif how == "folder":  # a symlinked folder on the way: sub -> ../outside
        (bundle / "sub").symlink_to(Path("..") / "outside", target_is_directory=True)

        def to_sub(manifest):
            manifest["artifacts"][0]["path"] = f"sub/{stranger.name}"
        edit_manifest(bundle, to_sub)
    digest, size = sha256_file(stranger), stranger.stat().st_size

    def match(manifest):
        manifest["artifacts"][0]["sha256"], manifest["artifacts"][0]["size_bytes"] = digest, size
    edit_manifest(bundle, match)


# ---------------------------------------------------------------- 1. symlinks inside a bundle

@pytest.mark.parametrize("how", ["absolute", "relative", "folder"])
def test_a_symlink_in_a_bundle_is_never_followed(world, how):
    point_at(world, how)
    root, bundle = world["root"], world["bundle"]
    before = tree(root)
    code, out, err = cli("info", bundle)
    assert code == 3 and "unsafe" in out, out
    one_error(err, "integrity check failed for onnx-fp32 (unsafe)")

    for args, words in (
        (["triton", bundle, "-o", root / "repo"], "symbolic link"),
        (["kserve", bundle, "-o", root / "isvc.yaml", "--storage-uri", "s3://b/m", "--repository", root / "repo2"],
         "symbolic link"),
        (["verify", bundle], "symbolic link"),
        (["profile", bundle, "--runs", "1", "--warmup", "0"], "symbolic link"),
    ):
        code, out, err = cli(*args)
        assert code == 2, (args, out, err)
        one_error(err, *words.split("|"))
    assert tree(root) == before  # no repository, no YAML, no staging folder, the bundle untouched

    from cbam_deploy.errors import CbamDeployError
    from cbam_deploy.serve.app import ServeConfig
    from cbam_deploy.serve.service import Metrics, load_repository

    with pytest.raises(CbamDeployError, match="symbolic link"):  # serve refuses it at startup
        load_repository(ServeConfig(str(bundle)), Metrics())


def test_a_folder_of_bundles_does_not_serve_a_linked_one(world, clean_bundle):
    from cbam_deploy.errors import CbamDeployError
    from cbam_deploy.serve.service import bundle_paths

    farm = world["root"] / "farm"
    farm.mkdir()
    shutil.copytree(clean_bundle, farm / "a")
    (farm / "b").symlink_to(world["bundle"], target_is_directory=True)
    with pytest.raises(CbamDeployError, match="b is a symbolic link; a folder of bundles holds the bundles themselves"):
        bundle_paths(str(farm))
    assert bundle_paths([str(farm / "a"), str(world["bundle"])])  # each named on the command line: served


def test_a_symlink_to_a_fifo_is_refused_without_opening_it(world):
    """A FIFO blocks whoever opens it for reading: the command finishing at all shows nothing opened it."""
    fifo = world["outside"] / "pipe"
    os.mkfifo(fifo)
    (world["bundle"] / "model.onnx").unlink()
    (world["bundle"] / "model.onnx").symlink_to(fifo)
    proc = process("info", world["bundle"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "unsafe" in out
    one_error(err, "unsafe")
    (world["bundle"] / "model.onnx").unlink()
    os.mkfifo(world["bundle"] / "model.onnx")  # a FIFO inside the bundle: not a regular file either
    code, out, err = cli("triton", world["bundle"], "-o", world["root"] / "repo")
    assert code == 2 and not (world["root"] / "repo").exists()
    one_error(err, "not a regular file")


def test_an_onnx_whose_external_data_leads_outside_is_refused(world):
    """The ONNX itself names its external-data file: one the manifest does not record (here
    ``../outside/w.bin``) is never opened, whatever the ONNX's own sha256."""
    import onnx

    bundle, outside = world["bundle"], world["outside"]
    onnx.save_model(onnx.load(str(bundle / "model.onnx")), str(outside / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    proto = onnx.load(str(outside / "ext.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/w.bin"
    (bundle / "model.onnx").write_bytes(proto.SerializeToString())
    digest = sha256_file(bundle / "model.onnx")
    edit_manifest(bundle, lambda m: m["artifacts"][0].update(sha256=digest))
    before = tree(world["root"])
    code, out, err = cli("info", bundle)
    assert code == 3 and "unsafe" in out
    one_error(err, "onnx-fp32 (unsafe)")
    code, _, err = cli("triton", bundle, "-o", world["root"] / "repo")
    assert code == 2
    one_error(err, "refers to '../outside/w.bin'", "does not record")
    assert tree(world["root"]) == before


def test_a_symlinked_manifest_and_lock_are_refused(world):
    bundle, root = world["bundle"], world["root"]
    real = world["outside"] / "manifest.json"
    shutil.move(bundle / "manifest.json", real)
    (bundle / "manifest.json").symlink_to(real)
    code, _, err = cli("info", bundle)
    assert code == 2
    one_error(err, "cannot read", "symbolic link")
    shutil.move(real, bundle / "manifest.json")
    (bundle / ".lock").unlink(missing_ok=True)
    target = world["outside"] / "created-by-lock"
    (bundle / ".lock").symlink_to(target)  # a dangling link: opening it with O_CREAT would create a file outside
    before = tree(world["outside"])
    code, _, err = cli("verify", bundle, "--model", "x.py:make")  # any command that writes the bundle
    cli("info", bundle)
    assert not target.exists() and tree(world["outside"]) == before
    from cbam_deploy.errors import CbamDeployError
    from cbam_deploy.transaction import update_manifest

    with pytest.raises(CbamDeployError, match="symbolic link"):
        update_manifest(bundle, lambda m: m)
    assert not target.exists()


def test_a_crafted_commit_cannot_move_or_remove_anything_outside(world):
    """A staging folder shipped inside a bundle, whose COMMIT names files outside it, is discarded."""
    bundle, root = world["bundle"], world["root"]
    victim = root / "victim.txt"
    victim.write_text("keep me")
    staging = bundle / ".staging-crafted"
    staging.mkdir()
    (staging / "COMMIT").write_text(json.dumps({"files": ["../../moved.txt"], "remove": ["../victim.txt"]}))
    (staging / "moved.txt").write_text("x")
    before = tree(world["outside"])
    code, _, _ = cli("info", bundle)
    assert code == 0
    assert victim.read_text() == "keep me" and not (root / "moved.txt").exists() and not (root.parent / "moved.txt").exists()
    assert not staging.exists() and tree(world["outside"]) == before


def test_triton_copies_the_checked_bytes_not_a_link(world):
    repo = world["root"] / "repo"
    code, out, err = cli("triton", world["bundle"], "-o", repo, "--json")
    assert code == 0, err
    copied = Path(json.loads(out)[0]["path"]) / "1" / "model.onnx"
    assert not copied.is_symlink() and os.lstat(copied).st_nlink == 1
    assert sha256_file(copied) == sha256_file(world["bundle"] / "model.onnx")


# ---------------------------------------------------------------- 2. code from a bundle never runs by itself

@pytest.fixture(scope="module")
def factory_bundle(tmp_path_factory):
    """A factory-made bundle whose factory file, when imported, leaves a marker file."""
    root = tmp_path_factory.mktemp("factory")
    marker = root / "code-ran"
    factory = root / "net.py"
    factory.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
                       "from cbam_deploy.models import create_model\n\n\n"
                       "def make(num_classes=10):\n"
                       "    return create_model('resnet10_half_cbam', num_classes=10, stem='cifar')\n")
    bundle = root / "bundle"
    export_bundle(ExportOptions(model=f"{factory}:make", input_size=32, output=str(bundle), parity=False))
    marker.unlink()  # exporting ran it: the user's own code, named by them
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["factory_sha256"] == sha256_file(factory)
    return {"root": root, "bundle": bundle, "factory": factory, "marker": marker}


def test_verify_explain_quantize_eval_bench_never_import_a_bundles_factory(factory_bundle, tmp_path):
    from reference.digits import write_image_folder

    bundle, marker = factory_bundle["bundle"], factory_bundle["marker"]
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    code, out, err = cli("verify", bundle, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["passed"] is None and {r["skipped"] for r in result["results"]} == {"no trusted reference"}
    one_error(err, "no trusted reference", "--trust-code")
    assert not marker.exists()

    code, out, err = cli("explain", bundle, "--image", image, "-o", tmp_path / "page")
    assert code == 0, err
    one_error(err, "no PyTorch reference", "--model FILE.py:FACTORY")
    assert "stand-in" in out.replace("\n", " ") or (tmp_path / "page" / "index.html").is_file()
    assert not marker.exists()

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    code, out, err = cli("quantize", copy, "--calib-data", "synthetic", "--calib-size", "8", "--no-cache")
    assert code in (0, 3), err
    assert not marker.exists()
    assert "Traceback" not in err and lines(err)[0].startswith("note: no PyTorch reference")

    data = write_image_folder(tmp_path / "digits", "test")
    code, out, err = cli("eval", bundle, "--data", data, "--limit", "8")
    assert code == 0 and not marker.exists(), err

    code, out, err = cli("bench", bundle, "--iters", "2", "--min-seconds", "0.1")
    assert code == 2 and not marker.exists()
    one_error(err, "bench times every artifact against the PyTorch original", "--trust-code")


def test_a_manifest_that_says_zoo_but_names_a_file_runs_nothing(factory_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(factory_bundle["bundle"], bundle)

    def disguise(manifest):
        manifest["model"]["source"] = "zoo"
        manifest["model"]["name"] = manifest["model"].pop("factory")
        manifest["model"].pop("factory_sha256")
    edit_manifest(bundle, disguise)
    code, out, err = cli("verify", bundle, "--json")
    assert code == 0 and json.loads(out)["passed"] is None
    one_error(err, "no trusted reference")
    assert not factory_bundle["marker"].exists()


def test_the_factory_runs_when_named_again_with_its_hash_or_trusted(factory_bundle, tmp_path):
    bundle, factory, marker = factory_bundle["bundle"], factory_bundle["factory"], factory_bundle["marker"]
    changed = tmp_path / "net.py"
    changed.write_text(factory.read_text() + "\n# changed\n")
    code, _, err = cli("verify", bundle, "--model", f"{changed}:make")
    assert code == 2 and not marker.exists()
    one_error(err, "sha256 differs", "not the bundle's model code")
    try:
        code, out, err = cli("verify", bundle, "--model", f"{factory}:make", "--json")
        assert code == 0, err
        assert json.loads(out)["reference"] == "pytorch-fp32" and json.loads(out)["passed"] is True
        assert marker.exists()  # the user named it: it ran
        marker.unlink()
        code, out, err = cli("verify", bundle, "--trust-code", "--json")
        assert code == 0 and json.loads(out)["passed"] is True and marker.exists()
    finally:
        marker.unlink(missing_ok=True)


# ---------------------------------------------------------------- 3, 4. names and values

@pytest.mark.parametrize("name", ["../evil", "/tmp/cbam-evil-abs", "a/b", "..", ".hidden", "x" * 200])
def test_triton_and_kserve_names_cannot_escape(world, name):
    root = world["root"]
    before = tree(root)
    code, _, err = cli("triton", world["bundle"], "-o", root / "repo", "--name", name)
    assert code == 2
    one_error(err, "--name", "a model name is letters, digits")
    code, _, err = cli("kserve", world["bundle"], "-o", root / "isvc.yaml", "--storage-uri", "s3://b/m",
                       "--repository", root / "repo", "--model-name", name)
    assert code == 2
    one_error(err, "--model-name", "a model name is letters, digits")
    assert tree(root) == before and not Path("/tmp/cbam-evil-abs").exists()


def test_a_manifest_name_cannot_escape_or_break_the_config(world):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def hostile(manifest):
        manifest["model"]["name"] = ".."
        manifest["input"]["name"] = 'in"put\nname: "evil'
        manifest["outputs"][0]["name"] = "out\\put"
    edit_manifest(world["bundle"], hostile)
    repo = world["root"] / "repo"
    code, out, err = cli("triton", world["bundle"], "-o", repo, "--json")
    assert code == 0, err
    written = json.loads(out)[0]
    assert Path(written["path"]).parent == repo and written["model"] == "model"
    config = text_format.Parse((repo / "model" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "model" and config.input[0].name == 'in"put\nname: "evil'
    assert config.output[0].name == "out\\put"
    assert sorted(os.listdir(world["root"])) == ["bundle", "outside", "repo"]


def test_a_newline_in_the_storage_uri_is_refused_and_quotes_stay_quoted(world):
    import yaml

    out_file = world["root"] / "isvc.yaml"
    code, _, err = cli("kserve", world["bundle"], "-o", out_file, "--storage-uri", "s3://bucket/m\nkind: Pod")
    assert code == 2 and not out_file.exists()
    one_error(err, "--storage-uri", "control characters")
    uri = "s3://bucket/m #x 'y' \"z\": w"
    code, _, err = cli("kserve", world["bundle"], "-o", out_file, "--storage-uri", uri)
    assert code == 0, err
    document = yaml.safe_load(out_file.read_text())
    assert document["spec"]["predictor"]["model"]["storageUri"] == uri
    assert all(line.startswith("# ") for line in out_file.read_text().splitlines()[:3])


# ---------------------------------------------------------------- 5. a manifest nested too deep

@pytest.mark.parametrize("depth", [40, 100_000])
def test_a_deeply_nested_manifest_is_one_line(world, depth):
    bundle = world["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    text = json.dumps(manifest)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    (bundle / "manifest.json").write_text(text)
    before = tree(world["root"])
    code, _, err = cli("info", bundle)
    assert code == 2
    one_error(err, "cannot read", "nested deeper than")
    assert tree(world["root"]) == before


# ---------------------------------------------------------------- 6, 7. Ctrl-C

INTERRUPTED = "interrupted: every bundle and output is as it was before"


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_ctrl_c_during_startup_imports_is_exit_130_and_one_line(world, tmp_path, delay):
    marker = tmp_path / "marker"
    proc = paused_at("startup", marker, "info", world["bundle"])
    marker.unlink()  # on it goes, into typer, rich, torch, onnxruntime ...
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.skip(f"the command had finished within {delay} s")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    one_error(err, INTERRUPTED)


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """The digits model (real gates, Grad-CAM) with a first page written."""
    from PIL import Image

    from reference.digits import CHECKPOINT, MODEL_NAME, STEM

    root = tmp_path_factory.mktemp("explain-int")
    bundle = root / "bundle"
    export_bundle(ExportOptions(model=MODEL_NAME, stem=STEM, weights=str(CHECKPOINT), output=str(bundle), parity=False))
    image = root / "seven.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    page = root / "page"
    code, _, err = cli("explain", bundle, "--image", image, "-o", page)
    assert code == 0, err
    return {"root": root, "bundle": bundle, "image": image, "page": page}


def staging_left(folder: Path, tag: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(f".cbam-{tag}-")]


@pytest.mark.parametrize("point,after", [("explain-start", 0.0), ("explain-gradcam", 0.0), ("explain-gradcam", 0.1),
                                         ("explain-render", 0.0), ("explain-render", 0.05), ("explain-staged", 0.0)])
def test_ctrl_c_anywhere_in_explain_is_130_and_leaves_the_old_page(explained, tmp_path, point, after):
    """Paused at a point, then let go for ``after`` seconds (into captum's and matplotlib's imports and
    work) before Ctrl-C: exit 130, one line, the earlier page exactly as it was, no staging folder."""
    before = tree(explained["page"])
    marker = tmp_path / "marker"
    proc = paused_at(point, marker, "explain", explained["bundle"], "--image", explained["image"],
                     "-o", explained["page"])
    if after:
        marker.unlink()
        time.sleep(after)
    proc.send_signal(signal.SIGINT)
    marker.unlink(missing_ok=True)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    one_error(err, INTERRUPTED)
    assert tree(explained["page"]) == before
    assert staging_left(explained["root"], "explain") == []


def test_a_killed_explain_leaves_the_old_page_and_the_next_run_cleans_up(explained, tmp_path):
    before = tree(explained["page"])
    marker = tmp_path / "marker"
    proc = paused_at("explain-staged", marker, "explain", explained["bundle"], "--image", explained["image"],
                     "-o", explained["page"])
    proc.kill()
    proc.communicate(timeout=60)
    marker.unlink()
    assert tree(explained["page"]) == before and staging_left(explained["root"], "explain")
    code, _, err = cli("explain", explained["bundle"], "--image", explained["image"], "-o", explained["page"])
    assert code == 0, err
    assert staging_left(explained["root"], "explain") == []


def test_a_killed_triton_run_is_cleaned_up_by_the_next(world, tmp_path):
    repo = world["root"] / "repo"
    marker = tmp_path / "marker"
    proc = paused_at("triton-staged", marker, "triton", world["bundle"], "-o", repo)
    proc.kill()
    proc.communicate(timeout=60)
    marker.unlink()
    left = staging_left(world["root"], "triton")
    assert left and os.listdir(repo) == []  # the repository never saw half a model
    code, out, err = cli("triton", world["bundle"], "-o", repo)
    assert code == 0, err
    assert staging_left(world["root"], "triton") == [] and len(os.listdir(repo)) == 1


def test_a_swallowed_ctrl_c_still_exits_130_and_commits_nothing(world):
    """Whatever catches the KeyboardInterrupt (a library's bare except), the run ends with 130 and
    nothing is committed after it."""
    import typer

    from cbam_deploy import interrupts
    from cbam_deploy.cli import _handle_errors
    from cbam_deploy.fsutil import StagedFolder

    final = world["root"] / "out"
    stage = StagedFolder(final, "test")

    @_handle_errors
    def swallowing():
        with stage as staged:
            (staged / "a").write_text("a")
            try:
                interrupts.on_sigint(signal.SIGINT, None)  # what the installed handler does on Ctrl-C
            except BaseException:  # noqa: BLE001 -- a library that swallows it
                pass
            stage.swap_in()

    try:
        with pytest.raises(typer.Exit) as exit_info:
            swallowing()
        assert exit_info.value.exit_code == 130
        assert not final.exists() and staging_left(world["root"], "test") == []
    finally:
        interrupts.reset()


# ---------------------------------------------------------------- 9. profile --plot

@pytest.mark.parametrize("plot", ["/proc/cbam-plot.png", "{root}/missing/plot.png", "{root}/" + "x" * 300 + ".png"])
def test_profile_refuses_a_plot_path_before_profiling(world, plot):
    plot = plot.format(root=world["root"])
    # an artifact the bundle lacks: had anything been opened or profiled first, that would be the error
    code, out, err = cli("profile", world["bundle"], "--plot", plot, "--artifact", "not-in-the-bundle")
    assert code == 2 and out == ""  # no table: nothing was profiled
    one_error(err, "--plot")


def test_profile_plot_is_a_png_whatever_its_suffix(world):
    plot = world["root"] / "plot.xyz"
    (world["root"] / ".plot.xyz.k1lled.tmp").write_bytes(b"half a PNG")  # what a killed run left
    code, _, err = cli("profile", world["bundle"], "--runs", "1", "--warmup", "0", "--plot", plot)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [n for n in os.listdir(world["root"]) if n.endswith(".tmp")] == []


# ---------------------------------------------------------------- 10. 20 KB names over gRPC

def test_grpc_names_over_16_kb_get_their_status_not_a_broken_stream(clean_bundle):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("starlette")
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from cbam_deploy.serve.app import ServeConfig, create_app
    from serving import running_server

    long = "n" * 20_000
    app = create_app(ServeConfig(str(clean_bundle), grpc_port=0))
    with running_server(app):
        channel = grpc.insecure_channel(app.state.grpc_address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        model = next(iter(app.state.repository.models))
        x = np.zeros((1, 3, 32, 32), np.float32)

        def request(model_name=model, input_name="input", output_name=None):
            req = pb.ModelInferRequest(model_name=model_name)
            req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
            req.raw_input_contents.append(x.tobytes())
            if output_name:
                req.outputs.add(name=output_name)
            return req

        cases = [(lambda: stub.ModelInfer(request(model_name=long)), grpc.StatusCode.NOT_FOUND, "unknown model"),
                 (lambda: stub.ModelInfer(request(input_name=long)), grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
                 (lambda: stub.ModelInfer(request(output_name=long)), grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
                 (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=long)), grpc.StatusCode.NOT_FOUND,
                  "unknown model")]
        for call, status, words in cases:
            with pytest.raises(grpc.RpcError) as failure:
                call()
            assert failure.value.code() == status, failure.value.details()
            details = failure.value.details()
            assert words in details and "20000 characters" in details and len(details) < 1100
        answers = list(stub.ModelStreamInfer(iter([request(model_name=long), request()])))
        assert "unknown model" in answers[0].error_message and len(answers[0].error_message) < 1100
        assert answers[1].error_message == "" and answers[1].infer_response.outputs
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        channel.close()
