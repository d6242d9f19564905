"""A small synthetic detection set in YOLO format: filled circles, squares and triangles on noisy flat
backgrounds (3 classes), drawn from one seed, so the reference detector is trained and judged offline.

Layout (Ultralytics' own): ``ROOT/images/{train,val}/NNNNN.png``, ``ROOT/labels/{train,val}/NNNNN.txt``
(one ``class cx cy w h`` line per object, normalised to 0-1), ``ROOT/data.yaml``. The same seed and
counts give the same files, byte for byte (numpy's PCG64 and PIL's drawing, nothing else random).

    python -m reference.shapes OUT [--train 300] [--val 100] [--size 160] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

NAMES = ("circle", "square", "triangle")
IMAGE_SIZE = 160
TRAIN_IMAGES = 300
VAL_IMAGES = 100
SEED = 0
MAX_OBJECTS = 3
MIN_CONTRAST = 120  # the sum of |object colour - background colour| over RGB, at least


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def draw(rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One image (PIL, RGB) and its labels [(class, cx, cy, w, h)] normalised to the image side."""
    from PIL import Image, ImageDraw

    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(20):  # a place that barely overlaps the others
            side = int(rng.integers(size // 8, size // 3))
            x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_overlap(box, other) < 0.1 for other in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(NAMES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        while np.abs(np.array(colour) - background).sum() < MIN_CONTRAST:
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if cls == 0:
            pen.ellipse(box, fill=colour)
        elif cls == 1:
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
        boxes.append(box)
        labels.append((cls, (x0 + side / 2) / size, (y0 + side / 2) / size, side / size, side / size))
    return image, labels


def write_shapes(root: str | Path, train: int = TRAIN_IMAGES, val: int = VAL_IMAGES, size: int = IMAGE_SIZE,
                 seed: int = SEED) -> Path:
    """Write the set under ``root``; returns its ``data.yaml`` (absolute ``path``, as Ultralytics reads it)."""
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, objects = draw(rng, size)
            image.save(images / f"{index:05d}.png")
            (labels / f"{index:05d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in objects))
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {name}\n" for i, name in enumerate(NAMES)))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=TRAIN_IMAGES)
    parser.add_argument("--val", type=int, default=VAL_IMAGES)
    parser.add_argument("--size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(write_shapes(args.out, args.train, args.val, args.size, args.seed))


if __name__ == "__main__":
    main()
