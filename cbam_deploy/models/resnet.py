"""ResNet / ResNeXt with optional CBAM, SE or BAM attention, laid out like the official CBAM code.

Names and shapes match github Jongchan/attention-module ``MODELS/model_resnet.py`` (``conv1``, ``bn1``,
``layerX.Y.conv1..3``, ``layerX.Y.cbam.*``, ``bam1..3``, ``fc``), so its checkpoints load unchanged.
Differences, all invisible to a state dict:

* the head is a global average (``mean`` over H, W) instead of ``nn.AvgPool2d(7)``: identical at
  224x224 and still correct at other sizes, where the fixed 7x7 window averaged only a corner;
* Bottleneck takes ``groups``/``base_width`` so ResNeXt uses the same block (torchvision's rule);
* the attention module is chosen by ``attention`` in {None, "cbam", "se", "bam"};
* ``outputs="features"`` makes ``forward`` return the stage outputs ``{"C2", "C3", "C4", "C5"}`` (what
  detectors and FPNs consume) instead of logits. ``fc`` stays in the model, unused, so the state
  dict and every module name are those of the classifier: official checkpoints load unchanged.

CBAM (and SE) sit on the residual branch after the block's last BN, before the residual add and
the final ReLU; BAM sits after stages 1-3, as in the official code.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import BAM, CBAM, SqueezeExcite

ATTENTIONS = (None, "cbam", "se", "bam")
STEMS = ("imagenet", "cifar")
OUTPUTS = ("logits", "features")
FEATURE_NAMES = ("C2", "C3", "C4", "C5")  # layer1..layer4: strides 4, 8, 16, 32 (imagenet stem)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


class _Block(nn.Module):
    """Shared by both block types: the per-block attention module, under the name its checkpoints
    use (``cbam`` as in the official code, ``se``), applied after the last BN."""

    attention_name: str | None = None

    def _attach_attention(self, attention: str | None, channels: int) -> None:
        if attention == "cbam":
            self.cbam = CBAM(channels, 16)
        elif attention == "se":
            self.se = SqueezeExcite(channels, 16)
        self.attention_name = attention if attention in ("cbam", "se") else None

    def _attend(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.attention_name is None else getattr(self, self.attention_name)(out)


class BasicBlock(_Block):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: str | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self._attach_attention(attention, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self._attend(self.bn2(self.conv2(out)))
        return self.relu(out + residual)


class Bottleneck(_Block):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: str | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._attach_attention(attention, planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self._attend(self.bn3(self.conv3(out)))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """ResNet/ResNeXt with the official CBAM code's module names; ``stem`` 'imagenet' or 'cifar';
    ``outputs`` 'logits' (the classifier) or 'features' (a backbone: the dict of C2..C5)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        attention: str | None = None,
        stem: str = "imagenet",
        groups: int = 1,
        width_per_group: int = 64,
        width: int = 64,
        outputs: str = "logits",
    ) -> None:
        super().__init__()
        if outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.inplanes = width
        self.groups = groups
        self.base_width = width_per_group
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = None
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        if attention == "bam":
            self.bam1 = BAM(width * block.expansion)
            self.bam2 = BAM(2 * width * block.expansion)
            self.bam3 = BAM(4 * width * block.expansion)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        block_attention = attention if attention in ("cbam", "se") else None
        self.layer1 = self._make_layer(block, width, layers[0], 1, block_attention)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2, block_attention)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2, block_attention)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2, block_attention)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        self.num_classes = num_classes
        self.outputs = outputs  # a plain attribute: not in the state dict
        official_init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, attention: str | None) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        extra = {"groups": self.groups, "base_width": self.base_width}
        layers = [block(self.inplanes, planes, stride, downsample, attention, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, attention=attention, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four stage outputs, in order: C2 (layer1), C3 (layer2), C4 (layer3), C5 (layer4).

        With BAM, C2..C4 are taken after the stage's BAM, i.e. what the next stage consumes."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        stages = {}
        for name, stage, bam in zip(FEATURE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4),
                                    (self.bam1, self.bam2, self.bam3, None)):
            x = stage(x)
            if bam is not None:
                x = bam(x)
            stages[name] = x
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (C5), which the classifier head averages."""
        return self.forward_stages(x)["C5"]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.outputs == "features":
            return self.forward_stages(x)
        x = self.forward_features(x)
        return self.fc(x.mean(dim=(2, 3)))

    def extra_repr(self) -> str:
        return "outputs='features'" if self.outputs == "features" else ""


@torch.no_grad()
def official_init(model: nn.Module) -> None:
    """The official initialisation: He (fan_out) for convs, BN weight 1 / bias 0, every bias 0,
    and the CBAM spatial-gate BN weight 0 (so a fresh spatial gate starts as a constant 0.5)."""
    nn.init.kaiming_normal_(model.fc.weight)
    state = model.state_dict()
    for key, tensor in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight":
            if "conv" in key and tensor.dim() == 4:
                nn.init.kaiming_normal_(tensor, mode="fan_out")
            if "bn" in key:
                tensor.fill_(0.0 if "SpatialGate" in key else 1.0)
        elif leaf == "bias":
            tensor.zero_()


_DEPTHS = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


def resnet(depth: int, attention: str | None = None, num_classes: int = 1000, stem: str = "imagenet",
           width: int = 64, outputs: str = "logits") -> ResNet:
    """The official ``ResidualNet`` for depth 18/34/50/101 (and a one-block-per-stage depth 10)."""
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, num_classes=num_classes, attention=attention, stem=stem, width=width,
                  outputs=outputs)


def resnext50_32x4d(attention: str | None = None, num_classes: int = 1000, stem: str = "imagenet",
                    outputs: str = "logits") -> ResNet:
    """ResNeXt-50 32x4d (Xie et al.), as in the CBAM paper's Table 4."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, attention=attention, stem=stem,
                  groups=32, width_per_group=4, outputs=outputs)
