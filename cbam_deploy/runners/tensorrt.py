"""TensorRT engines through the name-based I/O API (TensorRT 8.5+): ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; device buffers are torch CUDA tensors (no pycuda).
The engine's sidecar metadata is checked first: an engine from another TensorRT version or GPU is
refused with a message that says to rebuild it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CbamDeployError
from ..exporters.tensorrt import check_engine_compatible, current_gpu, require_tensorrt, sidecar
from .base import Runner


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, precision: str = "fp32") -> None:
        trt = require_tensorrt()
        import torch

        meta_path = sidecar(Path(engine_path))
        if not meta_path.is_file():
            raise CbamDeployError(f"{engine_path} has no metadata sidecar {meta_path.name}; rebuild the engine with cbam-deploy")
        check_engine_compatible(json.loads(meta_path.read_text()), trt.__version__, current_gpu())
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise CbamDeployError(f"TensorRT could not load {engine_path}; rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()
        self._events = None  # (start, end) CUDA events while run_timed measures
        self.device = f"cuda:{torch.cuda.current_device()}"
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):  # copies and execution ordered on one stream
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda(non_blocking=True)
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise CbamDeployError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile; "
                                      "rebuild it with a larger --max-batch or send smaller batches")
            outputs = {}
            for name in self.output_names:
                outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device=x.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            if self._events:
                self._events[0].record(self.stream)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CbamDeployError("TensorRT execution failed")
            if self._events:
                self._events[1].record(self.stream)
            host = {name: y.to("cpu", non_blocking=False) for name, y in outputs.items()}
        self.stream.synchronize()
        return {name: y.numpy() for name, y in host.items()}

    def run_timed(self, batch: np.ndarray) -> tuple[float, float | None]:
        """End to end on the host clock; the engine's execution alone with CUDA events on its stream."""
        import time

        self._events = (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))
        try:
            start = time.perf_counter()
            self.infer(batch)
            total = (time.perf_counter() - start) * 1e3
            return total, self._events[0].elapsed_time(self._events[1])
        finally:
            self._events = None
