"""Knowledge-distillation losses: the references of ``+method=kd_clip`` and ``+method=kd_multi``.

Plain PyTorch, fp32 math (half inputs are upcast, float64 stays float64 so tests can compare at 1e-12). Each
method keeps its losses in its own block below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ====================================================================================================== kd_clip
# CLIP -> ResNet distillation with generated images (fastdistill/recipes/kd_clip.py). Three objectives:
#   FD  feature distillation   student embedding (after a projection) -> the teacher's image embedding
#   LD  logit distillation     KL(p_teacher || p_student) at temperature T, p_teacher from text prompts (CLIP)
#   CP  condition prediction   a generated image -> the teacher embedding of the real image it was made from

FEATURE_LOSSES = ("cosine", "mse")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_pair(where: str, student: torch.Tensor, target: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != target.shape:
        raise ValueError(f"{where}: student and target must both be (N, D) of one shape, got "
                         f"{tuple(student.shape)} and {tuple(target.shape)}")


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """FD: distance between the student's projected embedding and the teacher's image embedding.

    Args:
        student: (N, D) student embedding after its projection head (any float dtype).
        teacher: (N, D) teacher embedding (no gradient flows into it).
        kind: ``cosine``: ``mean_n (1 - cos(s_n, t_n))`` (direction only, as CLIP compares embeddings);
            ``mse``: ``mean_{n,d} (s_nd - t_nd)^2`` (also matches the teacher's scale).

    Returns: scalar, fp32 (float64 for float64 inputs).
    """
    _check_pair("feature_distillation", student, teacher)
    s, t = _upcast(student), _upcast(teacher).detach().to(_upcast(student).dtype)
    if kind == "cosine":
        # eps as F.cosine_similarity: a zero vector gives cos 0 and a finite gradient
        return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown feature loss {kind!r}; expected one of {', '.join(FEATURE_LOSSES)}")


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """LD: ``T^2 * mean_n KL(softmax(t_n / T) || softmax(s_n / T))`` (Hinton et al. 2015; the T^2 keeps the
    gradient's scale independent of T).

    Args:
        student_logits: (N, C). teacher_logits: (N, C), e.g. CLIP zero-shot logits
            ``scale * norm(image_emb) @ norm(text_emb)^T`` or a supervised teacher's own logits.
        temperature: T > 0.

    Returns: scalar, fp32 (float64 for float64 inputs).
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_distillation: student and teacher logits must both be (N, C) of one shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"logit_distillation: temperature must be > 0, got {temperature!r}")
    s = _upcast(student_logits)
    t = _upcast(teacher_logits).detach().to(s.dtype)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def condition_prediction(student: torch.Tensor, source_bank: torch.Tensor, source: torch.Tensor,
                         kind: str = "cosine") -> torch.Tensor:
    """CP: each image predicts the teacher embedding of its *source* real image, so the teacher never sees the
    generated images (it embeds the real set once).

    Args:
        student: (N, D) student embedding (after the projection) of generated (or real) images.
        source_bank: (R, D) teacher embeddings of the real images.
        source: int64 (N,) row of ``source_bank`` that each image was generated from (a real image is its own
            source); every entry must be in [0, R).
        kind: ``cosine`` or ``mse``, as :func:`feature_distillation`.

    Returns: scalar, fp32 (float64 for float64 inputs).
    """
    if source.dim() != 1 or source.shape[0] != student.shape[0]:
        raise ValueError(f"condition_prediction: source must be (N,) = ({student.shape[0]},), got {tuple(source.shape)}")
    if source.numel() and (int(source.min()) < 0 or int(source.max()) >= source_bank.shape[0]):
        raise ValueError(f"condition_prediction: source indices must be in [0, {source_bank.shape[0]}), got "
                         f"[{int(source.min())}, {int(source.max())}]: an image without a real source (class prompt) "
                         f"has no CP target")
    return feature_distillation(student, source_bank[source.to(source_bank.device)], kind)


def zero_shot_logits(image_embedding: torch.Tensor, text_embedding: torch.Tensor,
                     logit_scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """CLIP zero-shot class logits: ``scale * norm(image) @ norm(text)^T``, (N, D) x (C, D) -> (N, C), fp32.
    CLIP's trained scale is exp(4.6052) = 100."""
    if image_embedding.dim() != 2 or text_embedding.dim() != 2 or image_embedding.shape[1] != text_embedding.shape[1]:
        raise ValueError(f"zero_shot_logits: image (N, D) and text (C, D) embeddings must share D, got "
                         f"{tuple(image_embedding.shape)} and {tuple(text_embedding.shape)}")
    img = F.normalize(_upcast(image_embedding), dim=1)
    txt = F.normalize(_upcast(text_embedding).to(img.dtype), dim=1)
    return logit_scale * img @ txt.t()
# ================================================================================================== end kd_clip


# ===================================================================================================== kd_multi
# Contrastive + masked-image-modelling teachers -> ViT student (fastdistill/recipes/kd_multi.py):
#   L = CE_S + CE_CL + CE_MIM + L_KD + L_Attn
#   L_KD   = l1 KL(p_CL || p_S) + (1 - l1) KL(p_MIM || p_S)                  output KD at temperature T
#   L_Attn = l2 KL(A_CL || A_S1) + (1 - l2) KL(A_MIM || A_S2)                 attention KD, one head per teacher
# with each teacher's head chosen by Attention Confidence C_h = mean_q max_k A_h(q, k). The attention KL itself is
# fastdistill/losses/attention_kl.py (fused form: fastdistill.kernels.attention_kl).

from fastdistill.losses.attention_kl import attention_kl, attention_scores  # noqa: E402


def multi_teacher_output_kd(student_logits: torch.Tensor, cl_logits: torch.Tensor, mim_logits: torch.Tensor,
                            lambda_output: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """L_KD = l1 T^2 KL(p_CL || p_S) + (1 - l1) T^2 KL(p_MIM || p_S), p = softmax(logits / T), batch mean.

    Args:
        student_logits, cl_logits, mim_logits: (N, C); the teachers' logits are constants (detached).
        lambda_output: l1 in [0, 1], the contrastive teacher's share (0.5 as published).
        temperature: T > 0.

    Returns: scalar, fp32 (float64 for float64 inputs).
    """
    if not 0.0 <= lambda_output <= 1.0:
        raise ValueError(f"multi_teacher_output_kd: lambda_output must be in [0, 1], got {lambda_output!r}")
    return (lambda_output * logit_distillation(student_logits, cl_logits, temperature)
            + (1.0 - lambda_output) * logit_distillation(student_logits, mim_logits, temperature))


def attention_confidence(attn: torch.Tensor) -> torch.Tensor:
    """Attention Confidence per head, C_h = mean over images and queries of max_k A_h(q, k).

    Args: attn (B, H, L, L) attention probabilities (rows sum to 1). Returns: (H,) fp32.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention_confidence: attn must be (B, H, L, L), got {tuple(attn.shape)}")
    return _upcast(attn).amax(-1).mean((0, 2))


@torch.no_grad()
def attention_confidence_qk(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`attention_confidence` from queries and keys (B, H, L, D): max_k A(q, k) = exp(max_k S - lse_k S),
    so no probability map is formed (the score rows are, once, without a graph)."""
    scores = attention_scores(q, k, scale)
    return (scores.amax(-1) - scores.logsumexp(-1)).exp().mean((0, 2))


def select_head(confidence: torch.Tensor) -> int:
    """The head with the highest Attention Confidence (the first on ties)."""
    return int(torch.argmax(confidence))


def resample_tokens(x: torch.Tensor, grid_from: tuple[int, int], grid_to: tuple[int, int],
                    num_prefix: int = 1) -> torch.Tensor:
    """Put per-token vectors (B, H, L, D) of a ViT with a ``grid_from`` patch grid onto ``grid_to`` (bilinear over
    the patch grid; the ``num_prefix`` CLS/register tokens are kept as they are).

    The teacher's queries and keys are resampled before its attention is formed, so a teacher with another patch
    grid still gives one (L_s, L_s) map per head, comparable row by row with the student's.
    """
    gh, gw = grid_from
    if x.dim() != 4 or x.shape[2] != num_prefix + gh * gw:
        raise ValueError(f"resample_tokens: expected (B, H, {num_prefix} + {gh}x{gw}, D) tokens, got {tuple(x.shape)}")
    if tuple(grid_from) == tuple(grid_to):
        return x
    b, h, _, d = x.shape
    patches = x[:, :, num_prefix:].reshape(b * h, gh, gw, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid_to), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(b, h, grid_to[0] * grid_to[1], d)
    return torch.cat([x[:, :, :num_prefix], patches], dim=2)


def multi_teacher_attention_kd(teacher_cl: tuple[torch.Tensor, torch.Tensor],
                               teacher_mim: tuple[torch.Tensor, torch.Tensor],
                               student_cl: tuple[torch.Tensor, torch.Tensor],
                               student_mim: tuple[torch.Tensor, torch.Tensor],
                               lambda_attention: float = 0.0, kl=attention_kl) -> torch.Tensor:
    """L_Attn = l2 KL(A_CL || A_S1) + (1 - l2) KL(A_MIM || A_S2), each KL the row mean over images and tokens.

    Args:
        teacher_cl, teacher_mim: (Q, K) of each teacher's chosen head, (B, 1, L, D_t), on the student's grid.
        student_cl, student_mim: (Q, K) of the student heads S1 and S2, (B, 1, L, D_s).
        lambda_attention: l2 in [0, 1] (0 as published: only the MIM teacher's attention is transferred); a term
            whose weight is 0 is not computed.
        kl: ``(q_t, k_t, q_s, k_s) -> scalar``: the reference :func:`attention_kl` or the fused
            ``fastdistill.kernels.attention_kl.attention_kl``.
    """
    if not 0.0 <= lambda_attention <= 1.0:
        raise ValueError(f"multi_teacher_attention_kd: lambda_attention must be in [0, 1], got {lambda_attention!r}")
    loss = None
    for weight, (q_t, k_t), (q_s, k_s) in ((lambda_attention, teacher_cl, student_cl),
                                           (1.0 - lambda_attention, teacher_mim, student_mim)):
        if weight > 0:
            term = weight * kl(q_t, k_t, q_s, k_s)
            loss = term if loss is None else loss + term
    return loss
# ================================================================================================= end kd_multi
