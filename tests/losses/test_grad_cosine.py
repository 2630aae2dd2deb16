"""The closed-form reference of the LGM loss against independent computations: autograd through nn.Linear for the
head gradient, the published double-backward formulation for the feature gradient, and values known by hand."""
import re

import pytest
import torch
import torch.nn.functional as F

from fastdistill.losses.grad_cosine import grad_cosine_loss, linear_head_grad

# (N, C, D): one regular, one odd (no power of two), one with a single sample and a single feature
HEAD_SHAPES = [(32, 10, 64), (27, 13, 45), (1, 3, 1)]
# (N, C, dims per backbone)
LOSS_SHAPES = [(32, 10, (64,)), (27, 13, (45, 24, 70)), (5, 2, (3, 7))]


def _inputs(seed, n, c, dims, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    feats = [torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_() for d in dims]
    weights = [torch.randn(c, d, generator=gen, dtype=dtype) / d**0.5 for d in dims]
    biases = [0.1 * torch.randn(c, generator=gen, dtype=dtype) for _ in dims]
    real_labels = torch.randint(0, c, (2 * n,), generator=gen)
    real_grads = [
        linear_head_grad(torch.randn(2 * n, d, generator=gen, dtype=dtype), real_labels, w, b)
        for d, w, b in zip(dims, weights, biases)
    ]
    backbone_weights = [1.0 + 0.5 * m for m in range(len(dims))]
    return feats, labels, weights, biases, real_grads, backbone_weights


@pytest.mark.parametrize("n, c, d", HEAD_SHAPES)
def test_linear_head_grad_equals_autograd_of_cross_entropy(n, c, d):
    gen = torch.Generator().manual_seed(n * 1000 + c)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    head = torch.nn.Linear(d, c).double()
    ce = F.cross_entropy(head(feats), labels)
    grad_w, grad_b = torch.autograd.grad(ce, [head.weight, head.bias])

    g, g_b = linear_head_grad(feats, labels, head.weight.detach(), head.bias.detach())
    shape = f"N={n} C={c} D={d}"
    torch.testing.assert_close(g, grad_w, atol=1e-12, rtol=1e-10, msg=lambda m: f"G at {shape}: {m}")
    torch.testing.assert_close(g_b, grad_b, atol=1e-12, rtol=1e-10, msg=lambda m: f"g_b at {shape}: {m}")


def _published_loss(feats, labels, weights, biases, real_grads, backbone_weights):
    """The authors' formulation: head gradient by autograd with create_graph, then 1 - cosine per backbone."""
    loss = 0.0
    for f, w, b, (g_r, gb_r), w_m in zip(feats, weights, biases, real_grads, backbone_weights):
        w = w.detach().requires_grad_()
        b = b.detach().requires_grad_()
        ce = F.cross_entropy(F.linear(f, w, b), labels)
        grad_w, grad_b = torch.autograd.grad(ce, [w, b], create_graph=True)
        syn = torch.cat([grad_w.flatten(), grad_b])
        real = torch.cat([g_r.flatten(), gb_r])
        loss = loss + w_m * (1 - F.cosine_similarity(syn, real, dim=0))
    return loss


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n, c, dims", LOSS_SHAPES)
def test_feature_grad_equals_double_backward(n, c, dims, seed):
    feats, labels, weights, biases, real_grads, backbone_weights = _inputs(seed, n, c, dims)
    shape = f"seed={seed} N={n} C={c} D={dims}"

    expected = _published_loss(feats, labels, weights, biases, real_grads, backbone_weights)
    expected_grads = torch.autograd.grad(expected, feats)
    loss = grad_cosine_loss(feats, labels, weights, biases, real_grads, backbone_weights)
    grads = torch.autograd.grad(loss, feats)

    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12, msg=lambda m: f"loss at {shape}: {m}")
    for m, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10,
                                   msg=lambda msg: f"dL/dF of backbone {m} at {shape}: {msg}")


def test_loss_by_hand_for_equal_and_opposite_gradients():
    feats, labels, weights, biases, _, _ = _inputs(0, 8, 4, (6, 5))
    with torch.no_grad():
        syn = [linear_head_grad(f, labels, w, b) for f, w, b in zip(feats, weights, biases)]
    # cos = 1 for the backbone matched with itself, cos = -1 for the one matched with its negation
    real_grads = [syn[0], (-3 * syn[1][0], -3 * syn[1][1])]
    loss = grad_cosine_loss(feats, labels, weights, biases, real_grads, backbone_weights=[0.5, 2.0])
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0 + 2.0 * 2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_zero_real_gradient_gives_unit_loss_and_zero_grad():
    feats, labels, weights, biases, _, _ = _inputs(0, 8, 4, (6,))
    real_grads = [(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))]
    loss = grad_cosine_loss(feats, labels, weights, biases, real_grads, backbone_weights=[3.0])
    (grad,) = torch.autograd.grad(loss, feats)
    torch.testing.assert_close(loss, torch.tensor(3.0, dtype=torch.float64), msg="loss with R = 0 (eps clamp)")
    torch.testing.assert_close(grad, torch.zeros_like(grad), msg="dL/dF with R = 0 (eps clamp)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_loss_and_grad_in_input_dtype(dtype):
    feats, labels, weights, biases, real_grads, _ = _inputs(0, 16, 5, (12, 20), dtype=torch.float32)
    feats = [f.detach().to(dtype).requires_grad_() for f in feats]
    loss = grad_cosine_loss(feats, labels, weights, biases, real_grads)
    grads = torch.autograd.grad(loss, feats)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype} for {dtype} feats"
    assert all(g.dtype == dtype for g in grads), f"grad dtypes {[g.dtype for g in grads]} for {dtype} feats"
    g, g_b = linear_head_grad(feats[0], labels, weights[0], biases[0])
    assert g.dtype == g_b.dtype == torch.float32, f"head gradient dtypes {g.dtype}, {g_b.dtype}"


def _bad_inputs():
    feats, labels, weights, biases, real_grads, _ = _inputs(0, 8, 4, (6, 5), dtype=torch.float32)
    good = dict(feats=feats, labels=labels, weights=weights, biases=biases, real_grads=real_grads)
    cases = {
        "feats[0] must be (N, D) matching labels": dict(feats=[feats[0][:7], feats[1]]),
        "labels must be a 1-D integer": dict(labels=labels.float()),
        "weights[0] must be (C, D)": dict(weights=[weights[0][:, :5], weights[1]]),
        "biases[1] must be (C,)": dict(biases=[biases[0], biases[1][:3]]),
        "real_grads[1] must be (G_r (C, D), g_br (C,))": dict(
            real_grads=[real_grads[0], (real_grads[1][0].T, real_grads[1][1])]),
        "weights must be a list of 2": dict(weights=weights[:1]),
        "labels must lie in [0, C)": dict(labels=labels + 4),
        "every head needs the same C": dict(weights=[weights[0], weights[1][:3]], biases=[biases[0], biases[1][:3]],
                                            real_grads=[real_grads[0], (real_grads[1][0][:3], real_grads[1][1][:3])]),
        "backbone_weights must hold 2": dict(backbone_weights=[1.0]),
    }
    return [pytest.param({**good, **bad}, match, id=match) for match, bad in cases.items()]


@pytest.mark.parametrize("kwargs, match", _bad_inputs())
def test_bad_inputs_raise_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        grad_cosine_loss(**kwargs)
    assert "\n" not in str(info.value), f"multi-line message: {info.value}"
