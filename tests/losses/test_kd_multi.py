"""The kd_multi losses of fastdistill/losses/kd.py against direct float64 formulas and hand-made attention maps."""
import functools

import pytest
import torch

from fastdistill.kernels import attention_kl as kernel
from fastdistill.losses import kd
from fastdistill.losses.attention_kl import attention_kl


def _kl_rows(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def test_output_kd_is_the_weighted_kl_of_both_teachers():
    gen = torch.Generator().manual_seed(0)
    s, cl, mim = (3 * torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    s.requires_grad_()
    t, l1 = 2.0, 0.3
    p_s = (s / t).softmax(1)
    expected = t**2 * (l1 * _kl_rows((cl / t).softmax(1), p_s) + (1 - l1) * _kl_rows((mim / t).softmax(1), p_s)).mean()
    loss = kd.multi_teacher_output_kd(s, cl, mim, lambda_output=l1, temperature=t)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, msg="L_KD")
    (grad,) = torch.autograd.grad(loss, s)
    (expected_grad,) = torch.autograd.grad(expected, s)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12, msg="dL_KD/ds")
    only_cl = kd.multi_teacher_output_kd(s, cl, mim, lambda_output=1.0, temperature=t)
    torch.testing.assert_close(only_cl, t**2 * _kl_rows((cl / t).softmax(1), p_s).mean(), msg="l1 = 1: CL alone")
    with pytest.raises(ValueError, match="lambda_output must be in"):
        kd.multi_teacher_output_kd(s, cl, mim, lambda_output=1.5)


def test_attention_confidence_picks_the_peaked_head_on_hand_made_maps():
    length = 4
    uniform = torch.full((length, length), 1 / length)             # C = 1/4
    one_hot = torch.eye(length)                                    # C = 1
    half = torch.tensor([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    attn = torch.stack([uniform, half, one_hot])[None].repeat(2, 1, 1, 1)  # (B 2, H 3, 4, 4)
    confidence = kd.attention_confidence(attn)
    torch.testing.assert_close(confidence, torch.tensor([0.25, (0.5 + 0.5 + 0.7 + 0.25) / 4, 1.0]),
                               msg="C_h = mean_q max_k A")
    assert kd.select_head(confidence) == 2
    assert kd.select_head(kd.attention_confidence(attn[:, :2])) == 1
    with pytest.raises(ValueError, match=r"must be \(B, H, L, L\)"):
        kd.attention_confidence(torch.rand(2, 3, 4))


def test_attention_confidence_from_queries_and_keys_equals_the_map_form():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(3, 4, 9, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    attn = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
    torch.testing.assert_close(kd.attention_confidence_qk(q, k), kd.attention_confidence(attn), msg="C_h from Q, K")


def test_resample_tokens_keeps_prefix_and_interpolates_the_grid():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 1 + 4 * 4, 5, generator=gen)
    assert kd.resample_tokens(x, (4, 4), (4, 4)) is x
    up = kd.resample_tokens(x, (4, 4), (8, 8))
    assert up.shape == (2, 3, 1 + 64, 5)
    torch.testing.assert_close(up[:, :, :1], x[:, :, :1], msg="CLS token kept")
    # a constant grid stays constant; a 1x1 grid is replicated over the new grid
    const = torch.ones(1, 1, 1 + 9, 2)
    torch.testing.assert_close(kd.resample_tokens(const, (3, 3), (2, 2)), torch.ones(1, 1, 5, 2), msg="constant")
    single = torch.tensor([[[[0.0], [3.0]]]])  # (1, 1, 1 + 1x1, 1)
    torch.testing.assert_close(kd.resample_tokens(single, (1, 1), (2, 2))[0, 0, 1:, 0], torch.full((4,), 3.0),
                               msg="1x1 -> 2x2")
    # up 2x then down 2x is a smoothing, not the identity; the grid mean survives it closely
    down = kd.resample_tokens(up, (8, 8), (4, 4))
    torch.testing.assert_close(down[:, :, 1:].mean(2), x[:, :, 1:].mean(2), atol=0.1, rtol=0, msg="grid mean")
    with pytest.raises(ValueError, match=r"expected \(B, H, 1 \+ 3x3, D\) tokens"):
        kd.resample_tokens(x, (3, 3), (4, 4))


def _qk(seed, d, length=10, b=2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, 1, length, d, generator=gen, dtype=torch.float64) for _ in range(2))


def test_attention_kd_weights_the_two_teachers_and_skips_zero_terms():
    t_cl, t_mim, s_cl, s_mim = _qk(3, 12), _qk(4, 16), _qk(5, 8), _qk(6, 8)
    loss = kd.multi_teacher_attention_kd(t_cl, t_mim, s_cl, s_mim, lambda_attention=0.25)
    expected = 0.25 * attention_kl(*t_cl, *s_cl) + 0.75 * attention_kl(*t_mim, *s_mim)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12, msg="L_Attn")
    calls = []

    def counting_kl(*args):
        calls.append(args[0].shape)
        return attention_kl(*args)

    published = kd.multi_teacher_attention_kd(t_cl, t_mim, s_cl, s_mim, lambda_attention=0.0, kl=counting_kl)
    torch.testing.assert_close(published, attention_kl(*t_mim, *s_mim), msg="l2 = 0: MIM alone")
    assert len(calls) == 1, "a term of weight 0 must not be computed"
    with pytest.raises(ValueError, match="lambda_attention must be in"):
        kd.multi_teacher_attention_kd(t_cl, t_mim, s_cl, s_mim, lambda_attention=-0.1)


def test_attention_kd_through_the_fused_form_matches_the_reference():
    t_cl, t_mim = _qk(7, 12), _qk(8, 16)
    s_cl, s_mim = (tuple(t.float().requires_grad_() for t in _qk(s, 8)) for s in (9, 10))
    fused = functools.partial(kernel.attention_kl, backend="torch")
    loss = kd.multi_teacher_attention_kd(*(tuple(t.float() for t in p) for p in (t_cl, t_mim)), s_cl, s_mim, 0.5,
                                         kl=fused)
    expected = kd.multi_teacher_attention_kd(t_cl, t_mim, *(tuple(t.double() for t in p) for p in (s_cl, s_mim)),
                                             0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6, msg="fused L_Attn")
