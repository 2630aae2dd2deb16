"""CLIP zero-shot classifiers: class prompts -> text-tower embeddings (open_clip), the other half of a CLIP teacher.

The factory's ``open_clip:`` backbones are image towers; logit distillation from CLIP needs the text tower of the
same weights to turn class names into a classifier (Radford et al. 2021, zero-shot transfer): each prompt is
embedded and L2-normalised, the T templates of a class are averaged and normalised again, and an image's class
logits are ``logit_scale * norm(image_emb) @ text_emb^T`` (``fastdistill.losses.kd.zero_shot_logits``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill.models.factory import parse_backbone_id
from fastdistill.models.weights import load_into, read_state_dict, weights_kind


def build_clip(backbone_id: str, pretrained: str | None = "none", **kwargs):
    """The whole open_clip model (both towers) of ``open_clip:<arch>/<tag>`` with ``pretrained`` weights, frozen."""
    import open_clip

    source, name = parse_backbone_id(backbone_id)
    if source != "open_clip":
        raise ValueError(f"zero-shot text prompts need an open_clip teacher, got {backbone_id!r}")
    arch, _, tag = name.partition("/")
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {arch!r}; see open_clip.list_models() for the names")
    kind = weights_kind(pretrained)
    kwargs.pop("num_classes", None)
    model = open_clip.create_model(arch, pretrained=tag if kind == "hub" and tag else None, **kwargs)
    if kind == "file":
        sd = read_state_dict(pretrained)
        if not any(k.startswith(("transformer.", "text.")) for k in sd):
            raise ValueError(f"weights '{pretrained}' hold no text tower; zero-shot logits need the full CLIP weights")
        load_into(model, sd, f"weights '{pretrained}'")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def text_classifier(model, arch: str, prompts: list[list[str]], device: torch.device | None = None,
                    batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """Zero-shot class embeddings (C, D), fp32, unit rows, and the model's logit scale ``exp(logit_scale)``.

    ``prompts`` holds T prompts per class (``fastdistill.data.generated.build_prompts``), all with the same T.
    """
    import open_clip

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("text_classifier: every class needs the same number of prompts")
    device = device or next(model.parameters()).device
    tokenizer = open_clip.get_tokenizer(arch)
    flat = [p for cls in prompts for p in cls]
    emb = torch.cat([model.encode_text(tokenizer(flat[i:i + batch_size]).to(device)).float()
                     for i in range(0, len(flat), batch_size)])
    emb = F.normalize(emb, dim=-1).view(len(prompts), len(prompts[0]), -1).mean(1)
    return F.normalize(emb, dim=-1), float(model.logit_scale.exp())
