"""The MAE reconstruction loss (He et al. 2022, sec. 3 "Reconstruction target").

Mean squared error between predicted and target pixels, per patch, averaged over the *masked* patches only:

    L = sum_n,l m_nl * mean_j (pred_nlj - t_nlj)^2 / sum_n,l m_nl,    t = (x - mean(x)) / sqrt(var(x) + eps)

with per-patch normalisation of the target (``norm_pix``: mean and unbiased variance over the patch's pixels, as published),
which the paper found to improve the representation.
"""
from __future__ import annotations

import torch


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
             eps: float = 1e-6) -> torch.Tensor:
    """fp32 scalar loss.

    Args:
        pred: (N, L, P) predicted pixels per patch.
        target: (N, L, P) the image's patches (:func:`fastdistill.models.ssl.patchify`).
        mask: (N, L), 1 on masked patches (the loss is over these), 0 on visible ones.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"mae_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (N, L, P), (N, L, P) and (N, L)")
    target = target.float()
    if norm_pix:
        var, mean = torch.var_mean(target, dim=-1, keepdim=True, correction=1)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
