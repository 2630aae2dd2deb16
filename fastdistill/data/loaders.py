"""Loaders, chosen by ``loader=torch|ffcv|dali``: every one yields (uint8 (B, C, H, W), int64 (B,)) batches.

The batch order of an epoch is a function of (seed, epoch) alone, so a resumed run replays exactly the
batches an unbroken run would have seen (``epoch(e, start=k)`` skips the first k batches).

Decoded splits are indexed directly; splits on disk are read by a ``DataLoader`` with worker processes
(``num_workers: auto`` = the CPU cores this process may use), pinned memory on CUDA, and workers kept alive across
epochs. A dataset decoding for training (``ImageDataset.train_view``) gets one seed per sample from (seed, epoch,
sample): its crops are the same whatever the number of workers.

Under torchrun ``batch_size`` is the global batch: every rank walks the same batches and keeps its slice of
each (``rank``, ``world_size``), so the samples of a step, and the learning rate defined for them, do not
depend on the number of processes.
"""
from __future__ import annotations

import os
from typing import Iterator, Protocol

import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine.distributed import shard

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


def repeat_order(order: torch.Tensor, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): each sample of ``order`` ``repeats`` times in a
    row, cut to the epoch's length, so an epoch takes as many steps and sees about 1 / repeats of the samples.
    Returns the order and each entry's crop key (sample * repeats + copy: every copy is cropped anew), int64."""
    n = order.numel()
    copies = torch.arange(n * repeats) % repeats
    order = order.repeat_interleave(repeats)
    return order[:n], (order * repeats + copies)[:n]


def pass_batch(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of batch ``step`` of an endless stream of shuffled passes, int64 (batch_size,): what a
    shuffled ``DataLoader`` with ``drop_last`` yields when it is re-iterated whenever it runs out. Pass p is
    :func:`epoch_order` (seed, p) cut into ``n // batch_size`` batches, its rest left out, so no sample repeats
    within a pass; a batch larger than the data takes whole passes of its own, cut to ``batch_size``. A function of
    (seed, step) alone: a resumed run draws what an unbroken one would."""
    per_pass = n // batch_size
    if per_pass == 0:
        passes = -(-batch_size // n)
        return torch.cat([epoch_order(n, seed, step * passes + k, True) for k in range(passes)])[:batch_size]
    p, b = divmod(step, per_pass)
    return epoch_order(n, seed, p, True)[b * batch_size:(b + 1) * batch_size]


def crop_seeds(seed: int, draw: int, keys: torch.Tensor) -> torch.Tensor:
    """Train-time crop seeds (int64, like ``keys``) of the samples ``keys`` at epoch or step ``draw``: a new crop
    at every draw, the same on every rank and worker and after a resume."""
    return (seed * 1_000_003 + draw) * 10_000_019 + keys


def num_batches(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Global batches per epoch; a last batch too small to give every rank a sample is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (not drop_last and rest >= world_size)


def resolve_workers(num_workers) -> int:
    """``num_workers``: an integer >= 0, or ``auto`` = the CPU cores this process may use (its affinity mask)."""
    if num_workers == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or auto, got {num_workers!r}")
    return num_workers


class _EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of a persistent ``DataLoader``: it yields whatever batches the current epoch set (the
    sampler runs in the main process, so setting them between epochs reaches the live workers)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def check_world(batch_size: int, world_size: int) -> None:
    if batch_size < world_size:
        raise ValueError(f"batch size {batch_size} is smaller than the {world_size} processes: every rank needs "
                         "a sample of each step (the batch size is the global one)")


class TorchLoader:
    """Plain PyTorch: direct indexing of decoded images, or a persistent ``DataLoader`` over files with workers."""

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers="auto", rank: int = 0, world_size: int = 1, repeats: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeated augmentation must be an integer >= 1 (copies per sample), got {repeats!r}")
        check_world(batch_size, world_size)
        self.dataset, self.batch_size, self.shuffle, self.repeats = dataset, batch_size, shuffle, repeats
        self.drop_last, self.seed, self.num_workers = drop_last, seed, resolve_workers(num_workers)
        self.rank, self.world_size = rank, world_size
        self._loader = None  # built at the first epoch over files

    def __len__(self) -> int:
        return num_batches(len(self.dataset), self.batch_size, self.drop_last, self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        order, keys = repeat_order(order, self.repeats) if self.repeats > 1 else (order, order)
        # the global order is cut into global batches, then each rank takes its slice: the samples of a step do not
        # depend on the number of ranks (DeiT's RASampler deals an image's copies to different GPUs instead; their
        # global batch is the same, and the ViT students have no batch statistics that would tell them apart)
        mine = []
        for i in range(0, len(order), self.batch_size)[start:len(self)]:
            part = shard(min(self.batch_size, len(order) - i), self.rank, self.world_size)
            mine.append(slice(i + part.start, i + part.stop))
        yield from self.iterate([order[s] for s in mine], epoch, [keys[s] for s in mine])

    def iterate(self, batches: list[torch.Tensor], epoch: int = 0,
                keys: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The given batches (int64 index tensors) in order, through the same workers: for callers that draw their
        own order (the student and probe trainers keep the generator stream they always had). ``keys`` (like
        ``batches``; default the indices) seed the train-time crops."""
        if self.dataset.images is not None:
            for idx in batches:
                yield self.dataset.images[idx], self.dataset.labels[idx]
            return
        if not batches:
            return
        if self._loader is None:
            workers = min(self.num_workers, max(len(self), len(batches)))
            self._sampler = _EpochBatches()
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=workers, persistent_workers=workers > 0,
                pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None,
                generator=torch.Generator())  # iterating draws a worker seed: not from the stream a resume restores
        if self.dataset.train_crop is not None:  # one crop seed per (seed, epoch, sample)
            self._sampler.batches = [list(zip(b.tolist(), crop_seeds(self.seed, epoch, k).tolist()))
                                     for b, k in zip(batches, batches if keys is None else keys)]
        else:
            self._sampler.batches = [b.tolist() for b in batches]
        yield from self._loader


class RankSlice:
    """Any loader under torchrun: each rank reads the global batch and keeps its slice (the FFCV and DALI
    pipelines decode whole batches; sharding their files per rank is left to them)."""

    def __init__(self, loader: Loader, rank: int, world_size: int):
        check_world(loader.batch_size, world_size)
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return num_batches(len(self.loader.dataset), self.batch_size, self.loader.drop_last, self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, (x, y) in zip(range(start, len(self)), self.loader.epoch(epoch, start)):
            part = shard(len(y), self.rank, self.world_size)
            yield x[part.start:part.stop], y[part.start:part.stop]


def build_loader(name: str, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers="auto", rank: int = 0, world_size: int = 1, repeats: int = 1) -> Loader:
    """The loader ``name`` over ``dataset``, yielding this rank's slice of each global batch (``repeats`` copies of
    each sample in a row: repeated augmentation, torch loader only); optional loaders fail with the extra to
    install."""
    if name == "torch":
        return TorchLoader(dataset, batch_size, shuffle, drop_last, seed, num_workers, rank, world_size, repeats)
    if repeats != 1:
        raise ValueError(f"repeated augmentation ({repeats} copies) needs loader=torch, got loader={name!r}")
    if name == "ffcv":
        from fastdistill.data.ffcv_loader import FFCVLoader as cls
    elif name == "dali":
        from fastdistill.data.dali_loader import DALILoader as cls
    else:
        raise ValueError(f"unknown loader {name!r}; expected one of {', '.join(LOADERS)}")
    loader = cls(dataset, batch_size, shuffle, drop_last, seed, resolve_workers(num_workers))
    return loader if world_size == 1 else RankSlice(loader, rank, world_size)
