"""Launch policy and dispatch shared by every kernel (one place, as in Liger-Kernel's ``ops/utils.py``)."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
MAX_BLOCK = 65536 // 4  # fp32 elements per program held in registers before spilling


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can launch: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``backend`` for these tensors: auto picks Triton on CUDA, the torch reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ModuleNotFoundError(
            "kernels=triton needs triton and a CUDA device, or TRITON_INTERPRET=1 set before importing triton on CPU"
        )
    return True


def calculate_settings(n: int, cap: int = MAX_BLOCK) -> tuple[int, int]:
    """Block size (next power of two >= n, at most ``cap``) and warps growing with the block."""
    import triton

    block = triton.next_power_of_2(n)
    if block > cap:
        raise ValueError(f"row of {n} elements exceeds the kernel's block cap of {cap}")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    return block, num_warps
