"""A received bundle crafted by a hostile sender, against the real CLI: leftover staging folders whose
plan would act outside the bundle, companions and sidecars placed where the runtime reads something
other than what was checked, native files made to crash or hang their parser (an ncnn .param with a
cycle or 100,000 layers, values that are not numbers, a .pte that aborts ExecuTorch's loader), sidecars
and manifest records with values a runner takes as limits, and a factory swapped between its check and
its import. Beside every bundle lies a folder 'outside' with a marker that must stay untouched and
files that must never be read (their access time is checked, and a FIFO outside or inside blocks
whoever opens it). Each case ends in one line; the cases that could hang or crash run the CLI in a
child process with a timeout. Property-based tests (hypothesis) cover plans, sidecars, .param text
and manifest records."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbam_deploy.build import build_artifacts
from cbam_deploy.cli import app
from cbam_deploy.errors import CbamDeployError
from cbam_deploy.export_job import ExportOptions, export_bundle

pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAS_NCNN = all(importlib.util.find_spec(m) is not None for m in ("ncnn", "pnnx"))
HAS_EXECUTORCH = all(importlib.util.find_spec(m) is not None for m in ("executorch", "torchao"))
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_ncnn = pytest.mark.skipif(not HAS_NCNN, reason="the ncnn extra is not installed")
needs_executorch = pytest.mark.skipif(not HAS_EXECUTORCH, reason="the executorch extra is not installed")
CHILD_TIMEOUT_S = 240  # a child that hangs is killed here (a busy 2-core machine takes ~20 s to import torch)
OLD_ATIME = 1_000_000  # a file outside is made with this access time: any read moves it (relatime)


# ---------------------------------------------------------------- helpers

def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def child(*args, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, str, str]:
    """The real entry point in a child process, killed after ``timeout`` (a hang fails the test)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cbam_deploy", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{args[0]} hung (killed after {timeout} s): {err[-2000:]}") from None
    return proc.returncode, out, err


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def one_line(err: str, *words: str) -> str:
    """The one line a crafted input gets on stderr: no traceback, one non-empty line naming it."""
    assert "Traceback" not in err, err
    shown = [ln for ln in lines(err) if not _noise(ln)]
    assert len(shown) == 1, err
    for word in words:
        assert word in shown[0], (word, shown[0])
    return shown[0]


def _noise(line: str) -> bool:
    """Lines the libraries print on their own in a child process (torchao's optional kernels, torch's
    pytree notice, ExecuTorch's CPU probe), not the tool's."""
    return any(s in line for s in ("torchao", "_pytree", "cpuinfo_utils", "register_constant", "W1", "Failed to load /"))


def tree(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            out[str(path.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def artifact_of(manifest: dict, fmt: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["format"] == fmt)


def rehash(bundle: Path, relative: str) -> None:
    """Make the manifest's sha256 of ``relative`` match the file there (a crafted bundle's own)."""
    digest = sha(bundle / relative)

    def change(manifest):
        for artifact in manifest["artifacts"]:
            if artifact["path"] == relative:
                artifact["sha256"] = digest
            if relative in artifact.get("companion_files", {}):
                artifact["companion_files"][relative] = digest
    edit_manifest(bundle, change)


class Outside:
    """A folder beside the bundle: ``marker.txt`` must stay untouched; every file made with ``secret``
    must never be read (its access time is set far in the past, so any read moves it) or changed."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "outside"
        self.dir.mkdir()
        self.marker = self.dir / "marker.txt"
        self.marker.write_text("keep me")
        self.secrets: list[Path] = []
        probe = self.dir / ".atime-probe"
        probe.write_bytes(b"x")
        os.utime(probe, (OLD_ATIME, probe.stat().st_mtime))
        probe.read_bytes()
        self.atime_counts = probe.stat().st_atime != OLD_ATIME  # False on a noatime mount: reads go unseen
        probe.unlink()
        self.before: dict | None = None

    def secret(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        self.secrets.append(path)
        return path

    def seal(self) -> None:
        for path in self.secrets:
            os.utime(path, (OLD_ATIME, path.stat().st_mtime))
        self.before = tree(self.dir)

    def check(self) -> None:
        assert self.before is not None, "seal() the outside folder before the command runs"
        assert tree(self.dir) == self.before, "something outside the bundle was written, moved or deleted"
        assert self.marker.read_text() == "keep me"
        if self.atime_counts:
            assert [p.name for p in self.secrets if os.stat(p).st_atime != OLD_ATIME] == [], "a file outside was read"


class FifoWatch:
    """Whether anyone opens ``path`` (a FIFO) for reading: a FIFO can be opened for writing without
    blocking only while a reader holds it. A reader found is let go at once (it reads end of file), so
    a command that opened it fails the test instead of hanging it."""

    def __init__(self, path: Path) -> None:
        self.path, self.opened, self._stop = path, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads it; ENOENT: removed
                time.sleep(0.005)
                continue
            self.opened = True
            os.close(fd)

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crafted-onnx") / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=4, input_size=32,
                                output=str(out), parity=False))
    return out


@pytest.fixture(scope="module")
def edge_bundle(tmp_path_factory) -> Path:
    """resnet10_half_cbam (CIFAR stem, 4 classes, 32 px) with the fp32 artifacts of the formats whose
    companions or native files this file crafts: ncnn, ExecuTorch, OpenVINO (those installed)."""
    formats = [f for f, has in (("ncnn", HAS_NCNN), ("executorch", HAS_EXECUTORCH), ("openvino", HAS_OPENVINO)) if has]
    if not formats:
        pytest.skip("none of the ncnn, executorch and openvino extras is installed")
    out = tmp_path_factory.mktemp("crafted-edge") / "bundle"
    export_bundle(ExportOptions(model="resnet10_half_cbam", stem="cifar", num_classes=4, input_size=32,
                                output=str(out), parity=False))
    outcomes = build_artifacts(out, formats, "fp32")
    assert all(o.name and not o.skipped for o in outcomes), outcomes
    return out


@pytest.fixture
def world(onnx_bundle, tmp_path) -> dict:
    bundle = tmp_path / "bundle"
    shutil.copytree(onnx_bundle, bundle, symlinks=True)
    return {"root": tmp_path, "bundle": bundle, "outside": Outside(tmp_path)}


@pytest.fixture
def edge(edge_bundle, tmp_path) -> dict:
    bundle = tmp_path / "bundle"
    shutil.copytree(edge_bundle, bundle, symlinks=True)
    return {"root": tmp_path, "bundle": bundle, "outside": Outside(tmp_path),
            "manifest": json.loads((bundle / "manifest.json").read_text())}


# ---------------------------------------------------------------- 1. recovery is a local affair

def _staging(bundle: Path, plan=None, raw: bytes | None = None) -> Path:
    staging = bundle / ".staging-crafted"
    staging.mkdir()
    if raw is not None:
        (staging / "COMMIT").write_bytes(raw)
    elif plan is not None:
        (staging / "COMMIT").write_text(json.dumps(plan))
    return staging


def _linked_folder(w):
    """A sub-folder of the bundle that is a link to the folder outside; the plan moves a file in
    through it and removes the marker through it."""
    (w["bundle"] / "sub").symlink_to(w["outside"].dir, target_is_directory=True)
    staging = _staging(w["bundle"], {"files": ["sub/dropped.sh", "manifest.json"], "remove": ["sub/marker.txt"]})
    (staging / "sub").mkdir()
    (staging / "sub" / "dropped.sh").write_text("echo owned\n")


def _linked_commit(w):
    """COMMIT is a link to a plan outside (which would remove the bundle's ONNX)."""
    plan = w["outside"].secret("plan.json", json.dumps({"files": ["manifest.json"], "remove": ["model.onnx"]}).encode())
    staging = _staging(w["bundle"])
    (staging / "COMMIT").symlink_to(plan)


def _staged_link(w):
    """A staged file that is a link to a file outside: moving it in would put the link in the bundle."""
    secret = w["outside"].secret("weights.onnx", b"outside weights")
    staging = _staging(w["bundle"], {"files": ["model.onnx", "manifest.json"], "remove": []})
    (staging / "model.onnx").symlink_to(secret)


def _replaces_folder(w):
    (w["bundle"] / "data").mkdir()
    staging = _staging(w["bundle"], {"files": ["data", "manifest.json"], "remove": []})
    (staging / "data").write_text("x")


def _owner_link(w):
    """No plan, and an owner record that is a link to a file outside: never opened, the folder discarded."""
    secret = w["outside"].secret("owner", b"")
    (_staging(w["bundle"]) / ".owner").symlink_to(secret)


RECOVERY_CASES = {
    # id: (make the leftover, words of the warning line; None: discarded without a word, nothing to apply)
    "linked-folder": (_linked_folder, "names 'sub/dropped.sh', not a plain file name"),
    "linked-commit": (_linked_commit, "its COMMIT is a symbolic link"),
    "staged-link": (_staged_link, "'model.onnx' in it is a symbolic link"),
    "replaces-folder": (_replaces_folder, "would replace or remove the folder 'data'"),
    "owner-link": (_owner_link, None),
    "no-files": (lambda w: _staging(w["bundle"], {"remove": ["model.onnx"]}), "lists 'files' and 'remove'"),
    "files-not-a-list": (lambda w: _staging(w["bundle"], {"files": "manifest.json", "remove": []}),
                         "lists 'files' and 'remove'"),
    "remove-not-a-list": (lambda w: _staging(w["bundle"], {"files": ["manifest.json"], "remove": 5}),
                          "lists 'files' and 'remove'"),
    "parent-path": (lambda w: _staging(w["bundle"], {"files": ["manifest.json"], "remove": ["../outside/marker.txt"]}),
                    "not a plain file name"),
    "absolute-path": (lambda w: _staging(w["bundle"], {"files": ["manifest.json"],
                                                       "remove": [str(w["outside"].marker)]}), "not a plain file name"),
    "hidden-name": (lambda w: _staging(w["bundle"], {"files": ["manifest.json"], "remove": [".lock"]}),
                    "not a plain file name"),
    "not-a-string": (lambda w: _staging(w["bundle"], {"files": [7, "manifest.json"], "remove": []}),
                     "not a plain file name"),
    "manifest-not-last": (lambda w: _staging(w["bundle"], {"files": ["manifest.json", "model.onnx"], "remove": []}),
                          "does not move manifest.json in last"),
    "removes-manifest": (lambda w: _staging(w["bundle"], {"files": ["manifest.json"], "remove": ["manifest.json"]}),
                         "does not move manifest.json in last"),
    "not-json": (lambda w: _staging(w["bundle"], raw=b"\xff\xfe{not json"), "is not a JSON plan"),
    "nested-100000": (lambda w: _staging(w["bundle"], raw=b"[" * 100_000), "is not a JSON plan"),
    "huge": (lambda w: _staging(w["bundle"], raw=b" " * (2 << 20) + b"{}"), "larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", list(RECOVERY_CASES))
def test_a_crafted_leftover_is_discarded_and_nothing_outside_is_touched(world, case):
    """The next command that opens the bundle (``info``, then ``verify``) discards the staging folder:
    one warning line, the committed bundle intact, nothing outside written, removed or read."""
    make, words = RECOVERY_CASES[case]
    bundle, outside = world["bundle"], world["outside"]
    make(world)
    outside.seal()
    inside = {p.name: sha(p) for p in bundle.iterdir() if p.is_file() and not p.is_symlink()}
    code, out, err = cli("info", bundle)
    assert code == 0, (out, err)  # the committed bundle, intact
    if words is None:
        assert lines(err) == [], err
    else:
        one_line(err, "warning:", "discarded the staging folder .staging-crafted", words, "nothing in it was applied")
    assert not (bundle / ".staging-crafted").exists()
    assert {p.name: sha(p) for p in bundle.iterdir() if p.is_file() and not p.is_symlink()} == inside
    assert not (outside.dir / "dropped.sh").exists()
    outside.check()
    code, _, err = cli("info", bundle)  # and it is gone: the next command says nothing
    assert code == 0 and lines(err) == [], err


def test_fifos_left_in_a_bundle_are_never_opened(world):
    """A staging folder whose COMMIT is a FIFO, another whose owner record is a FIFO, and a temporary
    file that is a FIFO: ``info`` (a child process, so that a hang fails the test) finishes, the first
    discarded with one warning line, all removed, none of the FIFOs opened."""
    bundle = world["bundle"]
    commit = _staging(bundle)
    os.mkfifo(commit / "COMMIT")
    owner = bundle / ".staging-owned"
    owner.mkdir()
    os.mkfifo(owner / ".owner")
    os.mkfifo(bundle / ".model.onnx.abc123.tmp")
    fifos = [commit / "COMMIT", owner / ".owner", bundle / ".model.onnx.abc123.tmp"]
    world["outside"].seal()
    watches = [FifoWatch(f) for f in fifos]
    for watch in watches:
        watch.__enter__()
    try:
        code, out, err = child("info", bundle)
    finally:
        for watch in watches:
            watch.__exit__()
    assert code == 0, err
    one_line(err, "warning:", ".staging-crafted", "its COMMIT is not a regular file")
    assert [w.path.name for w in watches if w.opened] == []
    assert not any(os.path.lexists(f) for f in fifos) and not owner.exists()
    world["outside"].check()


def test_a_plan_this_tool_wrote_still_rolls_forward(world):
    """The rules refuse only what this tool never writes: a plan of plain names (a commit killed after
    its commit point) is applied, the staged manifest moved in last."""
    bundle = world["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["labels"] = ["a", "b", "c", "d"]
    staging = _staging(bundle, {"files": ["manifest.json"], "remove": []})
    (staging / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli("info", bundle, "--json")
    assert code == 0 and lines(err) == [], err
    assert json.loads((bundle / "manifest.json").read_text())["labels"] == ["a", "b", "c", "d"]
    assert not staging.exists()


# ---------------------------------------------------------------- 2. companions checked where they are read

def _move_to_sub(edge: dict, fmt: str) -> dict:
    """Move the artifact's file into ``sub/`` (its companions recorded at the bundle's root, where the
    runtime does not read them) and return its record."""
    bundle = edge["bundle"]
    record = artifact_of(edge["manifest"], fmt)
    (bundle / "sub").mkdir(exist_ok=True)
    shutil.move(bundle / record["path"], bundle / "sub" / record["path"])

    def change(manifest):
        artifact_of(manifest, fmt)["path"] = "sub/" + record["path"]
    edit_manifest(bundle, change)
    return record


COMPANION_FORMATS = [pytest.param("ncnn", marks=needs_ncnn), pytest.param("executorch", marks=needs_executorch),
                     pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="no OpenVINO"))]


@pytest.mark.parametrize("fmt", COMPANION_FORMATS)
@pytest.mark.parametrize("how", ["link-outside", "plain-unrecorded", "missing"])
def test_a_companion_is_checked_where_the_runtime_reads_it(edge, fmt, how):
    """The artifact at ``sub/model.<x>``; the manifest records its companion (the ncnn or OpenVINO
    .bin, the ExecuTorch sidecar) at the bundle's root, which matches its sha256, while the runtime
    reads ``sub/<companion>``: a link to a file outside, a file nobody checked, or nothing. ``verify``
    and ``serve`` refuse in one line, ``info`` says unsafe (exit 3); nothing outside is read."""
    bundle, outside = edge["bundle"], edge["outside"]
    record = _move_to_sub(edge, fmt)
    (companion,) = record["companion_files"]
    if how == "link-outside":
        secret = outside.secret("outside-" + companion, (bundle / companion).read_bytes() + b"\0")
        (bundle / "sub" / companion).symlink_to(secret)
        words = f"its file refers to '{companion}', which the manifest does not record"
    elif how == "plain-unrecorded":
        shutil.copyfile(bundle / companion, bundle / "sub" / companion)
        words = f"its file refers to '{companion}', which the manifest does not record"
    else:
        words = f"the manifest records its companion '{companion}', which is not one its runtime reads"
    outside.seal()
    code, out, err = cli("verify", bundle, "--artifact", record["name"])
    assert code == 2, (out, err)
    one_line(err, f"artifact {record['name']}", words)
    code, out, err = cli("info", bundle)
    assert code == 3 and "unsafe" in out, (out, err)
    one_line(err, f"{record['name']} (unsafe)")

    from cbam_deploy.serve.app import ServeConfig
    from cbam_deploy.serve.service import Metrics, load_repository

    with pytest.raises(CbamDeployError, match="which"):
        load_repository(ServeConfig(str(bundle), artifact=record["name"]), Metrics())
    outside.check()


@needs_executorch
def test_a_sidecar_that_is_a_fifo_is_never_opened(edge):
    """The ExecuTorch sidecar beside the artifact is a FIFO (the manifest records one at the root):
    ``verify`` in a child process refuses it in one line without opening it."""
    bundle = edge["bundle"]
    record = _move_to_sub(edge, "executorch")
    (companion,) = record["companion_files"]
    os.mkfifo(bundle / "sub" / companion)
    edge["outside"].seal()
    with FifoWatch(bundle / "sub" / companion) as watch:
        code, out, err = child("verify", bundle, "--artifact", record["name"])
    assert code == 2, err
    one_line(err, f"its file refers to '{companion}', which the manifest does not record")
    assert not watch.opened
    edge["outside"].check()


# ---------------------------------------------------------------- 3. crafted native files

def _param(edge: dict) -> tuple[Path, list[str]]:
    record = artifact_of(edge["manifest"], "ncnn")
    path = edge["bundle"] / record["path"]
    return path, path.read_text().splitlines()


def _write_param(edge: dict, text_lines: list[str]) -> str:
    record = artifact_of(edge["manifest"], "ncnn")
    (edge["bundle"] / record["path"]).write_text("\n".join(text_lines) + "\n")
    rehash(edge["bundle"], record["path"])
    return record["name"]


def _first(text_lines: list[str], kind: str) -> int:
    return next(i for i, ln in enumerate(text_lines) if ln.split()[0] == kind)


def _set_param(line: str, key: str, value: str) -> str:
    tokens = [t for t in line.split() if not t.startswith(f"{key}=")]
    return " ".join(tokens + [f"{key}={value}"])


def _make_twice(text_lines: list[str], i: int) -> None:
    """The layer after line ``i`` makes, as its first output, the blob line ``i`` made."""
    made, after = text_lines[i].split(), text_lines[i + 1].split()
    after[4 + int(after[2])] = made[4 + int(made[2])]
    text_lines[i + 1] = " ".join(after)


PARAM_VALUES = {
    # id: (change the text's lines, words of the one line)
    "abc": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "0", "abc")), "'abc' is not a number"),
    "inf": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", "inf")), "'inf' is not a number"),
    "nan": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", "nan")), "'nan' is not a number"),
    "1e999": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "3", "1e999")), "outside the range of a float"),
    "2^40": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", str(1 << 40))), "range of a 32-bit integer"),
    "negative-weights": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", "-864")), "declares -864 values"),
    "more-weights": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", "100000000")), "truncated"),
    "param-id-99": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "99", "1")), "parameter id 99 is outside"),
    "array-count": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "-23303", "5,1,2")), "does not hold the number"),
    "name-300": (lambda ls, i: ls.__setitem__(i, ls[i].replace("convrelu_0", "x" * 300, 1)), "a name of 300 characters"),
    "blob-made-twice": (lambda ls, i: _make_twice(ls, i), "is made twice"),
    "fewer-layers": (lambda ls, i: ls.__delitem__(i), "layers where its header says"),
    "header-blobs": (lambda ls, i: ls.__setitem__(1, f"{ls[1].split()[0]} 7"), "blobs where its header says"),
    "counts-not-numbers": (lambda ls, i: ls.__setitem__(1, "many blobs"), "not an ncnn .param file"),
    # quoted shape expressions: ncnn pops an empty stack on the first (a segfault) and traps on the second
    "expression-no-operands": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", '"+"')), "lacks its operands"),
    "expression-int-min-by-minus-1": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", '"//(*(32768,65536),-1)"')),
                                      "can divide the smallest integer by -1"),
    "expression-where-a-number-is-read": (lambda ls, i: ls.__setitem__(i, _set_param(ls[i], "6", '"864"')),
                                          "where a number is read"),
}


@needs_ncnn
@pytest.mark.parametrize("case", list(PARAM_VALUES))
def test_a_param_with_values_ncnn_would_misread_is_one_line(edge, case):
    change, words = PARAM_VALUES[case]
    path, text = _param(edge)
    change(text, _first(text, "Convolution"))
    name = _write_param(edge, text)
    edge["outside"].seal()
    code, out, err = cli("verify", edge["bundle"], "--artifact", name)
    assert code == 2, (out, err)
    one_line(err, words)
    edge["outside"].check()


def _cycle(text: list[str]) -> list[str]:
    """The first convolution reads the output of the last layer (through the Split after it): a cycle
    ncnn would walk for ever."""
    first = _first(text, "Convolution")
    tokens = text[first].split()
    last_out = text[-1].split()[4 + int(text[-1].split()[2])]
    tokens[4] = last_out
    text[first] = " ".join(tokens)
    return text


def _many_layers(text: list[str], count: int = 100_000) -> list[str]:
    layers, blobs = (int(v) for v in text[1].split())
    source = text[2].split()[4]
    chain = [f"Noop n{i} 1 1 {source if i == 0 else f'nb{i - 1}'} nb{i}" for i in range(count)]
    first = _first(text, "Convolution")
    text[first] = text[first].replace(f" {source} ", f" nb{count - 1} ", 1)
    return [text[0], f"{layers + count} {blobs + count}", text[2], *chain, *text[3:]]


def _inplace_after_input(text: list[str]) -> list[str]:
    """A Noop and an identity ReLU (slope 1; both in-place layers) read the input first: ncnn in light
    mode freed, then wrote, an input it did not own (a segfault before the runner gave ncnn its own copy)."""
    layers, blobs = (int(v) for v in text[1].split())
    source = text[2].split()[4]
    first = _first(text, "Convolution")
    text[first] = text[first].replace(f" {source} ", " relu_in ", 1)
    return [text[0], f"{layers + 2} {blobs + 2}", text[2], f"Noop noop_in 1 1 {source} noop_out",
            "ReLU relu_in 1 1 noop_out relu_in 0=1.0", *text[3:]]


@needs_ncnn
@pytest.mark.parametrize("case", ["cycle", "100000-layers", "in-place-after-input"])
def test_a_param_that_hung_or_crashed_ncnn_ends_in_one_line(edge, case):
    """Run in a child process (a hang or a crash fails the test, never the suite): a cycle and 100,000
    layers are refused in one line before ncnn sees them; in-place layers reading the input run (ncnn
    is handed an input it owns) and verify passes."""
    path, text = _param(edge)
    text = {"cycle": _cycle, "100000-layers": _many_layers, "in-place-after-input": _inplace_after_input}[case](text)
    name = _write_param(edge, text)
    edge["outside"].seal()
    code, out, err = child("verify", edge["bundle"], "--artifact", name)
    if case == "in-place-after-input":
        assert code == 0, err
    else:
        assert code == 2, err
        one_line(err, {"cycle": "before any layer makes it (a cycle", "100000-layers": "reads at most 10000 layers"}[case])
    edge["outside"].check()


@needs_executorch
@pytest.mark.parametrize("case", ["random-bytes", "garbage-after-header"])
def test_a_pte_that_aborts_executorch_is_one_line(edge, case):
    """A .pte whose sha256 matches the manifest but whose bytes are garbage: random bytes made
    ExecuTorch's loader abort the process (SIGABRT from a pybind11 error while it logged the file's
    identifier). ``verify`` in a child process: exit 2, one line."""
    bundle = edge["bundle"]
    record = artifact_of(edge["manifest"], "executorch")
    path = bundle / record["path"]
    data = path.read_bytes()
    if case == "random-bytes":
        path.write_bytes(os.urandom(4096))
        words = "not an ExecuTorch program"
    else:
        path.write_bytes(data[:40] + os.urandom(4096) + data[40 + 4096:])
        words = "ExecuTorch cannot load"
    rehash(bundle, record["path"])
    edge["outside"].seal()
    code, out, err = child("verify", bundle, "--artifact", record["name"])
    assert code == 2, err
    one_line(err, words)
    edge["outside"].check()


def test_an_onnx_with_a_cycle_is_one_line(world):
    """ONNX (protobuf, checked by onnxruntime's graph resolver): a node fed by its own output."""
    import onnx

    bundle = world["bundle"]
    proto = onnx.load(str(bundle / "model.onnx"))
    node = proto.graph.node[1]
    node.input[0] = proto.graph.node[3].output[0]
    onnx.save(proto, str(bundle / "model.onnx"))
    rehash(bundle, "model.onnx")
    world["outside"].seal()
    code, out, err = cli("verify", bundle)
    assert code == 2, (out, err)
    one_line(err)
    world["outside"].check()


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO is not installed")
@pytest.mark.parametrize("case", ["entities", "nested-1000000"])
def test_an_openvino_xml_crafted_to_exhaust_its_parser_is_one_line(edge, case):
    """OpenVINO's .xml through its own parser (which expands no entities and nests without recursion):
    an entity bomb and 10^6 nested elements end in one line."""
    bundle = edge["bundle"]
    record = artifact_of(edge["manifest"], "openvino")
    if case == "entities":
        entities = "".join(f'<!ENTITY e{i} "{"&e%d;" % (i - 1) * 10 if i else "x" * 40}">' for i in range(10))
        text = f'<?xml version="1.0"?><!DOCTYPE n [{entities}]><net name="&e9;" version="11"><layers/><edges/></net>'
    else:
        text = '<?xml version="1.0"?><net name="x" version="11"><layers>' + "<a>" * 10**6 + "</a>" * 10**6 + "</layers></net>"
    (bundle / record["path"]).write_text(text)
    rehash(bundle, record["path"])
    code, out, err = cli("verify", bundle, "--artifact", record["name"])
    assert code == 2, (out, err)
    one_line(err)


# ---------------------------------------------------------------- 4. sidecars and manifest records

def _bounds(**change) -> dict:
    return {**{"batch": [1, 8], "height": [32, 32], "width": [32, 32], "channels": 3}, **change}


SIDECARS = {
    # id: the sidecar's bytes (the rest of the record kept), words of the one line
    "nested-100000": (lambda record: b"[" * 100_000 + b"]" * 100_000, "nested deeper than 16 levels"),
    "huge": (lambda record: b" " * (2 << 20) + json.dumps(record).encode(), "larger than"),
    "channels-1e999": (lambda record: json.dumps({**record, "bounds": _bounds()}).replace(
        '"channels": 3', '"channels": 1e999').encode(), "not finite"),
    "nan": (lambda record: json.dumps({**record, "bounds": _bounds(batch=[1, float("nan")])}).encode(), "not finite"),
    "bounds-a-string": (lambda record: json.dumps({**record, "bounds": "1..8"}).encode(), "bounds must be an object"),
    "batch-3-items": (lambda record: json.dumps({**record, "bounds": _bounds(batch=[1, 4, 8])}).encode(),
                      "bounds.batch must be a [min, max] pair"),
    "batch-negative": (lambda record: json.dumps({**record, "bounds": _bounds(batch=[-4, 8])}).encode(),
                       "bounds.batch must be a [min, max] pair"),
    "min-over-max": (lambda record: json.dumps({**record, "bounds": _bounds(height=[64, 32])}).encode(),
                     "bounds.height must be"),
    "batch-10^9": (lambda record: json.dumps({**record, "bounds": _bounds(batch=[1, 10**9])}).encode(),
                   "max <= 1024"),
    "outputs-not-names": (lambda record: json.dumps({**record, "outputs": [1, 2]}).encode(), "outputs must be a list"),
    "not-an-object": (lambda record: b"[1, 2, 3]", "not a JSON object"),
    "not-utf8": (lambda record: b"\xff\xfe\x00", "not UTF-8"),
}


@needs_executorch
@pytest.mark.parametrize("case", list(SIDECARS))
def test_a_crafted_sidecar_is_one_line(edge, case):
    """The ExecuTorch sidecar, its sha256 matching the manifest: refused in one line before the
    runner takes any of its numbers (the bounds it checks every input against, its output names)."""
    make, words = SIDECARS[case]
    bundle = edge["bundle"]
    record = artifact_of(edge["manifest"], "executorch")
    (companion,) = record["companion_files"]
    side = bundle / companion
    side.write_bytes(make(json.loads(side.read_text())))
    rehash(bundle, companion)
    edge["outside"].seal()
    code, out, err = cli("verify", bundle, "--artifact", record["name"])
    assert code == 2, (out, err)
    one_line(err, f"its sidecar {companion} is damaged", words)
    edge["outside"].check()


def _set_export_bounds(manifest: dict, value) -> None:
    manifest["artifacts"][0].setdefault("export", {})["bounds"] = value


MANIFEST_RECORDS = {
    # id: (change, the field the one line names)
    "bounds-batch-a-string": (lambda m: _set_export_bounds(m, _bounds(batch="b")), "artifacts[0].export.bounds.batch"),
    "bounds-batch-one-item": (lambda m: _set_export_bounds(m, _bounds(batch=[8])), "artifacts[0].export.bounds.batch"),
    "bounds-batch-inf": (lambda m: _set_export_bounds(m, _bounds(batch=[1, float("inf")])),
                         "artifacts[0].export.bounds.batch"),
    "bounds-a-string": (lambda m: _set_export_bounds(m, "1..8"), "artifacts[0].export.bounds must be an object"),
    "bounds-channels-0": (lambda m: _set_export_bounds(m, _bounds(channels=0)), "artifacts[0].export.bounds.channels"),
    "profile-out-of-order": (lambda m: m["artifacts"][0].setdefault("export", {}).update(
        profile={"min_batch": 8, "opt_batch": 1, "max_batch": 4}), "artifacts[0].export.profile"),
    "num-classes-10^10": (lambda m: m["model"].update(num_classes=10**10), "model.num_classes"),
    "input-height-10^9": (lambda m: m["input"]["shape"].__setitem__(2, 10**9), "input.shape[2]"),
    "input-channels-10^6": (lambda m: m["input"]["shape"].__setitem__(1, 10**6), "input.shape[1]"),
    "center-crop-10^6": (lambda m: m["input"]["preprocess"].update(center_crop=10**6), "input.preprocess.center_crop"),
    "output-dim-2^40": (lambda m: m["outputs"][0]["shape"].__setitem__(-1, 1 << 40), "outputs[0].shape[1]"),
    "output-name-repeated": (lambda m: m["outputs"].append(dict(m["outputs"][0])), "outputs[1].name"),
    "input-name-10^5": (lambda m: m["input"].update(name="x" * 100_000), "input.name"),
}


@pytest.mark.parametrize("case", list(MANIFEST_RECORDS))
def test_a_manifest_record_a_runner_or_serve_takes_is_checked_by_the_schema(world, case):
    """Values a runner or ``serve`` takes as limits or sizes: one line naming the field, from ``info``
    and ``serve`` alike (never a traceback in serve, an allocator error in verify)."""
    change, field = MANIFEST_RECORDS[case]
    bundle = world["bundle"]
    edit_manifest(bundle, change)
    world["outside"].seal()
    code, out, err = cli("info", bundle)
    assert code == 2, (out, err)
    one_line(err, field, "must be")

    from cbam_deploy.serve.app import ServeConfig
    from cbam_deploy.serve.service import Metrics, load_repository

    with pytest.raises(CbamDeployError, match="must be"):
        load_repository(ServeConfig(str(bundle)), Metrics())
    world["outside"].check()


# ---------------------------------------------------------------- 5. a factory's hash, on the bytes imported

GOOD_FACTORY = ("from cbam_deploy.models import create_model\n\n\n"
                "def make(num_classes=4):\n"
                "    return create_model('resnet10_half_cbam', num_classes=4, stem='cifar')\n")


def _evil(marker: Path) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" + GOOD_FACTORY


@pytest.fixture(scope="module")
def factory_bundle(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("swap")
    factory = root / "net.py"
    factory.write_text(GOOD_FACTORY)
    bundle = root / "bundle"
    export_bundle(ExportOptions(model=f"{factory}:make", input_size=32, output=str(bundle), parity=False))
    return {"root": root, "bundle": bundle, "factory": factory}


def test_a_factory_swapped_after_its_check_never_runs(factory_bundle, monkeypatch):
    """The file is replaced right after its sha256 was checked (the moment the check and the import
    used to be apart): every check before the import sees the recorded code, the import gets the other;
    it hashes the bytes it compiles, so the other code never runs."""
    import cbam_deploy.models.custom as custom

    factory, marker = factory_bundle["factory"], factory_bundle["root"] / "swapped-code-ran"
    recorded = json.loads((factory_bundle["bundle"] / "manifest.json").read_text())["model"]["factory_sha256"]

    def checked_then_swapped(spec: str) -> str:
        assert sha(Path(spec.rpartition(":")[0])) == recorded or marker.name in Path(spec.rpartition(":")[0]).read_text()
        factory.write_text(_evil(marker))
        return recorded  # what the check saw

    monkeypatch.setattr(custom, "factory_sha256", checked_then_swapped)
    try:
        code, out, err = cli("verify", factory_bundle["bundle"], "--model", f"{factory}:make")
        assert not marker.exists()
        assert code == 2, (out, err)
        one_line(err, "its sha256 differs from the one recorded", "was not run")
    finally:
        factory.write_text(GOOD_FACTORY)


def test_a_factory_flipping_during_imports_only_ever_runs_the_checked_code(factory_bundle):
    """A thread flips the file between the recorded code and other code while it is imported again and
    again: each import either builds the model from the recorded code or is refused in one line."""
    from cbam_deploy.models import build_model

    factory, marker = factory_bundle["factory"], factory_bundle["root"] / "flipped-code-ran"
    recorded = json.loads((factory_bundle["bundle"] / "manifest.json").read_text())["model"]["factory_sha256"]
    evil, stop = _evil(marker), threading.Event()

    def flip():
        while not stop.is_set():
            for text in (evil, GOOD_FACTORY):
                tmp = factory.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, factory)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    outcomes = []
    try:
        for _ in range(12):
            try:
                build_model(f"{factory}:make", None, 4, "cifar", None, factory_sha256=recorded)
                outcomes.append("built")
            except CbamDeployError as exc:
                assert "\n" not in str(exc) and "sha256 differs" in str(exc)
                outcomes.append("refused")
    finally:
        stop.set()
        flipper.join()
        factory.write_text(GOOD_FACTORY)
    assert not marker.exists(), outcomes


# ---------------------------------------------------------------- 6. property-based: plans, sidecars, .param, manifests

NAMES = st.one_of(
    st.sampled_from(["manifest.json", "model.onnx", "x.bin", "../x", "../../outside/marker.txt", "sub/x", "/etc/passwd",
                     ".lock", ".staging-x", ".", "..", "", "a\\b", "a\0b", "COMMIT", "x" * 300]),
    st.text(max_size=12), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)
PLANS = st.one_of(
    st.fixed_dictionaries({"files": st.lists(NAMES, max_size=5), "remove": st.lists(NAMES, max_size=5)}),
    st.dictionaries(st.sampled_from(["files", "remove", "extra"]), st.one_of(st.lists(NAMES, max_size=4), JSON),
                    max_size=3),
    JSON)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=PLANS, staged=st.lists(st.sampled_from(["manifest.json", "model.onnx", "x.bin", "sub"]), max_size=3,
                                   unique=True),
       linked=st.booleans())
def test_property_no_plan_acts_outside_the_bundle(tmp_path_factory, plan, staged, linked):
    """Any plan, any staged files (a folder among them), a sub-folder of the bundle that may be a link
    to the outside folder: ``recover`` never raises, leaves no staging folder, and writes, removes or
    reads nothing outside; inside, only plain names directly in the bundle change."""
    from cbam_deploy.transaction import plain_name, recover

    root = tmp_path_factory.mktemp("plan")
    bundle, outside = root / "bundle", Outside(root)
    bundle.mkdir()
    for name in ("manifest.json", "model.onnx", "keep.txt"):
        (bundle / name).write_text(name)
    outside.secret("x.bin", b"outside")
    if linked:
        (bundle / "sub").symlink_to(outside.dir, target_is_directory=True)
    staging = bundle / ".staging-p"
    staging.mkdir()
    (staging / "COMMIT").write_text(json.dumps(plan))
    for name in staged:
        (staging / name).mkdir() if name == "sub" else (staging / name).write_text("new " + name)
    outside.seal()
    recover(bundle)
    assert not staging.exists()
    outside.check()
    changed = {p.name for p in bundle.iterdir()} ^ {"manifest.json", "model.onnx", "keep.txt", *(["sub"] if linked else [])}
    assert all(plain_name(n) for n in changed)


SIDECAR_VALUES = st.one_of(JSON, st.floats(), st.integers(min_value=-2**40, max_value=2**40),
                           st.lists(st.integers(min_value=-5, max_value=2000), max_size=4))


@settings(max_examples=150, deadline=None, database=None)
@given(field=st.sampled_from(["bounds", "bounds.batch", "bounds.height", "bounds.width", "bounds.channels", "outputs",
                              "bounds.batch.0", "bounds.batch.1", "outputs.0", "partitions"]),
       value=SIDECAR_VALUES, drop=st.booleans())
def test_property_a_sidecar_is_well_formed_or_one_line(tmp_path_factory, field, value, drop):
    """A sidecar with one field set to anything (or dropped): ``read_sidecar`` gives one line, or a
    record whose bounds hold 1 <= min <= max and whose outputs are names."""
    from cbam_deploy.backends.executorch.runner import read_sidecar

    record = {"bounds": _bounds(), "outputs": ["logits"], "partitions": 1}
    *parents, last = field.split(".")
    holder = record
    for key in parents:
        holder = holder[key] if isinstance(holder, dict) else holder[int(key)]
    if isinstance(holder, list):
        holder[int(last)] = value
    elif drop:
        holder.pop(last, None)
    else:
        holder[last] = value
    pte = tmp_path_factory.mktemp("sidecar") / "m.pte"
    pte.write_bytes(b"")
    Path(str(pte) + ".json").write_text(json.dumps(record))
    try:
        read = read_sidecar(pte)
    except CbamDeployError as exc:
        assert "\n" not in str(exc) and "sidecar" in str(exc)
        return
    for key in ("batch", "height", "width"):
        low, high = read["bounds"][key]
        assert type(low) is int and type(high) is int and 1 <= low <= high
    assert read["outputs"] and all(isinstance(n, str) and n for n in read["outputs"])


PARAM_TEXT = """7767517
6 7
Input in0 0 1 in0 0=8 1=8 2=3
Convolution conv0 1 1 in0 c0 0=4 1=3 4=1 5=1 6=108
Split split0 1 2 c0 s0 s1
Reduction red0 1 1 s0 r0 0=3 1=0 -23303=2,1,2 4=1 5=1
Sigmoid sig0 1 1 r0 g0
BinaryOp mul0 2 1 s1 g0 out0 0=2
"""
TOKENS = st.one_of(st.sampled_from(["0", "1", "-1", "abc", "inf", "nan", "1e999", "3.5", "2147483648", "-23303=2,1,2",
                                    "6=-4", "99=1", "0=", "=", "in0", "c0", "s0", "out0", "x" * 300, "7767517",
                                    '6="+"', '6="//(*(32768,65536),-1)"', '0="1,1,//(16,0n),0n"', '6="9w"',
                                    '4="0w"', '-23303=2,1.5,x']),
                   st.text(alphabet="0123456789-=,.eabcx", max_size=8))


@settings(max_examples=200, deadline=None, database=None)
@given(edits=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 12), TOKENS, st.sampled_from(["set", "insert",
                                                                                                 "drop", "dup"])),
                      max_size=4), tail=st.binary(max_size=64))
def test_property_a_param_is_checked_before_any_walk(edits, tail):
    """A small .param changed token by token: ``NcnnParam.parse`` gives one line, or a graph whose
    every blob is made once and before it is read, whose values are finite numbers in range, and whose
    weight walk over any .bin ends in one line or an exact read."""
    from cbam_deploy.backends.ncnn.exporter import MAX_LAYERS, NcnnParam, walk_bin
    from cbam_deploy.backends.ncnn.gates import ncnn_gates

    text = [ln.split() for ln in PARAM_TEXT.splitlines()]
    for row, column, token, how in edits:
        line = text[row % len(text)]
        if how == "set" and line:
            line[column % len(line)] = token
        elif how == "insert":
            line.insert(column % (len(line) + 1), token)
        elif how == "drop" and line:
            line.pop(column % len(line))
        elif how == "dup":
            text.insert(row % len(text), list(line))
    try:
        param = NcnnParam.parse("\n".join(" ".join(t) for t in text), "crafted.param")
    except CbamDeployError as exc:
        assert "\n" not in str(exc)
        return
    assert len(param.layers) <= MAX_LAYERS
    made = set()
    for layer in param.layers:
        assert all(b in made for b in layer.inputs)
        assert not made & set(layer.outputs)
        made |= set(layer.outputs)
        for key in range(10):
            try:
                layer.int(key)
            except CbamDeployError as exc:
                assert "\n" not in str(exc)
    ncnn_gates(param.layers)  # the gate finder reads the same layers: never a traceback
    try:
        arrays = walk_bin(param, tail)
    except CbamDeployError as exc:
        assert "\n" not in str(exc)
        return
    assert all(a.size >= 0 and a.offset + a.nbytes <= len(tail) for a in arrays)


MANIFEST_FIELDS = ["model.num_classes", "model.name", "input.name", "input.shape", "input.shape.0", "input.shape.1",
                   "input.shape.2", "input.preprocess.center_crop", "input.preprocess.resize_shorter",
                   "input.preprocess.mean", "outputs.0.name", "outputs.0.shape", "outputs.0.shape.1", "labels",
                   "artifacts.0.export.bounds", "artifacts.0.export.bounds.batch", "artifacts.0.export.bounds.channels",
                   "artifacts.0.export.profile", "artifacts.0.size_bytes", "artifacts.0.companion_files"]


@pytest.fixture(scope="module")
def a_manifest(onnx_bundle) -> dict:
    return json.loads((onnx_bundle / "manifest.json").read_text())


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(MANIFEST_FIELDS), value=st.one_of(SIDECAR_VALUES, st.text(max_size=5)))
def test_property_a_manifest_record_is_valid_or_one_line(a_manifest, field, value):
    """A manifest with one record set to anything: ``validate_manifest`` gives one line naming a field,
    or the typed views and the limits serve takes from it (the batch bound, the fixed batch, the
    classes, the input side) are whole, positive numbers."""
    import copy

    from cbam_deploy.bundle import Bundle
    from cbam_deploy.manifest import validate_manifest

    manifest = copy.deepcopy(a_manifest)
    manifest["artifacts"][0].setdefault("export", {})
    *parents, last = field.split(".")
    holder = manifest
    for key in parents:
        holder = holder[int(key)] if isinstance(holder, list) else holder.setdefault(key, {})
    if isinstance(holder, list):
        holder[int(last) % len(holder)] = value
    else:
        holder[last] = value
    try:
        validate_manifest(manifest)
    except CbamDeployError as exc:
        assert "\n" not in str(exc)
        return
    bundle = Bundle(manifest)
    assert bundle.input.channels >= 1 and bundle.input.side >= 1
    assert bundle.fixed_batch is None or 1 <= bundle.fixed_batch <= 1024
    assert bundle.model.num_classes is None or 1 <= bundle.model.num_classes <= 100_000
    assert all(o.name for o in bundle.outputs) and len({o.name for o in bundle.outputs}) == len(bundle.outputs)
    bounds = (bundle.artifacts[0].export or {}).get("bounds")
    if bounds is not None:
        assert 1 <= int(bounds["batch"][0]) <= int(bounds["batch"][1]) <= 1024
