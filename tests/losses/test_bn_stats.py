"""The BN-statistics and ARC references against values worked by hand and an independent float64 computation."""
import pytest
import torch

from fastdistill.losses.bn_stats import arc_update, bn_stats_loss, grouped_bn_stats_loss


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


def _published_recovery_loss(model, x, y, r_bn, first_multiplier):
    """The published recovery objective written out with plain forward hooks (no fastdistill code): per BN input
    the mean over (N, H, W), the biased variance of the channel-first flattened input, their plain L2 distances to
    the running statistics; the stem's term times ``first_multiplier``; plus the batch-mean CE."""
    terms, handles = [], []

    def hook(module, inputs, output):
        z = inputs[0]
        mean = z.mean([0, 2, 3])
        var = z.transpose(0, 1).reshape(z.shape[1], -1).var(1, unbiased=False)
        terms.append(torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2))

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            handles.append(m.register_forward_hook(hook))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    bn = sum(t * (first_multiplier if i == 0 else 1.0) for i, t in enumerate(terms))
    return torch.nn.functional.cross_entropy(logits, y) + r_bn * bn


def test_recovery_loss_equals_the_published_objective_in_float64():
    # a float64 teacher (BN statistics drawn away from 0/1 so the BN term is not trivial): the fastdistill path (BN tap
    # + recovery_loss) agrees with the published objective to float64 rounding, gradient included; the CE is no
    # longer computed on logits cast down to fp32 (which left 1e-7 between the two)
    from fastdistill.losses.bn_stats import recovery_loss
    from fastdistill.models import create_backbone
    from fastdistill.models.taps import BNStatsTap

    gen = torch.Generator().manual_seed(0)
    teacher = create_backbone("timm:resnet18", num_classes=5).freeze()
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    teacher = teacher.double()
    x = torch.rand(6, 3, 16, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    tap = BNStatsTap(teacher, first_multiplier=10.0)
    with tap.collect():
        logits = teacher(x)
    loss = recovery_loss(logits, y, tap.loss(), r_bn=0.01)
    tap.remove()
    x_ref = x.detach().clone().requires_grad_()
    expected = _published_recovery_loss(teacher.model, teacher.normalize(x_ref), y, 0.01, 10.0)
    assert loss.dtype == torch.float64, f"recovery loss of float64 logits came back {loss.dtype}"
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"recovery loss: {m}")
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected, x_ref)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"dL/dx: {m}")


def test_recovery_loss_promotes_half_logits_to_fp32():
    logits = torch.randn(4, 3).half()
    loss = recovery_loss_of(logits)
    assert loss.dtype == torch.float32, f"fp16 logits gave a {loss.dtype} loss"
    torch.testing.assert_close(loss, recovery_loss_of(logits.float()), msg=lambda m: f"fp16 vs fp32 logits: {m}")


def recovery_loss_of(logits):
    from fastdistill.losses.bn_stats import recovery_loss

    return recovery_loss(logits, torch.tensor([0, 1, 2, 0]), torch.tensor(2.0), r_bn=0.5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_grouped_terms_are_each_slices_own_term_in_float64(layout):
    # three batches side by side: each group's value and gradient are those of its slice alone
    g = torch.Generator().manual_seed(3)
    shape = (12, 5) if layout == "2d" else (12, 5, 4, 3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grouped = grouped_bn_stats_loss(x, rm, rv, 3)
    (grouped * weights).sum().backward()
    for k, part in enumerate(x.detach().split(4)):
        part = part.clone().requires_grad_(True)
        alone = bn_stats_loss(part, rm, rv)
        (alone * weights[k]).backward()
        torch.testing.assert_close(grouped[k], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[4 * k:4 * k + 4], part.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="a batch of 12 does not split into 5 equal groups"):
        grouped_bn_stats_loss(x, rm, rv, 5)


def test_grouped_recovery_loss_is_each_batchs_own_objective():
    from fastdistill.losses.bn_stats import recovery_loss

    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    bn = torch.tensor([0.3, 0.7], dtype=torch.float64)
    grouped = recovery_loss(logits, y, bn, r_bn=0.5, groups=2)
    alone = [recovery_loss(logits[3 * k:3 * k + 3], y[3 * k:3 * k + 3], bn[k], r_bn=0.5) for k in range(2)]
    torch.testing.assert_close(grouped, torch.stack(alone), rtol=1e-14, atol=1e-14)
