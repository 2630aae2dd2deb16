"""Launch policy and dispatch shared by every kernel (one place, as in Liger-Kernel's ``ops/utils.py``)."""
from __future__ import annotations

import functools
import os
import warnings

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


def kernel_dtypes() -> dict:
    """torch dtype -> Triton dtype of the tensors every kernel takes (float64 and integers go to the reference)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_settings(dtype: torch.dtype) -> dict:
    """``tl.dot`` operand dtype and precision for inputs of ``dtype`` (operands in the input dtype, fp32 sums).

    fp32 follows torch's matmul setting: "high"/"medium" allow TF32, as in eager. "highest" (torch's default)
    asks for fp32 accuracy, which the kernels get from three TF32 products (tf32x3, about 1e-6 relative): the
    plain fp32 ("ieee") dot runs on the FMA units without the tensor cores and spills registers at 64-wide
    tiles (4-28 KB per thread in the sm_90 compile), and ran 5-30x slower than eager on an H200.
    """
    import triton.language as tl

    precision = "tf32"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        precision = "tf32x3"
    dot_dtype = kernel_dtypes()[dtype]
    # the interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584): fp32 there
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        dot_dtype = tl.float32
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision}


def dispatch(name: str, backend: str, tensors, unsupported: str | None = None) -> bool:
    """True to run the Triton kernel ``name``, False for the torch path.

    ``unsupported`` is the kernel's reason it cannot take these inputs (a dtype, a size over its cap), or None.
    ``auto`` then falls back to torch with one warning per reason; ``triton`` raises it as a ValueError.
    """
    if not use_triton(backend, *tensors):
        return False
    if unsupported is None:
        return True
    if backend == "triton":
        raise ValueError(f"{name}: {unsupported}; use backend='torch' or 'auto'")
    _warn_fallback(name, unsupported)
    return False


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(f"{name}: {reason}; running the PyTorch path instead of the Triton kernel", stacklevel=4)


def dtype_reason(tensors: dict[str, torch.Tensor]) -> str | None:
    """The unsupported-dtype reason of :func:`dispatch` for these named tensors, or None."""
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernel takes float32, float16 or bfloat16 {name}, got {t.dtype}"
    return None


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
