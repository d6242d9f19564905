"""Calibration and evaluation data: image folders, .npy/.npz arrays, and synthetic data on request.

Preprocessing comes from the bundle's manifest (``input.preprocess``) through ``preprocess_image``,
the one function that calibration, evaluation and serving all use.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import CbamDeployError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC = "synthetic"


def preprocess_image(image, spec: dict) -> np.ndarray:
    """PIL image -> float32 CHW, as the manifest says (``preprocessing``): RGB, fitted to the input
    (resize the shorter side and centre-crop, or letterbox: resize the longer side and pad), scaled,
    mean subtracted, divided by std.

    16-bit images (modes I;16* and I) are scaled by their depth (65535 -> 1.0), not clipped at 255.
    The work is bounded by the output whatever the aspect ratio: an image whose resized long side
    stays within 4x the resize target is resized whole and then cropped (the reference recipe, bit for
    bit); a longer one (a thin strip) is first cut to the region the crop needs, plus the filter's
    reach, and resized straight to the crop, so a 1 x 60000 strip costs what a square does."""
    def to_rgb(image):  # alpha on white; 16-bit -> one float channel on the 8-bit scale (0-255)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32), 0, 65535) * np.float32(255 / 65535))
        if image.mode != "RGB":
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            image = image.convert("RGB")
        return image

    pre = spec["preprocess"]
    method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre.get("interpolation", "bilinear")]
    if pre.get("mode") == "letterbox":
        image = _letterbox(to_rgb(image), int(pre["center_crop"]), method, int(pre.get("pad_value", 114)))
        return _normalise(np.asarray(image, dtype=np.float32), pre)
    resize, crop = int(pre["resize_shorter"]), int(pre["center_crop"])
    width, height = image.size
    scale = resize / min(width, height)
    new_w, new_h = max(resize, round(width * scale)), max(resize, round(height * scale))
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    if max(new_w, new_h) <= 4 * resize:
        image = to_rgb(image)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), method)
        image = image.crop((left, top, left + crop, top + crop))
    else:
        # the crop window in resized pixels (clipped to the resized image), mapped back to source pixels
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + crop, new_w), min(top + crop, new_h)
        sx, sy = width / new_w, height / new_h
        reach = math.ceil(3 * max(sx, sy, 1)) + 2  # wider than the support of any of the three filters
        rx0, ry0 = max(0, math.floor(x0 * sx) - reach), max(0, math.floor(y0 * sy) - reach)
        region = to_rgb(image.crop((rx0, ry0, min(width, math.ceil(x1 * sx) + reach), min(height, math.ceil(y1 * sy) + reach))))
        image = region.resize((x1 - x0, y1 - y0), method, box=(x0 * sx - rx0, y0 * sy - ry0, x1 * sx - rx0, y1 * sy - ry0))
        if image.size != (crop, crop):  # a crop larger than the resized image: black borders, as crop() gives
            window, image = image, Image.new(image.mode, (crop, crop))
            image.paste(window, (x0 - left, y0 - top))
    return _normalise(np.asarray(image, dtype=np.float32), pre)


def _normalise(array: np.ndarray, pre: dict) -> np.ndarray:
    """HWC pixels -> CHW, scaled and normalised as ``pre`` says."""
    if array.ndim == 2:  # a 16-bit image is one channel until here
        array = np.repeat(array[:, :, None], 3, axis=2)
    array = array * float(pre.get("scale", 1 / 255))
    array = (array - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _letterbox(image, size: int, method, pad_value: int):
    """The image resized so that its longer side is ``size`` (aspect kept), centred on a ``size`` x
    ``size`` canvas of ``pad_value`` (what Ultralytics' LetterBox does for a square input). A very long
    strip is resized from the rows or columns it keeps, so its cost is bounded by the output."""
    ratio, offset, resized = letterbox_geometry(*image.size, size)
    if resized != image.size:
        image = image.resize(resized, method, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (pad_value,) * 3)
    canvas.paste(image, offset)
    return canvas


def letterbox_geometry(width: int, height: int, size: int) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Where the letterbox puts an image of ``width`` x ``height`` in the ``size`` x ``size`` input: (its scale,
    (left, top) of the resized image, its (width, height)): what maps a box of the image into the input."""
    ratio = size / max(width, height)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    return ratio, ((size - new_w) // 2, (size - new_h) // 2), (new_w, new_h)


def load_image_file(path: Path, spec: dict) -> np.ndarray:
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


def has_images(root: Path) -> bool:
    """True as soon as one image file is found under ``root`` (a cheap check before any work)."""
    try:
        for folder, _dirs, files in os.walk(root):
            if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in files):
                return True
    except OSError:
        return False
    return False


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip


def array_file_kind(path: Path) -> str | None:
    """'npy' or 'npz' judged by the file's first bytes (not its name), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return None
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _ZIP_MAGICS:
        return "npz"
    return None


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
    # called with the number of samples each calibration step ran (a progress bar), when set
    on_samples: Callable[[int], None] | None = field(default=None, repr=False, compare=False)

    def advance(self, samples: int) -> None:
        """Report ``samples`` more calibration samples run (recipes call it as they go)."""
        if self.on_samples is not None:
            self.on_samples(samples)

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
        """The inputs in chunks of ``batch``, each reported (``advance``) as it is taken."""
        for start in range(0, len(self.inputs), batch):
            chunk = self.inputs[start:start + batch]
            self.advance(len(chunk))
            yield chunk


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
    kind = array_file_kind(path)
    if kind is not None:
        return _from_array(path, spec, size, seed, kind)
    if path.suffix.lower() in (".npy", ".npz"):
        raise CbamDeployError(f"cannot read calibration array {path}: its first bytes are neither a .npy header "
                              "nor a zip (.npz) archive; the file is corrupt or not NumPy data")
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


def _from_array(path: Path, spec: dict, size: int, seed: int, kind: str | None = None) -> CalibrationSet:
    kind = kind or array_file_kind(path)
    if kind is None:
        raise CbamDeployError(f"cannot read calibration array {path}: not a .npy or .npz file (judged by its first bytes)")
    try:
        # np.load itself chooses by content too; the kind decides how the result is unpacked
        if kind == "npz":
            with np.load(path, allow_pickle=False) as archive:
                if not isinstance(archive, np.lib.npyio.NpzFile):
                    raise CbamDeployError(f"cannot read calibration array {path}: not a .npz archive")
                if not archive.files:
                    raise CbamDeployError(f"{path} holds no arrays")
                array = archive[archive.files[0]]
        else:
            array = np.load(path, allow_pickle=False)
        if not isinstance(array, np.ndarray):
            raise CbamDeployError(f"cannot read calibration array {path}: it holds a {type(array).__name__}, not an array")
    except CbamDeployError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CbamDeployError(f"cannot read calibration array {path}: {message}") from None
    channels, height, width = expected_chw(spec)
    if array.ndim != 4 or len(array) == 0:
        raise CbamDeployError(f"{path}: expected a 4-D array (N, C, H, W float32 or N, H, W, C uint8), got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[-1] not in (1, 3, 4):
            raise CbamDeployError(f"{path}: a uint8 array must be NHWC images with 1, 3 or 4 channels, got shape {array.shape}")
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


def check_data_source(option: str, source: str | None, *, images_only: bool = False) -> None:
    """A calibration / verification source: 'synthetic', a folder holding images, or a NumPy file
    (recognised by its first bytes, not its name). ``images_only``: a folder (eval's ImageFolder)."""
    if source is None:
        return
    if not images_only and source == SYNTHETIC:
        return
    path = Path(source)
    if not path.exists():
        what = "a folder of images" if images_only else "a folder of images, a .npy/.npz file, or 'synthetic'"
        raise CbamDeployError(f"{option} {path} does not exist ({what})")
    if path.is_dir():
        if not has_images(path):
            raise CbamDeployError(f"{option} {path} holds no images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
        return
    if images_only:
        raise CbamDeployError(f"{option} {path} is not a folder (ImageFolder layout: one sub-folder per class)")
    if array_file_kind(path) is None:
        raise CbamDeployError(
            f"{option} {path} is neither a folder of images nor a NumPy .npy/.npz file (judged by its first bytes)"
        )
