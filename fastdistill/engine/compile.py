"""``compile=auto|true|false``: ``torch.compile`` where it pays (on for CUDA; off on CPU, where it measured
0.9-1.1x on 2 cores for a 60-70 s first compile, PLATFORM.md)."""
from __future__ import annotations

import torch


def should_compile(setting, device: torch.device) -> bool:
    if setting in ("auto", None):
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    if str(setting).lower() in ("true", "false"):
        return str(setting).lower() == "true"
    raise ValueError(f"compile must be auto, true or false, got {setting!r}")


def maybe_compile(module: torch.nn.Module, setting, device: torch.device) -> torch.nn.Module:
    """The compiled module when ``setting`` asks for it, else ``module`` itself."""
    return torch.compile(module) if should_compile(setting, device) else module
