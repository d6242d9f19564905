"""Writing files so that a crash or Ctrl-C never leaves a truncated file that a later step trusts, and
reading files from a folder someone else made (a bundle) without following a link out of it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .interrupts import raise_if_interrupted


def cache_root() -> Path:
    """The per-user cache folder of cbam-deploy (calibration results, TensorRT timing caches), outside
    every bundle: ``$CBAM_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/cbam-deploy``, else ``~/.cache/cbam-deploy``."""
    return Path(os.environ.get("CBAM_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "cbam-deploy"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# files this process wrote and hashed itself: their (device, inode, size, mtime) -> sha256. A bundle's files
# are renamed into place, never rewritten, so a later check of the same file in the same command needs no
# second hash; a file replaced meanwhile is another inode and is hashed as usual.
_WRITTEN: dict[tuple, str] = {}


def file_signature(path: str | Path) -> tuple:
    """(device, inode, size, modification time) of ``path`` itself (a link is not followed)."""
    stat = os.lstat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def sha256_written(path: str | Path) -> str:
    """``sha256_file`` of a file this process has just written, remembered for ``written_digest``."""
    before = file_signature(path)
    digest = sha256_file(path)
    if file_signature(path) == before:
        _WRITTEN[before] = digest
    return digest


def written_digest(signature: tuple) -> str | None:
    """The sha256 this process computed for the file with ``signature`` when it wrote it, else None."""
    return _WRITTEN.get(signature)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it into place, else delete it.

    The temporary file is ``flock``-ed while it is written, so the temporaries a killed run left for
    the same ``final`` (their lock free) are removed here, and a run still writing is never touched."""
    final = Path(final)
    clean_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp_path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; a finished file follows the umask
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


def clean_stale_temporaries(final: str | Path) -> list[str]:
    """Remove the ``atomic_path`` temporaries of ``final`` that killed runs left (nobody holds their lock)."""
    final = Path(final)
    prefix, removed = f".{final.name}.", []
    try:
        names = os.listdir(final.parent if str(final.parent) else ".")
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        path = final.parent / name
        try:  # only a regular file can be a temporary of ours: a link, a FIFO or a device is never opened
            fd = open_no_follow(path)
        except (OSError, UnsafePath):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            removed.append(name)
        except OSError:  # held: a run still writing it
            pass
        finally:
            os.close(fd)
    return removed


@functools.lru_cache(maxsize=1)
def current_umask() -> int:
    """The process umask (read once: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths on one filesystem in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    a reader sees the old entry or the new one, never neither. False where the system cannot (another
    OS, an old kernel or libc, a filesystem without it): the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported by this kernel or filesystem
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# ---------------------------------------------------------------- files read from a folder someone else made

class UnsafePath(ValueError):
    """A path inside a folder leads elsewhere: a symbolic link (the file or a folder on the way), a
    ``..`` or absolute path, or something that is not a plain file (a FIFO, a device)."""


def resolve_inside(root: str | Path, relative: str | Path) -> Path:
    """``root / relative``, refused (``UnsafePath``) unless every step below ``root`` is a real folder
    and the last a regular file, none a symbolic link, and the path stays inside ``root``.

    The check is on what the path *is* (``lstat`` of every component), not on its text: a symlink to
    ``/etc/passwd`` named ``model.onnx`` is refused, whatever its target's sha256. ``root`` itself is
    what the user named and may be reached through links. A missing file raises ``FileNotFoundError``.
    """
    root = Path(root)
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or any(p in ("..", ".", "") for p in parts):
        raise UnsafePath(f"{relative} is not a plain path inside the folder")
    path = root
    for index, part in enumerate(parts):
        path = path / part
        mode = os.lstat(path).st_mode  # FileNotFoundError for a missing step
        if stat.S_ISLNK(mode):
            raise UnsafePath(f"{path} is a symbolic link")
        last = index == len(parts) - 1
        if last and not stat.S_ISREG(mode):
            raise UnsafePath(f"{path} is not a regular file")
        if not last and not stat.S_ISDIR(mode):
            raise UnsafePath(f"{path} is not a folder")
    return path


class FileTooLarge(ValueError):
    """A file read from a folder someone else made is larger than what its reader takes."""


def open_no_follow(path: str | Path) -> int:
    """A read-only descriptor of ``path``, refused (``UnsafePath``) when the last step is a symbolic
    link or not a regular file. What the path is is looked at (``lstat``) before it is opened, so a
    FIFO or a device is never opened at all, and checked again on the opened file itself (no window
    for a swap); the open never blocks (``O_NONBLOCK``)."""
    mode = os.lstat(path).st_mode  # FileNotFoundError for a missing file
    if stat.S_ISLNK(mode):
        raise UnsafePath(f"{path} is a symbolic link")
    if not stat.S_ISREG(mode):
        raise UnsafePath(f"{path} is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file")
    return fd


def read_no_follow(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` through ``open_no_follow`` (a regular file, never a link, a FIFO or a
    device), at most ``max_bytes`` of them: a larger file is refused (``FileTooLarge``) after reading
    one byte more than that, never read whole."""
    with os.fdopen(open_no_follow(path), "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(f"{path} is larger than {max_bytes} bytes")
    return data


def read_json_no_follow(path: str | Path, max_bytes: int, max_depth: int):
    """The JSON document in ``path`` (``read_no_follow``), checked on the way in: UTF-8, at most
    ``max_bytes``, nested at most ``max_depth`` deep (counted without recursion), every number finite
    (``NaN``, ``Infinity`` and ``1e999`` are refused). ``ValueError`` (``UnsafePath``, ``FileTooLarge``
    included) says what is wrong in one line; ``OSError`` when it cannot be read."""
    data = read_no_follow(path, max_bytes)
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if json_depth(value, max_depth) > max_depth:
        raise ValueError(f"{path}: JSON nested deeper than {max_depth} levels")
    return value


def _no_constant(name: str):
    raise ValueError(f"a number that is not finite ({name})")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a number that is not finite ({text[:20]})")
    return value


def json_depth(value, limit: int) -> int:
    """How deep a parsed JSON value nests (iterative, and it stops once past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def sha256_no_follow(path: str | Path) -> str:
    """``sha256_file`` of a regular file that is not a symbolic link."""
    digest = hashlib.sha256()
    with os.fdopen(open_no_follow(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_checked(source: str | Path, target: str | Path, sha256: str) -> bool:
    """Copy ``source`` to ``target`` from one open descriptor (no symbolic link followed), hashing the
    bytes as they are written: what lands in ``target`` is exactly what was checked. False (and no
    ``target``) when the bytes do not match ``sha256``."""
    digest = hashlib.sha256()
    with os.fdopen(open_no_follow(source), "rb") as src:
        try:
            with open(target, "xb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
    if digest.hexdigest() != sha256:
        os.unlink(target)
        return False
    return True


# ---------------------------------------------------------------- multi-file outputs: stage, then swap

OWNER_NAME = ".owner"


def staging_prefix(final: str | Path, tag: str) -> str:
    """The name prefix of a command's staging folders for ``final`` (``.cbam-<tag>-<name>-``)."""
    return f".cbam-{tag}-{Path(final).name}-"


def owner_alive(folder: Path) -> bool:
    """Whether a live process holds the owner lock (``.owner``, flock) of a staging folder."""
    try:  # a link, a FIFO or a device is no lock of ours: never opened (it could block, or lead out)
        fd = open_no_follow(folder / OWNER_NAME)
    except (OSError, UnsafePath):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def clean_stale_staging(parent: str | Path, prefix: str) -> list[str]:
    """Remove the staging folders (``prefix*`` in ``parent``) that killed runs left: those whose owner
    lock nobody holds. A run still going holds its own, so it is never touched. Returns the names."""
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        entry = Path(parent) / name
        if not name.startswith(prefix):
            continue
        try:
            if not stat.S_ISDIR(os.lstat(entry).st_mode) or owner_alive(entry):
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(name)
    return removed


class StagedFolder:
    """Write a folder of files as one unit: files go into a private folder beside ``final`` (same
    filesystem), owned through an ``flock``; ``swap_in`` puts it in place of ``final`` with one
    atomic exchange where the system has it (two renames elsewhere) and removes the old one. Leaving
    the ``with`` block without ``swap_in`` (an error, Ctrl-C) removes the staging folder; a killed run's
    is removed by the next run (``clean_stale_staging``). A pending Ctrl-C is raised before the swap.

    ``around``: stage beside this path instead (a Triton model folder is staged beside the repository,
    never inside it, where Triton's polling would take it for a model)."""

    def __init__(self, final: str | Path, tag: str, around: str | Path | None = None) -> None:
        self.final = Path(final)
        around = Path(around) if around is not None else self.final
        self.parent = around.absolute().parent
        self.prefix = staging_prefix(around, tag)
        self.path: Path | None = None
        self._owner: int | None = None

    def __enter__(self) -> Path:
        return self.open()

    def open(self) -> Path:
        """Make the staging folder (removing what killed runs left); returns the folder to fill."""
        self.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(self.parent, self.prefix)
        self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        self._owner = os.open(self.path / OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX)
        self.content = self.path / "content"
        self.content.mkdir()
        return self.content

    def swap_in(self) -> None:
        """Put the staged folder in place of ``final`` (which may or may not exist)."""
        raise_if_interrupted()
        assert self.path is not None
        os.chmod(self.content, 0o777 & ~current_umask())
        if self.final.exists() or self.final.is_symlink():
            if not exchange(self.content, self.final):
                os.rename(self.final, self.path / "previous")
                os.rename(self.content, self.final)
        else:
            os.rename(self.content, self.final)
        fsync_dir(self.final.absolute().parent)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the staging folder (the old one after ``swap_in``, else the unfinished one)."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)  # the old folder after a swap, or the unfinished one
