"""Bring-your-own CBAM networks that are not classifiers, for the multi-output tests: a detector
with tuple outputs, a segmenter with one dense output, and a model answering a dict."""

import torch
from torch import nn

from cbam_deploy.models.layers import CBAM


class _Stem(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.cbam = CBAM(channels, reduction_ratio=8)

    def forward(self, x):
        return self.cbam(self.conv(x))


class Detector(nn.Module):
    """(boxes (N, A, 4), scores (N, A, classes)) from a 4x4 grid of anchors."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = _Stem()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.box = nn.Conv2d(32, 4, 1)
        self.cls = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        f = self.pool(self.backbone(x))
        boxes = self.box(f).flatten(2).transpose(1, 2)
        scores = self.cls(f).flatten(2).transpose(1, 2).sigmoid()
        return boxes, scores


class Segmenter(nn.Module):
    """Per-pixel class scores at the input's resolution: one dense output."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = _Stem()
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.backbone(x)), scale_factor=2.0, mode="bilinear",
                                         align_corners=False)


class Embedder(nn.Module):
    """A dict: an embedding and a heatmap."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Stem()
        self.proj = nn.Linear(32, 16)
        self.heat = nn.Conv2d(32, 1, 1)

    def forward(self, x):
        f = self.backbone(x)
        return {"embedding": self.proj(f.mean((2, 3))), "heatmap": self.heat(f)}


def _seeded(cls):
    torch.manual_seed(0)
    model = cls()
    for module in model.modules():  # live BN statistics, so every gate matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def detector():
    return _seeded(Detector)


def segmenter():
    return _seeded(Segmenter)


def embedder():
    return _seeded(Embedder)


class DeclaredEmbedder(Embedder):
    """The embedder, saying what its outputs are: the (N, 16) embedding is no classifier's logits."""

    output_kinds = {"embedding": "dense"}


def embedder_declared():
    return _seeded(DeclaredEmbedder)
