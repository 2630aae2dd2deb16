"""FFCV loader (``loader=ffcv``): the dataset written once to a ``.beton`` file, read back by FFCV's JIT pipeline.

Images are stored as raw uint8 (C, H, W) arrays, so every pixel comes back exactly as it went in (gray or RGB).
Needs the ``ffcv`` extra; FFCV takes about 10 s to import and compiles its pipeline with numba during the first
epoch (PLATFORM.md, "Data loaders").
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastdistill.data.dataset import ImageDataset

try:
    import ffcv  # noqa: F401  (first, so a missing or blocked `ffcv` fails here and not on a cached submodule)
    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:
    _IMPORT_ERROR = e

_INSTALL = ("loader 'ffcv' needs the ffcv extra: pip install 'fastdistill[ffcv]' "
            "(and Debian libturbojpeg0-dev libopencv-dev)")


def cache_dir() -> Path:
    """Where ``.beton`` files are kept: ``$FASTDISTILL_CACHE`` or ``~/.cache/fastdistill``."""
    return Path(os.environ.get("FASTDISTILL_CACHE") or Path.home() / ".cache" / "fastdistill")


def dataset_digest(dataset: ImageDataset) -> str:
    """A content hash of ``dataset``: name, size, labels and pixels (or, for files, paths, sizes and mtimes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dataset.name}|{len(dataset)}|{dataset.channels}|{tuple(dataset.image_size)}".encode())
    h.update(dataset.labels.to(torch.int64).contiguous().numpy().tobytes())
    if dataset.images is not None:
        h.update(dataset.images.contiguous().numpy().data)
    else:
        # decoding every file only to look the cache up would cost as much as writing it
        for p in dataset.paths:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


class _Samples:
    """(uint8 (C, H, W) ndarray, int) per index: what ``DatasetWriter`` encodes; read in its worker processes."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image, label = self.dataset[i]
        return image.numpy(), label


def write_beton(dataset: ImageDataset, num_workers: int = 0) -> Path:
    """The ``.beton`` of ``dataset`` in :func:`cache_dir`, written on first use (atomically) and reused after."""
    path = cache_dir() / f"{dataset.name or 'dataset'}-{dataset_digest(dataset)}.beton"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (dataset.channels, *dataset.image_size)
    # NDArrayField, not RGBImageField: that one takes only 3-channel HWC images, and its JPEG mode is lossy
    fields = {"image": NDArrayField(np.dtype("uint8"), shape), "label": IntField()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        DatasetWriter(str(tmp), fields, num_workers=num_workers or -1).from_indexed_dataset(_Samples(dataset))
        os.replace(tmp, path)  # a concurrent writer of the same content is harmless
    finally:
        tmp.unlink(missing_ok=True)
    return path


class FFCVLoader:
    """FFCV over a cached ``.beton``: uint8 (B, C, H, W) and int64 (B,) CPU tensors per batch.

    Without shuffle the order is the dataset's; with shuffle it is FFCV's permutation seeded from
    (seed, epoch), so it is reproducible but not TorchLoader's. ``num_workers`` are FFCV's threads
    (0 means all cores).

    Raises:
        ModuleNotFoundError: ffcv (or one of its dependencies) cannot be imported.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers: int = 0):
        if _IMPORT_ERROR is not None:
            missing = getattr(_IMPORT_ERROR, "name", None)
            detail = "" if missing == "ffcv" else f"; importing it failed: {_IMPORT_ERROR}"
            raise ModuleNotFoundError(_INSTALL + detail) from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if seed < 0:
            raise ValueError(f"ffcv loader: seed must be >= 0 (numpy's default_rng), got {seed!r}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.seed, self.num_workers = drop_last, seed, num_workers
        self.path = write_beton(dataset, num_workers)
        # FFCV permutes with default_rng(loader seed + epoch): scaling the seed as epoch_order does keeps
        # (seed, epoch) and (seed + 1, epoch - 1) apart
        self._loader = Loader(
            str(self.path), batch_size=batch_size, num_workers=num_workers, os_cache=True,
            order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL, seed=seed * 1_000_003,
            drop_last=drop_last,  # FFCV's default is True
            pipelines={"image": [NDArrayDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
        )

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # one Loader for all epochs: a new one recompiles its numba pipeline in its first epoch (~1 s on 2 cores)
        self._loader.next_epoch = epoch
        batches = iter(self._loader)
        try:
            for i, (images, labels) in enumerate(batches):
                if i < start:  # FFCV cannot begin mid-epoch: skipped batches are read and dropped
                    continue
                # FFCV reuses batches_ahead + 2 output buffers: copy so a kept batch is not overwritten
                yield images.clone(), labels.view(-1).clone()
        finally:
            batches.close()  # stops FFCV's reader thread if the consumer leaves early
