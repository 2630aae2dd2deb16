"""The Triton gradient-cosine kernel (forced, TRITON_INTERPRET=1 on CPU) against the reference in losses/."""
import random

import pytest
import torch

from fastdistill.kernels import grad_cosine as kernel
from fastdistill.losses import grad_cosine as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# atol is relative to the largest reference entry: the gradient's scale changes with N, C and |F|. Half precision
# rounds the dot operands (E, A, dZ') to the input dtype, about 2^-11 (fp16) and 2^-8 (bf16) relative error.
DTYPES = [
    (torch.float32, 1e-5, 1e-4),
    (torch.float16, 2e-3, 2e-2),
    (torch.bfloat16, 2e-2, 5e-2),
]


def _random_shape(seed):
    rng = random.Random(seed)
    dims = tuple(rng.randint(1, 64) for _ in range(rng.randint(1, 3)))
    return pytest.param(seed, rng.randint(1, 32), rng.randint(2, 16), dims, None, id=f"random{seed}")


# (seed, N, C, dims per backbone, tile cap or None for the default)
SHAPES = [
    pytest.param(0, 32, 16, (64,), None, id="regular"),
    pytest.param(1, 27, 13, (40, 24, 56), None, id="odd"),
    # a lowered tile cap makes every grid and loop span several masked blocks (3 N, 2 C, 3 D) at interpreter size
    pytest.param(2, 37, 21, (45,), 16, id="tiled"),
    *(_random_shape(seed) for seed in (3, 4, 5)),
]


def _inputs(seed, n, c, dims, dtype, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    feats = [torch.randn(n, d, generator=gen).to(dtype) for d in dims]
    weights = [(torch.randn(c, d, generator=gen) / d**0.5).to(dtype) for d in dims]
    biases = [(0.1 * torch.randn(c, generator=gen)).to(dtype) for _ in dims]
    real_labels = torch.randint(0, c, (2 * n,), generator=gen)
    real_grads = [
        reference.linear_head_grad(torch.randn(2 * n, d, generator=gen), real_labels, w.float(), b.float())
        for d, w, b in zip(dims, weights, biases)
    ]
    backbone_weights = [1.0 + 0.5 * m for m in range(len(dims))]
    to = lambda t: t.to(DEVICE)  # noqa: E731
    feats = [to(f).requires_grad_(requires_grad) for f in feats]
    real_grads = [(to(g), to(g_b)) for g, g_b in real_grads]
    return feats, to(labels), [to(w) for w in weights], [to(b) for b in biases], real_grads, backbone_weights


def _close(actual, expected, atol, rtol, what):
    scale = expected.detach().float().abs().max().clamp_min(1e-30)
    # one rounding step of the dtype near zero (fp16 subnormals: 2^-24) is resolution, not error (as Liger's tests)
    step = torch.finfo(actual.dtype).smallest_normal * torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(),
                               atol=max(atol * scale.item(), step), rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_loss_and_grads(seed, n, c, dims, dtype, atol, rtol, grad_output=1.0, requires_grad=None):
    args = _inputs(seed, n, c, dims, dtype)
    feats = args[0]
    if requires_grad is not None:
        for f, flag in zip(feats, requires_grad):
            f.requires_grad_(flag)
    shape = f"seed={seed} N={n} C={c} D={dims} {dtype}"

    loss = kernel.grad_cosine_loss(*args, backend="triton")
    expected = reference.grad_cosine_loss(*args)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype} at {shape}"
    _close(loss, expected, atol, rtol, f"loss at {shape}")

    wanted = [f for f in feats if f.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_outputs=torch.tensor(grad_output, device=DEVICE))
    expected_grads = torch.autograd.grad(expected, wanted, grad_outputs=torch.tensor(grad_output, device=DEVICE))
    for m, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
        assert grad.dtype == dtype, f"dL/dF dtype {grad.dtype} of backbone {m} at {shape}"
        _close(grad, expected_grad, atol, rtol, f"dL/dF of backbone {m} at {shape}, grad_output={grad_output}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed, n, c, dims, tile_cap", SHAPES)
def test_loss_and_feature_grads_match_reference(seed, n, c, dims, tile_cap, dtype, atol, rtol, monkeypatch):
    if tile_cap is not None:
        monkeypatch.setattr(kernel, "_TILE_CAP", tile_cap)
    _check_loss_and_grads(seed, n, c, dims, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_grad_output_scales_and_frozen_backbones_get_no_grad(dtype, atol, rtol):
    _check_loss_and_grads(6, 19, 7, (33, 16, 9), dtype, atol, rtol, grad_output=-2.5,
                          requires_grad=(True, False, True))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed, n, c, dims, tile_cap", SHAPES[:3])
def test_linear_head_grad_matches_reference(seed, n, c, dims, tile_cap, dtype, atol, rtol, monkeypatch):
    if tile_cap is not None:
        monkeypatch.setattr(kernel, "_TILE_CAP", tile_cap)
    feats, labels, weights, biases, _, _ = _inputs(seed, n, c, dims, dtype, requires_grad=False)
    shape = f"seed={seed} N={n} C={c} D={dims[0]} {dtype}"
    g, g_b = kernel.linear_head_grad(feats[0], labels, weights[0], biases[0], backend="triton")
    expected_g, expected_g_b = reference.linear_head_grad(feats[0], labels, weights[0], biases[0])
    assert g.dtype == g_b.dtype == torch.float32, f"head gradient dtypes {g.dtype}, {g_b.dtype} at {shape}"
    _close(g, expected_g, atol, rtol, f"G at {shape}")
    _close(g_b, expected_g_b, atol, rtol, f"g_b at {shape}")


def test_zero_real_gradient_hits_eps_clamp_like_reference():
    feats, labels, weights, biases, real_grads, _ = _inputs(7, 16, 5, (24,), torch.float32)
    real_grads = [(torch.zeros_like(real_grads[0][0]), torch.zeros_like(real_grads[0][1]))]
    loss = kernel.grad_cosine_loss(feats, labels, weights, biases, real_grads, [3.0], backend="triton")
    (grad,) = torch.autograd.grad(loss, feats)
    torch.testing.assert_close(loss, torch.tensor(3.0, device=DEVICE), msg="loss with R = 0 (eps clamp)")
    torch.testing.assert_close(grad, torch.zeros_like(grad), msg="dL/dF with R = 0 (eps clamp)")


def test_repeated_calls_are_bitwise_identical():
    args = _inputs(8, 30, 11, (50, 20), torch.float32)
    first = kernel.grad_cosine_loss(*args, backend="triton")
    first_grads = torch.autograd.grad(first, args[0])
    second = kernel.grad_cosine_loss(*args, backend="triton")
    second_grads = torch.autograd.grad(second, args[0])
    assert torch.equal(first, second), "loss differs between two identical calls (partial sums must not use atomics)"
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads)), "dL/dF differs between two calls"


def test_dispatch_and_input_errors():
    args = _inputs(9, 8, 4, (6,), torch.float32)
    expected = reference.grad_cosine_loss(*args)
    torch.testing.assert_close(kernel.grad_cosine_loss(*args, backend="torch"), expected, atol=0, rtol=0)
    if DEVICE == "cpu":
        torch.testing.assert_close(kernel.grad_cosine_loss(*args), expected, atol=0, rtol=0,
                                   msg="backend='auto' on CPU must be the reference")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernel.grad_cosine_loss(*args, backend="cuda")
    feats, labels, weights, biases, real_grads, _ = args
    with pytest.raises(ValueError, match=r"feats\[0\] must be \(N, D\) matching labels"):
        kernel.grad_cosine_loss([feats[0][:5]], labels, weights, biases, real_grads, backend="triton")
    with pytest.raises(ValueError, match=r"takes float32, float16 or bfloat16 feats\[0\], got torch.float64"):
        kernel.grad_cosine_loss([feats[0].double()], labels, [weights[0].double()], [biases[0].double()],
                                real_grads, backend="triton")
    with pytest.raises(ValueError, match="builds no autograd graph"):
        kernel.linear_head_grad(feats[0], labels, weights[0], biases[0], backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"labels must lie in \[0, C\)"):
            kernel.grad_cosine_loss(feats, labels + 4, weights, biases, real_grads, backend="triton")


def test_fp16_feature_grad_is_scaled_before_rounding():
    # at published sizes dL/dF lies below fp16's smallest normal number (6.1e-5); a GradScaler's 2^16 brings it
    # back only if it multiplies the gradient before the rounding to fp16 (a saved fp16 gradient flushes to zero)
    scale = 2.0**16
    feats, labels, weights, biases, real_grads, _ = _inputs(11, 32, 16, (64,), torch.float16)
    loss = kernel.grad_cosine_loss(feats, labels, weights, biases, real_grads, [1e-3], backend="triton")
    (grad,) = torch.autograd.grad(loss, feats, grad_outputs=torch.tensor(scale, device=DEVICE))
    f64 = feats[0].detach().double().requires_grad_()
    expected = reference.grad_cosine_loss([f64], labels, [weights[0].double()], [biases[0].double()],
                                          [tuple(t.double() for t in real_grads[0])], [1e-3])
    (expected_grad,) = torch.autograd.grad(expected * scale, f64)
    unscaled = expected_grad.abs().max().item() / scale
    assert unscaled < torch.finfo(torch.float16).smallest_normal, f"dL/dF up to {unscaled:.2e} is not subnormal"
    error = ((grad.double() - expected_grad).norm() / expected_grad.norm()).item()
    assert error < 2e-3, f"scaled fp16 dL/dF off the float64 reference by {error:.2e} (flushed before scaling?)"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed, n, c, dims, tile_cap", SHAPES[:3])
def test_two_pass_parts_match_reference(seed, n, c, dims, tile_cap, dtype, atol, rtol, monkeypatch):
    """The per-chunk head sums and the feature gradient given an adjoint (the two-pass LGM step) on the kernels."""
    if tile_cap is not None:
        monkeypatch.setattr(kernel, "_TILE_CAP", tile_cap)
    feats, labels, weights, biases, real_grads, backbone_weights = _inputs(seed, n, c, dims, dtype,
                                                                           requires_grad=False)
    shape = f"seed={seed} N={n} C={c} D={dims} {dtype}"
    for m, (f, w, b) in enumerate(zip(feats, weights, biases)):
        sums = kernel.linear_head_grad_sums(f, labels, w, b, backend="triton")
        expected_sums = reference.linear_head_grad_sums(f, labels, w, b)
        for name, got, want in zip(("E^T F", "sum E"), sums, expected_sums):
            assert got.dtype == torch.float32, f"{name} dtype {got.dtype} at {shape}"
            _close(got, want, atol, rtol, f"{name} of backbone {m} at {shape}")
        _, adjoints = reference.grad_cosine_adjoint([(g / n, g_b / n) for g, g_b in [expected_sums]],
                                                    [real_grads[m]], [backbone_weights[m]])
        grad = kernel.grad_cosine_feature_grad(f, labels, w, b, adjoints[0], n, backend="triton")
        expected = reference.grad_cosine_feature_grad(f, labels, w, b, adjoints[0], n)
        assert grad.dtype == torch.float32, f"dL/dF dtype {grad.dtype} at {shape}"
        _close(grad, expected, atol, rtol, f"dL/dF given the adjoint, backbone {m} at {shape}")


def test_auto_falls_back_with_one_warning_where_the_kernel_cannot_run(monkeypatch):
    # on CUDA, auto picks Triton; inputs it cannot take (float64 here) must run the reference, not crash
    from fastdistill.kernels import _utils

    monkeypatch.setattr(_utils, "use_triton", lambda backend, *tensors: backend != "torch")
    _utils._warn_fallback.cache_clear()
    args = _inputs(12, 9, 5, (7,), torch.float64)
    with pytest.warns(UserWarning, match=r"grad_cosine: .*float64.*running the PyTorch path"):
        loss = kernel.grad_cosine_loss(*args, backend="auto")
    torch.testing.assert_close(loss, reference.grad_cosine_loss(*args), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"got torch.float64; use backend='torch'"):
        kernel.grad_cosine_loss(*args, backend="triton")
    monkeypatch.setattr(kernel, "MAX_BLOCK", 4)  # more classes than a softmax row block
    with pytest.warns(UserWarning, match="5 classes exceed the softmax kernels' row cap of 4"):
        kernel.linear_head_grad(args[0][0].detach().float(), args[1], args[2][0].float(), args[3][0].float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n, c, dims", [(512, 1000, (1536,)), (100, 100, (384, 768, 1536)), (512, 10, (768,))])
def test_published_sizes_on_gpu(n, c, dims, dtype, atol, rtol):
    _check_loss_and_grads(10, n, c, dims, dtype, atol, rtol, grad_output=0.5)
