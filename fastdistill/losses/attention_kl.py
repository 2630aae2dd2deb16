"""Attention-map KL divergence between a teacher head and a student head: the reference.

For one (image, head pair) with teacher queries/keys Q_t, K_t (L, D_t) and student Q_s, K_s (L, D_s):

    S_t = scale_t Q_t K_t^T,   A_t = softmax_rows(S_t)                      (L, L)
    S_s = scale_s Q_s K_s^T,   A_s = softmax_rows(S_s)
    KL_q = sum_k A_t(q, k) (log A_t(q, k) - log A_s(q, k))
         = sum_k A_t(q, k) (S_t(q, k) - S_s(q, k)) - lse_t(q) + lse_s(q)

and the loss is the mean of KL_q over every row (batch x head pairs x queries), the attention-transfer term of
multi-teacher KD into a ViT student: ``KL(A_teacher || A_student)`` per row. The teacher is a constant (its
inputs are detached): gradients reach Q_s and K_s only,

    dL/dS_s = (A_s - A_t) / rows,   dL/dQ_s = scale_s dL/dS_s K_s,   dL/dK_s = scale_s dL/dS_s^T Q_s.

This file materialises the (B, H, L, L) maps: plain PyTorch, fp32 math (float64 stays float64, for the tests).
``fastdistill.kernels.attention_kl`` computes the same value and gradients blockwise, never holding L x L.
"""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t) -> tuple | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_attention_kl_inputs(q_t, k_t, q_s, k_s) -> None:
    """Raise a one-line ValueError unless q_t, k_t are (B, H, L, D_t) and q_s, k_s (B, H, L, D_s) on one device."""
    for name, t in (("q_t", q_t), ("k_t", k_t), ("q_s", q_s), ("k_s", k_s)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention_kl: {name} must be (B, H, L, D), got {_shape(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"attention_kl: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if q_t.shape != k_t.shape or q_s.shape != k_s.shape:
        raise ValueError(f"attention_kl: queries and keys must have one shape per side, got q_t {_shape(q_t)}, "
                         f"k_t {_shape(k_t)}, q_s {_shape(q_s)}, k_s {_shape(k_s)}")
    if q_t.shape[:3] != q_s.shape[:3] or 0 in q_t.shape:
        raise ValueError(f"attention_kl: teacher and student need the same non-empty (B, H, L), got {_shape(q_t)[:3]} "
                         f"and {_shape(q_s)[:3]}; resample the teacher's token grid to the student's first")
    if len({t.device for t in (q_t, k_t, q_s, k_s)}) != 1:
        raise ValueError(f"attention_kl: inputs must share a device, got {q_t.device}, {k_t.device}, {q_s.device}, "
                         f"{k_s.device}")


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """scale Q K^T (B, H, L, L) in fp32 (float64 for float64 inputs); scale defaults to D^-1/2."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)


def attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    scale_t: float | None = None,
    scale_s: float | None = None,
) -> torch.Tensor:
    """Mean over rows of KL(softmax(scale_t Q_t K_t^T) || softmax(scale_s Q_s K_s^T)).

    Args:
        q_t, k_t: (B, H, L, D_t) teacher queries and keys of the H chosen heads (constants: detached here).
        q_s, k_s: (B, H, L, D_s) student queries and keys of the H heads they are matched to.
        scale_t, scale_s: softmax scales, default D_t^-1/2 and D_s^-1/2 (a timm ViT's own).

    Returns:
        Scalar fp32 loss (float64 for float64 inputs); gradients reach ``q_s`` and ``k_s`` by autograd.

    Raises:
        ValueError: shapes, dtypes or devices disagree.
    """
    check_attention_kl_inputs(q_t, k_t, q_s, k_s)
    log_t = torch.log_softmax(attention_scores(q_t.detach(), k_t.detach(), scale_t), dim=-1)
    log_s = torch.log_softmax(attention_scores(q_s, k_s, scale_s), dim=-1)
    log_s = log_s.to(log_t.dtype)
    # xlogy-free form: A_t (log A_t - log A_s); exp(log A_t) is 0 exactly where the teacher row is, so 0 * finite = 0
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean()


def attention_kl_probs(attn_t: torch.Tensor, attn_s: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Mean over rows of KL(A_t || A_s) from probability maps (B, H, L, L) whose rows sum to 1 (the form in which
    the published code compares materialised attention maps); the teacher map is a constant."""
    if attn_t.shape != attn_s.shape or attn_t.dim() != 4:
        raise ValueError(f"attention_kl_probs: maps must both be (B, H, L, L), got {_shape(attn_t)} and "
                         f"{_shape(attn_s)}")
    a_t = attn_t.detach()
    dtype = torch.promote_types(a_t.dtype, torch.float32)
    a_t, a_s = a_t.to(dtype), attn_s.to(dtype)
    return torch.special.xlogy(a_t, a_t).sum(-1).mean() - (a_t * torch.log(a_s + eps)).sum(-1).mean()
