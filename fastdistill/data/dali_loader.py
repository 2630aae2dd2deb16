"""NVIDIA DALI loader (``loader=dali``): a CPU pipeline fed batch by batch through ``fn.external_source``.

The batches are TorchLoader's (``epoch_order``), so ``loader=dali`` and ``loader=torch`` see the same samples in
the same order. Needs the ``dali`` extra; runs without a GPU (``device_id=None``, PLATFORM.md "Data loaders").
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import epoch_order

try:
    import nvidia.dali  # noqa: F401  (first, so a missing or blocked DALI fails here and not on a cached submodule)
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:
    _IMPORT_ERROR = e

_INSTALL = "loader 'dali' needs the dali extra: pip install 'fastdistill[dali]'"


class DALILoader:
    """DALI over the dataset's uint8 images: uint8 (B, C, H, W) and int64 (B,) CPU tensors per batch.

    ``num_workers`` sets DALI's CPU threads (at least 1). Images on disk (``paths``) are decoded per batch
    by the dataset, in the feeding thread.

    Raises:
        ModuleNotFoundError: DALI cannot be imported.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers: int = 0):
        if _IMPORT_ERROR is not None:
            missing = getattr(_IMPORT_ERROR, "name", None)
            detail = "" if missing in ("nvidia", "nvidia.dali") else f"; importing it failed: {_IMPORT_ERROR}"
            raise ModuleNotFoundError(_INSTALL + detail) from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.seed, self.num_workers = drop_last, seed, num_workers
        # device_id=0 fails on a machine without a GPU; None runs CPU operators only
        self.device_id = torch.cuda.current_device() if torch.cuda.is_available() else None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batch(self, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.dataset.images is not None:
            images = self.dataset.images[idx]
        else:
            images = torch.stack([self.dataset[i][0] for i in idx.tolist()])
        return images.numpy(), self.dataset.labels[idx].numpy()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)][:len(self)]
        batches = batches[start:]
        if not batches:
            return

        def source():
            for idx in batches:
                yield self._batch(idx)

        # a pipeline per epoch: DALI prefetches from its source as soon as it is reset, so a pipeline
        # reused across epochs would read the next epoch's first batches before its order is known
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.num_workers), device_id=self.device_id)
        with pipe:
            images, labels = fn.external_source(source=source, num_outputs=2, batch=True, layout=["CHW", ""])
            pipe.set_outputs(images, labels)
        pipe.build()
        for _ in batches:
            images, labels = pipe.run()
            # as_array copies out of DALI's buffers, which the next run() reuses
            yield torch.from_numpy(images.as_array()), torch.from_numpy(labels.as_array())
