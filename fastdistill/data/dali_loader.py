"""NVIDIA DALI loader (``loader=dali``): a CPU pipeline fed batch by batch through ``fn.external_source``.

The batches are TorchLoader's (``epoch_order``), so ``loader=dali`` and ``loader=torch`` see the same samples in
the same order. Decoded images pass through as they are; files are fed encoded and DALI decodes them on its CPU
threads the way the torch loader's evaluation decode does: the same resize and centre crop, read from each file's
header (``eval_geometry``), with DALI's antialiased linear or cubic resampling (the dataset's ``interpolation``)
instead of PIL's (within a grey level or so; more where PIL decodes a JPEG at a reduced DCT scale and DALI at full
size). Needs the ``dali`` extra; runs without a GPU (``device_id=None``, PLATFORM.md "Data loaders").
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from fastdistill.data.dataset import ImageDataset, eval_geometry
from fastdistill.data.loaders import epoch_order

try:
    import nvidia.dali  # noqa: F401  (first, so a missing or blocked DALI fails here and not on a cached submodule)
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:
    _IMPORT_ERROR = e

_INSTALL = "loader 'dali' needs the dali extra: pip install 'fastdistill[dali]'"


class DALILoader:
    """DALI over the dataset's uint8 images: uint8 (B, C, H, W) and int64 (B,) CPU tensors per batch.

    ``num_workers`` sets DALI's CPU threads (at least 1), which decode the files of a dataset on disk
    (``paths``); a dataset decoding for training (``train_crop``) is decoded by itself, in the feeding thread.

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

    @property
    def _dali_decodes(self) -> bool:
        return self.dataset.images is None and self.dataset.train_crop is None

    def _batch(self, idx: torch.Tensor) -> tuple:
        """(images, labels), or for files (encoded bytes, labels, resized (H, W), crop (top, left)) per sample."""
        ds, ids = self.dataset, idx.tolist()
        labels = ds.labels[idx].numpy()
        if self._dali_decodes:  # the bytes: DALI decodes them on its threads; PIL only reads the headers
            where = [eval_geometry(ds.paths[i], ds.image_size, ds.channels, ds.crop_pct) for i in ids]
            return ([np.fromfile(ds.paths[i], dtype=np.uint8) for i in ids], labels,
                    [np.array(hw, dtype=np.float32) for hw, _ in where],
                    [np.array(tl, dtype=np.int32) for _, tl in where])
        if ds.images is not None:
            return ds.images[idx].numpy(), labels
        return torch.stack([ds[i][0] for i in ids]).numpy(), labels

    def _decode(self, encoded, resized, start):
        """Encoded files -> uint8 (C, H, W): the evaluation decode of ``ImageDataset`` (resize, centre crop)."""
        ds = self.dataset
        x = fn.decoders.image(encoded, device="cpu", output_type=types.GRAY if ds.channels == 1 else types.RGB)
        mode = types.INTERP_CUBIC if ds.interpolation == "bicubic" else types.INTERP_LINEAR
        x = fn.resize(x, size=resized, interp_type=mode, antialias=True)
        x = fn.slice(x, start=start, shape=list(ds.image_size), axes=[0, 1])
        return fn.transpose(x, perm=[2, 0, 1])

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
            if self._dali_decodes:
                encoded, labels, resized, start = fn.external_source(source=source, num_outputs=4, batch=True)
                pipe.set_outputs(self._decode(encoded, resized, start), labels)
            else:
                images, labels = fn.external_source(source=source, num_outputs=2, batch=True, layout=["CHW", ""])
                pipe.set_outputs(images, labels)
        pipe.build()
        for _ in batches:
            images, labels = pipe.run()
            # as_array copies out of DALI's buffers, which the next run() reuses
            yield torch.from_numpy(images.as_array()), torch.from_numpy(labels.as_array())
