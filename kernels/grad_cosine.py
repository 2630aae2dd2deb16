"""Fused multi-backbone gradient-cosine loss of Linear Gradient Matching (Cazenavette et al., NeurIPS 2025), Triton.

Same maths and signature as ``fastdistill/losses/grad_cosine.py`` (the reference), plus ``backend``. Per backbone the
forward launches seven small kernels (five @triton.jit functions) and keeps only two N x C and one C x D fp32
intermediates (2 MiB and 6 MiB at the published N 512, C 1000, D 1536), never P itself; the N x D feature gradient
is written in the forward (fp32), since the loss is terminal, and the backward scales it by ``grad_output`` before
rounding it to the feature dtype:

    logits   Z = F W^T + b                          (N, C)  _grad_cosine_logits_kernel
    softmax  E = softmax(Z) - Y, in place           (N, C)  _grad_cosine_softmax_fwd_kernel
    head     G = E^T F / N, g_b = colsum(E) / N,    (C, D)  _grad_cosine_head_kernel
             per-tile shares of <S, R>, |S|^2, |R|^2
    cosine   loss_m, alpha, beta                    (3,)    _grad_cosine_cos_kernel
    adjoint  Q' = F A^T + a                         (N, C)  _grad_cosine_logits_kernel (MIX)
    softmax' dZ' = P (Q' - rowsum(P Q')), in place  (N, C)  _grad_cosine_softmax_bwd_kernel
    feature  dL/dF = (E A + dZ' W) / N              (N, D)  _grad_cosine_bwd_kernel

with A = alpha G_r + beta G and a = alpha g_br + beta g_b built tile by tile, never stored.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastdistill.kernels._utils import MAX_BLOCK, calculate_settings, dispatch, dot_settings, dtype_reason
from fastdistill.losses import grad_cosine as _reference
from fastdistill.losses.grad_cosine import EPS

# Edge of the tl.dot tiles (N, C and D blocks); tl.dot needs at least 16. 64 gives 128-384 programs per matmul at
# the published sizes (N 512, C 1000, D 1536), about one wave on an H100's 132 SMs.
_TILE_CAP = 64
# fp32 values one program of the row (softmax) kernels holds: whole rows of up to MAX_BLOCK classes.
_ROW_ELEMENTS = 4096
_PART_BLOCK_CAP = 1024


@triton.jit
def _grad_cosine_logits_kernel(
    f_ptr,
    m_ptr,
    mb_ptr,
    r_ptr,
    rb_ptr,
    coef_ptr,
    z_ptr,
    n_rows,
    n_classes,
    n_dims,
    MIX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_C) tile of Z = F M^T + m in fp32, summing over D.

    Logits: M = W (C, D), m = b (C,). Adjoint Q' = N dL/dP: M = A, m = a, given (two-pass step), or with MIX
    built per tile as A = alpha G_r + beta G, a = alpha g_br + beta g_b from ``r_ptr`` (G_r), ``m_ptr`` (G) and
    alpha, beta read from ``coef_ptr`` (written by the cosine kernel, no host sync).
    """
    # int64: row * n_dims overflows int32 past 2^31 elements (e.g. N = 10^6 views of a 4096-d backbone)
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < n_classes
    if MIX:
        alpha = tl.load(coef_ptr + 1)
        beta = tl.load(coef_ptr + 2)

    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, n_dims, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < n_dims
        f = tl.load(f_ptr + rows[:, None] * n_dims + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        cd_mask = col_mask[:, None] & dim_mask[None, :]
        m = tl.load(m_ptr + cols[:, None] * n_dims + dims[None, :], mask=cd_mask, other=0.0)
        if MIX:
            r = tl.load(r_ptr + cols[:, None] * n_dims + dims[None, :], mask=cd_mask, other=0.0)
            m = alpha * r.to(tl.float32) + beta * m
        acc = tl.dot(f.to(DOT_DTYPE), tl.trans(m.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)

    mb = tl.load(mb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if MIX:
        rb = tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        mb = alpha * rb + beta * mb
    acc += mb[None, :]
    tl.store(z_ptr + rows[:, None] * n_classes + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grad_cosine_softmax_fwd_kernel(
    z_ptr,
    labels_ptr,
    n_rows,
    n_classes,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """E = softmax(Z) - onehot(y) in place of Z, for BLOCK_N whole rows (BLOCK_C >= C)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < n_classes
    mask = row_mask[:, None] & col_mask[None, :]
    ptrs = z_ptr + rows[:, None] * n_classes + cols[None, :]

    # padding rows load 0, not -inf, so that no row is all -inf (its max would make exp(-inf + inf) a NaN)
    z = tl.load(ptrs, mask=mask, other=0.0)
    z = tl.where(col_mask[None, :], z, -float("inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    err = p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    tl.store(ptrs, err, mask=mask)


@triton.jit
def _grad_cosine_softmax_bwd_kernel(
    e_ptr,
    q_ptr,
    labels_ptr,
    n_rows,
    n_classes,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dZ' = P (Q' - rowsum(P Q')) in place of Q', with P = E + onehot(y) rebuilt from E (P is never stored)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_classes)[None, :]
    offsets = rows[:, None] * n_classes + cols[None, :]

    err = tl.load(e_ptr + offsets, mask=mask, other=0.0)
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    # rebuilding P at the label as (P - 1) + 1 costs an absolute fp32 rounding (6e-8), which P * (...) keeps small
    p = err + tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    pq = p * q
    tl.store(q_ptr + offsets, pq - p * tl.sum(pq, axis=1)[:, None], mask=mask)


@triton.jit
def _grad_cosine_head_kernel(
    f_ptr,
    e_ptr,
    g_ptr,
    gb_ptr,
    r_ptr,
    rb_ptr,
    part_ptr,
    n_rows,
    n_classes,
    n_dims,
    inv_n,
    HAS_REAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (BLOCK_C, BLOCK_D) tile of G = E^T F / N (fp32), summing over N; the first column of tiles also
    writes g_b = colsum(E) / N. With HAS_REAL, the tile's shares of <S, R>, |S|^2 and |R|^2 go to
    ``part_ptr`` (3 fp32 per program, summed by the cosine kernel: deterministic, unlike atomics)."""
    pid_c = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_classes
    dim_mask = dims < n_dims

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        err = tl.load(e_ptr + rows[:, None] * n_classes + cols[None, :],
                      mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        f = tl.load(f_ptr + rows[:, None] * n_dims + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(err.to(DOT_DTYPE)), f.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        acc_b += tl.sum(err, axis=0)

    g = acc * inv_n
    g_b = acc_b * inv_n
    tile_mask = col_mask[:, None] & dim_mask[None, :]
    tl.store(g_ptr + cols[:, None] * n_dims + dims[None, :], g, mask=tile_mask)
    if pid_d == 0:
        tl.store(gb_ptr + cols, g_b, mask=col_mask)
    if HAS_REAL:
        r = tl.load(r_ptr + cols[:, None] * n_dims + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        rb = tl.load(rb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        # the bias entries of S and R are counted once, by the first column of tiles
        g_b = tl.where(pid_d == 0, g_b, 0.0)
        rb = tl.where(pid_d == 0, rb, 0.0)
        part = part_ptr + 3 * (pid_c * tl.num_programs(1) + pid_d)
        tl.store(part, tl.sum(g * r) + tl.sum(g_b * rb))
        tl.store(part + 1, tl.sum(g * g) + tl.sum(g_b * g_b))
        tl.store(part + 2, tl.sum(r * r) + tl.sum(rb * rb))


@triton.jit
def _grad_cosine_cos_kernel(
    part_ptr,
    coef_ptr,
    n_parts,
    weight,
    eps,
    BLOCK_P: tl.constexpr,
):
    """One program: sum the head tiles' partials and write (w (1 - cos), alpha, beta), dL/dS = alpha R + beta S."""
    sr = tl.zeros((BLOCK_P,), dtype=tl.float32)
    ss = tl.zeros((BLOCK_P,), dtype=tl.float32)
    rr = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        idx = p0 + tl.arange(0, BLOCK_P)
        mask = idx < n_parts
        sr += tl.load(part_ptr + 3 * idx, mask=mask, other=0.0)
        ss += tl.load(part_ptr + 3 * idx + 1, mask=mask, other=0.0)
        rr += tl.load(part_ptr + 3 * idx + 2, mask=mask, other=0.0)
    s_norm = tl.sqrt(tl.sum(ss))
    s_den = tl.maximum(s_norm, eps)
    r_den = tl.maximum(tl.sqrt(tl.sum(rr)), eps)
    cos = tl.sum(sr) / (s_den * r_den)
    tl.store(coef_ptr, weight * (1.0 - cos))
    tl.store(coef_ptr + 1, -weight / (s_den * r_den))
    # a clamped |S| is a constant to autograd in the reference (clamp_min passes no gradient), so beta is 0 there
    tl.store(coef_ptr + 2, tl.where(s_norm > eps, weight * cos / (s_den * s_den), 0.0))


@triton.jit
def _grad_cosine_bwd_kernel(
    e_ptr,
    dz_ptr,
    g_ptr,
    r_ptr,
    w_ptr,
    coef_ptr,
    df_ptr,
    n_rows,
    n_classes,
    n_dims,
    inv_n,
    MIX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_D) tile of dL/dF = (E A + dZ' W) / N in fp32, summing over C; A is given at ``r_ptr``,
    or with MIX built per tile as alpha G_r + beta G.

    The output stays fp32 whatever the feature dtype: these entries lie below fp16's smallest normal number at
    published sizes, and only the incoming loss scale, applied before rounding, makes them representable.
    1/N is applied once to the fp32 accumulator rather than to E or dZ', so that half-precision dot operands
    (E ~ 1e-4 for confident rows) do not become fp16 subnormals.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    dim_mask = dims < n_dims
    if MIX:
        alpha = tl.load(coef_ptr + 1)
        beta = tl.load(coef_ptr + 2)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < n_classes
        nc_mask = row_mask[:, None] & col_mask[None, :]
        cd_mask = col_mask[:, None] & dim_mask[None, :]
        nc_offsets = rows[:, None] * n_classes + cols[None, :]
        cd_offsets = cols[:, None] * n_dims + dims[None, :]
        err = tl.load(e_ptr + nc_offsets, mask=nc_mask, other=0.0)
        dz = tl.load(dz_ptr + nc_offsets, mask=nc_mask, other=0.0)
        a = tl.load(r_ptr + cd_offsets, mask=cd_mask, other=0.0).to(tl.float32)
        if MIX:
            a = alpha * a + beta * tl.load(g_ptr + cd_offsets, mask=cd_mask, other=0.0)
        w = tl.load(w_ptr + cd_offsets, mask=cd_mask, other=0.0)
        acc = tl.dot(err.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(dz.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    tl.store(df_ptr + rows[:, None] * n_dims + dims[None, :], acc * inv_n,
             mask=row_mask[:, None] & dim_mask[None, :])


def _tile(n: int, cap: int | None = None) -> int:
    return max(16, min(triton.next_power_of_2(n), cap or _TILE_CAP))


def _dot_launch(dtype: torch.dtype) -> dict:
    """Warps of the tile kernels: fp32's three-product (tf32x3) dots spill at 4 (``benchmarks/kernels_aot.py``)."""
    return {"num_warps": 8 if dtype == torch.float32 else 4}


def _row_settings(n_rows: int, n_classes: int) -> tuple[int, int, int]:
    block_c, num_warps = calculate_settings(n_classes)
    block_n = max(1, min(triton.next_power_of_2(n_rows), _ROW_ELEMENTS // block_c))
    return block_n, block_c, num_warps


def _error(feats, labels, weight, bias):
    """E = softmax(F W^T + b) - Y (N, C) fp32: the logits and softmax kernels (contiguous inputs)."""
    n, d = feats.shape
    c = weight.shape[0]
    block_n, block_c, block_d = _tile(n), _tile(c), _tile(d)
    err = torch.empty((n, c), dtype=torch.float32, device=feats.device)
    _grad_cosine_logits_kernel[(triton.cdiv(n, block_n), triton.cdiv(c, block_c))](
        feats, weight, bias, weight, bias, err, err, n, c, d,
        MIX=False, **dot_settings(feats.dtype), BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
        **_dot_launch(feats.dtype),
    )
    row_n, row_c, row_warps = _row_settings(n, c)
    _grad_cosine_softmax_fwd_kernel[(triton.cdiv(n, row_n),)](
        err, labels, n, c, BLOCK_N=row_n, BLOCK_C=row_c, num_warps=row_warps,
    )
    return err


def _head_grad(feats, labels, weight, bias, real=None, inv_n=None):
    """E (:func:`_error`) and the head kernel for one backbone (contiguous inputs).

    Returns E = P - Y (N, C), G (C, D), g_b (C,), all fp32, and with ``real`` = (G_r, g_br) the (tiles, 3)
    partial sums of <S, R>, |S|^2, |R|^2 (else None). G and g_b are scaled by ``inv_n`` (default 1/N).
    """
    n, d = feats.shape
    c = weight.shape[0]
    # fp32 sums over N in half-width steps: the tf32x3 operand splits spill at 64 on sm_80 (kernels_aot.py)
    block_n = _tile(n, _TILE_CAP // 2 if feats.dtype == torch.float32 else None)
    block_c, block_d = _tile(c), _tile(d)
    err = _error(feats, labels, weight, bias)
    g = torch.empty((c, d), dtype=torch.float32, device=feats.device)
    g_b = torch.empty((c,), dtype=torch.float32, device=feats.device)
    grid = (triton.cdiv(c, block_c), triton.cdiv(d, block_d))
    parts = None
    if real is not None:
        parts = torch.empty((grid[0] * grid[1], 3), dtype=torch.float32, device=feats.device)
    g_r, gb_r = real if real is not None else (g, g_b)
    _grad_cosine_head_kernel[grid](
        feats, err, g, g_b, g_r, gb_r, parts if parts is not None else g_b, n, c, d,
        1.0 / n if inv_n is None else inv_n, HAS_REAL=real is not None, **dot_settings(feats.dtype),
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, **_dot_launch(feats.dtype),
    )
    return err, g, g_b, parts


def _feature_grad(f, labels, w, err, adjoint, mix, coef, num_views):
    """dL/dF (N, D) fp32 of one backbone: adjoint logits, softmax backward and feature kernels.

    ``adjoint`` = (M, m) and (R, r): with ``mix``, A = alpha R + beta M and a = alpha r + beta m from ``coef``
    (the forward's G, g_b and the real side); without, A = R and a = r (the two-pass step's given adjoint).
    """
    (m_w, m_b), (r_w, r_b) = adjoint
    n, d = f.shape
    c = w.shape[0]
    block_n, block_c, block_d = _tile(n), _tile(c), _tile(d)
    dot = dot_settings(f.dtype)
    q = torch.empty_like(err)
    _grad_cosine_logits_kernel[(triton.cdiv(n, block_n), triton.cdiv(c, block_c))](
        f, m_w, m_b, r_w, r_b, coef, q, n, c, d,
        MIX=mix, **dot, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d, **_dot_launch(f.dtype),
    )
    row_n, row_c, row_warps = _row_settings(n, c)
    _grad_cosine_softmax_bwd_kernel[(triton.cdiv(n, row_n),)](
        err, q, labels, n, c, BLOCK_N=row_n, BLOCK_C=row_c, num_warps=row_warps,
    )
    grad = torch.empty((n, d), dtype=torch.float32, device=f.device)
    # two dots per step over C: narrower steps (half, fp32 a quarter) keep both operand pairs within sm_80's shared
    # memory and registers (kernels_aot.py)
    step_c = _tile(c, _TILE_CAP // (4 if f.dtype == torch.float32 else 2))
    _grad_cosine_bwd_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
        err, q, m_w, r_w, w, coef, grad, n, c, d, 1.0 / num_views,
        MIX=mix, **dot, BLOCK_N=block_n, BLOCK_C=step_c, BLOCK_D=block_d, **_dot_launch(f.dtype),
    )
    return grad


def grad_cosine_fwd(feats, labels, weights, biases, real_grads, backbone_weights, need_grad):
    """Loss (fp32 scalar) and, for each backbone with ``need_grad[m]``, the state its feature gradient needs.

    Inputs are contiguous and validated. Returns ``(loss, states)``; ``states[m]`` is ``(E, G, g_b, coef)`` with
    ``coef`` = (w_m (1 - cos), alpha, beta) as a fp32 view (3,), or None.
    """
    coefs = torch.empty((len(feats), 3), dtype=torch.float32, device=feats[0].device)
    states = []
    for m, (f, w, b, real, w_m) in enumerate(zip(feats, weights, biases, real_grads, backbone_weights)):
        err, g, g_b, parts = _head_grad(f, labels, w, b, real)
        block_p = min(triton.next_power_of_2(parts.shape[0]), _PART_BLOCK_CAP)
        _grad_cosine_cos_kernel[(1,)](parts, coefs[m], parts.shape[0], w_m, EPS, BLOCK_P=block_p, num_warps=4)
        states.append((err, g, g_b, coefs[m]) if need_grad[m] else None)
    return coefs[:, 0].sum(), states


def grad_cosine_bwd(feats, labels, weights, real_grads, states):
    """dL/dF (N, D_m) fp32 from :func:`grad_cosine_fwd`'s states (None where None)."""
    return [None if state is None else _feature_grad(f, labels, w, state[0], (state[1:3], real), True, state[3],
                                                     f.shape[0])
            for f, w, real, state in zip(feats, weights, real_grads, states)]


class GradCosineFunction(torch.autograd.Function):
    r"""L = sum_m w_m (1 - cos(S_m, R_m)), S = vec(G, g_b), R = vec(G_r, g_br), with (per backbone, E = P - Y)

        Z = F W^T + b,  P = softmax(Z),  G = E^T F / N,  g_b = 1^T E / N,
        cos = <S, R> / (max(|S|, eps) max(|R|, eps)),   eps = 1e-8 (as F.cosine_similarity).

    Backward (gradient to F only; the head and the real side are constants):

        dL/dS = alpha R + beta S,   alpha = -w / (max(|S|, eps) max(|R|, eps)),   beta = w cos / |S|^2 (0 if |S| <= eps)
        A = dL/dG = alpha G_r + beta G,   a = dL/dg_b = alpha g_br + beta g_b
        Q = dL/dP = (F A^T + 1 a^T) / N,   dZ = P * (Q - rowsum(P * Q))         (softmax Jacobian)
        dL/dF = E A / N + dZ W = (E A + dZ' W) / N,   dZ' = N dZ

    The kernels form Q' = N Q and dZ' and divide by N once, in fp32. dL/dF is computed in the forward (a terminal
    loss: nothing else needs the intermediates) and saved in fp32 (N x D x 4 bytes per backbone); the backward
    multiplies it by ``grad_output`` and only then rounds it to the feature dtype, so a GradScaler's scale keeps
    fp16 gradients out of the subnormal range.
    """

    @staticmethod
    def forward(ctx, labels, weights, biases, real_grads, backbone_weights, *feats):
        feats = [f.contiguous() for f in feats]
        weights = [w.contiguous() for w in weights]
        biases = [b.contiguous() for b in biases]
        real_grads = [(g.contiguous(), gb.contiguous()) for g, gb in real_grads]
        labels = labels.contiguous()
        need_grad = list(ctx.needs_input_grad[5:])
        loss, states = grad_cosine_fwd(feats, labels, weights, biases, real_grads, backbone_weights, need_grad)
        grads = grad_cosine_bwd(feats, labels, weights, real_grads, states)
        ctx.need_grad = need_grad
        ctx.dtypes = [f.dtype for f in feats]
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_output).to(dtype) if need else None
                 for need, dtype in zip(ctx.need_grad, ctx.dtypes)]
        return (None, None, None, None, None, *grads)


def _unsupported(feats: dict[str, torch.Tensor], num_classes: int) -> str | None:
    """Why the Triton kernel cannot take these inputs (None if it can): a dtype, or more classes than a row block."""
    reason = dtype_reason(feats)
    if reason is None and num_classes > MAX_BLOCK:
        reason = f"{num_classes} classes exceed the softmax kernels' row cap of {MAX_BLOCK}"
    return reason


def grad_cosine_loss(
    feats: Sequence[torch.Tensor],
    labels: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    real_grads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    backbone_weights: Sequence[float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sum over backbones of w_m (1 - cos(vec(G, g_b), vec(G_r, g_br))), the LGM matching loss.

    Args:
        feats: M tensors (N, D_m) float32/float16/bfloat16, the synthetic views' features per backbone.
        labels: (N,) int64 labels in [0, C), shared by all backbones.
        weights: M head weights (C, D_m). biases: M head biases (C,).
        real_grads: M pairs (G_r (C, D_m), g_br (C,)) from :func:`linear_head_grad` on real features.
        backbone_weights: M floats w_m, default all 1.
        backend: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "torch" (the reference). Inputs
            the kernel cannot take (float64, more than 16,384 classes) run the reference under "auto", with one
            warning, and raise ValueError under "triton".

    Returns:
        Scalar float32 loss. Gradients flow to ``feats`` only (in their dtype), through
        :class:`GradCosineFunction` on the Triton path; the head and ``real_grads`` are constants.

    Raises:
        ValueError: list lengths, shapes, dtypes or devices disagree, a label lies outside [0, C) (on CUDA a
            device-side assert instead, as F.cross_entropy), or an unknown backend.
    """
    backbone_weights = _reference.check_grad_cosine_inputs(feats, labels, weights, biases, real_grads,
                                                           backbone_weights)
    reason = _unsupported({f"feats[{m}]": f for m, f in enumerate(feats)}, weights[0].shape[0])
    if not dispatch("grad_cosine", backend, feats, reason):
        return _reference.grad_cosine_loss(feats, labels, weights, biases, real_grads, backbone_weights)
    return GradCosineFunction.apply(labels, list(weights), list(biases), [tuple(p) for p in real_grads],
                                    backbone_weights, *feats)


def _single_backbone_kernel(where: str, feats, labels, weight, bias, backend: str) -> bool:
    """The checks of the single-backbone entry points; True to run the Triton path, which builds no graph."""
    _reference.check_linear_head_inputs(where, feats, labels, weight, bias)
    if not dispatch(where, backend, (feats,), _unsupported({"feats": feats}, weight.shape[0])):
        return False
    if feats.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{where}: the Triton path builds no autograd graph, but feats requires grad; "
                         f"pass feats.detach(), run under torch.no_grad(), or use backend='torch'")
    _reference.check_labels(where, labels, weight.shape[0])
    return True


def linear_head_grad(
    feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form cross-entropy gradient (G (C, D), g_b (C,)), fp32, of a linear head: the real side of LGM.

    Same arguments as :func:`fastdistill.losses.grad_cosine.linear_head_grad` plus ``backend``. The Triton path
    (the forward kernels of :func:`grad_cosine_loss`) builds no autograd graph.

    Raises:
        ValueError: shapes, dtypes or devices disagree, a label lies outside [0, C), or ``feats`` requires grad
            on the Triton path.
    """
    if not _single_backbone_kernel("linear_head_grad", feats, labels, weight, bias, backend):
        return _reference.linear_head_grad(feats, labels, weight, bias)
    _, g, g_b, _ = _head_grad(feats.contiguous(), labels.contiguous(), weight.contiguous(), bias.contiguous())
    return g, g_b


# The two-pass LGM step (recipes/lgm.py) splits the loss above into per-chunk sums, a closed-form adjoint on the
# summed (C, D) gradients and a per-chunk feature gradient; these two run its per-view parts on the same kernels.


def linear_head_grad_sums(
    feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E^T F (C, D), sum_n E (C,)) fp32 of a slice of the views: :func:`fastdistill.losses.grad_cosine.
    linear_head_grad_sums` plus ``backend`` (the head kernels with 1/N = 1). No autograd graph."""
    if not _single_backbone_kernel("linear_head_grad_sums", feats, labels, weight, bias, backend):
        return _reference.linear_head_grad_sums(feats, labels, weight, bias)
    _, g, g_b, _ = _head_grad(feats.contiguous(), labels.contiguous(), weight.contiguous(), bias.contiguous(),
                              inv_n=1.0)
    return g, g_b


def grad_cosine_feature_grad(
    feats: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    adjoint: tuple[torch.Tensor, torch.Tensor],
    num_views: int,
    backend: str = "auto",
) -> torch.Tensor:
    """dL/dF (n, D) fp32 of a slice of the views given the adjoint (A, a): :func:`fastdistill.losses.grad_cosine.
    grad_cosine_feature_grad` plus ``backend``. No autograd graph."""
    if not _single_backbone_kernel("grad_cosine_feature_grad", feats, labels, weight, bias, backend):
        return _reference.grad_cosine_feature_grad(feats, labels, weight, bias, adjoint, num_views)
    f, labels, w, b = (t.contiguous() for t in (feats, labels, weight, bias))
    given = tuple(t.to(torch.float32).contiguous() for t in adjoint)
    err = _error(f, labels, w, b)
    # without MIX the kernels read A and a from both adjoint slots; coef is not read (err stands in)
    return _feature_grad(f, labels, w, err, (given, given), False, err, num_views)
