import torch

from fastdistill.kernels.bn_stats import bn_stats_loss as fused_kernel_loss
from fastdistill.losses.bn_stats import bn_stats_loss
from fastdistill.models import create_backbone
from fastdistill.models.taps import BNStatsTap


def test_bn_stats_tap_matches_reference_sum():
    torch.manual_seed(0)
    model = create_backbone("timm:resnet18", num_classes=10).freeze()
    for _, bn in model.bn_layers():  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    inputs, handles = [], [bn.register_forward_hook(lambda m, i, o: inputs.append((i[0], m)))
                           for _, bn in model.bn_layers()]
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    tap = BNStatsTap(model, first_multiplier=10.0, backend="torch")
    with tap.collect():
        model(x)
    got = tap.loss()
    for h in handles:
        h.remove()
    ref = sum((10.0 if i == 0 else 1.0) * bn_stats_loss(a.double(), m.running_mean.double(), m.running_var.double())
              for i, (a, m) in enumerate(inputs))
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5, msg="BN-statistics loss")
    model(x)  # outside collect(): records nothing
    assert tap.terms == []
    tap.remove()


def test_bn_stats_tap_torch_path_keeps_the_layer_output_and_input_gradient():
    """The torch path runs each BN layer and its term as one node: the network's output, the loss and dL/dx equal
    the layer followed by the separate term (float64, a frozen ResNet with non-trivial statistics and affine)."""
    torch.manual_seed(0)
    model = create_backbone("timm:resnet18", num_classes=10).double().freeze()
    for _, bn in model.bn_layers():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    x = torch.rand(3, 3, 40, 40, dtype=torch.float64)
    results = {}
    for fused in (True, False):
        tap = BNStatsTap(model, first_multiplier=10.0, backend="torch")
        if not fused:  # the layer as torch runs it, the term beside it
            tap._hook = lambda m, i, o, tap=tap: tap.terms.append(
                fused_kernel_loss(i[0], m.running_mean, m.running_var, backend="torch")) if tap.active else None
            tap.remove()
            tap.handles = [bn.register_forward_hook(tap._hook) for _, bn in tap.layers]
        xg = x.clone().requires_grad_()
        with tap.collect():
            logits = model(xg)
        loss = logits.square().mean() + 0.7 * tap.loss()
        loss.backward()
        results[fused] = (logits.detach(), loss.detach(), xg.grad)
        tap.remove()
    for name, got, ref in zip(("logits", "loss", "dL/dx"), results[True], results[False]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}, fused vs separate: {m}")
