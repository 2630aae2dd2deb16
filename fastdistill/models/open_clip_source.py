"""``open_clip:<arch>/<pretrained tag>`` backbones: the image tower of an open_clip model.

``embed`` is the CLIP image embedding (after the projection), the space the text tower shares.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastdistill.models.backbone import Backbone
from fastdistill.models.factory import register_source
from fastdistill.models.spec import BackboneSpec
from fastdistill.models.weights import load_into, read_state_dict, weights_kind


def mha_attention_probs(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (N, H, L, L) of an ``nn.MultiheadAttention`` (batch-first tokens (N, L, D))."""
    n, length, d = x.shape
    h = attn.num_heads
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = nn.functional.linear(x, w_q, b_q).view(n, length, h, d // h).transpose(1, 2)
    k = nn.functional.linear(x, w_k, b_k).view(n, length, h, d // h).transpose(1, 2)
    return (q @ k.transpose(-2, -1) / math.sqrt(d // h)).float().softmax(dim=-1)


def _embed(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


@register_source("open_clip")
def create_open_clip(name: str, pretrained: str | None = "none", **kwargs) -> Backbone:
    import open_clip

    arch, _, tag = name.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {arch!r}; see open_clip.list_models() for the names")
    kind = weights_kind(pretrained)
    kwargs.pop("num_classes", None)  # the image tower ends in the CLIP embedding
    try:
        model = open_clip.create_model(arch, pretrained=tag if kind == "hub" and tag else None, **kwargs)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"cannot build open_clip:{name} ({type(e).__name__}: {e}); offline runs use "
                           f"pretrained=/path/to/open_clip_weights") from None
    if kind == "file":
        sd = read_state_dict(pretrained)
        if not any(k.startswith("visual.") for k in sd):  # a file of the image tower alone
            sd = {f"visual.{k}": v for k, v in sd.items()}
        load_into(model, sd, f"weights '{pretrained}'")
    visual = model.visual
    pre = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    attention = []
    family = "cnn"
    patch = None
    if hasattr(visual, "transformer"):
        family = "vit"
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
        attention = [(blk.attn, mha_attention_probs) for blk in visual.transformer.resblocks
                     if isinstance(blk.attn, nn.MultiheadAttention)]
    embed_dim = getattr(visual, "output_dim", None) or model.text_projection.shape[-1]
    spec = BackboneSpec(
        name=f"open_clip:{name}", source="open_clip", arch=arch, tag=tag or None, input_size=tuple(size),
        mean=tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=pre.get("interpolation", "bicubic"), feature_dim=int(embed_dim), num_classes=0,
        family=family, fixed_size=family == "vit", patch_size=patch, weights=str(pretrained))
    return Backbone(visual, spec, _embed, None, attention)
