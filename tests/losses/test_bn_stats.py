"""The BN-statistics and ARC references against values worked by hand and an independent float64 computation."""
import pytest
import torch

from fastdistill.losses.bn_stats import arc_update, bn_stats_loss


def _float64_loss(x, running_mean, running_var):
    """The published hook's definition, channel by channel in float64: no var_mean, no shared code."""
    x = x.double()
    terms_var, terms_mean = [], []
    for c in range(x.shape[1]):
        values = x[:, c].reshape(-1)
        mean = values.sum() / values.numel()
        var = ((values - mean) ** 2).sum() / values.numel()
        terms_var.append((var - running_var[c].double()) ** 2)
        terms_mean.append((mean - running_mean[c].double()) ** 2)
    return torch.stack(terms_var).sum().sqrt() + torch.stack(terms_mean).sum().sqrt()


def test_value_and_gradient_worked_by_hand():
    # channel 0: values 1, 3 -> mean 2, var 1 (both matched); channel 1: values 2, 6 -> mean 4, var 4
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], requires_grad=True)
    running_mean, running_var = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0])
    loss = bn_stats_loss(x, running_mean, running_var)
    # ||(0, 4 - 0)|| + ||(0, 4 - 1)|| = 4 + 3
    torch.testing.assert_close(loss, torch.tensor(7.0), msg=lambda m: f"loss on the 2x2 input: {m}")
    # channel 1, unit directions (0, 1): d var/dx = 2 (x - 4) / 2, d mean/dx = 1 / 2 -> x - 3.5
    (grad,) = torch.autograd.grad(loss, x)
    expected = torch.tensor([[0.0, -1.5], [0.0, 2.5]])
    torch.testing.assert_close(grad, expected, msg=lambda m: f"dL/dx on the 2x2 input: {m}")


@pytest.mark.parametrize(
    "seed, shape, layout",
    [(0, (4, 8, 8, 8), "nchw"), (1, (3, 5, 7, 9), "channels_last"), (2, (7, 13), "nc"), (3, (1, 3, 1, 1), "nchw")],
    ids=["regular", "odd-channels_last", "nc", "one-value"],
)
def test_matches_float64_definition(seed, shape, layout):
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    running_mean = 3.0 + 0.3 * torch.randn(shape[1], generator=gen)
    running_var = 4.0 + torch.rand(shape[1], generator=gen)
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    where = f"seed={seed} shape={shape} layout={layout}"

    loss = bn_stats_loss(x, running_mean, running_var)
    expected = _float64_loss(x64, running_mean, running_var)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype} at {where}"
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6, msg=lambda m: f"loss at {where}: {m}")
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6 * expected_grad.abs().max().item(),
                               rtol=1e-5, msg=lambda m: f"dL/dx at {where}: {m}")


def test_half_input_gives_fp32_loss_and_half_gradient():
    x = torch.randn(4, 3, 5, 5).half().requires_grad_()
    loss = bn_stats_loss(x, torch.zeros(3), torch.ones(3))
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16, f"loss {loss.dtype}, dL/dx {grad.dtype}"


def test_matched_statistics_give_zero_gradient_not_nan():
    running_mean = torch.tensor([0.5, -0.25, 2.0])
    x = running_mean.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous().requires_grad_()
    loss = bn_stats_loss(x, running_mean, torch.zeros(3))
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and (grad == 0).all(), f"loss {loss.item()}, dL/dx {grad.flatten()[:4]}"


@pytest.mark.parametrize("shape, c", [((2, 3, 4), 3), ((2, 4, 5, 5), 3), ((0, 3), 3)], ids=["3d", "channels", "empty"])
def test_bad_shapes_raise_one_line_error(shape, c):
    with pytest.raises(ValueError, match=r"^bn_stats: x must [^\n]*got x \("):
        bn_stats_loss(torch.randn(shape), torch.zeros(c), torch.ones(c))


def test_arc_update_worked_by_hand():
    x = torch.tensor([[[[1.0, -3.0]], [[0.2, 0.4]]]])  # (1, 2, 1, 2)
    patches = torch.tensor([[[[0.0, 1.0]], [[1.0, -1.0]]]])
    # 0.5 x + 0.5 P = (0.5, -1.0) and (0.6, -0.3); channel bounds [-0.5, 0.4] and [-0.2, 1.0]
    expected = torch.tensor([[[[0.4, -0.5]], [[0.6, -0.2]]]])
    lo, hi = torch.tensor([-0.5, -0.2]), torch.tensor([0.4, 1.0])
    torch.testing.assert_close(arc_update(x, patches, 0.5, lo, hi), expected, msg=lambda m: f"per-channel: {m}")
    # float bounds; alpha 0.75: 0.75 x + 0.25 P
    expected = torch.tensor([[[[0.75, -2.0]], [[0.4, 0.05]]]])
    torch.testing.assert_close(arc_update(x, patches, 0.75, -2.0, 0.75), expected, msg=lambda m: f"floats: {m}")
    out = arc_update(x, patches, 0.75, -2.0, 0.75, out=x)
    assert out is x, "out=x did not return x"
    torch.testing.assert_close(x, expected, msg=lambda m: f"in place: {m}")


def test_arc_update_rejects_unresampled_patches():
    with pytest.raises(ValueError, match=r"^arc_update: patches must be resampled to x's shape"):
        arc_update(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), 0.5, -1.0, 1.0)
