"""DINO multi-crop augmentation on device batches (Caron et al. 2021, sec. 3.1 and appendix).

Two global crops (area scale >= 0.5 of the image here) and N local crops (scale < 0.5) at a lower resolution,
each drawn per sample: random-resized-crop, flip where the data allows it, colour jitter (p 0.8), grayscale
(p 0.2), Gaussian blur (p 1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local crops) and solarisation
(p 0.2 on global crop 2), the published asymmetric recipe. All crops go to the student, the global ones to the
teacher. The ops work on [0, 1] float batches (N, C, H, W) with per-sample parameters.

Images streamed from files take their crops as they are decoded (:meth:`MultiCrop.decode_crops`, each view a
random-resized crop of the whole file, as the published pipeline crops the original image); the device then
applies the colour, blur and solarisation ops to those views. Decoded-in-memory images (the embedded digits) are
cropped on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdistill.data.dataset import TrainCrop
from fastdistill.data.transforms import INTERPOLATIONS, random_hflip, random_resized_crop


@dataclass
class MultiCrop:
    global_size: int = 28
    local_size: int = 12
    num_local: int = 8
    global_scale: tuple[float, float] = (0.5, 1.0)
    local_scale: tuple[float, float] = (0.2, 0.5)
    hflip: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.0
    jitter_random_order: bool = False
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px at the crop's resolution (published 0.1-2.0 at 224 px)
    solarize_p: float = 0.2
    interpolation: str = "bicubic"  # of the random-resized crops (published)

    def __post_init__(self):
        (gl, gh), (ll, lh) = self.global_scale, self.local_scale
        if not 0 < ll <= lh <= gl <= gh <= 1:
            raise ValueError(f"multi-crop scales must satisfy 0 < local min <= local max <= global min <= global max "
                             f"<= 1, got local {list(self.local_scale)} and global {list(self.global_scale)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown crop interpolation {self.interpolation!r}; expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.num_local < 0 or self.local_size < 1 or self.global_size < 1:
            raise ValueError(f"multi-crop needs num_local >= 0 and sizes >= 1, got {self.num_local!r}, "
                             f"{self.local_size!r}, {self.global_size!r}")

    def views(self) -> list[tuple[int, tuple[float, float], float, float]]:
        """(size, area scale, blur p, solarisation p) of every view: global 1, global 2, then the local ones."""
        return [(self.global_size, tuple(self.global_scale), 1.0, 0.0),
                (self.global_size, tuple(self.global_scale), 0.1, self.solarize_p),
                *[(self.local_size, tuple(self.local_scale), 0.5, 0.0)] * self.num_local]

    def decode_crops(self) -> tuple[TrainCrop, ...]:
        """The views' random-resized crops and flips, for a dataset that draws them from each file as it decodes it
        (``ImageDataset.train_view``); :meth:`__call__` then gets the views and adds the rest."""
        return tuple(TrainCrop(scale=scale, hflip=self.hflip, interpolation=self.interpolation, size=(size, size))
                     for size, scale, _, _ in self.views())

    def __call__(self, x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """[0, 1] images (N, C, H, W) -> [global 1, global 2, local 1 .. local n], each (N, C, s, s), cropped here;
        or those views already cropped and flipped at decode (a list of [0, 1] batches in that order) -> the same
        views after the colour, grayscale, blur and solarisation ops."""
        views = self.views()
        if isinstance(x, torch.Tensor):
            return [self._photometric(self._crop(x, size, scale), blur_p, solarize_p)
                    for size, scale, blur_p, solarize_p in views]
        got = [tuple(v.shape[-2:]) for v in x]
        if got != [(size, size) for size, _, _, _ in views]:
            raise ValueError(f"multi-crop expects {len(views)} views of {[v[0] for v in views]} px, got {got}")
        return [self._photometric(v, blur_p, solarize_p) for v, (_, _, blur_p, solarize_p) in zip(x, views)]

    def _crop(self, x: torch.Tensor, size: int, scale) -> torch.Tensor:
        v = random_resized_crop(x, (size, size), scale=tuple(scale), mode=self.interpolation)
        return random_hflip(v) if self.hflip else v

    def _photometric(self, v: torch.Tensor, blur_p: float, solarize_p: float) -> torch.Tensor:
        v = color_jitter(v, self.jitter_p, self.brightness, self.contrast, self.saturation, self.hue,
                         self.jitter_random_order)
        v = random_grayscale(v, self.grayscale_p)
        v = gaussian_blur(v, blur_p, self.blur_sigma)
        return solarize(v, solarize_p)


def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
    """(N, 1, 1, 1) bool: which samples an op with probability p applies to."""
    return (torch.rand(x.shape[0]) < p).to(x.device)[:, None, None, None]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # ITU-R 601, as PIL
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, p: float, brightness: float, contrast: float, saturation: float, hue: float = 0.0,
                 random_order: bool = False) -> torch.Tensor:
    """With probability p per sample: brightness, contrast and saturation factors in [1 - s, 1 + s] and a hue shift
    in [-hue, hue] of the colour wheel, in a random order per sample (torchvision's ColorJitter, as the published
    DINO augmentation) or in that fixed order."""
    n = x.shape[0]
    factors = torch.stack([torch.empty(n).uniform_(1 - s, 1 + s) for s in (brightness, contrast, saturation)]
                          + [torch.empty(n).uniform_(-hue, hue)], dim=1)
    order = torch.stack([torch.randperm(4) for _ in range(n)]) if random_order else torch.arange(4).expand(n, 4)
    return torch.where(_chosen(x, p), jitter_ops(x, factors.to(x.device, x.dtype), order.to(x.device)), x)


def jitter_ops(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue (ops 0-3) with per-sample ``factors`` (N, 4), applied in the
    per-sample ``order`` (N, 4): step k applies op ``order[i, k]`` to sample i. Saturation and hue leave one-channel
    images as they are."""
    y = x
    for k in range(4):
        step = order[:, k]
        for op in range(4):
            chosen = (step == op)[:, None, None, None]
            if bool(chosen.any()):
                y = torch.where(chosen, _jitter_op(y, op, factors[:, op]), y)
    return y


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    f4 = f[:, None, None, None]
    if op == 0:
        return (x * f4).clamp(0, 1)
    if op == 1:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * f4 + mean).clamp(0, 1)
    if x.shape[1] != 3:
        return x
    if op == 2:
        g = _gray(x)
        return ((x - g) * f4 + g).clamp(0, 1)
    return shift_hue(x, f)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images (N, 3, H, W) in [0, 1] by ``shift`` (N,) turns, through HSV (as PIL and
    torchvision's adjust_hue)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    chroma = maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma == 0, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + shift[:, None, None], 1.0)
    i = torch.floor(h * 6.0)
    frac = h * 6.0 - i
    i = i.long() % 6
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * frac), v * (1 - sat * (1 - frac))
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 0)  # (6, N, 3, H, W): RGB per sextant
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1)).squeeze(0)


def random_grayscale(x: torch.Tensor, p: float) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return torch.where(_chosen(x, p), _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur, sigma ~ U(sigma) px per sample, reflect padding, with probability p."""
    n, c, h, w = x.shape
    s = torch.empty(n).uniform_(*sigma)
    radius = min(math.ceil(3 * sigma[1]), (min(h, w) - 1))  # reflect padding needs radius < size
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)  # (N * C, 2r + 1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    return torch.where(_chosen(x, p), y, x)


def solarize(x: torch.Tensor, p: float, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels >= threshold, with probability p per sample."""
    if p <= 0:
        return x
    return torch.where(_chosen(x, p), torch.where(x >= threshold, 1 - x, x), x)
