"""Primitive option checks: an integer in a range, a number, a choice, a comma list, a batch, a file
to read, a file or folder to write. Each raises ``CbamDeployError`` naming the option
(``--calib-size``) and what it accepts; the CLI turns that into one ``error:`` line and exit code 2.

The checks of a command's options live with the command (``verify.validate_verify_options``,
``bench.check_bench_options``, ...) and are built from these, so a typo costs a second, not an
export, and nothing is written when an option is wrong.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import CbamDeployError

# Input side in pixels. The lower bound is the smallest total stride of a network (a zoo model with
# the CIFAR stem downsamples by 8; ``models.spec`` knows each stem's); above 2048 the example tensor
# and activations alone take many GiB and a typo (100000) would only end in an allocation failure.
MIN_INPUT_SIZE = 8
MAX_INPUT_SIZE = 2048
MAX_BATCH = 1024
MAX_NUM_CLASSES = 100_000  # a classifier's classes (export's --num-classes; a manifest's model.num_classes)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(option: str, value, low: int | None = None, high: int | None = None, *, allow_none: bool = False) -> None:
    """``value`` is an integer in [low, high]; the message names the option and the range."""
    if value is None and allow_none:
        return
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            wanted = f"an integer from {low} to {high}"
        elif low is not None:
            wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        else:
            wanted = "an integer"
        raise CbamDeployError(f"{option} must be {wanted}, got {value!r}")


def check_number(option: str, value, *, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise CbamDeployError(f"{option} must be a number, got {value!r}")
    if positive and value <= 0:
        raise CbamDeployError(f"{option} must be greater than 0, got {value!r}")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CbamDeployError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def split_list(value: str | list | None) -> list[str]:
    """The one comma-list splitter: 'a, b,,c' -> ['a', 'b', 'c']; a list is taken item by item."""
    items = value if isinstance(value, (list, tuple)) else (value or "").split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def parse_list(value: str | list[str] | None, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against ``allowed``; an empty list is an error, repeats are dropped."""
    items = split_list(value)
    if not items:
        raise CbamDeployError(f"{option} takes a comma list{_of(allowed)}; got nothing")
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise CbamDeployError(f"{option} takes a comma list{_of(allowed)}; got {', '.join(repr(b) for b in bad)}")
    return list(dict.fromkeys(items))


def _of(allowed) -> str:
    return f" of {', '.join(allowed)}" if allowed else ""


def parse_batch(value: str | int | None, option: str = "--batch") -> int | None:
    """'dynamic' (or None) -> None; else a positive integer up to MAX_BATCH."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "dynamic"):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise CbamDeployError(f"{option} must be 'dynamic' or a positive integer, got {value!r}") from None
    if not 1 <= number <= MAX_BATCH:
        raise CbamDeployError(f"{option} must be 'dynamic' or an integer from 1 to {MAX_BATCH}, got {value!r}")
    return number


def parse_batches(value: str, option: str = "--batch") -> list[int]:
    """'1,8,32' -> [1, 8, 32] (each 1..MAX_BATCH)."""
    try:
        batches = [int(b) for b in split_list(str(value))]
    except ValueError:
        raise CbamDeployError(f"{option} takes a comma list of positive integers, got {value!r}") from None
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise CbamDeployError(f"{option} takes a comma list of integers from 1 to {MAX_BATCH}, got {value!r}")
    return list(dict.fromkeys(batches))


# --- records read from a bundle -------------------------------------------------------------------

MAX_CHANNELS = 4096  # input channels of an image model (an RGB image has 3; a multispectral one, dozens)
MAX_BOUND_SIDE = 4 * MAX_INPUT_SIZE  # a dynamic H/W is exported from half to twice its side


def bounds_problem(record) -> tuple[str, str, object] | None:
    """Why ``record`` is not an input-bounds record (``{"batch": [min, max], "height": [min, max],
    "width": [min, max], "channels": C}``, what an ExecuTorch export records in its sidecar and in the
    manifest): (the field, what it must be, its value); None when it is one. A runner and serve take
    these numbers as they are (a batch bound is the largest batch they send), so each is an integer
    pair with 1 <= min <= max under a finite ceiling."""
    if not isinstance(record, dict):
        return "", "an object", record
    for key, high in (("batch", MAX_BATCH), ("height", MAX_BOUND_SIDE), ("width", MAX_BOUND_SIDE)):
        value = record.get(key)
        if not (isinstance(value, list) and len(value) == 2 and all(is_int(v) for v in value)
                and 1 <= value[0] <= value[1] <= high):
            return key, f"a [min, max] pair of integers with 1 <= min <= max <= {high}", value
    channels = record.get("channels")
    if not (is_int(channels) and 1 <= channels <= MAX_CHANNELS):
        return "channels", f"an integer from 1 to {MAX_CHANNELS}", channels
    return None


# --- names that become paths, and text that goes into a file -------------------------------------

NAME_MAX = 128
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(text: str) -> str:
    """A name made from ``text`` that obeys ``check_name``: other characters become '_', leading and
    trailing dots go, at most ``NAME_MAX`` characters; 'model' when nothing is left."""
    return _UNSAFE_NAME_CHARS.sub("_", text)[:NAME_MAX].strip(".") or "model"


def check_name(option: str, name: str) -> str:
    """The one rule for a name that becomes a folder or a URL path (a served model, a Triton model, a
    KServe model): letters, digits, '_', '.' and '-', not starting with '.', at most ``NAME_MAX``
    characters. So ``../evil``, ``/abs`` or ``a/b`` can never lead out of the folder it is written in."""
    if not isinstance(name, str) or not name or safe_name(name) != name or len(name) > NAME_MAX:
        raise CbamDeployError(f"{option} {shorten(name)}: a model name is letters, digits, '_', '.' and '-' (not "
                              f"starting with '.'), at most {NAME_MAX} characters")
    return name


def check_plain_text(option: str, value: str | None) -> str | None:
    """Text that goes into a YAML value, a pbtxt string or a comment line: no line break or other
    control character, which would end the line it is written on."""
    if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise CbamDeployError(f"{option} {shorten(value)}: control characters (a line break, a tab) are not allowed")
    return value


def shorten(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the full length named: error text that
    quotes a name stays short whatever the name (a 20 KB model name in a gRPC request)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}...' ({len(value) if hasattr(value, '__len__') else len(text)} characters)"


# --- paths --------------------------------------------------------------------------------------

def check_existing_file(option: str, path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise CbamDeployError(f"{option} {path} does not exist")
    if not path.is_file():
        raise CbamDeployError(f"{option} {path} is not a file")


def check_output_file(option: str, path: str | Path | None) -> None:
    """A file we will write later: its folder exists and is writable, and it is not a folder itself.
    Checked before any measuring, so a typo in the path does not throw away minutes of work."""
    if path is None:
        return
    if str(path).strip() == "":
        raise CbamDeployError(f"{option} needs a file path")
    try:
        _check_output_file(option, Path(path))
    except OSError as exc:  # a name too long, a loop of links: whatever a write would meet
        raise CbamDeployError(f"{option} {shorten(str(path))}: cannot write there ({exc.strerror or exc})") from None


def _check_output_file(option: str, path: Path) -> None:
    if path.is_dir():
        raise CbamDeployError(f"{option} {path} is a folder; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CbamDeployError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):  # files are replaced atomically: the folder is what counts
        raise CbamDeployError(f"{option} {path}: the folder {parent} is not writable")
    # os.access misses what only a write shows (root on a read-only or special filesystem such as
    # /proc, a name too long): make and remove the very temporary file the atomic write will use
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CbamDeployError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def check_output_dir(option: str, path: str | Path | None) -> None:
    """A folder we may create later: it is a folder if it exists, and its nearest existing parent is
    a writable folder. Nothing is created here."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CbamDeployError(f"{option} {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CbamDeployError(f"{option} {path}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise CbamDeployError(f"{option} {path}: {probe} is not writable")


