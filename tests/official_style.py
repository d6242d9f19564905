"""An independent re-statement of the official CBAM ResNet (Jongchan/attention-module) *as written
there*: pools with kernels taken from ``x.size()``, ``torch.max(x, 1)[0].unsqueeze(1)`` channel pool,
a fixed ``AvgPool2d(7)`` head, ``view``-based flattening. It has the official module names, so its
state dict has the official key layout; tests compare cbam_deploy's export-friendly rewrite with it
and build official-format checkpoints from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Flat(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class _Channel(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.mlp = nn.Sequential(_Flat(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        kernel = (x.size(2), x.size(3))
        avg = self.mlp(F.avg_pool2d(x, kernel, stride=kernel))
        mx = self.mlp(F.max_pool2d(x, kernel, stride=kernel))
        return x * torch.sigmoid(avg + mx).unsqueeze(2).unsqueeze(3).expand_as(x)


class _Spatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _Conv()

    def forward(self, x):
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class _Cbam(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ChannelGate = _Channel(c)
        self.SpatialGate = _Spatial()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inp, planes, stride=1, down=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = down
        self.cbam = _Cbam(planes)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = self.cbam(out)
        out += residual
        return self.relu(out)


class _Bottle(nn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride=1, down=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = down
        self.cbam = _Cbam(planes * 4)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.cbam(self.bn3(self.conv3(out)))
        out += residual
        return self.relu(out)


class OfficialStyleResNet(nn.Module):
    """ImageNet-type CBAM ResNet in the official code's style and key layout."""

    def __init__(self, depth: int = 18, num_classes: int = 1000):
        super().__init__()
        block, layers = {18: (_Basic, [2, 2, 2, 2]), 34: (_Basic, [3, 4, 6, 3]),
                         50: (_Bottle, [3, 4, 6, 3]), 101: (_Bottle, [3, 4, 23, 3])}[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.avgpool = nn.AvgPool2d(7)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block, planes, count, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random statistics and affine parameters (and every spatial-gate BN a real
    weight), so that all gates vary with the input: a stand-in for trained weights in parity tests."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            module.weight.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.copy_(0.2 * torch.randn(n, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        elif isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()
