"""Dataset registry: ``data=NAME`` picks a builder registered here (timm-style decorator registry)."""
from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from fastdistill.data.dataset import ImageDataset

_DATASETS: dict[str, Callable[..., dict[str, ImageDataset]]] = {}


def register_dataset(name: str):
    """Register ``fn(cfg) -> {"train": ImageDataset, "test": ImageDataset}`` under ``name``."""
    def wrap(fn):
        _DATASETS[name] = fn
        return fn
    return wrap


def list_datasets() -> list[str]:
    _import_builtin()
    return sorted(_DATASETS)


def build_dataset(cfg: DictConfig) -> dict[str, ImageDataset]:
    """Build the train and test splits described by a ``configs/data/*.yaml`` node."""
    _import_builtin()
    if cfg.name not in _DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; expected one of {', '.join(sorted(_DATASETS))}")
    splits = _DATASETS[cfg.name](cfg)
    for split in splits.values():
        split.name = cfg.name
    return splits


def _import_builtin() -> None:
    from fastdistill.data import cifar, imagefolder, mnist5k  # noqa: F401  (registration side effect)
