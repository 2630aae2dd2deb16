"""``timm:<arch>[.<tag>]`` backbones (ViT, ResNet, ConvNeXt, EfficientNet, ...; DINO/DINOv2/MAE/CLIP tags).

Besides timm's own kwargs a ResNet or RegNet takes ``cifar_stem=True``: the stride-1 stem of the published small-image
ResNets (:func:`cifar_stem`)."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from fastdistill.models.backbone import Backbone
from fastdistill.models.factory import register_source
from fastdistill.models.spec import BackboneSpec
from fastdistill.models.weights import PACKAGED, convert_efficientnet_pytorch, load_into, read_state_dict, weights_kind


def queries_keys(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (N, H, L, D), normed as the module norms them, from the output (N, L, 3 H D) of a timm
    ``Attention`` module's qkv projection."""
    n, length, _ = qkv.shape
    qkv = qkv.reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (N, H, L, L) of a timm ``Attention`` module on its input tokens x (N, L, D).

    Recomputes q and k from the module's own projections and norms: the fused SDPA path never
    materialises the probabilities.
    """
    q, k = queries_keys(attn, attn.qkv(x))
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def _family(model: nn.Module) -> str:
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return "vit"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) or hasattr(model, "conv_stem"):
        return "cnn"
    return "other"


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def cifar_stem_kwargs(backbone_id: str) -> dict:
    """The constructor kwargs of the small-image form of ``timm:<arch>[.<tag>]``, ``{}`` for families without one.
    Read from the registry, nothing is built.

    ResNets (resnet18/50/101, the -d variants, ResNeXt, SE-ResNet ...): the CIFAR stem and torchvision's
    initialisation (``zero_init_last=False``), as the published small-image ResNets are torchvision's. With timm's
    zero-initialised residual branches the CIFAR-stem network starts as the stem seen through three 1x1 stride-2
    shortcuts, 16 of the 784 pixels of a digit: a ResNet-18 teacher ended 8 epochs at train loss 0.56 and test 0.889
    (0.115 and 0.974 with the ImageNet stem). RegNets: the stride-1 stem, timm's initialisation (no gain measured
    from the other: 0.40 vs 0.43 at ipc 1, one seed)."""
    from timm.models import is_model, model_entrypoint

    source, _, name = str(backbone_id).partition(":")
    arch = name.split(".")[0]
    if source != "timm" or not is_model(arch):
        return {}
    family = model_entrypoint(arch).__module__
    if family == "timm.models.resnet":
        return {"cifar_stem": True, "zero_init_last": False}
    return {"cifar_stem": True} if family == "timm.models.regnet" else {}


def cifar_stem(model: nn.Module, name: str) -> None:
    """Give a timm ResNet or RegNet a stem for small images, in place.

    ResNet: the CIFAR stem, a 3x3 stride-1 first convolution and no max-pool, the ResNet-18/50/101 the published
    small-image pipelines train at 32 and 64 px (Jiacheng8/FADRM ``models/resnet.py``, LINs-lab/RDED
    ``resnet18_modified``); the ImageNet stem (7x7 stride 2, then a stride-2 max-pool) leaves a 28-px digit a 7x7
    map before the first block. The new convolution gets timm's ResNet initialisation.
    RegNet: its 3x3 stem convolution at stride 1 (the published pipelines have no small-image RegNet). The ImageNet
    stride leaves a 28-px digit a 1x1 map in the last stage, whose BatchNorm over a micro-batch of 8 then
    normalises 8 numbers: a RegNetX-200MF student stays at chance (0.10-0.13 at ipc 1, against 0.43 at stride 1)."""
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet

    if isinstance(model, RegNet):
        model.stem.conv.stride = (1, 1)
        for info in model.feature_info:
            info["reduction"] = max(1, info["reduction"] // 2)
        return
    if not isinstance(model, ResNet):
        raise ValueError(f"cifar_stem=True: timm:{name} is not a timm ResNet or RegNet (resnet18, resnet50, "
                         f"regnetx_002, ...); other families keep their own stem")
    first = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]  # deep stems: a Sequential
    conv = nn.Conv2d(first.in_channels, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1, model.maxpool = conv, nn.Identity()
    for info in model.feature_info:  # the stem no longer halves, the pool no longer halves again
        info["reduction"] = 1 if info["module"] == "act1" else max(1, info["reduction"] // 4)


@register_source("timm")
def create_timm(name: str, pretrained: str | None = "none", **kwargs) -> Backbone:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the names")
    kind = weights_kind(pretrained)
    packaged = PACKAGED.get(pretrained) if kind == "packaged" else None
    if packaged is not None:
        if packaged.arch != arch:
            raise ValueError(f"packaged weights {pretrained!r} fit timm:{packaged.arch}, not timm:{name}")
        kwargs = {**packaged.model_kwargs, **kwargs}
    kwargs.setdefault("num_classes", 0)
    stem = bool(kwargs.pop("cifar_stem", False))
    if stem and kind == "hub":
        raise ValueError(f"timm:{name}: hub weights carry the ImageNet stem; cifar_stem=True takes pretrained=none or "
                         f"a weights file saved with the CIFAR stem")
    try:
        model = timm.create_model(name, pretrained=kind == "hub", **kwargs)
    except (RuntimeError, OSError) as e:
        if kind == "hub":
            raise RuntimeError(f"cannot fetch hub weights for timm:{name} ({type(e).__name__}: {e}); offline runs "
                               f"use pretrained=/path/to/weights") from None
        raise
    if stem:
        cifar_stem(model, name)
    if kind in ("file", "packaged"):
        path = packaged.path() if packaged else pretrained
        filters = [_timm_filter]
        load_into(model, read_state_dict(path), f"weights '{path}'", filters)

    data_cfg = timm.data.resolve_model_data_config(model)
    family = _family(model)
    patch = None
    fixed = False
    input_size = tuple(data_cfg["input_size"][1:])
    if family == "vit":
        pe = model.patch_embed
        patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
        input_size = tuple(pe.img_size)  # the configured img_size, not the pretrained config's
        fixed = not getattr(model, "dynamic_img_size", False)  # a model flag in timm, not a PatchEmbed one
    if packaged is not None:
        input_size = packaged.input_size or input_size
    spec = BackboneSpec(
        name=f"timm:{name}", source="timm", arch=arch, tag=name.partition(".")[2] or None,
        input_size=input_size,
        mean=tuple(packaged.mean if packaged and packaged.mean else data_cfg["mean"]),
        std=tuple(packaged.std if packaged and packaged.std else data_cfg["std"]),
        interpolation=data_cfg.get("interpolation", "bilinear"), feature_dim=model.num_features,
        num_classes=getattr(model, "num_classes", 0), family=family, fixed_size=fixed, patch_size=patch,
        weights=str(pretrained))
    attention = []
    if family == "vit":
        attention = [(blk.attn, attention_probs) for blk in model.blocks if hasattr(blk.attn, "qkv")]
    logits = _logits if spec.num_classes else None
    return Backbone(model, spec, _embed, logits, attention)


def _timm_filter(sd: dict, model: nn.Module) -> dict:
    """Foreign checkpoints -> timm names: efficientnet_pytorch keys, then timm's own per-family filter
    (DINOv2, MAE, CLIP ... conversions live in each timm module's ``checkpoint_filter_fn``)."""
    if any(k.startswith("_conv_stem") for k in sd):
        return convert_efficientnet_pytorch(sd, model)
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and not set(sd) <= set(model.state_dict()):
        sd = filter_fn(sd, model)
    return sd
