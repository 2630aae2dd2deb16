"""Datasets (registry, embedded default, ImageFolder, CIFAR), loaders and device-side transforms."""
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import LOADERS, build_loader
from fastdistill.data.registry import build_dataset, list_datasets, register_dataset

__all__ = ["ImageDataset", "LOADERS", "build_dataset", "build_loader", "list_datasets", "register_dataset"]
