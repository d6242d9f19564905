"""scikit-learn's digits (1797 labelled 8x8 images, 10 classes) as an ImageFolder, with a fixed split.

The images are written as 8-bit grayscale PNGs (value * 255 / 16), so the reference model is fed
through the same image-folder path and the same manifest preprocessing as any user's photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_NAME = "resnet10_half_cbam"
STEM = "cifar"
INPUT_SIZE = 32
CHECKPOINT = Path(__file__).with_name("digits_resnet10_half_cbam.pth")
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 N x 8 x 8, labels), 'test': ...}: stratified, seeded, always the same."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.clip(np.round(data.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def write_image_folder(root: str | Path, split: str = "test") -> Path:
    """Write one split as root/<digit>/<index>.png; returns root."""
    from PIL import Image

    root = Path(root)
    images, labels = digits_split()[split]
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return root
