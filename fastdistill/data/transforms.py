"""Batch transforms on the device: uint8 batches in, float [0, 1] batches at the backbone's size out.

Every dataset feeds every backbone through :func:`to_input`: grayscale is repeated to 3 channels and the
batch is resized to the backbone's input size. Normalisation is the backbone's own (``Backbone.normalize``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


INTERPOLATIONS = ("bilinear", "bicubic")

def to_input(x: torch.Tensor, size: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """uint8 or float (N, C, H, W) -> float32 (N, channels, *size) in [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = x.mean(1, keepdim=True)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def centre_crop(x: torch.Tensor, size: tuple[int, int], crop_pct: float = 1.0) -> torch.Tensor:
    """The evaluation decode of ``read_image`` on a [0, 1] batch (N, C, H, W): shorter side to
    ``ceil(min(size) / crop_pct)`` (aspect kept; no resampling where it is already that size), then the centre
    ``size`` crop, offsets rounded as torchvision's ``center_crop``. crop_pct 0.875 at 224 px: Resize 256 +
    CenterCrop 224."""
    short = math.ceil(min(size) / crop_pct)
    h, w = x.shape[-2:]
    if min(h, w) != short:
        scale = short / min(h, w)
        new = (short, max(short, round(w * scale))) if h <= w else (max(short, round(h * scale)), short)
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
        h, w = new
    if h < size[0] or w < size[1]:
        raise ValueError(f"centre_crop: a {h}x{w} image is smaller than the {size[0]}x{size[1]} crop")
    top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
    return x[..., top:top + size[0], left:left + size[1]]


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: torch.Generator | None = None, per_sample: bool = True,
                        mode: str = "bilinear") -> torch.Tensor:
    """Differentiable random-resized-crop via ``affine_grid``/``grid_sample`` (``mode``: bilinear or bicubic).

    One window per sample, or one for the whole batch with ``per_sample=False`` (SRe2L/FADRM recovery). The windows
    are torchvision's (:func:`crop_windows`): whole pixels of ``x``, inside it, a window that would leave the image
    redrawn. (The published LGM augmentation instead lets about 14 % of windows leave it and pads zeros, METHODS.md.)
    """
    theta = crop_windows(x.shape[0] if per_sample else 1, tuple(x.shape[-2:]), scale, ratio, generator)
    return apply_windows(x, theta.expand(x.shape[0], 2, 3), size, mode)


CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params


def crop_windows(n: int, size: tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random-resized-crop windows of an image of ``size`` (H, W) px as ``affine_grid`` maps, float32 (n, 2, 3)
    on the CPU. A window is data: FADRM records the ones it selects and re-applies them later (:func:`apply_windows`).

    Drawn as torchvision's ``RandomResizedCrop.get_params`` draws them (what the published SRe2L, RDED, FADRM, DINO
    and MAE pipelines crop with): up to 10 tries of an area ``U(scale) * H * W`` and a log-uniform aspect ratio,
    width and height rounded to whole pixels; the first try that fits inside the image is placed at a uniform whole
    pixel offset; when none fits, the centre crop of the whole image clipped to the ratio range. The tries are drawn
    for all windows at once from ``generator`` (a fixed number of draws per window, so a recorded generator state
    replays the same windows), not one window after another as torchvision does, so the windows follow its
    distribution, not its random stream.
    """
    height, width = int(size[0]), int(size[1])
    area = torch.empty(n, CROP_TRIES).uniform_(scale[0], scale[1], generator=generator).double() * (height * width)
    log_r = torch.empty(n, CROP_TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).double()
    w = (area * log_r.exp()).sqrt().round()  # round half to even, as Python's round in torchvision
    h = (area / log_r.exp()).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # fallback: torchvision's centre crop, the whole image narrowed to the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.tensor(float(fw), dtype=torch.float64))
    h = torch.where(found, h, torch.tensor(float(fh), dtype=torch.float64))
    u_i, u_j = torch.rand(n, generator=generator).double(), torch.rand(n, generator=generator).double()
    top = torch.where(found, (u_i * (height - h + 1)).floor().clamp(max=height - h), float((height - fh) // 2))
    left = torch.where(found, (u_j * (width - w + 1)).floor().clamp(max=width - w), float((width - fw) // 2))
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    # align_corners=False: -1 and 1 are the image's outer pixel edges, so pixel box [left, left + w) spans
    # (2 left / W - 1, 2 (left + w) / W - 1)
    theta[:, 0, 0], theta[:, 0, 2] = w / width, (2 * left + w) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / height, (2 * top + h) / height - 1
    return theta.float()


def apply_windows(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """The windows ``theta`` (N, 2, 3) of the [0, 1] images ``x`` (N, C, H, W), resampled to ``size``: bilinear, or
    bicubic (what the published DINO and MAE crops use) clamped back to [0, 1] as PIL clamps its overshoot."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r}; expected one of {', '.join(INTERPOLATIONS)}")
    grid = F.affine_grid(theta.to(x.device, x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample horizontally with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def check_crop_scale(scale, key: str) -> None:
    """One clear error for a random-resized-crop area range that is not ``0 < min <= max <= 1``."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{key} must satisfy 0 < min <= max <= 1, got {list(scale)}")


def train_augment(x: torch.Tensor, size: tuple[int, int], scale, hflip: bool,
                  generator: torch.Generator | None = None, mode: str = "bilinear") -> torch.Tensor:
    """The training augmentation of the recipes and evaluation trainings: a random-resized-crop of area ``scale``
    to ``size`` (``mode``: its interpolation), then a flip (p 0.5) where the data allows it."""
    x = random_resized_crop(x, size, scale=tuple(scale), generator=generator, mode=mode)
    return random_hflip(x, generator=generator) if hflip else x
