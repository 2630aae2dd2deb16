"""Loaders, chosen by ``loader=torch|ffcv|dali``: every one yields (uint8 (B, C, H, W), int64 (B,)) batches.

The batch order of an epoch is a function of (seed, epoch) alone, so a resumed run replays exactly the
batches an unbroken run would have seen (``epoch(e, start=k)`` skips the first k batches).
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from fastdistill.data.dataset import ImageDataset

LOADERS = ("torch", "ffcv", "dali")


class Loader(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch, int64 (n,)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class TorchLoader:
    """Plain PyTorch: direct indexing of decoded images, or a ``DataLoader`` over files with workers."""

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.seed, self.num_workers = drop_last, seed, num_workers

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)][:len(self)]
        batches = batches[start:]
        if self.dataset.images is not None:
            for idx in batches:
                yield self.dataset.images[idx], self.dataset.labels[idx]
            return
        dl = torch.utils.data.DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches],
                                         num_workers=self.num_workers, persistent_workers=False)
        yield from dl


def build_loader(name: str, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers: int = 0) -> Loader:
    """The loader ``name`` over ``dataset``; optional loaders fail with the extra to install."""
    if name == "torch":
        return TorchLoader(dataset, batch_size, shuffle, drop_last, seed, num_workers)
    if name == "ffcv":
        from fastdistill.data.ffcv_loader import FFCVLoader

        return FFCVLoader(dataset, batch_size, shuffle, drop_last, seed, num_workers)
    if name == "dali":
        from fastdistill.data.dali_loader import DALILoader

        return DALILoader(dataset, batch_size, shuffle, drop_last, seed, num_workers)
    raise ValueError(f"unknown loader {name!r}; expected one of {', '.join(LOADERS)}")
