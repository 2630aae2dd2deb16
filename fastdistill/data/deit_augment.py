"""DeiT's training augmentation (Touvron et al. 2021; facebookresearch/deit datasets.py and main.py), through timm's
implementations: RandAugment on each crop (the second stage of ``timm.data.create_transform``), random erasing with
per-pixel noise (``timm.data.random_erasing.RandomErasing``) and Mixup / CutMix (``timm.data.Mixup``).

The order is DeiT's: random-resized crop and flip -> RandAugment (PIL) -> normalise -> random erasing -> Mixup /
CutMix (on the batch). Random erasing draws its noise in the normalised space, as DeiT erases normalised tensors;
the batch here stays in [0, 1] (normalisation belongs to the backbone), so the noise is mapped back through it.
Mixup and CutMix are linear in the pixels, so they commute with the normalisation.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps


def check_augment(randaugment: str | None, erasing: float, mixup: float, cutmix: float) -> None:
    """One-line errors for the ``method.augment`` keys, before any work (timm parses the policy)."""
    if not 0 <= erasing <= 1 or mixup < 0 or cutmix < 0:
        raise ValueError(f"method.augment: random_erasing must be in [0, 1] and mixup, cutmix >= 0, got "
                         f"{erasing!r}, {mixup!r}, {cutmix!r}")
    if randaugment is not None:
        RandAugment(randaugment, 32, "bilinear", (0.5, 0.5, 0.5))


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as the Pillow of DeiT's time did (its mask kept no
    bit); Pillow 13 raises instead, and rand-m9-mstd0.5 reaches 0 bits (PosterizeIncreasing at magnitude 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class RandAugment:
    """timm's RandAugment on PIL images, configured as ``create_transform`` configures it for DeiT: ``policy`` (e.g.
    ``rand-m9-mstd0.5-inc1``), translations up to 0.45 x ``size``, ``mean`` as the fill colour, ``interpolation``.

    timm draws from Python's and NumPy's generators; here they are seeded from torch's for each image and restored
    afterwards, so a loader worker that seeds torch per sample gives the same augmentation whatever the worker
    count, and the caller's Python and NumPy streams (Mixup's) are left as they were.
    """

    def __init__(self, policy: str, size: int, interpolation: str, mean: tuple[float, ...]):
        from timm.data import create_transform

        if not isinstance(policy, str) or not policy.startswith("rand"):
            raise ValueError(f"method.augment.randaugment must be a timm RandAugment policy such as "
                             f"rand-m9-mstd0.5-inc1, or null, got {policy!r}")
        try:
            stages = create_transform(size, is_training=True, auto_augment=policy, interpolation=interpolation,
                                      mean=tuple(mean), separate=True)
        except (AssertionError, ValueError, KeyError) as e:
            raise ValueError(f"method.augment.randaugment {policy!r} is not a timm RandAugment policy (e.g. "
                             f"rand-m9-mstd0.5-inc1): {e}") from None
        self.transform = stages[1]  # stage 1 crop + flip, stage 2 RandAugment, stage 3 tensor + normalise + erasing
        for t in self.transform.transforms:
            for op in getattr(t, "ops", []):
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize

    def __call__(self, img: Image.Image) -> Image.Image:
        seed = int(torch.randint(0, 2**31 - 1, ()))
        python, numpy = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(img)
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def pil_each(x: torch.Tensor, transform) -> torch.Tensor:
    """A PIL transform applied to every image of a [0, 1] batch (N, C, H, W), C 1 or 3, on the host (for batches
    cropped on the device); returns the [0, 1] batch on ``x``'s device."""
    n, c, h, w = x.shape
    images = x.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = [np.asarray(transform(Image.fromarray(im[..., 0] if c == 1 else im, "L" if c == 1 else "RGB")))
           for im in images]
    return torch.from_numpy(np.stack(out)).reshape(n, h, w, c).permute(0, 3, 1, 2).to(x.device).float().div_(255)


class BatchAugment:
    """Random erasing, then Mixup or CutMix, on a [0, 1] device batch, as DeiT applies them.

    ``erasing``: the probability of erasing one box per image with N(0, 1) noise in the normalised space (``mean``,
    ``std``: the student's normalisation). ``mixup`` / ``cutmix``: the Beta alphas (0 = off); with both on, one of
    the two per batch (p 0.5), one mixing factor per batch, label smoothing folded into the soft targets. Returns
    (images, targets): int64 (N,) labels when neither mixes, else float32 (N, num_classes) probabilities.
    """

    def __init__(self, erasing: float, mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(erasing, mode="pixel", max_count=1, device=str(device)) if erasing > 0 else None
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes) if mixup > 0 or cutmix > 0 else None
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    @property
    def mixes(self) -> bool:
        return self.mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:  # timm writes N(0, 1) into each box of a NaN canvas; the rest keeps x exactly
            noise = self.erase(torch.full_like(x, float("nan")))
            x = torch.where(noise.isnan(), x, noise * self.std + self.mean)
        if self.mix is not None:
            x, y = self.mix(x.clone(), y)  # timm mixes in place and needs an even batch
        return x, y
