"""Optimiser parameter groups shared by the training recipes."""
from __future__ import annotations

from typing import Collection

import torch


def param_groups(model: torch.nn.Module, skip: Collection[str] = ()) -> list[dict]:
    """Weights get the weight-decay schedule; biases and norm gains (1-dim) none, as published, nor the
    parameters named in ``skip`` (as ``model.named_parameters()`` names them: timm's ``no_weight_decay()``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
