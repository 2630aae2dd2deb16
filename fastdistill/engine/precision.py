"""``precision=fp32|bf16|fp16|auto``: autocast for the forward, a GradScaler where fp16 needs one.

Statistics and losses stay fp32 (recipes cast them explicitly); parameters and optimiser state stay fp32.
On CPU, bf16 autocast pays only with native bf16 units: 1.5-1.9x slower than fp32 on a CPU without them
(PLATFORM.md), about 2x faster on one with AMX (FADRM and LGM steps, README "CPU: against the official steps").
``auto`` resolves per machine from that measurement; fp32 is the default.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = (*PRECISIONS, "auto")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 natively (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo; False where the
    flags cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CPU with native bf16 units, fp32 elsewhere (on CUDA the presets that need mixed
    precision name it); any other name unchanged."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def mpt_precision(device: torch.device) -> str:
    """The precision of FADRM's mixed-precision recovery (MPT, Cui et al. 2025): fp16 autocast with a GradScaler on
    CUDA, as published. On CPU torch runs fp16 autocast, but through slow kernels (a ResNet-18 forward and backward
    at 28 px, 1 thread: 6.6 s against 0.22 s in fp32, on a Xeon with avx512_fp16), so MPT there is bf16 where the
    CPU multiplies bf16 natively and fp32 elsewhere (the recipe says which)."""
    if device.type == "cuda":
        return "fp16"
    return resolve_precision("auto", device)


def channels_last_pays(device: torch.device, precision: "Precision") -> bool:
    """Whether convolutions should run channels_last: on CPU under bf16 (oneDNN's bf16 kernels; ResNet-18 forward
    + input backward 2.35x NCHW fp32 against 1.63x for NCHW bf16, 64 px, 1 thread); not in fp32 there (0.8-1.0x)."""
    return device.type == "cpu" and precision.name == "bf16"


class Precision:
    """Autocast context and loss scaling for one device and precision."""

    def __init__(self, name: str, device: torch.device):
        if name not in CHOICES:
            raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(CHOICES)}")
        name = resolve_precision(name, device)
        self.name, self.device, self.dtype = name, device, PRECISIONS[name]
        # fp16 overflows without loss scaling; the scaler also skips steps with inf/NaN gradients, which the
        # published LGM code's fixed scale of 1024 never checks (METHODS.md)
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip_grad: float | None = None, params=None,
             clip_scope: str = "global") -> None:
        """Unscale, optionally clip, step and update the scale.

        ``clip_scope``: ``global`` clips the norm of all gradients together (torch's clip_grad_norm_); ``tensor``
        clips each parameter tensor's gradient to ``clip_grad`` on its own, as the published DINO code does.
        """
        if clip_grad:
            self.scaler.unscale_(optimizer)
            if clip_scope == "global":
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            elif clip_scope == "tensor":
                clip_each_tensor(params, clip_grad)
            else:
                raise ValueError(f"unknown clip scope {clip_scope!r}; expected global or tensor")
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


@torch.no_grad()
def clip_each_tensor(params, max_norm: float, eps: float = 1e-6) -> None:
    """Scale each parameter's gradient down to L2 norm ``max_norm`` where it is larger (DINO's per-tensor clipping;
    the eps keeps a zero gradient finite). Non-finite gradients are left for the scaler to skip."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    scales = (max_norm / (norms + eps)).clamp(max=1.0)
    for g, scale in zip(grads, scales):
        g.mul_(scale.to(g.dtype))
