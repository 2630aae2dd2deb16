"""``data=cifar data.root=DIR``: the standard CIFAR-10 / CIFAR-100 python batches, read from local files.

``DIR`` may be the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.registry import register_dataset

LAYOUTS = {  # folder: (train files, test files, meta file, label key, class-name key)
    "cifar-10-batches-py": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels",
                            "label_names"),
    "cifar-100-python": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"corrupt CIFAR batch file '{path}': {e}") from None


def _read(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        batch = _unpickle(folder / name)
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


@register_dataset("cifar")
def build_cifar(cfg: DictConfig) -> dict[str, ImageDataset]:
    if not cfg.get("root"):
        raise ValueError("data=cifar needs data.root=DIR (the extracted cifar-10-batches-py or cifar-100-python)")
    root = Path(cfg.root).expanduser()
    candidates = [root] + [root / name for name in LAYOUTS]
    for folder in candidates:
        layout = LAYOUTS.get(folder.name)
        if layout and folder.is_dir():
            break
    else:
        raise FileNotFoundError(f"data.root '{root}' holds neither cifar-10-batches-py nor cifar-100-python")
    train_files, test_files, meta_file, label_key, names_key = layout
    for name in train_files + test_files + [meta_file]:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"CIFAR file '{folder / name}' is missing")
    classes = list(_unpickle(folder / meta_file)[names_key])
    xtr, ytr = _read(folder, train_files, label_key)
    xte, yte = _read(folder, test_files, label_key)
    return {
        "train": ImageDataset(labels=ytr, classes=classes, images=xtr),
        "test": ImageDataset(labels=yte, classes=classes, images=xte),
    }
