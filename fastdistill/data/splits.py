"""A validation split carved from the training data: stratified, seeded, and recorded so a run can be checked.

Model selection (learning rate, best epoch) happens on this split; the test split is kept for the one final read.
"""
from __future__ import annotations

import torch

from fastdistill.data.dataset import ImageDataset


def stratified_split(labels: torch.Tensor, fraction: float, seed: int,
                     num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a split with ``round(fraction * n_c)`` (at least 1) images of every class ``c`` held
    out, drawn by a generator seeded with ``seed`` alone; both int64 and ascending.

    Args:
        labels: int64 (N,) class of every sample.
        fraction: share of each class held out, in (0, 1).
        seed: the same seed gives the same split on every machine.

    Raises:
        ValueError: a fraction outside (0, 1), or a class with fewer than 2 images (it cannot be on both sides).
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r} (0.1: a tenth of every class)")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < 2:
            raise ValueError(f"class {c} has {idx.numel()} training images; a validation split needs at least 2")
        k = min(max(1, round(fraction * idx.numel())), idx.numel() - 1)
        perm = idx[torch.randperm(idx.numel(), generator=g)]
        val.append(perm[:k])
        train.append(perm[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def carve_validation(train_set: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset, dict]:
    """(train, val, record): the two parts of ``train_set`` and what the manifest records of the split (fraction,
    seed, per-class counts and a checksum of the held-out indices, so another run can prove it used the same)."""
    train_idx, val_idx = stratified_split(train_set.labels, fraction, seed, train_set.num_classes)
    val_counts = torch.bincount(train_set.labels[val_idx], minlength=train_set.num_classes)
    record = {"fraction": float(fraction), "seed": int(seed), "train": int(train_idx.numel()),
              "val": int(val_idx.numel()), "val_per_class": val_counts.tolist(),
              "val_index_sum": int(val_idx.sum()), "val_index_head": val_idx[:10].tolist()}
    return train_set.subset(train_idx), train_set.subset(val_idx), record
