"""onnxruntime, CPU execution provider by default."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CbamDeployError
from .base import Runner


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 precision: str = "fp32", profile_dir: str | Path | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise CbamDeployError("onnxruntime is not installed: pip install onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between runs: a spinning thread pool steals the CPU from whatever runs
        # next (another runner in an interleaved benchmark, the server's other work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_dir is not None:  # onnxruntime's own profiler: per-node kernel times (see node_times)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "ort-profile")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise CbamDeployError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads
        self.device = "cpu" if self.session.get_providers()[0] == "CPUExecutionProvider" else self.session.get_providers()[0]
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return {name: np.asarray(out, dtype=np.float32) for name, out in zip(self.output_names, outs)}

    def threads(self) -> int | None:
        """intra-op threads: as set, or onnxruntime's default (one per physical core)."""
        if self._threads:
            return self._threads
        try:
            import psutil

            return psutil.cpu_count(logical=False) or os.cpu_count()
        except ImportError:
            return os.cpu_count()

    def node_times(self, skip_runs: int = 0) -> list[tuple[str, str, float]]:
        """(node name, op type, microseconds) for every kernel run after the first ``skip_runs`` runs;
        needs ``profile_dir``. Ends the profiling session."""
        import json

        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        start = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if 0 < skip_runs <= len(runs) else 0
        return [(e["name"][: -len("_kernel_time")].removeprefix("fused "), e.get("args", {}).get("op_name", "?"), float(e["dur"]))
                for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
