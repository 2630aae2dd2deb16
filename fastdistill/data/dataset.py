"""The one dataset type every loader and recipe consumes: uint8 images, int64 labels, class names.

A split is either decoded in memory (``images``: the embedded digits, CIFAR arrays, small cached folders) or a
list of files read on access (``paths``). Nothing here decodes a whole split unless asked to (:meth:`load_all`,
which ``data.cache`` decides for image folders): callers draw indices (:meth:`class_index`, :meth:`per_class`)
and decode only those (:meth:`take`, or a loader over :meth:`subset`).

Files are decoded the way torchvision / timm pipelines do it, never squashed to a square:
- evaluation (default): resize the shorter side to ``image_size / crop_pct``, centre-crop ``image_size``;
- training (:meth:`train_view`): a random-resized-crop drawn on the whole image at its own aspect ratio, or
  (``TrainCrop(window="random")``) the evaluation resize with the ``image_size`` crop at a random position; or
  several such crops (DINO's multi-crop views), each drawn from the one decoded file.
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
    the shorter side to ``size / crop_pct`` and a ``size`` crop at a random position (``window`` random:
    torchvision's RandomCrop, the published LGM loader), then a flip with p 0.5, then ``augment`` (a PIL transform
    such as DeiT's RandAugment, ``data/deit_augment.py``) where given. ``size``: None is the dataset's
    ``image_size`` (a multi-crop's views set their own)."""

    window: str = "random_resized"  # or random (scale, ratio and interpolation are unused)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: str = "bilinear"  # or bicubic (the published DINO, MAE and DeiT crops)
    augment: Callable[[Image.Image], Image.Image] | None = None
    size: tuple[int, int] | None = None

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
    augmentation does not depend on which worker decodes it). With a tuple of train crops (multi-crop) a sample is a
    list of views, one per crop, and a loader's batch a list of (B, C, h, w) batches.
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
    # set: training decode (random-resized-crop on the original image); a tuple: one view per crop (multi-crop)
    train_crop: TrainCrop | tuple[TrainCrop, ...] | None = None

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

    def decode(self, i: int, seed: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Sample ``i`` read from its file: uint8 (channels, *image_size), or with a tuple of train crops the list
        of its views, uint8 (channels, *crop.size) each, all drawn from one decode of the file."""
        if self.train_crop is None:
            return read_image(self.paths[i], self.image_size, self.channels, self.crop_pct,
                              interpolation=self.interpolation)
        crops = self.train_crops()
        if all(c.window == "random" for c in crops):  # its own generator: take() decodes these on threads
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            views = read_views(self.paths[i], self.image_size, self.channels, self.crop_pct, crops, gen)
            return views if isinstance(self.train_crop, tuple) else views[0]
        # fork: a seeded crop must not reset the caller's global stream (the main process decodes in take())
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            views = read_views(self.paths[i], self.image_size, self.channels, self.crop_pct, crops)
        return views if isinstance(self.train_crop, tuple) else views[0]

    def train_crops(self) -> tuple[TrainCrop, ...]:
        """The train-time crops of a sample (none: evaluation decode)."""
        if self.train_crop is None:
            return ()
        return self.train_crop if isinstance(self.train_crop, tuple) else (self.train_crop,)

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
        serial = len(keys) < 8 or (seeds is not None and any(c.window == "random_resized" for c in self.train_crops()))
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

    def train_view(self, crop: TrainCrop | tuple[TrainCrop, ...]) -> "ImageDataset":
        """The same files decoded for training (``crop``, or a tuple of crops: a list of views per sample);
        decoded-in-memory splits are returned unchanged (their augmentation runs on the device, on the fixed-size
        images)."""
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
    at ``size``: the pixels as stored). Training (``train_crop``): as :func:`read_views` with that one crop.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    if train_crop is not None:
        return read_views(path, size, channels, crop_pct, (train_crop,), generator)[0]
    short = math.ceil(min(size) / crop_pct)
    im = _open(path, channels, short)
    mode = v2.InterpolationMode(interpolation)
    return _to_tensor(TF.center_crop(TF.resize(im, short, interpolation=mode, antialias=True), list(size)), channels)


def read_views(path: Path, size: tuple[int, int], channels: int, crop_pct: float, crops: tuple[TrainCrop, ...],
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One decode of the file, then per crop its window at ``crop.size`` (default ``size``), a flip and
    ``crop.augment``: uint8 (channels, *crop.size) each. A random-resized window (RandomResizedCrop on the whole
    image) draws from the global RNG (the dataset seeds it per sample); a random window (the evaluation resize, then
    a crop at a random position, and its flip) from ``generator`` (the global RNG when None).

    For random-resized windows the image is first brought down to a shorter side of ``largest view / crop_pct``
    when it is larger: a crop sees no more detail than that, and a multi-crop's views share the one resize.
    """
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    sizes = [tuple(c.size) if c.size is not None else tuple(size) for c in crops]
    short = math.ceil(max(min(s) for s in sizes) / crop_pct)
    im = _open(path, channels, short)
    bounded = None
    views = []
    for crop, s in zip(crops, sizes):
        if crop.window == "random":
            r = TF.resize(im, math.ceil(min(s) / crop_pct), antialias=True)
            top = int(torch.randint(r.height - s[0] + 1, (), generator=generator))
            left = int(torch.randint(r.width - s[1] + 1, (), generator=generator))
            v = TF.crop(r, top, left, s[0], s[1])
        else:
            if bounded is None:
                bounded = TF.resize(im, short, antialias=True) if min(im.size) > short else im
            v = v2.RandomResizedCrop(list(s), scale=crop.scale, ratio=crop.ratio,
                                     interpolation=v2.InterpolationMode(crop.interpolation), antialias=True)(bounded)
        if crop.hflip and torch.rand((), generator=generator) < 0.5:
            v = TF.horizontal_flip(v)
        if crop.augment is not None:
            v = crop.augment(v)
        views.append(_to_tensor(v, channels))
    return views


def eval_geometry(path: Path, size: tuple[int, int], channels: int,
                  crop_pct: float = 1.0) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`read_image`'s evaluation decode takes its pixels from, read from the file's header alone: the
    (H, W) the (bounded) decode is resized to and the (top, left) of the centre crop, by torchvision's rules (resize:
    the longer side truncated; centre crop: the offset rounded half to even). Other decoders (DALI) follow it."""
    short = math.ceil(min(size) / crop_pct)
    try:
        with Image.open(path) as im:
            _draft(im, channels, short)
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"corrupt image file '{path}': {e}") from None
    rh, rw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    return (rh, rw), (int(round((rh - size[0]) / 2.0)), int(round((rw - size[1]) / 2.0)))


def _draft(im: Image.Image, channels: int, short: int) -> None:
    """JPEGs: decode at the smallest DCT scale whose shorter side still covers ``short`` (sets ``im.size``)."""
    if im.format == "JPEG":
        w, h = im.size
        s = short / min(w, h)
        im.draft("L" if channels == 1 else "RGB", (math.ceil(w * s), math.ceil(h * s)))


def _open(path: Path, channels: int, short: int) -> Image.Image:
    """The decoded file in L or RGB, bounded (:func:`_draft`)."""
    try:
        with Image.open(path) as im:
            _draft(im, channels, short)
            return im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"corrupt image file '{path}': {e}") from None


def _to_tensor(im: Image.Image, channels: int) -> torch.Tensor:
    w, h = im.size
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(h, w, channels).permute(2, 0, 1).contiguous()
