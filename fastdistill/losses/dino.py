"""The DINO self-distillation loss and its centring (Caron et al. 2021, eq. 1 and sec. 3.1).

With K-dim head outputs of G global crops from the teacher and V >= G crops from the student (the global
crops first, in the same order), the loss is the cross-entropy over every pair of *different* views

    L = 1 / |{(g, v): v != g}| * sum_{g < G} sum_{v < V, v != g} mean_n H(P_t^(g)_n, P_s^(v)_n),
    P_t = softmax((t - c) / tau_t),   P_s = softmax(s / tau_s),   H(p, q) = -sum_k p_k log q_k

where the centre ``c`` (K,) is an EMA of the teacher's batch mean, ``c <- m c + (1 - m) mean_n t_n``, updated
after the loss. Centring stops one dimension from dominating, the low teacher temperature (sharpening) stops
the uniform collapse: the two together are what keeps DINO from collapsing without negatives.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdistill.engine import distributed as dist


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, num_global: int) -> torch.Tensor:
    """The DINO cross-entropy over all pairs of different views (fp32 scalar).

    Args:
        student_out: (V * N, K) head outputs of V views, view-major (view 0 rows first).
        teacher_out: (G * N, K) head outputs of the G global views, in the student's order; no gradient flows.
        center: (K,) the current centre.
        num_global: G; the teacher's view g is the student's view g, and that pair is skipped.

    Raises:
        ValueError: shapes that do not split into views of the same N, or fewer than 2 views in total.
    """
    if teacher_out.shape[0] % num_global or student_out.shape[-1] != teacher_out.shape[-1]:
        raise ValueError(f"dino_loss: teacher_out {tuple(teacher_out.shape)} must be {num_global} views of (N, K) "
                         f"like student_out {tuple(student_out.shape)}")
    n = teacher_out.shape[0] // num_global
    if student_out.shape[0] % n or student_out.shape[0] // n < num_global or student_out.shape[0] // n < 2:
        raise ValueError(f"dino_loss: student_out {tuple(student_out.shape)} must hold at least {max(num_global, 2)} "
                         f"views of {n} rows, the teacher's global views first")
    views = student_out.shape[0] // n
    log_p_s = F.log_softmax(student_out.float() / student_temp, dim=-1).view(views, n, -1)
    p_t = F.softmax((teacher_out.float().detach() - center) / teacher_temp, dim=-1).view(num_global, n, -1)
    # (G, V) mean cross-entropy of every (teacher view, student view) pair in one contraction
    ce = -torch.einsum("gnk,vnk->gv", p_t, log_p_s) / n
    keep = ~torch.eye(num_global, views, dtype=torch.bool, device=ce.device)
    return ce[keep].mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """``c <- m c + (1 - m) mean_n t_n`` in place; the batch mean is global across processes under torchrun."""
    batch_sum = teacher_out.float().sum(dim=0)
    count = torch.tensor(float(teacher_out.shape[0]), device=center.device)
    dist.all_reduce(batch_sum)
    dist.all_reduce(count)
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)
    return center


class DINOLoss(nn.Module):
    """The loss with the state it owns: the centre (a buffer, checkpointed with the models) and the teacher
    temperature schedule (linear warm-up from ``warmup_teacher_temp`` over ``warmup_epochs``, then constant).

    Args:
        out_dim: K.
        num_global: G, the crops the teacher sees (2 in the paper).
        student_temp: tau_s (0.1).
        teacher_temp: tau_t after warm-up (0.04-0.07; higher values can make training unstable).
        warmup_teacher_temp: tau_t at epoch 0 (0.04).
        warmup_epochs: epochs of the tau_t warm-up (30 in the paper).
        center_momentum: m of the centre EMA (0.9).
    """

    def __init__(self, out_dim: int, num_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_epochs: int = 0, center_momentum: float = 0.9):
        super().__init__()
        self.num_global, self.student_temp, self.center_momentum = num_global, student_temp, center_momentum
        self.teacher_temp, self.warmup_teacher_temp, self.warmup_epochs = teacher_temp, warmup_teacher_temp, warmup_epochs
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temp_at(self, epoch: int) -> float:
        if epoch >= self.warmup_epochs:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / self.warmup_epochs

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temp, self.teacher_temp_at(epoch),
                         self.num_global)
        update_center(self.center, teacher_out, self.center_momentum)  # after the loss: it used the old centre
        return loss
