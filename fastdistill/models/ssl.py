"""Heads and wrappers of the self-supervised ViT teachers: the DINO projection head and multi-crop wrapper
(Caron et al. 2021), MAE masking, the encoder on visible patches and the light decoder (He et al. 2022).

The backbones themselves are the factory's timm ViTs (``create_backbone("timm:vit_...")``), so a trained teacher
is saved as the plain timm state dict and loads back with ``pretrained=PATH``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from fastdistill.models.backbone import Backbone


class DINOHead(nn.Module):
    """MLP (``num_layers`` linear layers, GELU) to a bottleneck, L2 normalisation, then a weight-normalised linear
    layer to K outputs without bias (Caron et al. 2021, sec. 3.1 and appendix).

    With ``norm_last_layer`` the weight-norm gain g is fixed at 1: the last layer is a set of K unit-norm
    prototypes, which the paper found more stable; the recipe also freezes it in the first epoch. ``use_bn`` adds
    batch norm after the hidden layers (the published ``use_bn_in_head``): it removes the component every sample
    shares, which on small, uniform data (digits on black) is nearly all of a fresh ViT's output.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead: num_layers must be >= 1, got {num_layers!r}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(b), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim) logits."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropModel(nn.Module):
    """Backbone + head over a list of crops: consecutive crops of one resolution share one forward pass (the
    backbone sees one batch per resolution), outputs come back view-major, (sum_v N_v, K)."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone.embed(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


def check_vit(backbone: Backbone, what: str) -> VisionTransformer:
    """The timm VisionTransformer inside ``backbone``; a one-line error for anything else."""
    model = backbone.model
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ValueError(f"{what} needs a timm ViT with a class token (timm:vit_*), got {backbone.spec.name}")
    return model


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p * p * C), patches in row-major order (the ViT's token order)."""
    n, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patchify: {h}x{w} px is not a multiple of the patch size {patch_size}")
    x = x.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch_size) * (w // patch_size), patch_size ** 2 * c)


def unpatchify(patches: torch.Tensor, patch_size: int, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, L, p * p * C) -> (N, C, H, W)."""
    n = patches.shape[0]
    gh, gw = size[0] // patch_size, size[1] // patch_size
    x = patches.reshape(n, gh, gw, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, size[0], size[1])


def random_masking(n: int, length: int, mask_ratio: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uniformly random subset of ``int(L * (1 - mask_ratio))`` visible patches per sample (He et al. 2022).

    Returns:
        ids_keep: int64 (N, L_visible), the visible patch indices.
        mask: float (N, L), 1 on masked patches, 0 on visible ones; exactly ``L - L_visible`` ones per row.
        ids_restore: int64 (N, L), the permutation that puts [visible, masked] tokens back in patch order.
    """
    keep = int(length * (1 - mask_ratio))
    if not 0 <= mask_ratio < 1 or keep < 1:
        raise ValueError(f"mask_ratio must leave at least one of {length} patches visible (0 <= ratio < 1), "
                         f"got {mask_ratio!r}")
    noise = torch.rand(n, length, generator=generator).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def mae_encode(vit: VisionTransformer, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The ViT on the visible patches only: (N, P + L_visible, D) tokens after the final norm, prefix first.

    x: normalised images (N, 3, H, W). The patch embedding is a per-patch projection and position embeddings are
    added before the masked tokens are dropped, so no pixel of a masked patch reaches the blocks.
    """
    tokens = vit._pos_embed(vit.patch_embed(x))  # timm's own prefix tokens + position embedding (resampled if dynamic)
    p = vit.num_prefix_tokens
    visible = tokens[:, p:].gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
    return vit.norm(vit.blocks(vit.norm_pre(torch.cat([tokens[:, :p], visible], dim=1))))


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D sine-cosine position embedding of a patch grid, row-major (He et al. 2022, as
    their code orders it): the first dim / 2 channels encode the column, the last dim / 2 the row, each half as
    [sin(p w_i), cos(p w_i)] over the frequencies w_i = 10000^(-i / (dim / 4)), i < dim / 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def fix_sincos(pos_embed: nn.Parameter, grid: tuple[int, int]) -> None:
    """Overwrite a (1, [prefix +] rows * cols, D) position embedding with the fixed 2-D sin-cos one and freeze it;
    the patch rows are the last ones, prefix tokens (where embedded) get zeros, as published."""
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, pos_embed.shape[1] - grid[0] * grid[1]:] = sincos_2d(grid, pos_embed.shape[-1])
    pos_embed.requires_grad_(False)


POS_EMBEDS = ("learned", "sincos")


def set_pos_embed(vit: VisionTransformer, kind: str, what: str = "ViT") -> None:
    """``learned``: the ViT's own (timm: trainable, N(0, 0.02^2)); ``sincos``: the fixed 2-D sin-cos one of
    :func:`fix_sincos` (MAE as published; on 28-px digits DINO's ViT also learns faster with it: README)."""
    if kind not in POS_EMBEDS:
        raise ValueError(f"unknown {what} position embedding {kind!r}; expected one of {', '.join(POS_EMBEDS)}")
    if kind == "sincos":
        fix_sincos(vit.pos_embed, tuple(vit.patch_embed.grid_size))


class MAEDecoder(nn.Module):
    """The light MAE decoder: embed the encoder tokens, insert a shared mask token at every masked position,
    add position embeddings, a few transformer blocks, predict the p * p * C pixels of every patch."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_pixels: int, num_prefix: int = 1, dim: int = 128,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_prefix = num_prefix
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + num_patches, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, P + L_visible, D_enc), ids_restore (N, L) -> predicted patches (N, L, p * p * C)."""
        x = self.embed(latent)
        p, (n, length) = self.num_prefix, ids_restore.shape
        tokens = torch.cat([x[:, p:], self.mask_token.expand(n, length - (x.shape[1] - p), -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :p], tokens], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, p:]


class MAEModel(nn.Module):
    """Encoder (a factory ViT) + decoder; ``forward(x, ids_keep, ids_restore)`` predicts every patch."""

    def __init__(self, backbone: Backbone, decoder: MAEDecoder, pos_embed: str = "learned"):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.vit = check_vit(backbone, "MAE")
        set_pos_embed(self.vit, pos_embed, "MAE")  # fixed in encoder and decoder, as published (He et al. 2022, A.1)
        if pos_embed == "sincos":
            fix_sincos(decoder.pos_embed, tuple(self.vit.patch_embed.grid_size))

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x: [0, 1] images (N, C, H, W) -> (N, L, p * p * C) pixel predictions."""
        return self.decoder(mae_encode(self.vit, self.backbone.normalize(x), ids_keep), ids_restore)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
