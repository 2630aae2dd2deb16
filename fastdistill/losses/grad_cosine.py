"""Multi-backbone gradient-cosine loss of Linear Gradient Matching (Cazenavette et al., NeurIPS 2025): the reference.

For backbone m with features F (N, D), labels y (N,) and a random linear head (W (C, D), b (C,)), the
cross-entropy gradient of the head has a closed form (Z = F W^T + b, P = softmax(Z), Y = onehot(y)):

    G = (P - Y)^T F / N        (C, D)
    g_b = mean_n (P - Y)       (C,)

and the loss compares it with the real-side gradient (G_r, g_br) of the same head:

    L = sum_m w_m (1 - cos(vec(G, g_b), vec(G_r, g_br)))

The published code obtains (G, g_b) with ``torch.autograd.grad(ce, [W, b], create_graph=True)``; the closed form
gives the same feature gradient (tests/losses/test_grad_cosine.py) without a second-order graph. Plain PyTorch,
fp32 math: half inputs are upcast, float64 stays float64 (so tests can compare at 1e-12).
``fastdistill.kernels.grad_cosine`` has the same signature and is checked against this file.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# 1 - cos is undefined for a zero head gradient (a softmax saturated to one-hot in fp32); the norms are clamped
# separately, as F.cosine_similarity does, so the loss is then 1 and its gradient finite.
EPS = 1e-8

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_linear_head_inputs(where: str, feats, labels, weight, bias, index: int | None = None) -> None:
    """Raise a one-line ValueError unless feats (N, D), labels (N,), weight (C, D), bias (C,) agree; ``index``
    names backbone m's entries of the lists (``feats[m]``). Shared with the kernel, like :func:`check_labels`."""
    f_name, w_name, b_name = ("feats", "weight", "bias") if index is None else (
        f"feats[{index}]", f"weights[{index}]", f"biases[{index}]")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be a 1-D integer tensor (N,), got {_shape(labels)} "
                         f"{getattr(labels, 'dtype', '')}")
    n = labels.shape[0]
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != n or n == 0:
        raise ValueError(f"{where}: {f_name} must be (N, D) matching labels (N,) with N >= 1, "
                         f"got {_shape(feats)} and {_shape(labels)}")
    if feats.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{where}: {f_name} must be float32, float16, bfloat16 or float64, got {feats.dtype}")
    d = feats.shape[1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(f"{where}: {w_name} must be (C, D) with D = {d} from {f_name}, got {_shape(weight)}")
    c = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,):
        raise ValueError(f"{where}: {b_name} must be (C,) = ({c},) from {w_name}, got {_shape(bias)}")
    if any(t.device != feats.device for t in (labels, weight, bias)):
        raise ValueError(f"{where}: {f_name}, labels, {w_name} and {b_name} must share a device, got "
                         f"{feats.device}, {labels.device}, {weight.device} and {bias.device}")


def check_labels(where: str, labels: torch.Tensor, num_classes: int) -> None:
    """Labels must lie in [0, C): a ValueError on CPU; an asynchronous device assert on CUDA (as F.cross_entropy),
    because reading them back on the host would stall every step."""
    if labels.is_cuda:
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{where}: labels must lie in [0, {num_classes})")
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, C) = [0, {num_classes}), "
                         f"got min {int(labels.min())} and max {int(labels.max())}")


def check_grad_cosine_inputs(feats, labels, weights, biases, real_grads, backbone_weights) -> list[float]:
    """Validate the arguments of :func:`grad_cosine_loss` (shared with the kernel); return the backbone weights."""
    num = len(feats) if isinstance(feats, (list, tuple)) else -1
    if num < 1:
        raise ValueError(f"grad_cosine: feats must be a non-empty list of (N, D) tensors, one per backbone, "
                         f"got {_shape(feats)}")
    for name, seq in (("weights", weights), ("biases", biases), ("real_grads", real_grads)):
        if not isinstance(seq, (list, tuple)) or len(seq) != num:
            raise ValueError(f"grad_cosine: {name} must be a list of {num} (one per backbone in feats), "
                             f"got {len(seq) if isinstance(seq, (list, tuple)) else _shape(seq)}")
    if backbone_weights is None:
        backbone_weights = [1.0] * num
    elif len(backbone_weights) != num:
        raise ValueError(f"grad_cosine: backbone_weights must hold {num} floats (one per backbone), "
                         f"got {len(backbone_weights)}")
    num_classes = None
    for m in range(num):
        check_linear_head_inputs("grad_cosine", feats[m], labels, weights[m], biases[m], index=m)
        c, d = weights[m].shape
        if num_classes is not None and c != num_classes:
            raise ValueError(f"grad_cosine: weights[{m}] has C = {c} classes but weights[0] has {num_classes}; "
                             f"labels are shared, so every head needs the same C")
        num_classes = c
        pair = real_grads[m]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 \
                or _shape(pair[0]) != (c, d) or _shape(pair[1]) != (c,):
            got = [_shape(t) for t in pair] if isinstance(pair, (list, tuple)) else _shape(pair)
            raise ValueError(f"grad_cosine: real_grads[{m}] must be (G_r (C, D), g_br (C,)) = (({c}, {d}), ({c},)), "
                             f"got {got}")
        if pair[0].device != feats[m].device or pair[1].device != feats[m].device:
            raise ValueError(f"grad_cosine: real_grads[{m}] must be on {feats[m].device} like feats[{m}], "
                             f"got {pair[0].device} and {pair[1].device}")
    check_labels("grad_cosine", labels, num_classes)
    return [float(w) for w in backbone_weights]


def linear_head_grad(
    feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of the mean cross-entropy of a linear head with respect to its weight and bias.

    Args:
        feats: (N, D) float32/float16/bfloat16 features.
        labels: (N,) int64 class indices in [0, C).
        weight: (C, D) head weight. bias: (C,) head bias.

    Returns:
        G = (P - Y)^T F / N (C, D) and g_b = mean_n (P - Y) (C,), float32 (float64 for float64 inputs),
        differentiable with respect to ``feats`` by autograd.

    Raises:
        ValueError: shapes, dtypes or devices disagree, or a label lies outside [0, C).
    """
    check_linear_head_inputs("linear_head_grad", feats, labels, weight, bias)
    num_classes = weight.shape[0]
    check_labels("linear_head_grad", labels, num_classes)
    dtype = torch.promote_types(feats.dtype, torch.float32)
    f = feats.to(dtype)
    probs = torch.softmax(f @ weight.to(dtype).T + bias.to(dtype), dim=1)
    err = probs - F.one_hot(labels.long(), num_classes).to(dtype)
    return err.T @ f / feats.shape[0], err.mean(0)


def grad_cosine_loss(
    feats: Sequence[torch.Tensor],
    labels: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    real_grads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    backbone_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sum over backbones of w_m (1 - cos(vec(G, g_b), vec(G_r, g_br))), the LGM matching loss.

    Args:
        feats: M tensors (N, D_m), the synthetic views' features per backbone (usually requiring grad).
        labels: (N,) int64 labels in [0, C), shared by all backbones.
        weights: M head weights (C, D_m). biases: M head biases (C,).
        real_grads: M pairs (G_r (C, D_m), g_br (C,)) from :func:`linear_head_grad` on real features.
        backbone_weights: M floats w_m, default all 1.

    Returns:
        Scalar float32 loss (float64 for float64 features); gradients reach ``feats`` (and a head that requires
        grad) through the closed form by autograd. ``real_grads`` are treated as constants.

    Raises:
        ValueError: list lengths, shapes, dtypes or devices disagree, or a label lies outside [0, C).
    """
    backbone_weights = check_grad_cosine_inputs(feats, labels, weights, biases, real_grads, backbone_weights)
    loss = None
    for f, w, b, (g_r, gb_r), w_m in zip(feats, weights, biases, real_grads, backbone_weights):
        g, g_b = linear_head_grad(f, labels, w, b)
        syn = torch.cat([g.flatten(), g_b])
        real = torch.cat([g_r.flatten(), gb_r]).detach().to(syn.dtype)
        cos = syn @ real / (syn.norm().clamp_min(EPS) * real.norm().clamp_min(EPS))
        term = w_m * (1.0 - cos)
        loss = term if loss is None else loss + term
    return loss


# ---------------------------------------------------------------------------------------------------------------
# The loss in pieces, for the two-pass and data-parallel LGM step (recipes/lgm.py): the head gradient is a sum over
# views, so slices of the views (chunks, ranks) contribute partial sums that add up; the loss and its adjoint need
# only the summed (C, D) gradients; the feature gradient of each view then needs only its own features.


def _head_error(feats, labels, weight, bias):
    dtype = torch.promote_types(feats.dtype, torch.float32)
    f = feats.to(dtype)
    probs = torch.softmax(f @ weight.to(dtype).T + bias.to(dtype), dim=1)
    return probs - F.one_hot(labels.long(), weight.shape[0]).to(dtype), f


def linear_head_grad_sums(
    feats: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-normalised head gradient of a slice of the views: (E^T F (C, D), sum_n E (C,)), E = softmax(F W^T + b) - Y.

    Summed over the slices of N views and divided by N, they are :func:`linear_head_grad` of all N. float32
    (float64 for float64 inputs); no autograd graph is needed (call it under ``torch.no_grad``).
    """
    check_linear_head_inputs("linear_head_grad_sums", feats, labels, weight, bias)
    check_labels("linear_head_grad_sums", labels, weight.shape[0])
    err, f = _head_error(feats, labels, weight, bias)
    return err.T @ f, err.sum(0)


def grad_cosine_adjoint(
    head_grads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    real_grads: Sequence[tuple[torch.Tensor, torch.Tensor]],
    backbone_weights: Sequence[float],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The LGM loss from the summed head gradients and its gradient with respect to them, in closed form.

    With s = vec(G, g_b), r = vec(G_r, g_br) per backbone, L = sum_m w_m (1 - cos(s, r)) and

        dL/ds = -w_m (r / (|s| |r|) - cos(s, r) s / |s|^2)      (norms clamped at EPS as in grad_cosine_loss)

    Args:
        head_grads: M pairs (G (C, D_m), g_b (C,)), the synthetic views' head gradients (already divided by N).
        real_grads: M pairs (G_r, g_br) of the real batch. backbone_weights: M floats w_m.

    Returns:
        The scalar loss and M pairs (A = dL/dG (C, D_m), a = dL/dg_b (C,)), in the dtype of ``head_grads``.
    """
    loss, adjoints = None, []
    for (g, g_b), (g_r, gb_r), w_m in zip(head_grads, real_grads, backbone_weights):
        s = torch.cat([g.flatten(), g_b])
        r = torch.cat([g_r.flatten(), gb_r]).to(s.dtype)
        s_norm, r_norm = s.norm(), r.norm()
        s_den, r_den = s_norm.clamp_min(EPS), r_norm.clamp_min(EPS)
        cos = s @ r / (s_den * r_den)
        # a clamped norm is a constant: its term of the derivative vanishes
        ds = r / (s_den * r_den) - torch.where(s_norm > EPS, cos / s_den**2, torch.zeros_like(cos)) * s
        ds = -w_m * ds
        adjoints.append((ds[:-g_b.numel()].view_as(g), ds[-g_b.numel():]))
        term = w_m * (1.0 - cos)
        loss = term if loss is None else loss + term
    return loss, adjoints


def grad_cosine_feature_grad(
    feats: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    adjoint: tuple[torch.Tensor, torch.Tensor],
    num_views: int,
) -> torch.Tensor:
    """dL/dF of a slice of the views for one backbone, given the adjoint (A, a) of :func:`grad_cosine_adjoint`.

    G = E^T F / N and g_b = sum_n E / N with E = P - Y, P = softmax(Z), Z = F W^T + b, so (Q = F A^T + a):

        dL/dF = (E A + dZ W) / N,   dZ = P * (Q - rowsum(P * Q))

    Args:
        feats: (n, D) features of the slice; labels: (n,); weight (C, D), bias (C,): the backbone's head.
        adjoint: (A (C, D), a (C,)). num_views: N, the number of synthetic views of all slices together.

    Returns:
        (n, D) float32 (float64 for float64 inputs): the rows of the full feature gradient for this slice.
    """
    check_linear_head_inputs("grad_cosine_feature_grad", feats, labels, weight, bias)
    err, f = _head_error(feats, labels, weight, bias)
    a_w, a_b = (t.to(f.dtype) for t in adjoint)
    w = weight.to(f.dtype)
    probs = err + F.one_hot(labels.long(), weight.shape[0]).to(f.dtype)
    q = f @ a_w.T + a_b
    dz = probs * (q - (probs * q).sum(1, keepdim=True))
    return (err @ a_w + dz @ w) / num_views
