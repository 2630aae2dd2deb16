"""The one dataset type every loader and recipe consumes: uint8 images, int64 labels, class names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """A split of a labelled image dataset.

    Images are either decoded in memory (``images``: uint8 (N, C, H, W)) or read on access from ``paths``
    and resized to ``image_size``; ``__getitem__`` returns (uint8 (C, H, W) tensor, int label) either way.
    Pixel values stay uint8 until they reach the device: normalisation belongs to the backbone.
    """

    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    images: torch.Tensor | None = None  # uint8 (N, C, H, W)
    paths: list[Path] | None = None
    image_size: tuple[int, int] = (0, 0)
    channels: int = 3
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images is None and self.paths is None:
            raise ValueError(f"dataset {self.name!r}: needs images or paths")
        if self.images is not None:
            self.image_size = tuple(self.images.shape[-2:])
            self.channels = self.images.shape[1]

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        return read_image(self.paths[i], self.image_size, self.channels), int(self.labels[i])

    def load_all(self) -> torch.Tensor:
        """All images as one uint8 (N, C, H, W) tensor (decoded once, then kept)."""
        if self.images is None:
            self.images = torch.stack([read_image(p, self.image_size, self.channels) for p in self.paths])
        return self.images

    def subset(self, index: torch.Tensor) -> "ImageDataset":
        """The samples at ``index`` (int64), sharing decoded storage where there is one."""
        return ImageDataset(
            labels=self.labels[index],
            classes=self.classes,
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index.tolist()],
            image_size=self.image_size,
            channels=self.channels,
            name=self.name,
            meta=self.meta,
        )

    def per_class(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` random samples of every class (int64 (C * n,), class-major)."""
        out = []
        for c in range(self.num_classes):
            idx = (self.labels == c).nonzero().flatten()
            if idx.numel() < n:
                raise ValueError(f"class {self.classes[c]!r} of {self.name!r} has {idx.numel()} images, fewer than {n}")
            out.append(idx[torch.randperm(idx.numel(), generator=generator)[:n]])
        return torch.cat(out)


def read_image(path: Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Decode one image file to uint8 (channels, *size); a corrupt file is a one-line ValueError."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"corrupt image file '{path}': {e}") from None
    return data.view(size[0], size[1], channels).permute(2, 0, 1).contiguous()
