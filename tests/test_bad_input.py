"""The bad-input matrix: every user error is one red ``error:`` line on stderr, a fixed exit code
(2 for a bad option or input, 3 for an artifact that failed its integrity check), no traceback, and
nothing written or changed.

One small bundle (resnet10_half_cbam, CIFAR stem, 32x32) is built once for the module; each case runs
the CLI in-process through typer's CliRunner and compares a snapshot of every file under the
module's folder before and after.
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError

runner = CliRunner()


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bundle plus every kind of bad file the matrix needs, all under one folder."""
    from cbam_deploy.bundle import read_manifest
    from cbam_deploy.export_job import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("bad-input")
    bundle = root / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=4, output=str(bundle),
                                parity=False))
    read_manifest(bundle)  # creates the bundle's lock file now, not during a case
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "images" / label / "x.png")
    (root / "empty").mkdir()
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "garbage.pth").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (root / "garbage.npy").write_bytes(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    (root / "evil.pkl").write_bytes(pickle.dumps(_Evil(root / "pwned")))
    (root / "exits.py").write_text("import torch\ndef make():\n    import sys\n    sys.exit(0)\n")
    (root / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    (root / "raises.py").write_text("def make():\n    raise ValueError('bad config\\nsecond line')\n")
    (root / "broken_import.py").write_text("x = 1 / 0\n")
    (root / "prints.py").write_text("import sys\nprint('hello from the user file')\ndef make():\n    raise SystemExit('bye')\n")
    return root


def _snapshot(root):
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            state[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            info = os.stat(path)
            state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return state


def _run_clean_error(world, monkeypatch, args, code, needle, progress_line=False):
    monkeypatch.setenv("CBAM_DEPLOY_CACHE", str(world / "cache"))
    monkeypatch.chdir(world)  # a default output folder would land here, inside the snapshot
    before = _snapshot(world)
    result = runner.invoke(app, [str(a).format(root=world) for a in args])
    after = _snapshot(world)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0], (needle, errors[0])
    if not progress_line:
        assert lines == errors, result.stderr  # nothing but the one line
    assert after == before, {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not (world / "pwned").exists()
    return result


EXPORT = ["export", "-m", "resnet10_half_cbam", "--stem", "cifar", "-o", "{root}/out"]

BAD_OPTIONS = [
    # export: every option is checked before any work, so no output folder appears
    ("export-num-classes-0", EXPORT + ["--num-classes", "0"], "--num-classes must be an integer from 1"),
    ("export-num-classes-negative", EXPORT + ["--num-classes=-3"], "--num-classes must be"),
    ("export-num-classes-huge", EXPORT + ["--num-classes", "1000000000"], "--num-classes must be"),
    ("export-input-size-0", EXPORT + ["--input-size", "0"], "--input-size must be an integer from 8"),
    ("export-input-size-huge", EXPORT + ["--input-size", "100000"], "to 2048"),
    ("export-input-size-below-stride", ["export", "-m", "resnet10_half_cbam", "-o", "{root}/out", "--input-size", "16"],
     "from 32 (the network's stride"),
    ("export-opset-low", EXPORT + ["--opset", "9"], "opset 9 is out of range"),
    ("export-opset-high", EXPORT + ["--opset", "99"], "opset 99 is out of range"),
    ("export-dynamo-opset-17", EXPORT + ["--exporter", "dynamo", "--opset", "17"], "out of range for the dynamo"),
    ("export-exporter", EXPORT + ["--exporter", "bogus"], "--exporter must be one of"),
    ("export-batch-0", EXPORT + ["--batch", "0"], "--batch must be"),
    ("export-batch-word", EXPORT + ["--batch", "zero"], "--batch must be"),
    ("export-batch-huge", EXPORT + ["--batch", "100000"], "--batch must be"),
    ("export-format", EXPORT + ["--format", "bogus"], "--format takes a comma list"),
    ("export-format-empty", EXPORT + ["--format", ","], "--format takes a comma list"),
    ("export-precision", EXPORT + ["--precision", "bogus"], "--precision takes a comma list"),
    ("export-target", EXPORT + ["--target", "bogus"], "--target takes a comma list"),
    ("export-gates", EXPORT + ["--gates", "bogus"], "--gates must be one of"),
    ("export-stem", ["export", "-m", "resnet10_half_cbam", "-o", "{root}/out", "--stem", "bogus"], "--stem must be one of"),
    ("export-int8-no-data", EXPORT + ["--int8"], "--int8 needs --calib-data"),
    ("export-precision-int8-no-data", EXPORT + ["--precision", "int8"], "--precision int8 needs --calib-data"),
    ("export-int8-missing-data", EXPORT + ["--int8", "--calib-data", "{root}/missing"], "--calib-data {root}/missing does not exist"),
    ("export-int8-text-data", EXPORT + ["--int8", "--calib-data", "{root}/a-file.txt"], "neither a folder of images nor"),
    ("export-int8-empty-folder", EXPORT + ["--int8", "--calib-data", "{root}/empty"], "holds no images"),
    ("export-min-batch-0", EXPORT + ["--min-batch", "0"], "--min-batch must be"),
    ("export-profile-order", EXPORT + ["--min-batch", "4", "--opt-batch", "2"], "1 <= --min-batch <= --opt-batch"),
    ("export-profile-max", EXPORT + ["--opt-batch", "8", "--max-batch", "4"], "1 <= --min-batch <= --opt-batch"),
    ("export-workspace-0", EXPORT + ["--workspace-mb", "0"], "--workspace-mb must be a positive integer"),
    ("export-dla-core-negative", EXPORT + ["--dla-core=-1"], "--dla-core must be a non-negative integer"),
    ("export-timing-cache-folder-missing", EXPORT + ["--timing-cache", "{root}/missing/trt.cache"], "does not exist"),
    ("export-weights-missing", EXPORT + ["--weights", "{root}/missing.pth"], "--weights {root}/missing.pth does not exist"),
    ("export-unknown-model", ["export", "-m", "resnet10_half_cbm", "-o", "{root}/out"], "Did you mean: resnet10_half_cbam"),
    ("export-factory-file-missing", ["export", "-m", "{root}/missing.py:make", "-o", "{root}/out"], "does not exist"),
    ("export-output-kind-syntax", EXPORT + ["--output-kind", "logits"], "--output-kind takes NAME=KIND"),
    ("export-output-kind-unknown-kind", EXPORT + ["--output-kind", "logits=boxes"], "unknown kind 'boxes'; the kinds are"),
    ("export-output-is-a-file", ["export", "-m", "resnet10_half_cbam", "--stem", "cifar", "-o", "{root}/a-file.txt"],
     "exists and is not a folder"),
    # quantize: options first, then the bundle
    ("quantize-calib-size-0", ["quantize", "{root}/bundle", "--calib-data", "synthetic", "--calib-size", "0"],
     "--calib-size must be a positive integer"),
    ("quantize-calib-batch-0", ["quantize", "{root}/bundle", "--calib-data", "synthetic", "--calib-batch", "0"],
     "--calib-batch must be"),
    ("quantize-target", ["quantize", "{root}/bundle", "--calib-data", "synthetic", "--target", "gpu"], "unknown target"),
    ("quantize-method", ["quantize", "{root}/bundle", "--calib-data", "synthetic", "--method", "kl"], "unknown calibration method"),
    ("quantize-gates", ["quantize", "{root}/bundle", "--calib-data", "synthetic", "--gates", "half"], "--gates"),
    ("quantize-data-missing", ["quantize", "{root}/bundle", "--calib-data", "{root}/missing"], "does not exist"),
    ("quantize-data-not-numpy", ["quantize", "{root}/bundle", "--calib-data", "{root}/garbage.npy"],
     "neither a folder of images nor a NumPy"),
    ("quantize-no-bundle", ["quantize", "{root}/missing", "--calib-data", "synthetic"], "not a bundle"),
    # bench: everything, the report paths included, before measuring
    ("bench-iters-0", ["bench", "{root}/bundle", "--iters", "0"], "--iters must be a positive integer"),
    ("bench-warmup-negative", ["bench", "{root}/bundle", "--warmup=-1"], "--warmup must be a non-negative integer"),
    ("bench-min-seconds-0", ["bench", "{root}/bundle", "--min-seconds", "0"], "--min-seconds must be greater than 0"),
    ("bench-threads-0", ["bench", "{root}/bundle", "--threads", "0"], "--threads must be a positive integer"),
    ("bench-batch-0", ["bench", "{root}/bundle", "--batch", "1,0"], "--batch takes a comma list of integers"),
    ("bench-batch-word", ["bench", "{root}/bundle", "--batch", "one"], "--batch takes a comma list"),
    ("bench-artifact", ["bench", "{root}/bundle", "--artifact", "nope"], "has no artifact 'nope'"),
    ("bench-markdown-folder-missing", ["bench", "{root}/bundle", "--markdown", "{root}/missing/report.md"],
     "the folder {root}/missing does not exist"),
    ("bench-plot-folder-missing", ["bench", "{root}/bundle", "--plot", "{root}/missing/plot.png"],
     "the folder {root}/missing does not exist"),
    ("bench-markdown-is-folder", ["bench", "{root}/bundle", "--markdown", "{root}/empty"], "is a folder"),
    ("bench-bundle-and-model", ["bench", "{root}/bundle", "--model", "resnet18"], "not a factory; leave --model out"),
    ("bench-model-unknown", ["bench", "--model", "nope"], "unknown model 'nope'"),
    ("bench-model-artifact", ["bench", "--model", "resnet10_half_cbam", "--artifact", "int8-ort-cpu"], "no artifact 'int8-ort-cpu'"),
    # eval
    ("eval-batch-0", ["eval", "{root}/bundle", "--data", "{root}/images", "--batch", "0"], "--batch must be"),
    ("eval-limit-0", ["eval", "{root}/bundle", "--data", "{root}/images", "--limit", "0"], "--limit must be a positive integer"),
    ("eval-artifact", ["eval", "{root}/bundle", "--data", "{root}/images", "--artifact", "nope"], "has no artifact 'nope'"),
    ("eval-data-missing", ["eval", "{root}/bundle", "--data", "{root}/missing"], "does not exist"),
    ("eval-data-file", ["eval", "{root}/bundle", "--data", "{root}/a-file.txt"], "is not a folder"),
    # verify
    ("verify-samples-0", ["verify", "{root}/bundle", "--samples", "0"], "--samples must be a positive integer"),
    ("verify-artifact", ["verify", "{root}/bundle", "--artifact", "nope"], "has no artifact 'nope'"),
    ("verify-data-missing", ["verify", "{root}/bundle", "--data", "{root}/missing"], "does not exist"),
    # triton
    ("triton-max-batch-0", ["triton", "{root}/bundle", "-o", "{root}/repo", "--max-batch", "0"], "--max-batch must be"),
    ("triton-instances-0", ["triton", "{root}/bundle", "-o", "{root}/repo", "--instances", "0"], "--instances must be"),
    ("triton-delay-negative", ["triton", "{root}/bundle", "-o", "{root}/repo", "--delay-us=-1"], "--delay-us must be"),
    ("triton-kind", ["triton", "{root}/bundle", "-o", "{root}/repo", "--kind", "KIND_TPU"], "--kind must be one of"),
    ("triton-artifact", ["triton", "{root}/bundle", "-o", "{root}/repo", "--artifact", "nope"], "has no artifact 'nope'"),
    ("triton-output-is-a-file", ["triton", "{root}/bundle", "-o", "{root}/a-file.txt"], "exists and is not a folder"),
    # command-line parse errors are one line too
    ("parse-not-an-integer", ["bench", "{root}/bundle", "--iters", "abc"], "Invalid value for '--iters'"),
    ("parse-missing-option", ["export", "-o", "{root}/out"], "Missing option '--model'"),
    ("parse-unknown-option", EXPORT + ["--bogus"], "No such option: --bogus"),
    ("parse-unknown-command", ["exprot"], "No such command 'exprot'"),
    # models / info
    ("models-input-size-0", ["models", "--input-size", "0"], "--input-size must be"),
    ("info-no-bundle", ["info", "{root}/missing"], "not a bundle"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_option_is_one_line_exit_2_and_writes_nothing(world, monkeypatch, args, needle):
    _run_clean_error(world, monkeypatch, args, 2, needle.format(root=world))


BAD_MODEL_FILES = [
    # these fail while loading the model, after the "exporting ..." progress line
    ("checkpoint-random-bytes", ["--weights", "{root}/garbage.pth"], "not a PyTorch checkpoint"),
    ("checkpoint-code-running-pickle", ["--weights", "{root}/evil.pkl"], "refused to load checkpoint"),
    ("factory-sys-exit", ["--model", "{root}/exits.py:make"], "exits.py:make called sys.exit(0) while building the model"),
    ("factory-sys-exit-on-import", ["--model", "{root}/exits_on_import.py:make"], "called sys.exit(3)"),
    ("factory-system-exit-message", ["--model", "{root}/prints.py:make"], "called sys.exit('bye')"),
    ("factory-raises", ["--model", "{root}/raises.py:make"], "raises.py:make() raised ValueError: bad config (line 2)"),
    ("factory-import-fails", ["--model", "{root}/broken_import.py:make"], "failed (line 1): ZeroDivisionError"),
    # the model's outputs are known once it has run (before the ONNX export)
    ("output-kind-unknown-output", ["--output-kind", "logit=dense"], "--output-kind: no output 'logit'; the model's "
                                                                     "outputs are logits"),
]


@pytest.mark.parametrize("extra,needle", [c[1:] for c in BAD_MODEL_FILES], ids=[c[0] for c in BAD_MODEL_FILES])
def test_bad_model_file_is_one_line_exit_2_and_writes_nothing(world, monkeypatch, extra, needle):
    args = ["export", "-m", "resnet10_half_cbam", "--stem", "cifar", "-o", "{root}/out", *extra]
    if extra[0] == "--model":
        args = ["export", "--input-size", "32", "-o", "{root}/out", *extra]
    result = _run_clean_error(world, monkeypatch, args, 2, needle.format(root=world), progress_line=True)
    assert "Please file an issue" not in result.stderr and "second line" not in result.stderr
    assert result.stdout == ""  # a user file's print() goes to stderr: stdout belongs to --json


def _damaged(world, tmp_path, change):
    manifest = json.loads((world / "bundle" / "manifest.json").read_text())
    change(manifest)
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _first_artifact(manifest):
    return manifest["artifacts"][0]


DAMAGED_MANIFESTS = [
    ("artifacts-not-a-list", lambda m: m.update(artifacts=5), "artifacts must be a list, got 5 (an integer)"),
    ("artifact-is-a-string", lambda m: m.update(artifacts=["onnx-fp32"]), "artifacts[0] must be an object"),
    ("model-is-a-list", lambda m: m.update(model=[]), "model must be an object, got [] (a list)"),
    ("size-bytes-text", lambda m: _first_artifact(m).update(size_bytes="x"), "artifacts[0].size_bytes must be a non-negative integer"),
    ("input-empty", lambda m: m.update(input={}), "input.name is missing"),
    ("input-shape-missing", lambda m: m["input"].pop("shape"), "input.shape is missing"),
    ("preprocess-mean-text", lambda m: m["input"]["preprocess"].update(mean=["a"]), "input.preprocess.mean must be"),
    ("preprocess-crop-text", lambda m: m["input"]["preprocess"].update(center_crop="32"), "input.preprocess.center_crop"),
    ("num-classes-text", lambda m: m["model"].update(num_classes="ten"), "model.num_classes must be a positive integer or null"),
    ("model-name-missing", lambda m: m["model"].pop("name"), "model.name is missing"),
    ("outputs-not-dicts", lambda m: m.update(outputs=["logits"]), "outputs[0] must be an object"),
    ("output-kind-unknown", lambda m: m["outputs"][0].update(kind="boxes"), "outputs[0].kind must be one of logits, dense, detections, other"),
    ("artifact-name-number", lambda m: _first_artifact(m).update(name=7), "artifacts[0].name must be a non-empty string"),
    ("artifact-sha-missing", lambda m: _first_artifact(m).pop("sha256"), "artifacts[0].sha256 is missing"),
    ("companion-digest-number", lambda m: _first_artifact(m).update(companion_files={"model.bin": 5}), "companion_files"),
    ("companion-outside", lambda m: _first_artifact(m).update(companion_files={"../x": "ab"}), "must stay inside the bundle"),
    ("parity-text", lambda m: _first_artifact(m).update(parity="yes"), "artifacts[0].parity must be an object"),
    ("weights-text", lambda m: m["model"].update(weights="w.pth"), "model.weights must be an object or null"),
    ("versions-missing", lambda m: m.pop("versions"), "lacks versions"),
]


@pytest.mark.parametrize("change,needle", [c[1:] for c in DAMAGED_MANIFESTS], ids=[c[0] for c in DAMAGED_MANIFESTS])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_damaged_manifest_names_the_field(world, tmp_path, monkeypatch, change, needle, as_json):
    folder = _damaged(world, tmp_path, change)
    before = _snapshot(folder)
    args = ["info", str(folder)] + (["--json"] if as_json else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert _snapshot(folder) == {**before, **{k: v for k, v in _snapshot(folder).items() if k == ".lock"}}


def test_manifest_that_is_not_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot read")


def test_info_exits_3_and_names_changed_and_missing_artifacts(world, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(world / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    copy = dict(manifest["artifacts"][0], name="onnx-copy", path="copy.onnx")
    shutil.copyfile(bundle / "model.onnx", bundle / "copy.onnx")
    manifest["artifacts"].append(copy)
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    ok = runner.invoke(app, ["info", str(bundle), "--json"])
    assert ok.exit_code == 0, ok.output
    assert [a["integrity"] for a in json.loads(ok.stdout)["artifacts"]] == ["ok", "ok"]

    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    (bundle / "copy.onnx").unlink()
    table = runner.invoke(app, ["info", str(bundle)])
    assert table.exit_code == 3 and "changed" in table.stdout and "missing" in table.stdout
    errors = [line for line in table.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "onnx-fp32 (changed), onnx-copy (missing)" in errors[0]
    as_json = runner.invoke(app, ["info", str(bundle), "--json"])
    assert as_json.exit_code == 3
    assert {a["name"]: a["integrity"] for a in json.loads(as_json.stdout)["artifacts"]} == {
        "onnx-fp32": "changed", "onnx-copy": "missing"}


def test_corrupt_calibration_cache_entry_is_rebuilt(world, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(world / "bundle", bundle)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CBAM_DEPLOY_CACHE", str(cache))
    args = ["quantize", str(bundle), "--calib-data", "synthetic", "--calib-size", "8", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code in (0, 3), first.output  # random weights: the verdict is not the point here
    entries = list((cache / "calibration").glob("*.json"))
    assert len(entries) == 1
    good = json.loads(entries[0].read_text())
    for damage in (b"{ truncated", b"", b'{"data": 5}'):
        entries[0].write_bytes(damage)
        again = runner.invoke(app, args)
        assert again.exit_code in (0, 3) and "Traceback" not in again.output, again.output
        summary = json.loads(again.stdout)
        warnings = summary["calibration"].get("warnings", [])
        assert any("was unusable" in w and "calibrated again" in w for w in warnings), warnings
        cache_info = summary["artifacts"][0]["quantization"]["calibration_cache"]
        assert cache_info["hit"] is False and "rebuilt" in cache_info
        assert json.loads(entries[0].read_text()).keys() == good.keys()  # replaced with a whole entry
        assert not [p for p in entries[0].parent.iterdir() if p.name.startswith(".")]  # no temp file left
    hit = json.loads(runner.invoke(app, args).stdout)
    assert hit["artifacts"][0]["quantization"]["calibration_cache"]["hit"] is True
    assert not [w for w in hit["calibration"].get("warnings", []) if "unusable" in w]


def test_openvino_cache_entry_is_checked_against_its_digests(tmp_path):
    from cbam_deploy.backends.openvino.recipe import _ov_cache_problem, _store_ir

    source = tmp_path / "src.xml"
    source.write_text("<net/>")
    source.with_suffix(".bin").write_bytes(b"\1\2\3")
    cached = tmp_path / "cache" / "key.xml"
    cached.parent.mkdir()
    assert _ov_cache_problem(cached) == "absent"
    _store_ir(source, cached)
    assert _ov_cache_problem(cached) is None
    cached.with_suffix(".bin").write_bytes(b"\1\2")
    assert "does not match" in _ov_cache_problem(cached)
    _store_ir(source, cached)
    cached.with_suffix(".sha256.json").write_text("{garbage")
    assert "digest file is unreadable" in _ov_cache_problem(cached)


def test_arrays_are_recognised_by_content_not_name(tmp_path):
    from cbam_deploy.data import load_calibration
    from cbam_deploy.export_job import make_input_spec

    spec = make_input_spec(32)
    array = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "real.npy", array)
    np.savez(tmp_path / "real.npz", x=array)
    shutil.copyfile(tmp_path / "real.npy", tmp_path / "named.npz")  # .npy content, .npz name
    shutil.copyfile(tmp_path / "real.npz", tmp_path / "named.npy")  # and the other way round
    shutil.copyfile(tmp_path / "real.npy", tmp_path / "no_suffix")
    for name in ("named.npz", "named.npy", "no_suffix"):
        loaded = load_calibration(str(tmp_path / name), spec, size=4)
        assert loaded.inputs.shape == (4, 3, 32, 32) and loaded.kind == "arrays"
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CbamDeployError, match="neither a .npy header nor a zip"):
        load_calibration(str(tmp_path / "text.npz"), spec)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CbamDeployError, match="cannot read calibration array"):
        load_calibration(str(tmp_path / "broken.npz"), spec)


def test_library_refuses_what_the_cli_refuses():
    from cbam_deploy.backends.onnx.exporter import OnnxExportOptions
    from cbam_deploy.bench import bench_runners
    from cbam_deploy.export_job import ExportOptions
    from cbam_deploy.models import build_model

    with pytest.raises(CbamDeployError, match="num-classes"):
        ExportOptions(model="resnet10_half_cbam", num_classes=0)
    with pytest.raises(CbamDeployError, match="input-size"):
        ExportOptions(model="resnet10_half_cbam", stem="cifar", input_size=0)
    with pytest.raises(CbamDeployError, match="num_classes must be a positive integer"):
        build_model("resnet10_half_cbam", num_classes=0, stem="cifar")  # never silently 1000
    with pytest.raises(CbamDeployError, match="too large"):
        OnnxExportOptions(input_size=100_000).validate()
    with pytest.raises(CbamDeployError, match="--iters"):
        bench_runners({}, (3, 32, 32), [1], iters=0)
