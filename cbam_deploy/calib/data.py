"""Calibration and evaluation data: image folders, .npy/.npz arrays, and synthetic data on request.

Preprocessing comes from the bundle's manifest (``input.preprocess``) through ``preprocess_image``,
the one function that calibration, evaluation and serving all use.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CbamDeployError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC = "synthetic"


def preprocess_image(image, spec: dict) -> np.ndarray:
    """PIL image -> float32 CHW, as the manifest says: RGB, resize shorter side, center crop,
    scale to [0, 1], subtract mean, divide by std."""
    from PIL import Image

    pre = spec["preprocess"]
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    resize = int(pre["resize_shorter"])
    width, height = image.size
    scale = resize / min(width, height)
    new_size = (max(resize, round(width * scale)), max(resize, round(height * scale)))
    if new_size != image.size:
        method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre.get("interpolation", "bilinear")]
        image = image.resize(new_size, method)
    crop = int(pre["center_crop"])
    left = (image.size[0] - crop) // 2
    top = (image.size[1] - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    array = np.asarray(image, dtype=np.float32) * float(pre.get("scale", 1 / 255))
    array = (array - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_image_file(path: Path, spec: dict) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return preprocess_image(image, spec)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise _Unreadable(str(exc)) from None


class _Unreadable(Exception):
    pass


def find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs (N, C, H, W float32) and where they came from."""

    inputs: np.ndarray
    source: str
    kind: str  # "images", "arrays" or "synthetic"
    fingerprint: str
    skipped: int = 0
    total_found: int = 0
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        info = {
            "source": self.source,
            "kind": self.kind,
            "samples": int(len(self.inputs)),
            "fingerprint": self.fingerprint,
            "skipped_unreadable": self.skipped,
            "found": self.total_found,
        }
        if self.kind == SYNTHETIC:
            info["fit_for_production"] = False
        if self.warnings:
            info["warnings"] = self.warnings
        return info

    def batches(self, batch: int):
        for start in range(0, len(self.inputs), batch):
            yield self.inputs[start:start + batch]


def expected_chw(spec: dict) -> tuple[int, int, int]:
    crop = int(spec["preprocess"]["center_crop"])
    channels = spec["shape"][1] if isinstance(spec["shape"][1], int) else 3
    return channels, crop, crop


def load_calibration(source: str, spec: dict, size: int = 128, seed: int = 0) -> CalibrationSet:
    """Read ``size`` samples (seeded, deterministic choice) from a folder, an array file, or 'synthetic'."""
    if size < 1:
        raise CbamDeployError(f"--calib-size must be at least 1, got {size}")
    if source == SYNTHETIC:
        return _synthetic(spec, size, seed)
    path = Path(source)
    if not path.exists():
        raise CbamDeployError(f"calibration data {path} does not exist (a folder of images, a .npy/.npz file, or 'synthetic')")
    if path.is_dir():
        return _from_folder(path, spec, size, seed)
    if path.suffix.lower() in (".npy", ".npz"):
        return _from_array(path, spec, size, seed)
    raise CbamDeployError(f"calibration data {path} is neither a folder of images nor a .npy/.npz file")


def _choose(count: int, size: int, seed: int) -> np.ndarray:
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def _from_folder(root: Path, spec: dict, size: int, seed: int) -> CalibrationSet:
    try:
        files = find_images(root)
    except OSError as exc:
        raise CbamDeployError(f"cannot read calibration folder {root}: {exc}") from None
    if not files:
        raise CbamDeployError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
    order = np.random.default_rng(seed).permutation(len(files))  # seeded: the same files every run
    arrays, used, skipped = [], [], 0
    for index in order:
        if len(arrays) == size:
            break
        try:
            arrays.append(load_image_file(files[index], spec))
            used.append(files[index])
        except _Unreadable:
            skipped += 1
    if not arrays:
        raise CbamDeployError(f"calibration folder {root}: none of its {len(files)} image files could be read")
    digest = hashlib.sha256()
    for path in sorted(used):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(str(path.stat().st_size).encode())
        digest.update(str(path.stat().st_mtime_ns).encode())
    inputs = np.stack(arrays).astype(np.float32)
    warnings = []
    if len(arrays) < size:
        warnings.append(f"asked for {size} samples, the folder gave {len(arrays)}")
    return CalibrationSet(inputs, str(root), "images", digest.hexdigest()[:16], skipped, len(files), warnings)


def _from_array(path: Path, spec: dict, size: int, seed: int) -> CalibrationSet:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if not archive.files:
                    raise CbamDeployError(f"{path} holds no arrays")
                array = archive[archive.files[0]]
        else:
            array = np.load(path, allow_pickle=False)
    except CbamDeployError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CbamDeployError(f"cannot read calibration array {path}: {str(exc).splitlines()[0]}") from None
    channels, height, width = expected_chw(spec)
    if array.ndim != 4 or len(array) == 0:
        raise CbamDeployError(f"{path}: expected a 4-D array (N, C, H, W float32 or N, H, W, C uint8), got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[-1] not in (1, 3, 4):
            raise CbamDeployError(f"{path}: a uint8 array must be NHWC images with 1, 3 or 4 channels, got shape {array.shape}")
        from PIL import Image

        chosen = array[_choose(len(array), size, seed)]
        inputs = np.stack([preprocess_image(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img), spec) for img in chosen])
    elif np.issubdtype(array.dtype, np.floating):
        if tuple(array.shape[1:]) != (channels, height, width):
            raise CbamDeployError(
                f"{path}: float arrays must be preprocessed NCHW of shape (N, {channels}, {height}, {width}) to match "
                f"the bundle's input; got {array.shape}"
            )
        inputs = array[_choose(len(array), size, seed)].astype(np.float32)
    else:
        raise CbamDeployError(f"{path}: dtype {array.dtype} is neither float (preprocessed NCHW) nor uint8 (NHWC images)")
    if not np.isfinite(inputs).all():
        raise CbamDeployError(f"{path} holds NaN or Inf values")
    digest = hashlib.sha256(np.ascontiguousarray(inputs).tobytes()).hexdigest()[:16]
    return CalibrationSet(np.ascontiguousarray(inputs), str(path), "arrays", digest, 0, len(array))


def _synthetic(spec: dict, size: int, seed: int) -> CalibrationSet:
    channels, height, width = expected_chw(spec)
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 1, (size, height, width, channels)).astype(np.float32)
    pre = spec["preprocess"]
    inputs = ((pixels - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)).transpose(0, 3, 1, 2)
    return CalibrationSet(
        np.ascontiguousarray(inputs), SYNTHETIC, SYNTHETIC, f"synthetic-{seed}-{size}", 0, size,
        ["synthetic random data: ranges are not representative; do not ship this artifact"],
    )


@dataclass
class LabelledImages:
    """An ImageFolder: one sub-folder per class, classes in sorted order = output indices."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


def image_folder(root: str | Path) -> LabelledImages:
    root = Path(root)
    if not root.is_dir():
        raise CbamDeployError(f"evaluation data {root} is not a folder (ImageFolder layout: one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise CbamDeployError(f"{root} has no class sub-folders (ImageFolder layout: root/<class>/<image>)")
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in find_images(root / name):
            paths.append(path)
            labels.append(index)
    if not paths:
        raise CbamDeployError(f"{root}: its class folders hold no images")
    return LabelledImages(paths, np.asarray(labels), classes)
