"""Fused attention-map KL divergence KL(A_teacher || A_student), Triton, never materialising the L x L maps.

Same maths and signature as ``fastdistill/losses/attention_kl.py`` (the reference), plus ``backend``. Per query
block the forward streams the key blocks once and keeps, for both sides, the running row maximum m and the
running sum l of exp(S - m) (online log-sum-exp, as flash attention does), plus the teacher-weighted score gap:

    acc(q) = sum_k exp(S_t(q, k) - m_t(q)) (S_t(q, k) - S_s(q, k))        rescaled by exp(m_old - m_new)
    KL_q   = acc / l_t - lse_t + lse_s,   lse = m + log l                  _attention_kl_fwd_kernel

It stores KL_q and both lse rows (3 fp32 per row). The backward recomputes the score tiles and
dS = (exp(S_s - lse_s) - exp(S_t - lse_t)) / rows, then

    dQ_s = scale_s dS K_s     (one program per query block, streaming keys)    _attention_kl_bwd_dq_kernel
    dK_s = scale_s dS^T Q_s   (one program per key block, streaming queries)   _attention_kl_bwd_dk_kernel

so nothing larger than (BLOCK_M, BLOCK_N) is held and no atomics are needed (deterministic).

Off CUDA the same quantity runs as :func:`attention_kl_blockwise`: torch over query blocks of (block, L) score
rows, each recomputed in the backward (``torch.utils.checkpoint``), so autograd keeps only the inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from fastdistill.kernels._utils import dispatch, dot_settings, dtype_reason
from fastdistill.losses import attention_kl as _reference

# Largest query and key tile edges (tl.dot needs >= 16); _launch_settings halves them for 128-wide heads and for fp32.
# The tests lower them to 16 so the interpreter crosses several masked blocks.
_BLOCK_M = 64
_BLOCK_N = 64
# Head dims 129-256 need 262-410 KB of shared memory for the pipelined key tiles of both sides even at 32 x 32 tiles
# (sm_90 allows 227 KB per block); every ViT of the methods has 64. Above the cap the blockwise torch form runs.
_MAX_HEAD_DIM = 128
# rows of (rows, L) scores per block of the torch form: 64 x 1025 x 4 B x 2 sides x B H = 0.5 MiB per (image, head)
_TORCH_BLOCK = 64


@triton.jit
def _load_tokens(ptr, idx, n_tokens, head_dim, BLOCK_D: tl.constexpr):
    """Rows ``idx`` of one (L, D) head, a (len(idx), BLOCK_D) tile in the input dtype, zero outside."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(ptr + idx[:, None] * head_dim + dims[None, :],
                   mask=(idx < n_tokens)[:, None] & (dims < head_dim)[None, :], other=0.0)


@triton.jit
def _scores(q, k, scale, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """scale Q K^T of two loaded tiles, fp32."""
    return tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale


@triton.jit
def _attention_kl_fwd_kernel(
    qt_ptr,
    kt_ptr,
    qs_ptr,
    ks_ptr,
    kl_ptr,
    lse_t_ptr,
    lse_s_ptr,
    n_tokens,
    dim_t,
    dim_s,
    scale_t,
    scale_s,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """KL_q, lse_t(q), lse_s(q) for the BLOCK_M query rows of one (image, head pair), streaming key blocks."""
    pid_m = tl.program_id(0).to(tl.int64)
    # int64: head * L * D overflows int32 past 2^31 elements (B 4096 x H 12 x L 1025 x D 64)
    head = tl.program_id(1).to(tl.int64)
    qt_ptr += head * n_tokens * dim_t
    kt_ptr += head * n_tokens * dim_t
    qs_ptr += head * n_tokens * dim_s
    ks_ptr += head * n_tokens * dim_s
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # the query tiles stay in registers while the key blocks stream past
    q_t = _load_tokens(qt_ptr, rows, n_tokens, dim_t, BLOCK_DT)
    q_s = _load_tokens(qs_ptr, rows, n_tokens, dim_s, BLOCK_DS)

    m_t = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    m_s = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = (cols < n_tokens)[None, :]
        s_t = _scores(q_t, _load_tokens(kt_ptr, cols, n_tokens, dim_t, BLOCK_DT), scale_t, DOT_DTYPE, DOT_PRECISION)
        s_s = _scores(q_s, _load_tokens(ks_ptr, cols, n_tokens, dim_s, BLOCK_DS), scale_s, DOT_DTYPE, DOT_PRECISION)
        # padding columns (zero keys) score 0: the gap is taken before they are masked to -inf, so it stays finite
        gap = tl.where(valid, s_t - s_s, 0.0)
        s_t = tl.where(valid, s_t, -float("inf"))
        s_s = tl.where(valid, s_s, -float("inf"))
        # every key block holds at least one valid column (n0 < L), so the new maxima are finite
        m_t_new = tl.maximum(m_t, tl.max(s_t, axis=1))
        m_s_new = tl.maximum(m_s, tl.max(s_s, axis=1))
        alpha_t = tl.exp(m_t - m_t_new)
        p_t = tl.exp(s_t - m_t_new[:, None])
        acc = acc * alpha_t + tl.sum(p_t * gap, axis=1)
        l_t = l_t * alpha_t + tl.sum(p_t, axis=1)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_s - m_s_new[:, None]), axis=1)
        m_t, m_s = m_t_new, m_s_new

    lse_t = m_t + tl.log(l_t)
    lse_s = m_s + tl.log(l_s)
    row_mask = rows < n_tokens
    out = head * n_tokens + rows
    tl.store(kl_ptr + out, acc / l_t - lse_t + lse_s, mask=row_mask)
    tl.store(lse_t_ptr + out, lse_t, mask=row_mask)
    tl.store(lse_s_ptr + out, lse_s, mask=row_mask)


@triton.jit
def _score_grad(q_t, k_t, q_s, k_s, lse_t_ptr, lse_s_ptr, head, rows, cols, n_tokens, scale_t, scale_s,
                DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dS' = A_s - A_t on the (rows, cols) tile (0 outside the L x L map); the caller applies 1/rows and scale_s."""
    s_t = _scores(q_t, k_t, scale_t, DOT_DTYPE, DOT_PRECISION)
    s_s = _scores(q_s, k_s, scale_s, DOT_DTYPE, DOT_PRECISION)
    row_mask = rows < n_tokens
    lse_t = tl.load(lse_t_ptr + head * n_tokens + rows, mask=row_mask, other=0.0)
    lse_s = tl.load(lse_s_ptr + head * n_tokens + rows, mask=row_mask, other=0.0)
    ds = tl.exp(s_s - lse_s[:, None]) - tl.exp(s_t - lse_t[:, None])
    return tl.where(row_mask[:, None] & (cols < n_tokens)[None, :], ds, 0.0)


@triton.jit
def _attention_kl_bwd_dq_kernel(
    qt_ptr,
    kt_ptr,
    qs_ptr,
    ks_ptr,
    lse_t_ptr,
    lse_s_ptr,
    dq_ptr,
    go_ptr,
    n_tokens,
    dim_t,
    dim_s,
    scale_t,
    scale_s,
    coef,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """dQ_s = g coef scale_s (A_s - A_t) K_s for BLOCK_M query rows of one head pair, summing over key blocks;
    g = grad_output, read from ``go_ptr`` and applied in fp32 before the rounding to the student's dtype (at
    published sizes the unscaled entries lie below fp16's smallest normal number: only a GradScaler's scale keeps
    them)."""
    pid_m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    qt_ptr += head * n_tokens * dim_t
    kt_ptr += head * n_tokens * dim_t
    qs_ptr += head * n_tokens * dim_s
    ks_ptr += head * n_tokens * dim_s
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_DS)
    dim_mask = dims < dim_s
    q_t = _load_tokens(qt_ptr, rows, n_tokens, dim_t, BLOCK_DT)
    q_s = _load_tokens(qs_ptr, rows, n_tokens, dim_s, BLOCK_DS)

    acc = tl.zeros((BLOCK_M, BLOCK_DS), tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k_s = _load_tokens(ks_ptr, cols, n_tokens, dim_s, BLOCK_DS)
        ds = _score_grad(q_t, _load_tokens(kt_ptr, cols, n_tokens, dim_t, BLOCK_DT), q_s, k_s, lse_t_ptr, lse_s_ptr,
                         head, rows, cols, n_tokens, scale_t, scale_s, DOT_DTYPE, DOT_PRECISION)
        # dS stays fp32 in the dot: its entries are differences of probabilities, which half precision would round
        acc = tl.dot(ds, k_s.to(tl.float32), acc, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + head * n_tokens * dim_s + rows[:, None] * dim_s + dims[None, :],
             (acc * (coef * scale_s * tl.load(go_ptr))).to(dq_ptr.dtype.element_ty),
             mask=(rows < n_tokens)[:, None] & dim_mask[None, :])


@triton.jit
def _attention_kl_bwd_dk_kernel(
    qt_ptr,
    kt_ptr,
    qs_ptr,
    ks_ptr,
    lse_t_ptr,
    lse_s_ptr,
    dk_ptr,
    go_ptr,
    n_tokens,
    dim_t,
    dim_s,
    scale_t,
    scale_s,
    coef,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    BLOCK_DS: tl.constexpr,
):
    """dK_s = g coef scale_s (A_s - A_t)^T Q_s for BLOCK_N keys of one head pair, summing over query blocks (each
    program owns its keys: no atomics); g as in the dQ kernel."""
    pid_n = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    qt_ptr += head * n_tokens * dim_t
    kt_ptr += head * n_tokens * dim_t
    qs_ptr += head * n_tokens * dim_s
    ks_ptr += head * n_tokens * dim_s
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_DS)
    dim_mask = dims < dim_s
    k_t = _load_tokens(kt_ptr, cols, n_tokens, dim_t, BLOCK_DT)
    k_s = _load_tokens(ks_ptr, cols, n_tokens, dim_s, BLOCK_DS)

    acc = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    for m0 in range(0, n_tokens, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q_s = _load_tokens(qs_ptr, rows, n_tokens, dim_s, BLOCK_DS)
        ds = _score_grad(_load_tokens(qt_ptr, rows, n_tokens, dim_t, BLOCK_DT), k_t, q_s, k_s, lse_t_ptr, lse_s_ptr,
                         head, rows, cols, n_tokens, scale_t, scale_s, DOT_DTYPE, DOT_PRECISION)
        acc = tl.dot(tl.trans(ds), q_s.to(tl.float32), acc, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + head * n_tokens * dim_s + cols[:, None] * dim_s + dims[None, :],
             (acc * (coef * scale_s * tl.load(go_ptr))).to(dk_ptr.dtype.element_ty),
             mask=(cols < n_tokens)[:, None] & dim_mask[None, :])


def _launch_settings(n_tokens: int, dim_t: int, dim_s: int, dtype: torch.dtype) -> dict:
    """Tiles and warps per head dim and dtype, checked ahead of time for sm_80 and sm_90 by
    ``benchmarks/kernels_aot.py``: 128-wide heads take 32 x 32 score tiles (64 x 64 ones need 229-361 KB of shared
    memory in fp32), and fp32's three-product (tf32x3) dots take 8 warps (4 spill)."""
    blocks = {name: max(16, triton.next_power_of_2(d)) for name, d in (("BLOCK_DT", dim_t), ("BLOCK_DS", dim_s))}
    wide = max(blocks.values()) >= 128
    edge = 64 >> (wide + (dtype == torch.float32))
    edge = max(16, min(triton.next_power_of_2(n_tokens), edge))
    num_warps = 8 if wide else 4
    return {"BLOCK_M": min(edge, _BLOCK_M), "BLOCK_N": min(edge, _BLOCK_N), **blocks, "num_warps": num_warps}


def attention_kl_fwd(q_t, k_t, q_s, k_s, scale_t: float, scale_s: float):
    """Row KL, lse_t and lse_s (B H L,) fp32 for contiguous (B, H, L, D) inputs."""
    b, h, n_tokens, dim_t = q_t.shape
    dim_s = q_s.shape[-1]
    kl, lse_t, lse_s = (torch.empty(b * h * n_tokens, device=q_t.device, dtype=torch.float32) for _ in range(3))
    settings = _launch_settings(n_tokens, dim_t, dim_s, q_s.dtype)
    grid = (triton.cdiv(n_tokens, settings["BLOCK_M"]), b * h)
    # scales pinned to python floats (fp32 in the kernel); the dot inputs keep the input dtype
    _attention_kl_fwd_kernel[grid](q_t, k_t, q_s, k_s, kl, lse_t, lse_s, n_tokens, dim_t, dim_s, float(scale_t),
                                   float(scale_s), **dot_settings(q_s.dtype), **settings)
    return kl, lse_t, lse_s


def attention_kl_bwd(q_t, k_t, q_s, k_s, lse_t, lse_s, scale_t: float, scale_s: float, grad_output: torch.Tensor,
                     need_q: bool = True, need_k: bool = True):
    """dL/dQ_s and dL/dK_s of ``grad_output`` (a 0-dim tensor) times the mean row KL, in the student's dtype; None
    where not needed."""
    b, h, n_tokens, dim_t = q_t.shape
    dim_s = q_s.shape[-1]
    settings = _launch_settings(n_tokens, dim_t, dim_s, q_s.dtype)
    args = (q_t, k_t, q_s, k_s, lse_t, lse_s)
    go = grad_output.detach().reshape(()).to(torch.float32).contiguous()
    scalars = (n_tokens, dim_t, dim_s, float(scale_t), float(scale_s), 1.0 / (b * h * n_tokens))
    dq = dk = None
    if need_q:
        dq = torch.empty_like(q_s)
        _attention_kl_bwd_dq_kernel[(triton.cdiv(n_tokens, settings["BLOCK_M"]), b * h)](
            *args, dq, go, *scalars, **dot_settings(q_s.dtype), **settings)
    if need_k:
        dk = torch.empty_like(k_s)
        _attention_kl_bwd_dk_kernel[(triton.cdiv(n_tokens, settings["BLOCK_N"]), b * h)](
            *args, dk, go, *scalars, **dot_settings(q_s.dtype), **settings)
    return dq, dk


class AttentionKLFunction(torch.autograd.Function):
    """Mean over the B H L rows of KL(softmax(scale_t Q_t K_t^T) || softmax(scale_s Q_s K_s^T)), blockwise.

        forward   KL_q = sum_k A_t (S_t - S_s) - lse_t + lse_s with online lse over key blocks
        backward  dS = g (A_s - A_t) / (B H L),  dQ_s = scale_s dS K_s,  dK_s = scale_s dS^T Q_s

    Saves the four inputs and two fp32 lse rows (8 bytes per row), never an L x L map. g multiplies the fp32
    accumulators inside the kernels, before the rounding to the input dtype. The teacher's Q_t, K_t
    get no gradient (constants of the loss).
    """

    @staticmethod
    def forward(ctx, q_t, k_t, q_s, k_s, scale_t, scale_s):
        q_t, k_t, q_s, k_s = (t.contiguous() for t in (q_t, k_t, q_s, k_s))
        kl, lse_t, lse_s = attention_kl_fwd(q_t, k_t, q_s, k_s, scale_t, scale_s)
        ctx.save_for_backward(q_t, k_t, q_s, k_s, lse_t, lse_s)
        ctx.scales = (scale_t, scale_s)
        return kl.mean()

    @staticmethod
    def backward(ctx, grad_output):
        q_t, k_t, q_s, k_s, lse_t, lse_s = ctx.saved_tensors
        dq, dk = attention_kl_bwd(q_t, k_t, q_s, k_s, lse_t, lse_s, *ctx.scales, grad_output,
                                  need_q=ctx.needs_input_grad[2], need_k=ctx.needs_input_grad[3])
        return None, None, dq, dk, None, None


def _block_kl_sum(q_t, k_t, q_s, k_s, scale_t, scale_s):
    """Sum of the row KLs of one block of query rows (B, H, rows, D) against all keys."""
    log_t = torch.log_softmax(_reference.attention_scores(q_t, k_t, scale_t), dim=-1)
    log_s = torch.log_softmax(_reference.attention_scores(q_s, k_s, scale_s), dim=-1).to(log_t.dtype)
    return (log_t.exp() * (log_t - log_s)).sum()


def attention_kl_blockwise(q_t, k_t, q_s, k_s, scale_t: float, scale_s: float, block: int | None = None):
    """The torch form of the fused path: blocks of ``block`` query rows, each block's (rows, L) scores recomputed in
    the backward (checkpoint), so autograd keeps the inputs only; peak extra memory is one block's scores."""
    block = block or _TORCH_BLOCK
    q_t, k_t = q_t.detach(), k_t.detach()
    n_tokens = q_t.shape[2]
    total = None
    for i in range(0, n_tokens, block):
        part = checkpoint(_block_kl_sum, q_t[:, :, i:i + block], k_t, q_s[:, :, i:i + block], k_s, scale_t, scale_s,
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / (q_t.shape[0] * q_t.shape[1] * n_tokens)


def attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    scale_t: float | None = None,
    scale_s: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over rows of KL(A_t || A_s) from queries and keys, without materialising the L x L maps.

    Args: as :func:`fastdistill.losses.attention_kl.attention_kl` (teacher (B, H, L, D_t), student (B, H, L, D_s)),
        plus ``backend``: "auto" (Triton on CUDA, the blockwise torch form elsewhere), "triton", or "torch" (the
        blockwise torch form: the same memory profile without Triton).

    Returns:
        Scalar fp32 loss; gradients reach ``q_s`` and ``k_s`` in their dtype.

    Raises:
        ValueError: shapes, dtypes or devices disagree, an unknown backend, or under ``triton`` inputs the kernel
            cannot take (float64, a head dim above 128), which ``auto`` sends to the blockwise torch form with one
            warning.
    """
    _reference.check_attention_kl_inputs(q_t, k_t, q_s, k_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else float(scale_t)
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else float(scale_s)
    reason = dtype_reason({"q_t": q_t, "k_t": k_t, "q_s": q_s, "k_s": k_s})
    head_dim = max(q_t.shape[-1], q_s.shape[-1])
    if reason is None and head_dim > _MAX_HEAD_DIM:
        reason = f"head dim {head_dim} exceeds the kernel's cap of {_MAX_HEAD_DIM}"
    if not dispatch("attention_kl", backend, (q_t, k_t, q_s, k_s), reason):
        return attention_kl_blockwise(q_t, k_t, q_s, k_s, scale_t, scale_s)
    if q_t.dtype != q_s.dtype:
        # one dot dtype per launch: the teacher's tokens follow the student's
        q_t, k_t = q_t.to(q_s.dtype), k_t.to(q_s.dtype)
    return AttentionKLFunction.apply(q_t.detach(), k_t.detach(), q_s, k_s, scale_t, scale_s)
