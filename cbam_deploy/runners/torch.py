"""The PyTorch eager original, the reference every artifact is compared with (cpu or cuda, fp32 or
fp16). On CUDA, the copy of the output to the host synchronises the device, so a host-timed call
covers the whole inference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import CbamDeployError
from ..outputs import flatten_outputs
from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16"):
            raise CbamDeployError(f"the torch runner runs fp32 or fp16, not {precision}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CbamDeployError("device cuda asked for, but torch sees no CUDA GPU")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.eval().to(device=device, dtype=self.dtype)
        self.device = device
        self.precision = precision

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=self.dtype)
            out = self.model(x)
        return {name: t.float().cpu().numpy() for name, t in flatten_outputs(out)}

    def run_timed(self, batch: np.ndarray) -> tuple[float, float | None]:
        if not self.device.startswith("cuda"):
            return super().run_timed(batch)
        import time

        start = time.perf_counter()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=self.dtype)
            begin.record()
            out = self.model(x)
            end.record()
            [t.float().cpu() for _, t in flatten_outputs(out)]
        return (time.perf_counter() - start) * 1e3, begin.elapsed_time(end)

    def threads(self) -> int | None:
        return torch.get_num_threads() if self.device == "cpu" else None
