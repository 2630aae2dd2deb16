"""The one dataset type every loader and recipe consumes: uint8 images, int64 labels, class names.

A split is either decoded in memory (``images``: the embedded digits, CIFAR arrays, small cached folders) or a
list of files read on access (``paths``). Nothing here decodes a whole split unless asked to (:meth:`load_all`,
which ``data.cache`` decides for image folders): callers draw indices (:meth:`class_index`, :meth:`per_class`)
and decode only those (:meth:`take`, or a loader over :meth:`subset`).

Files are decoded the way torchvision / timm pipelines do it, never squashed to a square:
- evaluation (default): resize the shorter side to ``image_size / crop_pct``, centre-crop ``image_size``;
- training (:meth:`train_view`): a random-resized-crop drawn on the whole image at its own aspect ratio, or
  (``TrainCrop(window="random")``) the evaluation resize with the ``image_size`` crop at a random position.
JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) when that still leaves the shorter side at least
``image_size / crop_pct`` (PIL ``draft``, the bounded decode of DALI/FFCV pipelines): a 2000 px photo costs
what a 500 px one does.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from fastdistill.data.transforms import INTERPOLATIONS


@dataclass(frozen=True)
class TrainCrop:
    """Train-time decode: RandomResizedCrop(scale, ratio) on the original image (``window`` random_resized) or
    the shorter side to ``image_size / crop_pct`` and an ``image_size`` crop at a random position (``window``
    random: torchvision's RandomCrop, the published LGM loader), then a flip with p 0.5, then ``augment`` (a PIL
    transform such as DeiT's RandAugment, ``data/deit_augment.py``) where given."""

    window: str = "random_resized"  # or random (scale, ratio and interpolation are unused)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: str = "bilinear"  # or bicubic (the published DINO, MAE and DeiT crops)
    augment: Callable[[Image.Image], Image.Image] | None = None

    def __post_init__(self):
        if self.window not in TRAIN_WINDOWS:
            raise ValueError(f"unknown train crop window {self.window!r}; expected one of {', '.join(TRAIN_WINDOWS)}")


TRAIN_WINDOWS = ("random_resized", "random")


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A split of a labelled image dataset.

    Images are either decoded in memory (``images``: uint8 (N, C, H, W)) or read on access from ``paths``
    (decoded to ``image_size`` as the module docstring says); ``__getitem__`` returns (uint8 (C, H, W) tensor,
    int label) either way. Pixel values stay uint8 until they reach the device: normalisation belongs to the
    backbone. A key ``(i, seed)`` seeds the train-time crop of sample i (loaders pass one per sample, so the
    augmentation does not depend on which worker decodes it).
    """

    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    images: torch.Tensor | None = None  # uint8 (N, C, H, W)
    paths: list[Path] | None = None
    image_size: tuple[int, int] = (0, 0)
    channels: int = 3
    name: str = ""
    meta: dict = field(default_factory=dict)
    crop_pct: float = 1.0  # evaluation decode: shorter side to image_size / crop_pct, centre crop
    interpolation: str = "bilinear"  # of that resize: bilinear | bicubic (DeiT's test images)
    train_crop: TrainCrop | None = None  # set: training decode (random-resized-crop on the original image)

    def __post_init__(self):
        if self.images is None and self.paths is None:
            raise ValueError(f"dataset {self.name!r}: needs images or paths")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {self.crop_pct!r} (0.875: timm's default)")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown test image interpolation {self.interpolation!r}; expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.images is not None:
            self.image_size = tuple(self.images.shape[-2:])
            self.channels = self.images.shape[1]

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        return self.decode(i, seed), int(self.labels[i])

    def decode(self, i: int, seed: int | None = None) -> torch.Tensor:
        """Sample ``i`` read from its file: uint8 (channels, *image_size)."""
        if self.train_crop is None:
            return read_image(self.paths[i], self.image_size, self.channels, self.crop_pct,
                              interpolation=self.interpolation)
        if self.train_crop.window == "random":  # its own generator: take() decodes these on threads
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            return read_image(self.paths[i], self.image_size, self.channels, self.crop_pct, self.train_crop, gen)
        # fork: a seeded crop must not reset the caller's global stream (the main process decodes in take())
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return read_image(self.paths[i], self.image_size, self.channels, self.crop_pct, self.train_crop)

    def take(self, index: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """The images at ``index`` (int64 (n,)) as uint8 (n, C, H, W): only those files are decoded (by a few
        threads: PIL releases the GIL while it decodes). ``seeds`` (int64 (n,)) seed each train-time crop."""
        if self.images is not None:
            return self.images[index]
        ids = index.tolist()
        keys = ids if seeds is None else list(zip(ids, seeds.tolist()))
        if not keys:
            return torch.zeros(0, self.channels, *self.image_size, dtype=torch.uint8)
        # the random-resized window seeds the global RNG: decoded one at a time (its loaders use processes)
        serial = len(keys) < 8 or (seeds is not None and self.train_crop is not None
                                   and self.train_crop.window == "random_resized")
        images = (self[k][0] for k in keys) if serial else (x for x, _ in _pool().map(self.__getitem__, keys))
        return torch.stack(list(images))

    def load_all(self) -> torch.Tensor:
        """All images as one uint8 (N, C, H, W) tensor (decoded once, then kept). Only for splits known to be
        small: ``data.cache`` decides it for image folders; everything else draws indices and :meth:`take`s."""
        if self.images is None:
            self.images = self.take(torch.arange(len(self)))
        return self.images

    def subset(self, index: torch.Tensor) -> "ImageDataset":
        """The samples at ``index`` (int64), sharing decoded storage where there is one."""
        return replace(self, labels=self.labels[index],
                       images=None if self.images is None else self.images[index],
                       paths=None if self.paths is None else [self.paths[i] for i in index.tolist()])

    def train_view(self, crop: TrainCrop) -> "ImageDataset":
        """The same files decoded for training (``crop``); decoded-in-memory splits are returned unchanged (their
        augmentation runs on the device, on the fixed-size images)."""
        return self if self.images is not None else replace(self, train_crop=crop)

    def class_index(self, c: int) -> torch.Tensor:
        """Indices of the samples of class ``c``, int64, ascending."""
        return (self.labels == c).nonzero().flatten()

    def per_class(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` random samples of every class (int64 (C * n,), class-major)."""
        out = []
        for c in range(self.num_classes):
            idx = self.class_index(c)
            if idx.numel() < n:
                raise ValueError(f"class {self.classes[c]!r} of {self.name!r} has {idx.numel()} images, fewer than {n}")
            out.append(idx[torch.randperm(idx.numel(), generator=generator)[:n]])
        return torch.cat(out)

    def real_subset(self, per_class: int | None, seed: int) -> torch.Tensor:
        """Sorted ids of ``per_class`` random images of every class drawn with ``seed`` (all ids for None): the
        real images a student may use, the same draw wherever it is made (kd_clip, ``make_augmented``)."""
        if not per_class:
            return torch.arange(len(self))
        return self.per_class(per_class, torch.Generator().manual_seed(seed)).sort().values

    def decoded_bytes(self) -> int:
        """Bytes this split takes decoded in memory (uint8)."""
        return len(self) * self.channels * self.image_size[0] * self.image_size[1]


_POOL: ThreadPoolExecutor | None = None


def _drop_pool() -> None:
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_drop_pool)  # a forked loader worker has none of the parent's threads


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # threads, not processes: PIL releases the GIL while it decodes
        _POOL = ThreadPoolExecutor(max(1, min(8, len(os.sched_getaffinity(0)))), thread_name_prefix="decode")
    return _POOL


def read_image(path: Path, size: tuple[int, int], channels: int, crop_pct: float = 1.0,
               train_crop: TrainCrop | None = None, generator: torch.Generator | None = None,
               interpolation: str = "bilinear") -> torch.Tensor:
    """Decode one image file to uint8 (channels, *size); a corrupt file is a one-line ValueError.

    Evaluation: shorter side to ``size / crop_pct`` (``interpolation``), centre crop (crop_pct 1 and a file already
    at ``size``: the pixels as stored). Training (``train_crop``): RandomResizedCrop to ``size`` on the whole image, then a
    flip, from the global RNG (the dataset seeds it per sample); window random: the evaluation resize, then a
    ``size`` crop at a position (and a flip) drawn from ``generator`` (the global RNG when None).
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    short = math.ceil(min(size) / crop_pct)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format == "JPEG":  # bounded decode: the smallest DCT scale whose shorter side still covers `short`
                s = short / min(w, h)
                im.draft("L" if channels == 1 else "RGB", (math.ceil(w * s), math.ceil(h * s)))
            im = im.convert("L" if channels == 1 else "RGB")
            if train_crop is not None and train_crop.window == "random":
                im = TF.resize(im, short, antialias=True)
                top = int(torch.randint(im.height - size[0] + 1, (), generator=generator))
                left = int(torch.randint(im.width - size[1] + 1, (), generator=generator))
                im = TF.crop(im, top, left, size[0], size[1])
                if train_crop.hflip and torch.rand((), generator=generator) < 0.5:
                    im = TF.horizontal_flip(im)
                if train_crop.augment is not None:
                    im = train_crop.augment(im)
            elif train_crop is not None:
                if min(im.size) > short:  # the crop sees no more detail than `short` px across the shorter side
                    im = TF.resize(im, short, antialias=True)
                mode = v2.InterpolationMode(train_crop.interpolation)
                im = v2.RandomResizedCrop(list(size), scale=train_crop.scale, ratio=train_crop.ratio,
                                          interpolation=mode, antialias=True)(im)
                if train_crop.hflip and torch.rand(()) < 0.5:
                    im = TF.horizontal_flip(im)
                if train_crop.augment is not None:
                    im = train_crop.augment(im)
            else:
                mode = v2.InterpolationMode(interpolation)
                im = TF.center_crop(TF.resize(im, short, interpolation=mode, antialias=True), list(size))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"corrupt image file '{path}': {e}") from None
    return data.view(size[0], size[1], channels).permute(2, 0, 1).contiguous()
