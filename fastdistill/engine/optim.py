"""Optimiser parameter groups shared by the training recipes."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weights get the weight-decay schedule; biases and norm gains (1-dim) none, as published."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
