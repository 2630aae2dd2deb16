"""Differentiable augmented views with stored parameters (LGM's augmentation): draw the parameters of n views
once, apply them to any rows later. A view is then reproducible on its own, in any chunk and on any rank."""
from __future__ import annotations

import math

import torch


def draw(n: int, crop_scale, hflip: bool, noise_p: float, noise: bool) -> dict[str, torch.Tensor]:
    """Augmentation parameters of ``n`` views, drawn from the global CPU generator (checkpointed) in one fixed order:
    random-resized-crop window (area ``crop_scale``, ratio 3/4-4/3, kept inside the image), flip (p 0.5) where
    allowed, and whether (p ``noise_p``) and with which seed each view gets its Gaussian noise.

    Stored parameters make a view reproducible on its own: the two-pass step replays a chunk's views in pass 2,
    and ``torchrun`` ranks draw the parameters of all views (the same on every rank) and each applies its slice,
    so the draws do not depend on the chunk size or the number of ranks. Returns CPU tensors of n rows: ``theta``
    (n, 2, 3) the affine map of ``F.affine_grid`` (flip folded in), ``noise`` (n,) bool, ``seed`` (n,) int64.
    """
    area = torch.empty(n).uniform_(crop_scale[0], crop_scale[1])
    log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3))
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # fractions of the width and height
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    # every window lies inside the image: the published crop lets about 14 % leave it and pads zeros (METHODS.md)
    cx = (torch.rand(n) * 2 - 1) * (1 - w)
    cy = (torch.rand(n) * 2 - 1) * (1 - h)
    if hflip:  # a mirrored window is a flipped view (align_corners=False keeps the pixel grid symmetric)
        w = torch.where(torch.rand(n) < 0.5, -w, w)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    on = torch.rand(n) < noise_p if noise else torch.zeros(n, dtype=torch.bool)
    seed = torch.randint(0, 2**62, (n,)) if noise else torch.zeros(n, dtype=torch.int64)
    return {"theta": theta, "noise": on, "seed": seed}


def take(views: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in views.items()}


def apply(x: torch.Tensor, views: dict[str, torch.Tensor], size: tuple[int, int], noise_mean: float,
                noise_std: float) -> torch.Tensor:
    """Views of ``x`` (n, ch, H, W), one per row of ``views`` (:func:`draw`), at ``size``: differentiable in x
    (affine_grid / grid_sample, bilinear, reflection padding), plus N(noise_mean, noise_std^2) noise where drawn."""
    theta = views["theta"].to(x.device, x.dtype)
    grid = torch.nn.functional.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    rows = views["noise"].nonzero().flatten().tolist()
    if rows and noise_std + abs(noise_mean) > 0:
        # one generator per view, seeded by its draw: the view's noise is the same in any chunk and on any rank
        noise = torch.zeros_like(x)
        for i in rows:
            gen = torch.Generator(x.device).manual_seed(int(views["seed"][i]))
            noise[i] = torch.randn(x.shape[1:], generator=gen, device=x.device, dtype=x.dtype)
        x = x + views["noise"].to(x.device, x.dtype).view(-1, 1, 1, 1) * noise_mean + noise_std * noise
    return x


def augment(x: torch.Tensor, size: tuple[int, int], crop_scale, hflip: bool, noise_mean: float, noise_std: float,
            noise_p: float) -> torch.Tensor:
    """Per-sample, differentiable: random-resized-crop to ``size``, flip (p 0.5) where allowed, additive
    Gaussian noise N(noise_mean, noise_std^2) on a random ``noise_p`` of the samples. Global RNG (checkpointed)."""
    views = draw(x.shape[0], crop_scale, hflip, noise_p, noise=noise_p > 0 and noise_std + abs(noise_mean) > 0)
    return apply(x, views, size, noise_mean, noise_std)
