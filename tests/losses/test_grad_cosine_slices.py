"""The LGM loss in pieces (partial head-gradient sums, closed-form adjoint, per-slice feature gradient) against the
autograd gradient of the one-shot reference ``grad_cosine_loss``, in float64: what the two-pass and data-parallel
LGM step (recipes/lgm.py) relies on."""
import pytest
import torch

from fastdistill.losses.grad_cosine import (grad_cosine_adjoint, grad_cosine_feature_grad, grad_cosine_loss,
                                            linear_head_grad, linear_head_grad_sums)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_slices_give_the_loss_and_feature_gradient_of_the_whole(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 40, (1,), generator=gen))
    c = int(torch.randint(2, 12, (1,), generator=gen))
    dims = torch.randint(1, 50, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    labels = torch.randint(0, c, (n,), generator=gen)
    feats = [torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_() for d in dims]
    weights = [torch.randn(c, d, generator=gen, dtype=torch.float64) / d**0.5 for d in dims]
    biases = [0.1 * torch.randn(c, generator=gen, dtype=torch.float64) for _ in dims]
    real_y = torch.randint(0, c, (2 * n,), generator=gen)
    real_grads = [linear_head_grad(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), real_y, w, b)
                  for d, w, b in zip(dims, weights, biases)]
    bw = [0.5 + m for m in range(len(dims))]
    loss = grad_cosine_loss(feats, labels, weights, biases, real_grads, bw)
    expected = torch.autograd.grad(loss, feats)

    # uneven slices (a chunk or a rank each), summed as an all-reduce would
    cuts = sorted(set(torch.randint(1, n, (2,), generator=gen).tolist()) | {0, n})
    slices = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    head_grads = []
    for f, w, b in zip(feats, weights, biases):
        parts = [linear_head_grad_sums(f.detach()[s], labels[s], w, b) for s in slices]
        head_grads.append((sum(p[0] for p in parts) / n, sum(p[1] for p in parts) / n))
    pieces_loss, adjoints = grad_cosine_adjoint(head_grads, real_grads, bw)
    where = f"seed {seed}, N={n} C={c} D={dims} slices {[(s.start, s.stop) for s in slices]}"
    torch.testing.assert_close(pieces_loss, loss.detach(), atol=1e-12, rtol=1e-10, msg=lambda m: f"loss, {where}: {m}")
    for m, (f, w, b) in enumerate(zip(feats, weights, biases)):
        grad = torch.cat([grad_cosine_feature_grad(f.detach()[s], labels[s], w, b, adjoints[m], n) for s in slices])
        torch.testing.assert_close(grad, expected[m], atol=1e-12, rtol=1e-9,
                                   msg=lambda msg: f"dL/dF of backbone {m}, {where}: {msg}")


def test_adjoint_of_a_zero_head_gradient_is_finite():
    # a saturated softmax gives G = 0: the clamped norm makes the loss 1 and its gradient finite, as the reference
    g = (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    r = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    loss, [(a_w, a_b)] = grad_cosine_adjoint([g], [r], [2.0])
    assert loss.item() == 2.0
    assert torch.isfinite(a_w).all() and torch.isfinite(a_b).all() and a_w.abs().sum() > 0
