"""Bundle transactions: a bundle is always the old valid one or the new valid one, never a mix.

Every change to a bundle (export, quantize, build, verify's results) goes through ``BundleUpdate``:

1. **Stage.** New files are written into a private staging folder inside the bundle
   (``.staging-XXXX/``), owned by the writing process through an ``flock`` on ``.staging-XXXX/.owner``.
   Slow work (export, parity, calibration) happens here, with no lock on the bundle, so readers and
   other writers are never blocked by it.
2. **Commit**, under the bundle's exclusive lock (``flock`` on ``.lock``): re-read the *current*
   manifest, apply the caller's change to it (a merge, so two commands that overlap both keep their
   results), write the new manifest into the staging folder, then write ``COMMIT`` (the list of files
   to move in, the manifest last, and the files the new manifest no longer references) and fsync.
   Writing ``COMMIT`` is the commit point.
3. **Apply**: rename the staged files into place (SIGINT/SIGTERM are held back meanwhile), manifest
   last; remove the files nothing references any more; delete the staging folder.

A process killed before ``COMMIT`` exists leaves a staging folder whose owner lock is free: the next
command that opens the bundle deletes it (the old bundle was never touched). One killed after leaves
a ``COMMIT``: the next command rolls it forward (every step is idempotent). Readers take the shared
lock while they read the manifest, so they never see a half-applied commit.

A disk that fills up or a folder that cannot be written fails the stage or ``COMMIT`` write: one
clear error, the staging folder removed, the bundle unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CbamDeployError
from .fsutil import (OWNER_NAME, FileTooLarge, UnsafePath, fsync_dir, owner_alive, read_no_follow, resolve_inside,
                     write_bytes_atomic)
from .manifest import (MANIFEST_NAME, ROOT_ARTIFACT, artifact_file, artifact_name, artifact_record, read_manifest_file, upsert_artifact,
                       validate_manifest)
from .interrupts import raise_if_interrupted

LOCK_NAME = ".lock"
STAGING_PREFIX = ".staging-"
COMMIT_NAME = "COMMIT"
LOCK_TIMEOUT_S = 600.0
MAX_PLAN_BYTES = 1 << 20  # a plan lists file names; the largest bundles name a few dozen
MAX_PLAN_NAMES = 10_000
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
# errors a user can fix (space, permissions, read-only media): one line, not a traceback
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class BundleLockTimeout(CbamDeployError):
    """Another command held the bundle's lock for longer than ``LOCK_TIMEOUT_S``."""


def faultpoint(name: str) -> None:
    """Test hook for the fault-injection suite: when ``CBAM_DEPLOY_FAULTPOINT`` names this point, write
    the file ``CBAM_DEPLOY_FAULT_MARKER`` and wait (up to 120 s) until that file is removed, so a test
    can send a signal, or run another command, at exactly this phase. A no-op otherwise."""
    if os.environ.get("CBAM_DEPLOY_FAULTPOINT") != name:
        return
    marker = Path(os.environ["CBAM_DEPLOY_FAULT_MARKER"])
    marker.write_text(f"{os.getpid()} {name}\n")
    deadline = time.monotonic() + 120
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def user_os_error(exc: OSError, doing: str) -> CbamDeployError | None:
    """A ``CbamDeployError`` for an OSError the user can fix (disk full, read-only), else None."""
    if exc.errno not in _USER_OS_ERRORS:
        return None
    return CbamDeployError(f"{doing}: {exc.strerror or exc}")


@contextlib.contextmanager
def bundle_lock(bundle_dir: str | Path, shared: bool = False) -> Iterator[bool]:
    """Hold the bundle's lock (shared for readers, exclusive for a commit); yields False when a reader
    cannot even create the lock file (a read-only bundle: nobody can write it then either)."""
    path = Path(bundle_dir) / LOCK_NAME
    try:  # never through a symbolic link: a bundle from elsewhere must not make us create a file outside it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644)
    except OSError as exc:
        if shared:
            try:
                fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
            except OSError:
                yield False
                return
        elif exc.errno == errno.ELOOP:
            raise CbamDeployError(f"cannot lock bundle {bundle_dir}: its {LOCK_NAME} is a symbolic link; a bundle's "
                                  "files must be plain files inside it") from None
        else:
            raise user_os_error(exc, f"cannot lock bundle {bundle_dir}") or exc from None
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BundleLockTimeout(f"bundle {bundle_dir} stayed locked by another cbam-deploy command "
                                            f"for {LOCK_TIMEOUT_S:.0f} s; try again when it has finished") from None
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)


def pending_work(bundle_dir: Path) -> bool:
    """Whether a dead command left something behind (a staging folder or a temporary file)."""
    try:
        names = os.listdir(bundle_dir)
    except OSError:
        return False
    return any(n.startswith(STAGING_PREFIX) or (n.startswith(".") and n.endswith(".tmp")) for n in names)


def recover(bundle_dir: str | Path) -> list[str]:
    """Finish or discard what dead commands left; call with the exclusive lock held. Returns what it did.

    Recovery is a local affair: it acts only on what this tool leaves, directly inside the bundle. A
    staging folder is a real folder (a link is never followed); its ``COMMIT`` and ``.owner`` are
    looked at (``lstat``) before anything opens them, so a link, a FIFO or a device is never opened;
    a plan names only plain files directly inside the bundle and its staging folder (``read_plan``),
    and each is checked again by what it is before anything moves. Anything else is not a plan this
    tool wrote: the staging folder is discarded with one warning line on stderr, nothing in it applied.
    """
    bundle_dir = Path(bundle_dir)
    done = []
    for name in sorted(os.listdir(bundle_dir)):
        entry = bundle_dir / name
        try:
            mode = os.lstat(entry).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):  # no command of ours leaves a link: never followed out of the bundle
            continue
        if name.startswith(STAGING_PREFIX) and stat.S_ISDIR(mode):
            if owner_alive(entry):
                continue
            plan, why = read_plan(entry)
            if plan is not None:
                try:
                    _apply(bundle_dir, entry, plan)
                    done.append(f"rolled forward {name}")
                    continue
                except _NotAPlan as exc:
                    why = str(exc)
            shutil.rmtree(entry, ignore_errors=True)  # never follows a link inside it
            done.append(f"discarded {name}")
            if why:
                _warn(f"bundle {bundle_dir}: discarded the staging folder {name}: {why}; nothing in it was applied")
        elif name.startswith(".") and name.endswith(".tmp") and not stat.S_ISDIR(mode):
            # a temporary file directly in the bundle is only ever written under this lock; removing a
            # name never opens what it names
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            done.append(f"removed {name}")
    return done


def recover_if_needed(bundle_dir: Path) -> None:
    if pending_work(bundle_dir):
        try:
            with bundle_lock(bundle_dir):
                recover(bundle_dir)
        except (OSError, CbamDeployError):
            pass  # a read-only bundle: readers go on with what is committed


class _NotAPlan(Exception):
    """A staging folder's ``COMMIT`` that this tool did not write; the message says why, in a few words."""


def read_plan(staging: Path) -> tuple[dict | None, str | None]:
    """(the staging folder's ``COMMIT``, None); (None, None) when there is none (a command killed
    before its commit point); (None, why) when it is not a plan this tool writes: a link, a FIFO or
    anything but a regular file (never opened), over ``MAX_PLAN_BYTES``, not JSON, or not the shape
    ``BundleUpdate.commit`` writes (``plan_problem``)."""
    path = staging / COMMIT_NAME
    try:
        data = read_no_follow(path, MAX_PLAN_BYTES)
        plan = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        return None, None
    except UnsafePath as exc:
        return None, f"its {COMMIT_NAME} {_what(exc)}"
    except FileTooLarge:
        return None, f"its {COMMIT_NAME} is larger than {MAX_PLAN_BYTES >> 10} KiB"
    except (OSError, ValueError, RecursionError):
        return None, f"its {COMMIT_NAME} is not a JSON plan"
    problem = plan_problem(plan)
    if problem:
        return None, f"its {COMMIT_NAME} {problem}"
    return plan, None


def plan_problem(plan) -> str | None:
    """Why ``plan`` is not one ``BundleUpdate.commit`` writes, or None: an object with exactly the
    lists ``files`` (the manifest last) and ``remove`` (never the manifest), at most
    ``MAX_PLAN_NAMES`` names, each a plain file name (``plain_name``)."""
    if not isinstance(plan, dict) or set(plan) != {"files", "remove"}:
        return "is not an object with the lists 'files' and 'remove'"
    files, remove = plan["files"], plan["remove"]
    if not isinstance(files, list) or not isinstance(remove, list):
        return "is not an object with the lists 'files' and 'remove'"
    if len(files) + len(remove) > MAX_PLAN_NAMES:
        return f"names more than {MAX_PLAN_NAMES} files"
    bad = [n for n in (*files, *remove) if not plain_name(n)]
    if bad:
        return f"names {_shown(bad[0])}, not a plain file name directly inside the bundle"
    if not files or files[-1] != MANIFEST_NAME or MANIFEST_NAME in files[:-1] or MANIFEST_NAME in remove:
        return f"does not move {MANIFEST_NAME} in last"
    return None


def plain_name(name) -> bool:
    """A file name directly inside a folder: a string of at most 255 characters, no folder (no ``/``
    or ``\\``), not hidden (so not ``.``, ``..``, a staging folder, the lock or a temporary), no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and not any(c in name for c in "/\\\0"))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _what(exc: UnsafePath) -> str:
    """'is a symbolic link' / 'is not a regular file' from the refusal of ``open_no_follow``."""
    text = str(exc)
    return "is a symbolic link" if text.endswith("symbolic link") else "is not a regular file"


def _warn(line: str) -> None:
    """One warning line on stderr (what recovery discarded: the command goes on with the committed bundle)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _apply(bundle_dir: Path, staging: Path, plan: dict) -> None:
    """Roll ``plan`` (checked by ``plan_problem``) forward: every file it moves in must be a regular
    file directly inside the staging folder (``resolve_inside``: no link), or already moved (a roll
    forward killed half-way), and nothing it replaces or removes a folder; all of it checked before
    the first rename, so a plan refused (``_NotAPlan``) has changed nothing. Renames and unlinks act
    on names directly inside the bundle, so neither ever follows a link out of it."""
    for name in plan["files"]:
        try:
            resolve_inside(staging, name)
        except FileNotFoundError:
            continue  # moved in already by a roll forward that was killed half-way
        except UnsafePath as exc:
            raise _NotAPlan(f"{_shown(name)} in it {_what(exc)}") from None
    for name in (*plan["files"], *plan["remove"]):
        try:
            if stat.S_ISDIR(os.lstat(bundle_dir / name).st_mode):
                raise _NotAPlan(f"it would replace or remove the folder {_shown(name)}")
        except FileNotFoundError:
            pass
    for name in plan["files"]:
        source = staging / name
        if os.path.lexists(source):
            os.replace(source, bundle_dir / name)
        if name != MANIFEST_NAME:
            faultpoint("apply")
    for name in plan["remove"]:
        with contextlib.suppress(FileNotFoundError):
            (bundle_dir / name).unlink()
    fsync_dir(bundle_dir)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a commit is applied; they are raised again right after.

    Python-level handlers, not a signal mask: the kernel hands a process signal to any thread that
    does not block it (torch and onnxruntime run their own), and Python's handler then interrupts
    the main thread wherever it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    watched = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in received:
            signal.raise_signal(sig)


def referenced_files(manifest: dict | None) -> set[str]:
    """Every file a manifest points at: artifacts and their companion files."""
    if not manifest:
        return set()
    files = set()
    for artifact in manifest.get("artifacts", []):
        files.add(artifact["path"])
        files.update(artifact.get("companion_files", {}))
    return files


def read_current(bundle_dir: Path) -> dict | None:
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    return read_manifest_file(path)


def _make_staging(bundle_dir: Path) -> Path:
    """A new private staging folder inside the bundle (the fault-injection tests replace this)."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=bundle_dir))


class BundleUpdate:
    """Stage files for a bundle and commit them with a change to its manifest, all or nothing.

    ``create=True`` allows a folder without a bundle (a first export); the folder is removed again when
    nothing was committed and it was created here.
    """

    def __init__(self, bundle_dir: str | Path, create: bool = False) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.create = create
        self.created = False
        self.staging: Path | None = None
        self.committed: dict | None = None
        self.removed: list[str] = []
        self.added: list[dict] = []  # artifact records made by add_artifact, merged in at commit
        self._owner_fd: int | None = None

    def __enter__(self) -> BundleUpdate:
        try:
            if self.create:
                self.created = not self.bundle_dir.exists()
                self.bundle_dir.mkdir(parents=True, exist_ok=True)
            elif not (self.bundle_dir / MANIFEST_NAME).is_file():
                raise CbamDeployError(f"{self.bundle_dir} is not a bundle: no {MANIFEST_NAME} (make one with 'cbam-deploy export')")
            with bundle_lock(self.bundle_dir):
                recover(self.bundle_dir)
                self.staging = _make_staging(self.bundle_dir)
                self._owner_fd = os.open(self.staging / OWNER_NAME, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._owner_fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._cleanup()
            raise CbamDeployError(f"cannot write bundle {self.bundle_dir}: {exc.strerror or exc}") from None
        except BaseException:
            self._cleanup()
            raise
        return self

    def path(self, name: str) -> Path:
        """Where to write a file that will become ``<bundle>/<name>`` at commit."""
        assert self.staging is not None, "use BundleUpdate as a context manager"
        return self.staging / name

    def stage_artifact(self, fmt: str, precision: str, recipe: str | None = None, gates: str | None = None) -> Path:
        """Where to write the file of the artifact (``fmt``, ``precision``[, INT8 ``recipe``, ``gates``]):
        its name in the staging folder, from the one naming scheme (``manifest.artifact_name``)."""
        return self.path(artifact_file(artifact_name(fmt, precision, recipe, gates), fmt))

    def add_artifact(self, fmt: str, precision: str, recipe: str | None = None, gates: str | None = None,
                     **fields) -> dict:
        """Record the artifact staged at ``stage_artifact(...)``: its name, file, sha256 and size (its
        companions' too: an IR's .bin, an engine's sidecar, an ONNX's external data), plus ``fields``.
        Returns the record (callers may add to it until they commit). ``commit`` puts every added record
        into the manifest that its change returns, replacing one of the same name, unless the change
        placed the record itself (an export puts its ONNX first)."""
        assert self.staging is not None, "use BundleUpdate as a context manager"
        record = artifact_record(self.staging, fmt, precision, recipe, gates, **fields)
        self.added = [a for a in self.added if a["name"] != record["name"]] + [record]
        return record

    def commit(self, change: Callable[[dict | None], dict]) -> dict:
        """Apply ``change`` to the current manifest (a deep copy; None for a new bundle), add the
        artifacts recorded with ``add_artifact``, and commit the result with the staged files it
        references. Returns the committed manifest."""
        assert self.staging is not None and self.committed is None
        with bundle_lock(self.bundle_dir):
            recover(self.bundle_dir)
            current = read_current(self.bundle_dir)
            manifest = change(copy.deepcopy(current))
            if self.added and isinstance(manifest, dict) and isinstance(manifest.get("artifacts"), list):
                for record in self.added:
                    if record not in manifest["artifacts"]:
                        upsert_artifact(manifest, record)
            validate_manifest(manifest, self.bundle_dir / MANIFEST_NAME)
            wanted = referenced_files(manifest)
            files = sorted(n for n in wanted if (self.staging / n).is_file())
            missing = sorted(n for n in wanted if n not in files and not (self.bundle_dir / n).is_file())
            if missing:
                raise CbamDeployError(f"bundle {self.bundle_dir}: the new manifest names files that do not exist: {', '.join(missing)}")
            # a file in a folder of the bundle is none of ours (a bundle's own files lie directly in it): left be
            remove = sorted(n for n in referenced_files(current) - wanted if plain_name(n))
            plan = {"files": files + [MANIFEST_NAME], "remove": remove}
            problem = plan_problem(plan)
            if problem:
                raise CbamDeployError(f"bundle {self.bundle_dir}: the change {problem}; a bundle's files lie "
                                      "directly in its folder")
            faultpoint("stage-manifest")
            write_bytes_atomic(self.staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
            faultpoint("before-commit")
            raise_if_interrupted()  # a Ctrl-C that a library swallowed: nothing is committed after it
            write_bytes_atomic(self.staging / COMMIT_NAME, json.dumps(plan).encode())
            fsync_dir(self.staging)
            with _signals_held():
                faultpoint("committed")
                try:
                    _apply(self.bundle_dir, self.staging, plan)
                except _NotAPlan as exc:
                    raise CbamDeployError(f"bundle {self.bundle_dir}: cannot commit: {exc}") from None
                self.committed, self.removed = manifest, remove
        return manifest

    def _cleanup(self) -> None:
        if self.staging is not None and self.committed is None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        if self.created and self.committed is None and self.bundle_dir.is_dir():
            with contextlib.suppress(OSError):
                if set(os.listdir(self.bundle_dir)) <= {LOCK_NAME}:
                    (self.bundle_dir / LOCK_NAME).unlink(missing_ok=True)
                    self.bundle_dir.rmdir()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()
        if isinstance(exc, OSError):
            mapped = user_os_error(exc, f"could not write bundle {self.bundle_dir}; it was left as it was")
            if mapped is not None:
                raise mapped from None


def commit_from_source(update: BundleUpdate, source_sha: str, doing: str, again: str) -> dict:
    """Commit ``update`` (the artifacts recorded with ``add_artifact``) unless the bundle's FP32 ONNX is
    no longer the one they were made from (sha256 ``source_sha``): a re-export that landed meanwhile
    wins, and the error says so (``doing``: 'quantizing', ``again``: what to run again)."""

    def check(current: dict) -> dict:
        onnx_now = next((a for a in current["artifacts"] if a["name"] == ROOT_ARTIFACT), None)
        if onnx_now is None or onnx_now["sha256"] != source_sha:
            raise CbamDeployError(f"bundle {update.bundle_dir} was re-exported while {doing}: its ONNX is not the one "
                                  f"these artifacts were made from; {again}")
        return current

    return update.commit(check)


def update_manifest(bundle_dir: str | Path, change: Callable[[dict], dict]) -> dict:
    """Commit a manifest-only change (no new files), merged into the current manifest under the lock."""
    with BundleUpdate(bundle_dir) as update:
        return update.commit(change)
