import torch

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
