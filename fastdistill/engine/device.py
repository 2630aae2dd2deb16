"""``device=auto|cpu|cuda`` resolved once."""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda without a GPU is a one-line error."""
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)
