"""The pyramid parametrisation of synthetic images (LGM, Cazenavette et al. 2025): levels of doubling resolution
from 1x1, summed as bilinear upsamples, through a fixed colour decorrelation and sigmoid(2 z)."""
from __future__ import annotations

import torch

# Fixed colour decorrelation (Olah et al. 2017, "Feature Visualization"): a square root of ImageNet's RGB
# covariance, normalised by its largest column norm; the optimised values live in a decorrelated space.
_COLOR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_DECORRELATION = _COLOR / _COLOR.norm(dim=0).max()


def pyramid_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Level sizes 1, 2, 4, ... doubling until the full resolution (the last level is exactly (H, W))."""
    sizes, k = [], 0
    while True:
        size = (min(2 ** k, height), min(2 ** k, width))
        sizes.append(size)
        if size == (height, width):
            return sizes
        k += 1


def decode(levels: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, ch, H, W) from parameter levels: sigmoid(2 M (base + sum_k Up(level_k))), M the colour
    decorrelation for 3 channels (identity otherwise); bilinear upsampling without antialias (published)."""
    size = tuple(base.shape[-2:])
    z = base
    for level in levels:
        z = z + (level if tuple(level.shape[-2:]) == size else
                 torch.nn.functional.interpolate(level, size=size, mode="bilinear", align_corners=False))
    if z.shape[1] == 3:
        z = torch.einsum("dc,nchw->ndhw", COLOR_DECORRELATION.to(z), z)
    return torch.sigmoid(2 * z)


def encode(images: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The inverse of :func:`decode` with no levels: the base z with decode([], z) = images (clamped off 0 and 1)."""
    z = 0.5 * torch.logit(images.clamp(eps, 1 - eps))
    if z.shape[1] == 3:
        z = torch.einsum("dc,nchw->ndhw", torch.linalg.inv(COLOR_DECORRELATION).to(z), z)
    return z
