"""CBAM as people write it outside cbam-deploy: small networks (few channels, 32x32 inputs) in the
styles found in public code, for the gate finder and the promises built on it (INT8 gate policy,
attention parity, explain). None of them uses cbam_deploy's classes. Each factory's ``EXPECTED``
entry says which gates it holds.

* ``third_party_resnet``: a CBAM ResNet in the style of the popular third-party repositories:
  ``ChannelAttention`` / ``SpatialAttention`` return the sigmoid map and the block multiplies
  (``out = self.ca(out) * out``); the MLP is two 1x1 convs without bias; ``nn.Sigmoid`` modules;
  ``AdaptiveAvgPool2d(1)`` / ``AdaptiveMaxPool2d(1)``; spatial input [mean, max] over channels.
* ``yolo_detector``: a detector in the Ultralytics layout: ``Conv`` = conv + BN + SiLU everywhere,
  CBAM channel attention = avg pool, one 1x1 conv (no reduction), ``nn.Sigmoid``; spatial attention
  = cat(mean, max), 7x7 conv, sigmoid; the multiply inside each module; two outputs; and a hand-written
  SiLU (``x * torch.sigmoid(x)``) that must not be taken for a gate.
* ``neutral_names``: gates named ``Recalibrate`` / ``Locate``, ``torch.sigmoid``, a ``Linear`` MLP
  with ``.view(b, c)`` reshapes, the multiply in the parent.
* ``official_layout``: the official layout (``ChannelGate`` / ``SpatialGate`` with the multiply
  inside, Linear MLP, ``torch.sigmoid``, pools with kernels from ``x.size()``, ``expand_as``).
* ``se_eca``: a squeeze-excitation gate with hard-sigmoid (MobileNetV3 style, multiply inside) and an
  ECA gate (avg pool, 1-D conv across channels, sigmoid), next to hard-swish activations written as
  ``nn.Hardswish`` and as ``x * F.hardsigmoid(x)``, which are not gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# {factory: {kind: count}}: the gates each network holds
EXPECTED = {
    "third_party_resnet": {"channel": 2, "spatial": 2},
    "yolo_detector": {"channel": 2, "spatial": 2},
    "neutral_names": {"channel": 2, "spatial": 2},
    "official_layout": {"channel": 2, "spatial": 2},
    "se_eca": {"channel": 2},
}


# --- third-party CBAM ResNet: attention modules return the map, the block multiplies ---------------

class ChannelAttention(nn.Module):
    def __init__(self, planes, ratio=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(planes, planes // ratio, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(planes // ratio, planes, 1, bias=False))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return self.sigmoid(self.fc(self.avg_pool(x)) + self.fc(self.max_pool(x)))


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        return self.sigmoid(self.conv1(torch.cat([avg_out, max_out], dim=1)))


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.ca = ChannelAttention(planes)
        self.sa = SpatialAttention()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.ca(out) * out
        out = self.sa(out) * out
        out += residual
        return self.relu(out)


class ThirdPartyResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- an Ultralytics-layout detector: SiLU everywhere, CBAM multiplies inside ------------------------

class Conv(nn.Module):
    """conv + BN + SiLU, as Ultralytics writes it."""

    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class UChannelAttention(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.pool(x)))


class USpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return x * self.act(self.cv1(torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)))


class UCBAM(nn.Module):
    def __init__(self, c1, kernel_size=7):
        super().__init__()
        self.channel_attention = UChannelAttention(c1)
        self.spatial_attention = USpatialAttention(kernel_size)

    def forward(self, x):
        return self.spatial_attention(self.channel_attention(x))


class HandSiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)  # SiLU written out: the same tensor twice, not a gate


class YoloDetector(nn.Module):
    """Two outputs, as a detection head gives them: boxes (N, 4, A) and class scores (N, 3, A)."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.cbam1 = UCBAM(16)
        self.down = Conv(16, 32, 3, 2)
        self.act = HandSiLU()
        self.cbam2 = UCBAM(32)
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        x = self.cbam1(self.stem(x))
        x = self.cbam2(self.act(self.down(x)))
        return self.box(x).flatten(2), self.cls(x).flatten(2).sigmoid()


# --- neutral names, torch.sigmoid, Linear MLP, multiply in the parent -------------------------------

class Recalibrate(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(inplace=True), nn.Linear(c // r, c))

    def forward(self, x):
        b, c, _, _ = x.size()
        avg = self.squeeze(F.adaptive_avg_pool2d(x, 1).view(b, c))
        mx = self.squeeze(F.adaptive_max_pool2d(x, 1).view(b, c))
        return torch.sigmoid(avg + mx).view(b, c, 1, 1)


class Locate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        return torch.sigmoid(self.bn(self.conv(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1))))


class Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.w1 = Recalibrate(cout)
        self.w2 = Locate()

    def forward(self, x):
        y = self.body(x)
        y = y * self.w1(y)
        return y * self.w2(y)


class NeutralNames(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.s1 = Stage(3, 16)
        self.s2 = Stage(16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.s2(self.s1(x)).mean((2, 3)))


# --- the official layout: multiply inside, Linear MLP, pools with kernels from x.size() -------------

class _Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.mlp = nn.Sequential(_Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        kernel = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, kernel, stride=kernel)) + self.mlp(F.max_pool2d(x, kernel, stride=kernel))
        return x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class OfficialCBAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ChannelGate = ChannelGate(c)
        self.SpatialGate = SpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class OfficialLayout(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.cbam1 = OfficialCBAM(16)
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.cbam2 = OfficialCBAM(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.cbam2(self.conv2(self.cbam1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# --- SE with hard-sigmoid and ECA, beside hard-swish activations ------------------------------------

class SqueezeExcitation(nn.Module):
    def __init__(self, c, squeeze=8):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return self.scale_activation(scale) * x


class EfficientChannel(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = x.mean((2, 3), keepdim=True)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * y.sigmoid()


class SeEca(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.se = SqueezeExcitation(16)
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32))
        self.eca = EfficientChannel()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.se(self.conv1(x))
        x = self.conv2(x)
        x = x * F.hardsigmoid(x)  # hard-swish written out: not a gate
        return self.fc(self.eca(x).mean((2, 3)))


def _seeded(cls):
    """Seeded weights and live BN statistics, so every gate varies with the input."""
    torch.manual_seed(0)
    model = cls()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


def third_party_resnet():
    return _seeded(ThirdPartyResNet)


def yolo_detector():
    return _seeded(YoloDetector)


def neutral_names():
    return _seeded(NeutralNames)


def official_layout():
    return _seeded(OfficialLayout)


def se_eca():
    return _seeded(SeEca)


# --- a model torch.export cannot trace (a branch on the data); the ONNX exporter bakes the branch in --

class DataBranch(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.gate = UChannelAttention(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        y = self.gate(self.conv(x))
        if float(y.mean()) > 1e9:  # never true; torch.export refuses to guess
            y = y * 2
        return self.fc(y.mean((2, 3)))


def untraceable():
    return _seeded(DataBranch)
