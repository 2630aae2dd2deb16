"""Fused BN-statistics matching loss and ARC update of FADRM: Triton kernels, a lean torch path, dispatchers.

Reference: ``fastdistill/losses/bn_stats.py`` (same names and signatures, minus ``backend``). The published hook
(SRe2L, kept by FADRM) makes about 14 passes over every BN input per iteration and its ``.contiguous()`` keeps a
second full copy of each input alive for the backward (METHODS.md). Here the forward reads each input once,
saves nothing but the input (which the BN layer saves anyway) and two (C,) vectors, and the backward is one
fused multiply-add per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastdistill.kernels._utils import MAX_BLOCK, calculate_settings, dispatch, dtype_reason
from fastdistill.losses.bn_stats import _check_arc_input, _check_bn_input
from fastdistill.losses.bn_stats import arc_update as _arc_update_reference

# elements per program and step; the two fp32 accumulator tiles then take 2 x 16 registers per thread at 4 warps
_TILE = 2048
_ARC_BLOCK = 1024


@triton.jit
def _bn_stats_fwd_kernel(
    x_ptr,
    shift_ptr,
    part_ptr,
    n_outer,
    n_inner,
    n_channels,
    tiles_per_prog,
    stride_xn,
    stride_xc,
    stride_xs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # x is viewed as (n_outer, C, n_inner); program (split, c-block) sums a contiguous range of
    # (outer, inner-block) tiles and writes its partial sums, reduced in a fixed order by the finalize kernel
    pid_split = tl.program_id(0)
    pid_c = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < n_channels
    # sum(x)^2 / M and sum(x^2) cancel catastrophically when |mean| >> std; around the running mean both sums
    # stay small, and sum(x - rm) / M is the mean term (mean - rm) itself, exact even when the two nearly match
    shift = tl.load(shift_ptr + c_offs, mask=c_mask, other=0.0)
    # int64: n * stride_xn passes 2**31 for inputs over 2 G elements
    c_part = c_offs.to(tl.int64) * stride_xc
    s_blocks = tl.cdiv(n_inner, BLOCK_S)
    tile_start = pid_split * tiles_per_prog
    tile_end = tl.minimum(tile_start + tiles_per_prog, n_outer * s_blocks)
    acc_1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        n = (tile // s_blocks).to(tl.int64)
        s_offs = (tile % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (s_offs < n_inner)[None, :]
        offs = n * stride_xn + c_part[:, None] + s_offs.to(tl.int64)[None, :] * stride_xs
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[:, None], 0.0)
        acc_1 += d
        acc_2 += d * d
    n_splits = tl.num_programs(0)
    tl.store(part_ptr + pid_split * n_channels + c_offs, tl.sum(acc_1, axis=1), mask=c_mask)
    tl.store(part_ptr + (n_splits + pid_split) * n_channels + c_offs, tl.sum(acc_2, axis=1), mask=c_mask)


@triton.jit
def _bn_stats_finalize_kernel(
    part_ptr,
    running_mean_ptr,
    running_var_ptr,
    loss_ptr,
    coef_ptr,
    n_splits,
    n_channels,
    inv_m,
    BLOCK_C: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    c_offs = tl.arange(0, BLOCK_C)
    c_mask = c_offs < n_channels
    # BLOCK_SPLIT partial rows per step: one row per step would be hundreds of dependent loads on a large GPU
    acc_1 = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    acc_2 = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_splits, BLOCK_SPLIT):
        rows = start + tl.arange(0, BLOCK_SPLIT)
        mask = (rows < n_splits)[:, None] & c_mask[None, :]
        offs = rows[:, None] * n_channels + c_offs[None, :]
        acc_1 += tl.load(part_ptr + offs, mask=mask, other=0.0)
        acc_2 += tl.load(part_ptr + n_splits * n_channels + offs, mask=mask, other=0.0)
    s_1 = tl.sum(acc_1, axis=0)
    s_2 = tl.sum(acc_2, axis=0)
    running_mean = tl.load(running_mean_ptr + c_offs, mask=c_mask, other=0.0)
    running_var = tl.load(running_var_ptr + c_offs, mask=c_mask, other=0.0)
    d_mean = s_1 * inv_m
    d_var = tl.where(c_mask, s_2 * inv_m - d_mean * d_mean - running_var, 0.0)
    norm_mean = tl.sqrt(tl.sum(d_mean * d_mean, axis=0))
    norm_var = tl.sqrt(tl.sum(d_var * d_var, axis=0))
    tl.store(loss_ptr, norm_var + norm_mean)
    # d||v||/dv = v / ||v|| is 0/0 at a perfectly matched term: v = 0 there, so dividing by 1 instead gives 0
    # (torch's subgradient) rather than NaN
    g_var = d_var / tl.where(norm_var > 0, norm_var, 1.0)
    g_mean = d_mean / tl.where(norm_mean > 0, norm_mean, 1.0)
    a = 2.0 * inv_m * g_var
    b = inv_m * g_mean - a * (running_mean + d_mean)
    tl.store(coef_ptr + c_offs, a, mask=c_mask)
    tl.store(coef_ptr + n_channels + c_offs, b, mask=c_mask)


@triton.jit
def _bn_stats_bwd_kernel(
    x_ptr,
    coef_ptr,
    grad_out_ptr,
    grad_x_ptr,
    n_inner,
    n_channels,
    stride_xn,
    stride_xc,
    stride_xs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    s_blocks = tl.cdiv(n_inner, BLOCK_S)
    n = (tile // s_blocks).to(tl.int64)
    s_offs = (tile % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < n_channels
    mask = c_mask[:, None] & (s_offs < n_inner)[None, :]
    # grad_x has x's strides (allocated so by the launcher), so one offset serves both
    offs = n * stride_xn + c_offs.to(tl.int64)[:, None] * stride_xc + s_offs.to(tl.int64)[None, :] * stride_xs
    # read from memory rather than passed as a float: no host sync on the loss scale
    grad_out = tl.load(grad_out_ptr).to(tl.float32)
    a = tl.load(coef_ptr + c_offs, mask=c_mask, other=0.0) * grad_out
    b = tl.load(coef_ptr + n_channels + c_offs, mask=c_mask, other=0.0) * grad_out
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_x_ptr + offs, (x * a[:, None] + b[:, None]).to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _arc_update_kernel(
    x_ptr,
    patches_ptr,
    lo_ptr,
    hi_ptr,
    out_ptr,
    alpha,
    n_elements,
    n_channels,
    stride_xc,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    # x, patches and out share one dense layout, so the memory offset alone gives the channel (NCHW or NHWC)
    c = (offs // stride_xc) % n_channels
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    patches = tl.load(patches_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + c, mask=mask, other=0.0)
    hi = tl.load(hi_ptr + c, mask=mask, other=0.0)
    y = tl.minimum(tl.maximum(alpha * x + (1.0 - alpha) * patches, lo), hi)
    # each element is read before it is written at the same offset: out may be x
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when NCHW-, channels_last- or (N, C)-contiguous (the kernels follow strides), else a copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _ncs_view(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Dense ``x`` as (n_outer, C, n_inner) with strides: the longest contiguous run of rows becomes n_inner.

    NCHW gives (N, C, H*W) with unit inner stride; channels_last and (N, C) give (1, C, N*H*W) with inner
    stride C, so that a tile's rows of C channels are adjacent in memory.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    stride_n, stride_c, stride_s = x.view(n, c, s).stride()
    if s == 1:
        return 1, n, 0, stride_c, stride_n
    if n == 1 or stride_n == s * stride_s:
        return 1, n * s, 0, stride_c, stride_s
    return n, s, stride_n, stride_c, stride_s


def _tile_shape(n_channels: int, n_inner: int, stride_s: int) -> tuple[int, int]:
    if stride_s == 1:
        block_s = min(triton.next_power_of_2(n_inner), _TILE)
        return min(triton.next_power_of_2(n_channels), _TILE // block_s), block_s
    block_c = min(triton.next_power_of_2(n_channels), _TILE // 16)
    return block_c, min(triton.next_power_of_2(n_inner), _TILE // block_c)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    # the interpreter: a few programs still exercise the cross-program reduction
    return 4


def bn_stats_fwd(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (fp32 scalar) and coefficients (2, C) fp32 with dL/dx = coef[0, c] * x + coef[1, c]."""
    x = _dense(x)
    n_channels = x.shape[1]
    n_outer, n_inner, stride_n, stride_c, stride_s = _ncs_view(x)
    block_c, block_s = _tile_shape(n_channels, n_inner, stride_s)
    c_blocks = triton.cdiv(n_channels, block_c)
    n_tiles = n_outer * triton.cdiv(n_inner, block_s)
    tiles_per_prog = triton.cdiv(n_tiles, max(1, min(n_tiles, _target_programs(x.device) // c_blocks)))
    n_splits = triton.cdiv(n_tiles, tiles_per_prog)
    running_mean = running_mean.detach().reshape(-1).to(torch.float32).contiguous()
    running_var = running_var.detach().reshape(-1).to(torch.float32).contiguous()
    partials = torch.empty(2, n_splits, n_channels, dtype=torch.float32, device=x.device)
    _bn_stats_fwd_kernel[(n_splits, c_blocks)](
        x, running_mean, partials, n_outer, n_inner, n_channels, tiles_per_prog, stride_n, stride_c, stride_s,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4,
    )
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    coef = torch.empty(2, n_channels, dtype=torch.float32, device=x.device)
    block, num_warps = calculate_settings(n_channels)
    block_split = max(1, min(triton.next_power_of_2(n_splits), _TILE // block))
    # a Python float reaches the kernel as an fp32 scalar
    _bn_stats_finalize_kernel[(1,)](
        partials, running_mean, running_var, loss, coef, n_splits, n_channels, 1.0 / (x.numel() // n_channels),
        BLOCK_C=block, BLOCK_SPLIT=block_split, num_warps=num_warps,
    )
    return loss, coef


def bn_stats_bwd(x: torch.Tensor, coef: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """dL/dx in x's dtype and layout: ``grad_output * (coef[0, c] * x + coef[1, c])``."""
    x = _dense(x)
    n_channels = x.shape[1]
    n_outer, n_inner, stride_n, stride_c, stride_s = _ncs_view(x)
    block_c, block_s = _tile_shape(n_channels, n_inner, stride_s)
    grad_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    grid = (n_outer * triton.cdiv(n_inner, block_s), triton.cdiv(n_channels, block_c))
    _bn_stats_bwd_kernel[grid](
        x, coef, grad_output.reshape(()).contiguous(), grad_x, n_inner, n_channels, stride_n, stride_c, stride_s,
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4,
    )
    return grad_x


class BNStatsFunction(torch.autograd.Function):
    r"""BN-statistics loss in Triton (FADRM, Cui et al. 2025; SRe2L's BN hook).

    Forward, with the per-channel sums over the M = N*H*W values of channel c taken around the running mean:

    .. math::
        \delta\mu_c = \tfrac{1}{M} \textstyle\sum (x - \hat\mu_c), \quad
        \sigma^2_c = \tfrac{1}{M} \textstyle\sum (x - \hat\mu_c)^2 - \delta\mu_c^2, \quad
        L = \lVert \sigma^2 - \hat\sigma^2 \rVert_2 + \lVert \delta\mu \rVert_2

    Backward, with :math:`g^v = (\sigma^2 - \hat\sigma^2) / \lVert\cdot\rVert` and
    :math:`g^\mu = \delta\mu / \lVert\cdot\rVert` (0 where the norm is 0):

    .. math::
        \frac{\partial L}{\partial x_i} = \frac{2 g^v_c}{M} (x_i - \mu_c) + \frac{g^\mu_c}{M} = a_c x_i + b_c,
        \quad a_c = \frac{2 g^v_c}{M}, \quad b_c = \frac{g^\mu_c}{M} - a_c \mu_c

    The forward saves x (no copy: the BN layer keeps it for its own backward) and (a, b) as one (2, C) tensor.
    The running statistics get no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        loss, coef = bn_stats_fwd(x, running_mean, running_var)
        ctx.save_for_backward(x, coef)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, coef = ctx.saved_tensors
        return bn_stats_bwd(x, coef, grad_output), None, None


def _bn_stats_torch_fwd(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor):
    """The loss and the (1, C, 1, 1) fp32 coefficients a, b of dL/dx = a x + b (:class:`BNStatsFunction`)."""
    n_channels = x.shape[1]
    shape = (1, n_channels) + (1,) * (x.dim() - 2)
    dims = (0,) + tuple(range(2, x.dim()))
    inv_m = 1.0 / (x.numel() // n_channels)
    running_mean = running_mean.to(torch.float32).reshape(shape)
    running_var = running_var.to(torch.float32).reshape(-1)
    # fp32 whatever x's dtype (type promotion with the fp32 shift); shifted as in _bn_stats_fwd_kernel
    d = x - running_mean
    d_mean = d.sum(dims) * inv_m
    # squared in place: a second input-sized temporary would cost as much as the reduction
    d_var = d.square_().sum(dims) * inv_m - d_mean.square() - running_var
    norm_mean = torch.linalg.vector_norm(d_mean)
    norm_var = torch.linalg.vector_norm(d_var)
    # 0 where a norm is 0 (torch's subgradient), as in _bn_stats_finalize_kernel
    g_var = d_var / torch.where(norm_var > 0, norm_var, 1.0)
    g_mean = d_mean / torch.where(norm_mean > 0, norm_mean, 1.0)
    a = 2.0 * inv_m * g_var
    b = inv_m * g_mean - a * (running_mean.reshape(-1) + d_mean)
    return norm_var + norm_mean, a.reshape(shape), b.reshape(shape)


class BNStatsTorchFunction(torch.autograd.Function):
    """The same loss and gradient as :class:`BNStatsFunction` in plain torch, for CPU.

    One shifted fp32 sum and sum of squares per channel instead of the hook's mean, permuted copy and variance,
    and a backward of one ``addcmul``: the whole recovery step 1.17-1.54x faster on CPU (METHODS.md), the term
    alone 3-9x over resnet18's BN layers (``benchmarks/bench_bn_stats.py``, 1 thread). Saves x and the
    (1, C, 1, 1) coefficients a, b.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
        loss, a, b = _bn_stats_torch_fwd(x, running_mean, running_var)
        ctx.save_for_backward(x, a, b)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, a, b = ctx.saved_tensors
        return torch.addcmul(b * grad_output, x, a * grad_output).to(x.dtype), None, None


class BNEvalStatsTorchFunction(torch.autograd.Function):
    r"""An eval-mode BN layer and its BN-statistics loss as one autograd node, in plain torch (CPU).

    Forward: ``y = x * scale + shift`` (the layer with running statistics: scale = w / sqrt(var + eps),
    shift = b - mean * scale) and the loss of :class:`BNStatsTorchFunction`. Backward, both gradients at once:

    .. math::
        \frac{\partial}{\partial x_i} = g^y_i \, s_c + (a_c x_i + b_c) \, g^L

    one ``addcmul`` and one in-place ``addcmul_`` where autograd would run the layer's backward, the loss's and
    their sum (three x-sized results written). Saves x and per-channel coefficients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, out_dtype: torch.dtype):
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        scale, shift = scale.reshape(shape), shift.reshape(shape)
        y = torch.addcmul(shift.to(out_dtype), x.to(out_dtype), scale.to(out_dtype))
        loss, a, b = _bn_stats_torch_fwd(x, running_mean, running_var)
        ctx.save_for_backward(x, a, b, scale)
        return y, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor | None, grad_loss: torch.Tensor | None):
        x, a, b, scale = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad = torch.addcmul(b * grad_loss, x, a * grad_loss)
        if grad_y is not None:
            grad.addcmul_(grad_y, scale)
        return grad.to(x.dtype), None, None, None, None, None


def bn_eval_with_stats_loss(x: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, out_dtype: torch.dtype):
    """``(bn(x), bn_stats_loss(x, bn.running_mean, bn.running_var))`` of an eval-mode BN layer as one node
    (:class:`BNEvalStatsTorchFunction`): the same values and gradients; the FADRM recovery step on CPU writes one
    x-sized gradient per BN layer instead of three. ``out_dtype``: the layer's output dtype (autocast)."""
    _check_bn_input(x, bn.running_mean, bn.running_var)
    dtype = torch.promote_types(bn.running_var.dtype, torch.float32)  # fp32 coefficients (float64 in tests)
    inv_std = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    weight = bn.weight.to(dtype) if bn.weight is not None else torch.ones_like(inv_std)
    bias = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(inv_std)
    scale = weight * inv_std
    return BNEvalStatsTorchFunction.apply(x, scale, bias - bn.running_mean.to(dtype) * scale, bn.running_mean,
                                          bn.running_var, out_dtype)


def bn_stats_loss(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """BN-statistics loss ``||var(x) - running_var||_2 + ||mean(x) - running_mean||_2`` of one BN input.

    Same value and gradient as :func:`fastdistill.losses.bn_stats.bn_stats_loss`.

    Args:
        x: (N, C, H, W) (NCHW or channels_last, read in place) or (N, C); fp32, fp16 or bf16.
        running_mean, running_var: (C,) running statistics of the BN layer (no gradient).
        backend: ``triton`` (:class:`BNStatsFunction`), ``torch`` (:class:`BNStatsTorchFunction`) or ``auto``
            (Triton when x is on CUDA, else torch).

    Returns:
        Scalar fp32 loss; the gradient wrt x comes back in x's dtype and layout.

    Raises:
        ValueError: bad shapes, an unknown backend, or under ``triton`` inputs the kernel cannot take (float64,
            more than 16,384 channels), which ``auto`` sends to the torch path with one warning.
        ModuleNotFoundError: ``triton`` forced without a CUDA device or ``TRITON_INTERPRET=1``.
    """
    _check_bn_input(x, running_mean, running_var)
    reason = dtype_reason({"x": x})
    if reason is None and x.shape[1] > MAX_BLOCK:
        reason = f"{x.shape[1]} channels exceed the finalize kernel's cap of {MAX_BLOCK}"
    if dispatch("bn_stats", backend, (x,), reason):
        return BNStatsFunction.apply(x, running_mean, running_var)
    return BNStatsTorchFunction.apply(x, running_mean, running_var)


def arc_update_fwd(
    x: torch.Tensor,
    patches: torch.Tensor,
    alpha: float,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch :func:`_arc_update_kernel`; ``out`` may be ``x`` (in place)."""
    x_dense = _dense(x)
    if patches.stride() != x_dense.stride():
        patches = torch.empty_like(x_dense).copy_(patches)
    target = out if out is not None and out.stride() == x_dense.stride() else torch.empty_like(x_dense)
    n_channels = x.shape[1]
    lo = torch.as_tensor(lo, dtype=torch.float32, device=x.device).reshape(-1).expand(n_channels).contiguous()
    hi = torch.as_tensor(hi, dtype=torch.float32, device=x.device).reshape(-1).expand(n_channels).contiguous()
    n_elements = x.numel()
    _arc_update_kernel[(triton.cdiv(n_elements, _ARC_BLOCK),)](
        x_dense, patches, lo, hi, target, float(alpha), n_elements, n_channels, x_dense.stride(1),
        BLOCK=_ARC_BLOCK, num_warps=4,
    )
    if out is not None and target is not out:
        return out.copy_(target)
    return target


def arc_update(
    x: torch.Tensor,
    patches: torch.Tensor,
    alpha: float,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``clamp(alpha * x + (1 - alpha) * patches, lo, hi)`` in one pass (FADRM's ARC between stages).

    Same result as :func:`fastdistill.losses.bn_stats.arc_update`; forward only (the update runs outside
    autograd). ``lo``/``hi`` are floats or (C,) tensors; ``out`` may be ``x``. ``backend`` as in
    :func:`bn_stats_loss`; the torch path is the reference.
    """
    _check_arc_input(x, patches, lo, hi)
    if dispatch("arc_update", backend, (x, patches), dtype_reason({"x": x, "patches": patches})):
        return arc_update_fwd(x, patches, alpha, lo, hi, out)
    return _arc_update_reference(x, patches, alpha, lo, hi, out=out)
