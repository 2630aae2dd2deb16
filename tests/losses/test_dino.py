"""DINO loss and centring against a direct float64 reference (loops over view pairs, the paper's eq. 1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdistill.losses.dino import DINOLoss, dino_loss, update_center


def _reference(student, teacher, center, tps, tpt, num_global):
    """Loop over (teacher view g, student view v != g), mean over samples, mean over pairs."""
    n = teacher.shape[0] // num_global
    views = student.shape[0] // n
    total, pairs = 0.0, 0
    for g in range(num_global):
        q = torch.softmax((teacher[g * n:(g + 1) * n] - center) / tpt, dim=-1)
        for v in range(views):
            if v == g:
                continue
            log_p = torch.log_softmax(student[v * n:(v + 1) * n] / tps, dim=-1)
            total = total + (-(q * log_p).sum(-1)).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("views, num_global, n, k, seed", [(10, 2, 4, 16, 0), (2, 2, 3, 5, 1), (5, 1, 7, 33, 2)])
def test_dino_loss_matches_reference_value_and_gradient(views, num_global, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(views * n, k, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(num_global * n, k, generator=g, dtype=torch.float64) * 3
    center = torch.randn(k, generator=g, dtype=torch.float64)
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    got = dino_loss(s1.float(), teacher.float(), center.float(), 0.1, 0.04, num_global)
    ref = _reference(s2, teacher, center, 0.1, 0.04, num_global)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5, msg=f"loss value (seed {seed})")
    got.backward()
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-4, msg=f"student gradient (seed {seed})")


def test_dino_loss_does_not_backpropagate_into_the_teacher():
    student = torch.randn(8, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(6), 0.1, 0.04, 2).backward()
    assert teacher.grad is None and student.grad is not None


def test_identical_sharp_views_give_low_loss_uniform_gives_log_k():
    k = 8
    uniform = dino_loss(torch.zeros(6, k), torch.zeros(4, k), torch.zeros(k), 0.1, 0.04, 2)
    torch.testing.assert_close(uniform, torch.tensor(math.log(k)), msg="uniform distributions: H = log K")
    onehot = F.one_hot(torch.tensor([1, 3]), k).float() * 10
    views = onehot.repeat(3, 1)
    sharp = dino_loss(views, views[:4], torch.zeros(k), 0.1, 0.04, 2)
    assert sharp < 1e-3, f"agreeing confident views must give near-zero cross-entropy, got {sharp}"


def test_center_update_and_loss_state():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64)
    center = torch.randn(5, generator=g, dtype=torch.float64)
    expected = 0.9 * center + 0.1 * teacher.mean(0)
    torch.testing.assert_close(update_center(center.clone(), teacher, 0.9), expected, msg="centre EMA")

    loss = DINOLoss(5, num_global=2, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_epochs=3)
    assert [loss.teacher_temp_at(e) for e in (0, 3, 10)] == [0.04, 0.07, 0.07]
    torch.testing.assert_close(loss.teacher_temp_at(1), 0.05)
    loss.center.copy_(center.float())
    student = torch.randn(9, 5, generator=g)
    value = loss(student, teacher.float(), epoch=5)
    # the loss used the old centre, and the centre moved afterwards
    torch.testing.assert_close(value, dino_loss(student, teacher.float(), center.float(), 0.1, 0.07, 2))
    torch.testing.assert_close(loss.center, expected.float(), msg="centre after forward")
    assert "center" in loss.state_dict()


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="must be 2 views"):
        dino_loss(torch.randn(6, 4), torch.randn(3, 4), torch.zeros(4), 0.1, 0.04, 2)
    with pytest.raises(ValueError, match="at least 2 views"):
        dino_loss(torch.randn(3, 4), torch.randn(6, 4), torch.zeros(4), 0.1, 0.04, 2)
