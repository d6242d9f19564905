"""The ExecuTorch runner: a ``.pte`` under ExecuTorch's Python runtime (``executorch.runtime``), with
the XNNPACK delegate.

ExecuTorch never checks an input against the shapes the program was exported for: a shape outside
the bounds whose element count fits the planned memory runs and returns wrong numbers silently.
Every input is therefore checked against the bounds in the artifact's sidecar (written by the
exporter) and another shape is refused in one line. A damaged or truncated .pte, or a missing or
damaged sidecar, is refused in one line when the runner opens it.

A bundle may come from anyone: the sidecar is read as untrusted JSON (a regular file, bounded in
size and depth, numbers finite, bounds well formed), and the .pte is read once, its header checked,
and loaded and run once in a child process (``check_program``) before this process loads those same
bytes: ExecuTorch's loader aborts the whole process on some damaged files.

The XNNPACK thread pool is one per process: ``threads`` resets it for the whole process (ExecuTorch
offers no per-program setting), and ``threads()`` reads it back.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from ...checks import shorten
from ...errors import CbamDeployError
from ...fsutil import FileTooLarge, UnsafePath, cache_root, read_json_no_follow, read_no_follow, write_bytes_atomic
from ...runners.base import Runner
from .exporter import Bounds, import_extra, sidecar_path

# c10::ScalarType codes of ExecuTorch's tensor metadata
_SCALAR_TYPES = {6: "fp32", 5: "fp16", 15: "bf16"}
MAX_SIDECAR_BYTES = 1 << 20  # the exporter writes about 1 KB
MAX_SIDECAR_DEPTH = 16
MAX_OUTPUTS = 1024
MAX_OUTPUT_NAME = 4096
MAX_PTE_BYTES = 16 << 30
LOAD_CHECK_TIMEOUT_S = 300  # the child imports torch and ExecuTorch (seconds on a busy machine), then loads
_IDENTIFIER = re.compile(rb"ET[0-9]{2}")
_checked_loads: set[str] = set()  # programs (sha256, probe shape, ExecuTorch version) that loaded and ran in a child

# Run in a child process (``python -c``) on the program's bytes, given on stdin: ExecuTorch's native
# loader aborts the whole process on some damaged files (a pybind11 error thrown while it logs a
# file's bytes as text), which no ``except`` can catch. The child sets its own memory ceiling first.
_LOAD_CHECK = """
import sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
except (ImportError, ValueError, OSError):  # a system without address-space limits: the time limit still holds
    pass
data = sys.stdin.buffer.read()
shape = [int(v) for v in sys.argv[2:6]]
try:
    import torch
except Exception as exc:
    print(f"cannot import torch: {type(exc).__name__}: {exc}"[:300]); sys.exit(4)


def run_native():  # the native module alone: executorch.runtime imports the exporter too (seconds more)
    from executorch.extension.pybindings import _C
    program = _C._load_program_from_buffer(data, enable_etdump=False, debug_buffer_size=0, data_path=None,
                                           program_verification=_C.Verification.InternalConsistency)
    program.load_method("forward")((torch.zeros(shape),))


def run_runtime():
    from executorch import runtime
    method = runtime.Runtime.get().load_program(data).load_method("forward")
    if method is None:
        raise RuntimeError("no forward method")
    method.execute([torch.zeros(shape)])


try:
    try:
        run_native()
    except (ImportError, AttributeError, TypeError):  # another ExecuTorch: its public runtime
        run_runtime()
except BaseException as exc:
    print(" ".join(str(exc).split())[:300] or type(exc).__name__); sys.exit(3)
"""


def _runtime():
    """ExecuTorch's runtime module and its pybindings (for the thread pool), or one line saying why not."""
    return import_extra("the ExecuTorch runtime", "executorch.runtime", "executorch.extension.pybindings.portable_lib")


def read_sidecar(path: str | Path) -> dict:
    """The exporter's record beside a .pte (bounds, output names, partitions), read as untrusted input:
    a regular file (never a link, a FIFO or a device), at most ``MAX_SIDECAR_BYTES`` of JSON nested at
    most ``MAX_SIDECAR_DEPTH`` deep with finite numbers; its bounds well formed (``Bounds.from_record``)
    and its outputs a list of names. Anything else is one error line."""
    side = sidecar_path(path)
    try:
        record = read_json_no_follow(side, MAX_SIDECAR_BYTES, MAX_SIDECAR_DEPTH)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        Bounds.from_record(record.get("bounds"), "bounds")
        names = record.get("outputs")
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_OUTPUTS or not all(
                isinstance(n, str) and 0 < len(n) <= MAX_OUTPUT_NAME for n in names) or len(set(names)) != len(names):
            raise ValueError(f"outputs must be a list of 1 to {MAX_OUTPUTS} distinct names, got {shorten(names, 40)}")
    except FileNotFoundError:
        raise CbamDeployError(f"{path}: its sidecar {side.name} (input bounds, output names) is missing; build the "
                              "artifact again") from None
    except (OSError, ValueError, CbamDeployError) as exc:
        text = str(exc).replace(str(side), side.name)
        raise CbamDeployError(f"{path}: its sidecar {side.name} is damaged ({text}); build the artifact "
                              "again") from None
    return record


def header_problem(data: bytes) -> str | None:
    """Why ``data`` is not an ExecuTorch program by its header, or None: a flatbuffer whose root offset
    lies inside the file and whose identifier is ExecuTorch's (``ET`` and two digits), and an extended
    header (``eh00``), where there is one, whose sizes lie inside the file."""
    if len(data) < 16:
        return f"{len(data)} bytes, shorter than a program's header"
    root = int.from_bytes(data[0:4], "little")
    if not _IDENTIFIER.fullmatch(data[4:8]):
        return "no ExecuTorch identifier at its start"
    if not 8 <= root < len(data):
        return "its root offset points outside the file"
    if data[8:12] == b"eh00":
        length = int.from_bytes(data[12:16], "little")
        if not 24 <= length <= 256 or 8 + length > len(data):
            return "its extended header is cut or of an unknown size"
        program_size = int.from_bytes(data[16:24], "little")
        base = int.from_bytes(data[24:32], "little")
        size = int.from_bytes(data[32:40], "little") if length >= 32 else 0
        if program_size > len(data) or base > len(data) or base + size > len(data):
            return "its extended header names sizes beyond the end of the file"
    return None


def check_program(data: bytes, path: Path, bounds: Bounds) -> None:
    """Refuse (one line) a .pte that ExecuTorch's native loader cannot take without harm: a header that
    is not a program's (``header_problem``), then a load and one run at the smallest input its bounds
    allow, in a child process with a time and memory ceiling (a crash or a hang there is one line
    here, never this process's end). The verdict is kept per sha256 of the bytes (in this process,
    and, for a program that passed, in the cache folder), so each program is tried once."""
    problem = header_problem(data)
    if problem:
        raise CbamDeployError(f"ExecuTorch cannot load {path}: not an ExecuTorch program ({problem}); build it again")
    shape = (bounds.batch[0], bounds.channels, bounds.height[0], bounds.width[0])
    key = hashlib.sha256(data).hexdigest() + "-" + "x".join(map(str, shape)) + "-" + (_version() or "unknown")
    marker = cache_root() / "executorch-loads" / key
    if key in _checked_loads or marker.is_file():
        _checked_loads.add(key)
        return
    limit = (4 << 30) + 4 * len(data) + 16 * 4 * int(np.prod(shape))
    try:
        done = subprocess.run([sys.executable, "-c", _LOAD_CHECK, str(limit), *map(str, shape)], input=data,
                              capture_output=True, timeout=LOAD_CHECK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CbamDeployError(f"ExecuTorch cannot load {path}: its loader did not finish within "
                              f"{LOAD_CHECK_TIMEOUT_S} s (tried in a child process); build it again") from None
    if done.returncode != 0:
        if done.returncode < 0:
            why = f"its loader crashed on it ({_signal_name(-done.returncode)}, in a child process)"
        else:
            lines = [ln for ln in done.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"the loader ended with code {done.returncode}"
        raise CbamDeployError(f"ExecuTorch cannot load {path}: {why} (a damaged or truncated .pte? build it again)")
    _checked_loads.add(key)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(marker, b"")
    except OSError:  # a cache that cannot be written: the check runs again next time
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _version() -> str | None:
    try:
        return version("executorch")
    except PackageNotFoundError:  # a source checkout without metadata
        return None


class ExecuTorchRunner(Runner):
    backend = "executorch"

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        runtime, self._bindings = _runtime()
        self.path = Path(path)
        self.record = read_sidecar(self.path)
        self.bounds = Bounds.from_record(self.record["bounds"])
        self.output_names = list(self.record["outputs"])
        try:  # read once: the bytes checked are the bytes loaded
            data = read_no_follow(self.path, MAX_PTE_BYTES)
        except FileNotFoundError:
            raise CbamDeployError(f"{self.path}: no such .pte file") from None
        except (OSError, UnsafePath, FileTooLarge) as exc:
            raise CbamDeployError(f"cannot read {self.path}: {exc}") from None
        check_program(data, self.path, self.bounds)
        try:
            # kept: the program holds the bytes, which ExecuTorch reads in place for as long as it runs
            self._program = runtime.Runtime.get().load_program(data)
            self.method = self._program.load_method("forward")
        except Exception as exc:  # ExecuTorch reports a damaged or truncated file as RuntimeError "error 0x.."
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise CbamDeployError(f"ExecuTorch cannot load {self.path}: {text} (a damaged or truncated .pte? build it "
                                  "again)") from None
        if self.method is None:
            raise CbamDeployError(f"{self.path} has no forward method: not a .pte that cbam-deploy built")
        if threads:
            self._bindings._unsafe_reset_threadpool(int(threads))  # one pool per process (see the module's note)
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.bounds.check(batch.shape, f"{self.path.name}")
        try:
            outputs = self.method.execute([torch.from_numpy(batch)])
        except RuntimeError as exc:
            raise CbamDeployError(f"ExecuTorch failed to run {self.path.name} on shape {batch.shape}: "
                                  f"{' '.join(str(exc).split())}") from None
        if len(outputs) != len(self.output_names):
            raise CbamDeployError(f"{self.path.name} gave {len(outputs)} outputs; its sidecar names "
                                  f"{len(self.output_names)}: build the artifact again")
        return {name: out.detach().numpy().astype(np.float32, copy=True) for name, out in zip(self.output_names, outputs)}

    def threads(self) -> int | None:
        try:
            return int(self._bindings._threadpool_get_thread_count())
        except Exception:  # an ExecuTorch build without the thread-pool bindings
            return None

    def computed_precision(self) -> str | None:
        """The dtype of the loaded program's outputs: the XNNPACK delegate computes each tensor in the
        dtype the exported program gives it (an fp32 program runs in fp32 on every CPU). None for an
        INT8 program."""
        if self.precision == "int8":
            return None
        meta = self.method.metadata
        return _SCALAR_TYPES.get(int(meta.output_tensor_meta(0).dtype())) if meta.num_outputs() else None

    def describe(self) -> dict:
        return {**super().describe(), "runtime": getattr(self, "runtime", None) or "executorch",
                "delegate": self.record.get("delegate"), "partitions": self.record.get("partitions"),
                "outside_delegate": self.record.get("outside_delegate"), "bounds": self.record.get("bounds")}


__all__ = ["ExecuTorchRunner", "read_sidecar"]
