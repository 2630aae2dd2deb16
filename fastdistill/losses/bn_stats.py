"""BN-statistics matching loss and the data residual connection (ARC) of FADRM: the PyTorch reference.

Cui et al. 2025, "FADRM: Fast and Accurate Data Residual Matching for Dataset Distillation"; the loss is the
BN-statistics term of SRe2L (Yin et al. 2023), whose forward hook FADRM keeps unchanged
(Jiacheng8/FADRM ``recover/utils_recover.py``, ``BNFeatureHook``). The fast paths live in
``fastdistill.kernels.bn_stats`` and are tested against this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) promoted to fp32; float64 stays float64, so a float64 check compares at 1e-12."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_bn_input(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
    c = running_mean.numel()
    if x.dim() not in (2, 4) or x.shape[1] != c or running_var.numel() != c:
        raise ValueError(
            f"bn_stats: x must be (N, C) or (N, C, H, W) with C == running_mean.numel() == running_var.numel(), "
            f"got x {tuple(x.shape)}, running_mean {tuple(running_mean.shape)}, running_var {tuple(running_var.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"bn_stats: x must hold at least one value per channel, got x {tuple(x.shape)}")


def bn_stats_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    r"""Distance between the batch statistics of one BN input and the layer's running statistics.

    .. math::
        L = \lVert \sigma^2 - \hat\sigma^2 \rVert_2 + \lVert \mu - \hat\mu \rVert_2, \quad
        \mu_c = \frac{1}{M} \sum_{i \in c} x_i, \quad \sigma^2_c = \frac{1}{M} \sum_{i \in c} (x_i - \mu_c)^2

    over the M = N*H*W values of channel c; the variance is biased and the norms are plain, not squared, as in
    the published hook ``torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)``. Where a norm is 0 its gradient is
    taken as 0 (torch's subgradient), so a perfectly matched term contributes nothing instead of NaN.

    Args:
        x: (N, C, H, W) or (N, C) input of a BN layer, any float dtype and layout; the math runs in fp32
            (float64 for float64 inputs).
        running_mean: (C,) the layer's running mean.
        running_var: (C,) the layer's running (biased-update) variance.

    Returns:
        Scalar fp32 tensor (float64 for float64 inputs), differentiable with respect to ``x``.

    Raises:
        ValueError: ``x`` is not 2-D or 4-D, its channel count differs from the running statistics, or it is empty.
    """
    _check_bn_input(x, running_mean, running_var)
    dims = [0] + list(range(2, x.dim()))
    x = _at_least_fp32(x)
    return _distance(*torch.var_mean(x, dim=dims, correction=0), running_mean, running_var)


def _distance(var: torch.Tensor, mean: torch.Tensor, running_mean: torch.Tensor,
              running_var: torch.Tensor) -> torch.Tensor:
    """The published ``||var - running_var||_2 + ||mean - running_mean||_2`` over the last (channel) dimension."""
    return torch.linalg.vector_norm(var - running_var.to(var.dtype), dim=-1) + \
        torch.linalg.vector_norm(mean - running_mean.to(mean.dtype), dim=-1)


def grouped_bn_stats_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """:func:`bn_stats_loss` of each of ``groups`` equal, consecutive slices of the batch, as a (groups,) tensor:
    recovery batches optimised side by side in one forward each keep their own batch statistics."""
    _check_bn_input(x, running_mean, running_var)
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"bn_stats: a batch of {x.shape[0]} does not split into {groups} equal groups")
    x = _at_least_fp32(x)
    x = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)  # (G, n, C, H*W)
    return _distance(*torch.var_mean(x, dim=(1, 3), correction=0), running_mean, running_var)  # (G, C) -> (G,)


def recovery_loss(logits: torch.Tensor, targets: torch.Tensor, bn_loss: torch.Tensor, r_bn: float,
                  groups: int = 1) -> torch.Tensor:
    r"""The SRe2L / FADRM recovery objective on one augmented batch: :math:`\mathrm{CE}(z, y) + r_{bn} L_{bn}`.

    ``L_bn`` is the weighted sum :math:`\sum_l m_l \, \mathrm{bn\_stats\_loss}_l` over the teacher's BN layers
    (``models.taps.BNStatsTap.loss``); the published code adds ``args.r_bn * loss_BN + loss_ce``
    (Jiacheng8/FADRM ``recover/recover.py``), the CE being the batch mean.

    Args:
        logits: (N, C) teacher logits, any float dtype; fp16/bf16 (autocast) are promoted to fp32, float64 kept.
        targets: int64 (N,) class indices.
        bn_loss: scalar BN-statistics term (fp32, or float64 in checks).
        r_bn: its weight.
        groups: ``groups > 1``: the batch is that many recovery batches side by side (equal, consecutive slices),
            ``bn_loss`` their (groups,) terms (:func:`grouped_bn_stats_loss`); each gets its own CE mean.

    Returns:
        Scalar (a (groups,) tensor with ``groups > 1``) in the promoted dtype of the logits and the BN term.
    """
    if groups == 1:
        ce = F.cross_entropy(_at_least_fp32(logits), targets)
    else:
        ce = F.cross_entropy(_at_least_fp32(logits), targets, reduction="none").view(groups, -1).mean(1)
    return ce + r_bn * bn_loss


def arc_update(
    x: torch.Tensor,
    patches: torch.Tensor,
    alpha: float,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Data residual connection between FADRM stages: :math:`\mathrm{clamp}(\alpha x + (1 - \alpha) P, lo, hi)`.

    Cui et al. 2025 (ARC) blend the optimised images back towards the real patches they started from, P already
    resampled to the next stage's size (bilinear, no antialias); a = 0.5 in the published code.

    Args:
        x: (N, C, H, W) synthetic images.
        patches: real patches resampled to ``x.shape``, same dtype as ``x``.
        alpha: weight of ``x``.
        lo, hi: valid pixel range, floats or (C,) tensors (per channel, in normalised units).
        out: optional output, may be ``x`` itself (call under ``torch.no_grad()`` when ``x`` is a leaf
            that requires grad).

    Returns:
        The blended, clamped images, ``out`` when given.

    Raises:
        ValueError: ``patches`` does not have ``x``'s shape, or ``lo``/``hi`` are neither scalars nor (C,).
    """
    _check_arc_input(x, patches, lo, hi)
    blended = alpha * x.float() + (1.0 - alpha) * patches.float()
    result = torch.clamp(blended, _channel_bound(lo, x), _channel_bound(hi, x)).to(x.dtype)
    if out is None:
        return result
    return out.copy_(result)


def _channel_bound(bound: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bound = torch.as_tensor(bound, dtype=torch.float32, device=x.device)
    return bound.reshape((1, -1) + (1,) * (x.dim() - 2)) if bound.numel() > 1 else bound.reshape(())


def _check_arc_input(x: torch.Tensor, patches: torch.Tensor, lo, hi) -> None:
    if x.dim() < 2 or patches.shape != x.shape:
        raise ValueError(
            f"arc_update: patches must be resampled to x's shape (N, C, ...), got patches {tuple(patches.shape)} "
            f"for x {tuple(x.shape)}; resample with F.interpolate(patches, size=x.shape[-2:], mode='bilinear')"
        )
    for name, bound in (("lo", lo), ("hi", hi)):
        if isinstance(bound, torch.Tensor) and bound.numel() not in (1, x.shape[1]):
            raise ValueError(
                f"arc_update: {name} must be a float or a ({x.shape[1]},) tensor, got shape {tuple(bound.shape)}"
            )
