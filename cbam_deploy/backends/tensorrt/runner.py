"""TensorRT engines through the name-based I/O API (TensorRT 8.5+): ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; device buffers are torch CUDA tensors (no pycuda).

The engine's sidecar metadata is checked first: an engine from another TensorRT version or GPU is
refused with a message that says to rebuild it. A DLA engine gets ``runtime.DLA_core`` set before it
is deserialised. The optimisation profile is read from the engine itself: ``infer`` splits a batch
larger than the profile's max into several calls and pads one smaller than its min (outputs cut back
to the real rows), so every caller gets correct results whatever batch it uses; ``run_timed``
refuses a batch outside the profile, because a split or padded call is not the latency of that
batch. ``set_input_shape`` returning False is still an error (the last guard)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...errors import CbamDeployError
from ...fsutil import read_json_no_follow
from ...runners.base import Runner
from .exporter import check_engine_compatible, current_gpu, profile_chunks, require_tensorrt, sidecar


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, precision: str = "fp32") -> None:
        trt = require_tensorrt()
        meta_path = sidecar(Path(engine_path))
        if not meta_path.is_file():
            raise CbamDeployError(f"{engine_path} has no metadata sidecar {meta_path.name}; rebuild the engine with cbam-deploy")
        try:  # read as untrusted input: a regular file, never a link or a FIFO, bounded, finite numbers
            self.metadata = read_json_no_follow(meta_path, 1 << 20, 16)
        except (OSError, ValueError) as exc:
            raise CbamDeployError(f"{engine_path}: its metadata sidecar {meta_path.name} cannot be read ({exc}); "
                                  "rebuild the engine with cbam-deploy") from None
        if not isinstance(self.metadata, dict):
            raise CbamDeployError(f"{engine_path}: its metadata sidecar {meta_path.name} is not a JSON object; "
                                  "rebuild the engine with cbam-deploy")
        check_engine_compatible(self.metadata, trt.__version__, current_gpu())
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        dla_core = self.metadata.get("dla_core")
        if dla_core is not None:
            if self.runtime.num_DLA_cores <= dla_core:
                raise CbamDeployError(f"{engine_path} was built for DLA core {dla_core}, which this machine does not have")
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise CbamDeployError(f"TensorRT could not load {engine_path}; rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CbamDeployError(f"TensorRT could not create an execution context for {engine_path} (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.stream = torch.cuda.Stream()
        self._events = None  # (start, end) CUDA events while run_timed measures
        self.device = f"cuda:{torch.cuda.current_device()}" + (f"+dla{dla_core}" if dla_core is not None else "")
        self.precision = precision
        self.split_or_padded_calls = 0  # calls that had to be split or padded to fit the profile

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) == 0:
            raise CbamDeployError("an empty batch has nothing to run")
        chunks = profile_chunks(len(batch), self.min_batch, self.max_batch)
        if len(chunks) == 1 and chunks[0][2] == len(batch):
            return self._execute(batch)
        self.split_or_padded_calls += 1
        parts = []
        for start, stop, size in chunks:
            part = batch[start:stop]
            if size > len(part):  # below the profile's min: repeat the last row, cut the outputs
                part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
            out = self._execute(part)
            parts.append({name: value[:stop - start] for name, value in out.items()})
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def _execute(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):  # copies and execution ordered on one stream
            x = torch.from_numpy(batch).cuda(non_blocking=True).to(self.dtypes[self.input_name])
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise CbamDeployError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile "
                                      f"(batch {self.min_batch}..{self.max_batch})")
            outputs = {}
            for name in self.output_names:
                outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=x.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            if self._events:
                self._events[0].record(self.stream)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CbamDeployError("TensorRT execution failed")
            if self._events:
                self._events[1].record(self.stream)
            host = {name: y.float().to("cpu", non_blocking=False) for name, y in outputs.items()}
        self.stream.synchronize()
        return {name: y.numpy() for name, y in host.items()}

    def run_timed(self, batch: np.ndarray) -> tuple[float, float | None]:
        """End to end on the host clock; the engine's execution alone with CUDA events on its stream.
        Only for a batch the profile takes in one call."""
        if not self.min_batch <= len(batch) <= self.max_batch:
            raise CbamDeployError(f"batch {len(batch)} is outside this engine's profile ({self.min_batch}..{self.max_batch}): "
                                  "it would be split or padded, so its time would not be that batch's latency")
        self._events = (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))
        try:
            start = time.perf_counter()
            self._execute(np.ascontiguousarray(batch, dtype=np.float32))
            total = (time.perf_counter() - start) * 1e3
            return total, self._events[0].elapsed_time(self._events[1])
        finally:
            self._events = None

    def describe(self) -> dict:
        return {**super().describe(), "tensorrt": self.metadata.get("tensorrt"), "profile": [self.min_batch, self.max_batch],
                "tf32": self.metadata.get("tf32"), "dla_core": self.metadata.get("dla_core")}


def _torch_dtype(trt, dtype):
    """The torch dtype of a TensorRT I/O tensor type (float32 unless the engine says otherwise)."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
             "BOOL": torch.bool, "UINT8": torch.uint8, "INT64": torch.int64, "BF16": torch.bfloat16}
    return table.get(getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1]), torch.float32)
