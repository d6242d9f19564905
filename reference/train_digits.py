"""Train the reference CBAM model (resnet10_half_cbam, CIFAR stem, 10 classes) on the digits train split.

Deterministic (seeded, single process, CPU): python -m reference.train_digits [--epochs 20]
Writes reference/digits_resnet10_half_cbam.pth (a plain state dict) and prints the held-out top-1.
Takes about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from cbam_deploy.data import preprocess_image
from cbam_deploy.models import create_model
from cbam_deploy.pipeline import make_input_spec

from .digits import CHECKPOINT, INPUT_SIZE, MODEL_NAME, STEM, digits_split


def to_inputs(images: np.ndarray) -> torch.Tensor:
    spec = make_input_spec(INPUT_SIZE)
    return torch.from_numpy(np.stack([preprocess_image(Image.fromarray(img, mode="L"), spec) for img in images]))


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=str(CHECKPOINT))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    split = digits_split()
    x_train, y_train = to_inputs(split["train"][0]), torch.from_numpy(split["train"][1]).long()
    x_test, y_test = to_inputs(split["test"][0]), torch.from_numpy(split["test"][1]).long()
    model = create_model(MODEL_NAME, num_classes=10, stem=STEM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = -(-len(x_train) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(0)
    started = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            batch = x_train[index]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # small translations
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(batch), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  test top-1 {evaluate(model, x_test, y_test) * 100:.2f}%  "
              f"{time.time() - started:.0f}s", flush=True)
    model.eval()
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}: held-out top-1 {evaluate(model, x_test, y_test) * 100:.2f}% on {len(y_test)} images")


if __name__ == "__main__":
    main()
