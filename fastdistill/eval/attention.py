"""What a ViT attends to: CLS-attention overlays (Caron et al. 2021, fig. 1) and the mean attention distance per
layer and head (Dosovitskiy et al. 2021, fig. 7), for any backbone of the factory with ``attention()``.

Mean attention distance of head h in layer l: for every query patch q, the attention-weighted mean pixel distance
to the key patches k, averaged over queries and images,

    d_lh = mean_{n, q} sum_k a_nhqk ||pos_q - pos_k||_2 / sum_k a_nhqk

over patch tokens only (the CLS/register columns are left out and the row renormalised, so a head that parks its
weight on CLS is not counted as local). Large distances are global heads (DINO's later layers), small ones local
(MAE's); one curve per model puts the two in one picture.

Attention on object (the DINO-on-digits claim, measured): per image and head, the share of the CLS token's attention
to the patches that falls on object patches (mean pixel above ``object_threshold``: strokes on a dark ground),
divided by the share of object patches; averaged over images. Uniform attention gives 1; a head that looks only at
the object gives 1 / (object share).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fastdistill.artifacts import RunDir, atomic_path
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.transforms import to_input
from fastdistill.models import Backbone


def patch_grid(backbone: Backbone, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, cols, patch px) of the token grid at ``image_size``."""
    p = backbone.spec.patch_size
    if not p:
        raise ValueError(f"{backbone.spec.name} has no patch grid (family {backbone.spec.family!r}): attention maps "
                         f"need a ViT")
    return image_size[0] // p, image_size[1] // p, p


def num_prefix_tokens(backbone: Backbone) -> int:
    return int(getattr(backbone.model, "num_prefix_tokens", 1))


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """float64 (L, L) pixel distance between the centres of the patches of a (rows, cols) grid, row-major."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1) * patch_size
    return torch.cdist(pos, pos)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int,
                            num_prefix: int = 1) -> torch.Tensor:
    """float64 (H,): mean attention distance in pixels per head of one layer's attention (N, H, L, L).

    L = num_prefix + rows * cols; prefix rows and columns are dropped and rows renormalised (module docstring).
    """
    n_patches = grid[0] * grid[1]
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != num_prefix + n_patches:
        raise ValueError(f"attention must be (N, H, L, L) with L = {num_prefix} + {grid[0]}x{grid[1]}, got "
                         f"{tuple(attn.shape)}")
    a = attn[:, :, num_prefix:, num_prefix:].double()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = (a * patch_distances(grid, patch_size).to(a.device)).sum(-1)  # (N, H, L_patches)
    return dist.mean(dim=(0, 2))


@torch.no_grad()
def attention_distances(backbone: Backbone, images: torch.Tensor, image_size: tuple[int, int], device: torch.device,
                        batch_size: int = 128) -> torch.Tensor:
    """float64 (layers, H): mean attention distance of every layer and head over uint8/[0, 1] ``images``."""
    backbone = backbone.to(device).eval()
    rows, cols, p = patch_grid(backbone, image_size)
    layers = list(range(backbone.num_layers))
    total, count = None, 0
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size].to(device), image_size)
        attn = backbone.attention(x, layers)
        d = torch.stack([mean_attention_distance(attn[l], (rows, cols), p, num_prefix_tokens(backbone))
                         for l in layers]) * x.shape[0]
        total = d if total is None else total + d
        count += x.shape[0]
    return (total / count).cpu()


def attention_on_object(cls_attn: torch.Tensor, images: torch.Tensor, threshold: float) -> torch.Tensor:
    """float64 (n, H): attention on object (module docstring) per image and head, from CLS attention (N, H, rows,
    cols) on [0, 1] ``images`` (N, C, H, W); the n images with both object and ground patches."""
    rows, cols = cls_attn.shape[-2:]
    grey = images.double().mean(1, keepdim=True)
    obj = (F.adaptive_avg_pool2d(grey, (rows, cols)).flatten(1) > threshold).double()  # (N, rows * cols)
    a = cls_attn.double().flatten(2)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    share = obj.mean(1)
    keep = (share > 0) & (share < 1)
    return ((a * obj[:, None]).sum(-1) / share[:, None].clamp_min(1e-300))[keep]


@torch.no_grad()
def cls_attention(backbone: Backbone, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """(N, H, rows, cols): the CLS token's attention to the patches in ``layer``, per head, for [0, 1] images."""
    rows, cols, _ = patch_grid(backbone, tuple(x.shape[-2:]))
    attn = backbone.attention(x, [layer])
    a = next(iter(attn.values()))[:, :, 0, num_prefix_tokens(backbone):]
    return a.reshape(a.shape[0], a.shape[1], rows, cols)


def _colorize(maps: torch.Tensor, cmap: str) -> torch.Tensor:
    """[0, 1] maps (N, h, w) -> RGB (N, 3, h, w) through a matplotlib colormap."""
    import matplotlib

    rgb = matplotlib.colormaps[cmap](maps.clamp(0, 1).cpu().numpy())[..., :3]
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def overlay_grid(images: torch.Tensor, maps: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """One row per image: input | each head's attention | the head-mean attention over the input.

    images: [0, 1] (N, C, H, W); maps: (N, heads, rows, cols). Returns [0, 1] tiles (N * (heads + 2), 3, sH, sW)
    for ``torchvision.utils.save_image(..., nrow=heads + 2)``; every map is min-max scaled on its own.
    """
    n, heads = maps.shape[:2]
    size = (images.shape[-2] * scale, images.shape[-1] * scale)
    x = to_input(images.float().cpu(), channels=3)
    x = F.interpolate(x, size=size, mode="nearest")
    # patches shown as blocks, as in the DINO figures: nearest upsampling of the patch grid
    up = F.interpolate(maps.float().cpu(), size=size, mode="nearest")
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    up = (up - lo) / (hi - lo).clamp_min(1e-12)
    mean = up.mean(1)
    mean = (mean - mean.amin(dim=(1, 2), keepdim=True)) / (mean.amax(dim=(1, 2), keepdim=True) -
                                                           mean.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-12)
    heads_rgb = _colorize(up.reshape(n * heads, *size), "inferno").reshape(n, heads, 3, *size)
    overlay = 0.5 * x + 0.5 * _colorize(mean, "jet")
    return torch.cat([x[:, None], heads_rgb, overlay[:, None]], dim=1).reshape(n * (heads + 2), 3, *size)


def plot_attention_distance(distances: dict[str, torch.Tensor], path: str | Path, image_size: tuple[int, int]) -> Path:
    """One curve per model (the head mean per layer), each head as a dot: ``distances[name]`` is (layers, H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for i, (name, d) in enumerate(distances.items()):
        color = f"C{i}"
        layers = torch.arange(1, d.shape[0] + 1)
        ax.plot(layers, d.mean(1), "-o", color=color, label=name, markersize=4)
        for h in range(d.shape[1]):
            ax.scatter(layers, d[:, h], color=color, alpha=0.35, s=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_title(f"attention distance, {image_size[0]}x{image_size[1]} px inputs (dots: heads)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def sample_images(dataset: ImageDataset, n: int) -> torch.Tensor:
    """A fixed sample of uint8 images: one per class in turn (class 0, 1, ...), first images of each class."""
    per_class = [(dataset.labels == c).nonzero().flatten() for c in range(dataset.num_classes)]
    idx = [int(per_class[i % len(per_class)][i // len(per_class)]) for i in range(n)
           if i // len(per_class) < len(per_class[i % len(per_class)])]
    return dataset.take(torch.tensor(idx, dtype=torch.int64))


def write_attention_report(out: RunDir, models: dict[str, Backbone], test_set: ImageDataset, a: DictConfig,
                           device: torch.device) -> dict:
    """``attention_<name>.png`` (CLS overlays of ``a.images`` test images, layer ``a.layer``) per model, and
    ``attention_distance.json`` / ``.png`` over ``a.distance_images`` test images; returns the distances as
    ``{name: {"per_layer": [...], "per_head": [[...]], "attention_on_object": {"mean", "per_head", ...}}}`` (the
    last over the same images in layer ``a.layer``, unless ``a.object_threshold`` is null)."""
    from torchvision.utils import save_image

    if a.images < 1 or a.distance_images < 1:
        raise ValueError(f"attention.images and attention.distance_images must be >= 1, got {a.images!r}, "
                         f"{a.distance_images!r}")
    images = sample_images(test_set, int(a.images))
    dist_images = test_set.take(torch.linspace(0, len(test_set) - 1, min(int(a.distance_images), len(test_set)))
                                .round().long())
    distances, result = {}, {}
    for name, backbone in models.items():
        backbone = backbone.to(device).eval()
        size = tuple(backbone.spec.input_size)
        x = to_input(images.to(device), size)
        tiles = overlay_grid(x, cls_attention(backbone, x, int(a.layer)), int(a.scale))
        with atomic_path(out / f"attention_{name}.png") as tmp:
            save_image(tiles, str(tmp), nrow=tiles.shape[0] // x.shape[0], padding=2, format="png")
        d = attention_distances(backbone, dist_images, size, device, int(a.batch_size))
        distances[name] = d
        result[name] = {"per_layer": d.mean(1).tolist(), "per_head": d.tolist(), "image_size": list(size),
                        "patch_size": backbone.spec.patch_size}
        if a.object_threshold is not None:
            ratios = torch.cat([attention_on_object(cls_attention(backbone, xb, int(a.layer)), xb, a.object_threshold)
                                for xb in (to_input(dist_images[i:i + int(a.batch_size)].to(device), size)
                                           for i in range(0, len(dist_images), int(a.batch_size)))])
            if len(ratios) == 0:
                raise ValueError(f"attention.object_threshold {a.object_threshold}: no test image has both object "
                                 f"and ground patches; set it to null for this data")
            result[name]["attention_on_object"] = {"mean": ratios.mean().item(), "per_head": ratios.mean(0).tolist(),
                                                   "images": len(ratios), "layer": int(a.layer),
                                                   "threshold": float(a.object_threshold)}
    out.write_json("attention_distance.json", result)
    plot_attention_distance(distances, out / "attention_distance.png", size)
    return result

