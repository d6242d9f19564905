"""Attention layers: CBAM, SE and BAM, written for export.

Module and parameter names follow the official implementation (github Jongchan/attention-module,
MODELS/cbam.py and MODELS/bam.py) so that its checkpoints load unchanged. The forward passes are
rewritten so that ONNX export works with dynamic batch and dynamic H/W:

* global pools are ``mean``/``amax`` over (2, 3) with ``keepdim=True`` instead of
  ``avg_pool2d(x, (x.size(2), x.size(3)))``, whose kernel the exporter bakes in;
* the channel pool is ``amax``/``mean`` over dim 1 with ``keepdim=True`` instead of
  ``torch.max(x, 1)[0].unsqueeze(1)`` (no ArgMax, no ReduceMax shape-inference trouble);
* no ``x.size()``-derived values reach the graph; flattening uses ``flatten(1)``.

The arithmetic is the official one: channel gate = sigmoid(MLP(avg) + MLP(max)), spatial gate =
sigmoid(BN(conv7x7([max, mean]))), applied in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Flatten(nn.Module):
    """``x.flatten(1)``; kept as a module so the MLP's Linear layers sit at indices 1 and 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class BasicConv(nn.Module):
    """Conv2d, optional BatchNorm (eps 1e-5, momentum 0.01 as in the official code), optional ReLU."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        relu: bool = True,
        bn: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


def _logsumexp_pool(x: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over H and W, numerically stable (the official 'lse' pool)."""
    flat = x.flatten(2)
    peak = flat.amax(dim=2, keepdim=True)
    return (peak + (flat - peak).exp().sum(dim=2, keepdim=True).log()).unsqueeze(-1)


_POOLS = {
    "avg": lambda x: x.mean(dim=(2, 3), keepdim=True),
    "max": lambda x: x.amax(dim=(2, 3), keepdim=True),
    "lp": lambda x: x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt(),
    "lse": _logsumexp_pool,
}


def shared_mlp(channels: int, hidden: int) -> nn.Sequential:
    """Flatten, Linear(C, C/r), ReLU, Linear(C/r, C), both with bias: the official layout
    (Linear layers at indices 1 and 3, as the checkpoints name them)."""
    return nn.Sequential(Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))


class ChannelGate(nn.Module):
    """Channel attention: pooled descriptors through one shared MLP, summed, sigmoid, multiplied on."""

    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types: Sequence[str] = ("avg", "max")):
        super().__init__()
        unknown = [p for p in pool_types if p not in _POOLS]
        if unknown or not pool_types:
            raise ValueError(f"pool_types must be a non-empty subset of {sorted(_POOLS)}, got {list(pool_types)}")
        self.gate_channels = gate_channels
        hidden = max(gate_channels // reduction_ratio, 1)
        self.mlp = shared_mlp(gate_channels, hidden)
        self.pool_types = list(pool_types)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate, shape (N, C, 1, 1), values in (0, 1)."""
        total = None
        for pool_type in self.pool_types:
            raw = self.mlp(_POOLS[pool_type](x))
            total = raw if total is None else total + raw
        return torch.sigmoid(total)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class ChannelPool(nn.Module):
    """Pool over channels to two maps, in the official order [max, mean]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)


class SpatialGate(nn.Module):
    """Spatial attention: [max, mean] over channels, 7x7 conv + BN to one map, sigmoid, multiplied on."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial gate, shape (N, 1, H, W), values in (0, 1)."""
        return torch.sigmoid(self.spatial(self.compress(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel gate, then spatial gate."""

    def __init__(
        self,
        gate_channels: int,
        reduction_ratio: int = 16,
        pool_types: Sequence[str] = ("avg", "max"),
        no_spatial: bool = False,
    ) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ChannelGate(x)
        if not self.no_spatial:
            x = self.SpatialGate(x)
        return x


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): average pool, MLP with biases (C -> C/r -> C), sigmoid gate.

    Same MLP as CBAM's channel gate with the average pool only, which is how the CBAM paper's
    "+SE" baselines are built (ResNet50+SE 28.09M parameters).
    """

    def __init__(self, channels: int, reduction_ratio: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction_ratio, 1)
        self.fc = shared_mlp(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))[:, :, None, None]


class BAMChannelGate(nn.Module):
    """BAM channel branch (official MODELS/bam.py ``ChannelGate``): avg pool, FC-BN-ReLU, FC."""

    def __init__(self, gate_channel: int, reduction_ratio: int = 16, num_layers: int = 1) -> None:
        super().__init__()
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        widths = [gate_channel] + [gate_channel // reduction_ratio] * num_layers + [gate_channel]
        for i in range(len(widths) - 2):
            self.gate_c.add_module(f"gate_c_fc_{i}", nn.Linear(widths[i], widths[i + 1]))
            self.gate_c.add_module(f"gate_c_bn_{i + 1}", nn.BatchNorm1d(widths[i + 1]))
            self.gate_c.add_module(f"gate_c_relu_{i + 1}", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(widths[-2], widths[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_c(x.mean(dim=(2, 3), keepdim=True))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    """BAM spatial branch (official ``SpatialGate``): 1x1 reduce, two dilated 3x3 convs, 1x1 to one map."""

    def __init__(self, gate_channel: int, reduction_ratio: int = 16, dilation_conv_num: int = 2, dilation_val: int = 4):
        super().__init__()
        reduced = gate_channel // reduction_ratio
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(gate_channel, reduced, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(reduced))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            self.gate_s.add_module(
                f"gate_s_conv_di_{i}",
                nn.Conv2d(reduced, reduced, kernel_size=3, padding=dilation_val, dilation=dilation_val),
            )
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(reduced))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(reduced, 1, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_s(x)


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., BMVC 2018): x * (1 + sigmoid(channel * spatial))."""

    def __init__(self, gate_channel: int) -> None:
        super().__init__()
        self.channel_att = BAMChannelGate(gate_channel)
        self.spatial_att = BAMSpatialGate(gate_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x)))


__all__ = [
    "BAM",
    "CBAM",
    "BasicConv",
    "ChannelGate",
    "ChannelPool",
    "SpatialGate",
    "SqueezeExcite",
]
