"""The PyTorch eager original, the reference every artifact is compared with."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return out.float().cpu().numpy()
