"""The PyTorch eager original, the reference every artifact is compared with (cpu or cuda, fp32 or
fp16). On CUDA, TF32 is switched off first: ``torch.backends.cudnn.allow_tf32`` defaults to True, so
on Ampere and newer (every Orin) an "fp32" convolution would round its inputs to 10-bit mantissas and
the reference itself would miss the fp32 parity bound. fp16 is meant for CUDA (the reference for
fp16 engines); on a CPU it runs where this torch build has the kernels, slowly. On CUDA, the copy of
the output to the host synchronises the device, so a host-timed call covers the whole inference."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ..errors import CbamDeployError
from ..outputs import flatten_outputs
from .base import Runner


def disable_tf32() -> dict:
    """Make fp32 mean fp32 on CUDA for this process (cuDNN convolutions and cuBLAS matmuls); returns
    the flags as they are now. Process-wide: every torch CUDA model in the process is affected."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return tf32_state()


def tf32_state() -> dict:
    return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


class TorchRunner(Runner):
    backend = "torch"
    # measured (resnet50_cbam, 2 cores): an onnxruntime call right after a PyTorch eager call took 9%
    # longer than one after another onnxruntime call; 10 ms apart, the difference was gone
    settle_seconds = 0.01

    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32") -> None:
        if precision not in ("fp32", "fp16"):
            raise CbamDeployError(f"the torch runner runs fp32 or fp16, not {precision}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CbamDeployError("device cuda asked for, but torch sees no CUDA GPU")
        if device.startswith("cuda"):
            disable_tf32()
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

    def describe(self) -> dict:
        info = super().describe()
        if self.device.startswith("cuda"):
            info["tf32"] = any(tf32_state().values())
        return info
