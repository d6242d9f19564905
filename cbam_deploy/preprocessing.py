"""How an image becomes the model's input, as the manifest records it (``input.preprocess``), and the
options a user sets it with.

Two ways to fit an image to the model's square input of side ``size``:

- ``crop`` (ImageNet classifiers, timm): resize the shorter side to ``resize_shorter`` (``size /
  crop_pct``), then take the centre ``size`` x ``size``;
- ``letterbox`` (YOLO detectors): resize the longer side to ``size`` keeping the aspect ratio, then pad
  the rest with ``pad_value`` (114, Ultralytics' grey) to ``size`` x ``size``, the image centred.

Then every pixel is scaled (``scale``: 1/255 for 8-bit images) and normalised (``(x - mean) / std``;
a detector trained on 0-1 pixels has mean 0 and std 1). Calibration, verify, explain, eval and serve
all read the same record, so an artifact is fed as its model was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .checks import check_choice
from .errors import CbamDeployError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875
MODES = ("crop", "letterbox")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
LETTERBOX_PAD = 114


@dataclass(frozen=True)
class Preprocessing:
    """See the module doc. ``crop_pct`` None: the default (0.875 from 64 px up; no resize margin below)."""

    mode: str = "crop"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1 / 255
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    pad_value: int = LETTERBOX_PAD

    def __post_init__(self) -> None:
        check_choice("--resize", self.mode, MODES)
        check_choice("--interpolation", self.interpolation, INTERPOLATIONS)
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise CbamDeployError(f"--mean and --std take 1 or 3 numbers each, as many of one as of the other; got "
                                  f"{list(self.mean)} and {list(self.std)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.scale)):
            raise CbamDeployError("--mean, --std and --scale must be finite numbers")
        if any(v <= 0 for v in self.std) or self.scale <= 0:
            raise CbamDeployError(f"--std and --scale must be positive, got std {list(self.std)}, scale {self.scale}")
        if self.crop_pct is not None and not 0.1 <= self.crop_pct <= 1.0:
            raise CbamDeployError(f"--crop-pct must be between 0.1 and 1, got {self.crop_pct}")
        if not 0 <= self.pad_value <= 255:
            raise CbamDeployError(f"the letterbox pad value must be 0..255, got {self.pad_value}")

    def record(self, size: int) -> dict:
        """The manifest's ``input.preprocess`` for a model input of side ``size``."""
        crop_pct = self.crop_pct if self.crop_pct is not None else (CROP_PCT if size >= 64 else 1.0)
        record = {
            "mode": self.mode,
            "resize_shorter": size if self.mode == "letterbox" else int(round(size / crop_pct)),
            "center_crop": size,
            "interpolation": self.interpolation,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.mode == "letterbox":
            record["pad_value"] = self.pad_value
        return record

    def with_overrides(self, **overrides) -> Preprocessing:
        """This one with the options a user set (None: keep)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        return Preprocessing(**{**self.__dict__, **values})


def parse_numbers(value, option: str) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' (or a number, or a list) -> a tuple of floats; None stays None."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, (int, float)) else \
        [v for v in str(value).replace(" ", "").split(",") if v]
    try:
        numbers = tuple(_number(v) for v in items)
    except (TypeError, ValueError, ZeroDivisionError):
        raise CbamDeployError(f"{option} takes numbers separated by commas (e.g. 0.485,0.456,0.406), got {value!r}") \
            from None
    if not numbers:
        raise CbamDeployError(f"{option} takes at least one number")
    return numbers


def _number(text) -> float:
    """A number, or a fraction written 'a/b' (1/255)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    top, slash, bottom = str(text).partition("/")
    return float(top) / float(bottom) if slash else float(top)


def preprocessing_options(resize: str | None = None, mean=None, std=None, scale=None, crop_pct=None,
                          interpolation: str | None = None) -> dict:
    """The preprocessing a user set (the CLI's ``--resize --mean --std --scale --crop-pct
    --interpolation``), checked: only the options given, as ``Preprocessing.with_overrides`` takes them."""
    overrides = {"mode": resize, "mean": parse_numbers(mean, "--mean"), "std": parse_numbers(std, "--std"),
                 "scale": parse_numbers(scale, "--scale")[0] if scale is not None else None,
                 "crop_pct": parse_numbers(crop_pct, "--crop-pct")[0] if crop_pct is not None else None,
                 "interpolation": interpolation}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    Preprocessing().with_overrides(**overrides)  # checked now, before any work
    return overrides
