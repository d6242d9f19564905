"""The ExecuTorch runner: a ``.pte`` under ExecuTorch's Python runtime (``executorch.runtime``), with
the XNNPACK delegate.

ExecuTorch never checks an input against the shapes the program was exported for: a shape outside
the bounds whose element count fits the planned memory runs and returns wrong numbers silently.
Every input is therefore checked against the bounds in the artifact's sidecar (written by the
exporter) and another shape is refused in one line. A damaged or truncated .pte, or a missing or
damaged sidecar, is refused in one line when the runner opens it.

The XNNPACK thread pool is one per process: ``threads`` resets it for the whole process (ExecuTorch
offers no per-program setting), and ``threads()`` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...errors import CbamDeployError
from ...runners.base import Runner
from .exporter import Bounds, import_extra, sidecar_path

# c10::ScalarType codes of ExecuTorch's tensor metadata
_SCALAR_TYPES = {6: "fp32", 5: "fp16", 15: "bf16"}


def _runtime():
    """ExecuTorch's runtime module and its pybindings (for the thread pool), or one line saying why not."""
    return import_extra("the ExecuTorch runtime", "executorch.runtime", "executorch.extension.pybindings.portable_lib")


def read_sidecar(path: str | Path) -> dict:
    """The exporter's record beside a .pte: bounds, output names, partitions."""
    side = sidecar_path(path)
    try:
        record = json.loads(side.read_text())
        Bounds.from_record(record["bounds"])
        names = record["outputs"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("outputs is not a list of names")
    except FileNotFoundError:
        raise CbamDeployError(f"{path}: its sidecar {side.name} (input bounds, output names) is missing; build the "
                              "artifact again") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CbamDeployError(f"{path}: its sidecar {side.name} is damaged ({type(exc).__name__}: {exc}); build the "
                              "artifact again") from None
    return record


class ExecuTorchRunner(Runner):
    backend = "executorch"

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None) -> None:
        runtime, self._bindings = _runtime()
        self.path = Path(path)
        self.record = read_sidecar(self.path)
        self.bounds = Bounds.from_record(self.record["bounds"])
        self.output_names = list(self.record["outputs"])
        if not self.path.is_file():
            raise CbamDeployError(f"{self.path}: no such .pte file")
        try:
            program = runtime.Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
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
