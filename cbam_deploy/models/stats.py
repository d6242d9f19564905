"""Parameter and FLOP counts, computed from the model (never typed in)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> float:
    """Multiply-accumulates (in G) of one forward pass at batch 1, counted by torch's FlopCounterMode.

    Reported as "GFLOPs" in the MAC convention of torchvision and the CBAM paper (ResNet-50: 4.1).
    Runs on the meta device when the model is there, so it costs no real compute.
    """
    device = next(model.parameters()).device
    x = torch.empty(1, in_channels, input_size, input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / 1e9
