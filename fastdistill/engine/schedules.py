"""Per-step schedules, precomputed with an asserted length (DINO's ``cosine_scheduler``)."""
from __future__ import annotations

import math

import torch


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """float64 (total_steps,): linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    if total_steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warm = torch.linspace(warmup_start, base, warmup_steps + 1, dtype=torch.float64)[:-1] if warmup_steps else \
        torch.empty(0, dtype=torch.float64)
    n = total_steps - warmup_steps
    t = torch.arange(n, dtype=torch.float64)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t / max(n, 1)))
    out = torch.cat([warm, cos])
    assert out.numel() == total_steps
    return out


def cosine_per_epoch(base: float, final: float, epochs: int) -> torch.Tensor:
    """float64 (epochs,): the FKD validation's cosine, stepped once per epoch (Jiacheng8/FADRM
    ``validate/train_fkd.py``): ``base (1 + cos(pi e / (E eta))) / 2`` in epoch e of E. Its ``eta`` is given by the
    value the curve reaches at e = E, ``final``: eta = pi / arccos(2 final / base - 1) (``final = base / 2``: the
    published eta 2; ``final = 0``: eta 1); ``final >= base`` holds the lr."""
    if epochs < 1:
        raise ValueError(f"a schedule needs at least one epoch, got {epochs}")
    fraction = final / base if base else 1.0
    if fraction >= 1:
        return torch.full((epochs,), float(base), dtype=torch.float64)
    eta = math.pi / math.acos(2 * fraction - 1)
    e = torch.arange(epochs, dtype=torch.float64)
    return base * 0.5 * (1 + torch.cos(math.pi * e / (epochs * eta)))
