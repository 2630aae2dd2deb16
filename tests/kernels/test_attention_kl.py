"""The fused attention-KL kernel (Triton forced, TRITON_INTERPRET=1 on CPU) and its blockwise torch form against the
float64 reference in losses/."""
import random

import pytest
import torch

from fastdistill.kernels import attention_kl as kernel
from fastdistill.losses import attention_kl as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# atol is relative to the largest reference entry. Half precision rounds Q and K (2^-11 fp16, 2^-8 bf16 relative),
# which moves scores of size |q||k|/sqrt(D) ~ 1 by about that much.
DTYPES = [
    (torch.float32, 1e-5, 1e-4),
    (torch.float16, 5e-3, 2e-2),
    (torch.bfloat16, 3e-2, 6e-2),
]


def _random_shape(seed):
    rng = random.Random(seed)
    return pytest.param(seed, rng.randint(1, 2), rng.randint(1, 4), rng.randint(2, 70), rng.randint(4, 40),
                        rng.randint(4, 40), id=f"random{seed}")


# (seed, B, H, L tokens, D_t, D_s); the kernel's tiles are lowered to 16 so that L crosses several masked blocks
SHAPES = [
    pytest.param(0, 2, 3, 32, 16, 16, id="regular"),
    pytest.param(1, 1, 2, 50, 24, 40, id="odd"),  # ViT-Tiny at 28 px / patch 4: 49 patches + CLS; D_t != D_s
    *(_random_shape(seed) for seed in (2, 3, 4)),
]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setattr(kernel, "_BLOCK_M", 16)
    monkeypatch.setattr(kernel, "_BLOCK_N", 16)


def _inputs(seed, b, h, n, d_t, d_s, dtype):
    gen = torch.Generator().manual_seed(seed)
    # teacher scores sharper than the student's (scale 2): peaked rows, as a trained teacher's
    q_t, k_t = (2 * torch.randn(b, h, n, d_t, generator=gen) for _ in range(2))
    q_s, k_s = (torch.randn(b, h, n, d_s, generator=gen) for _ in range(2))
    return [t.to(DEVICE, dtype) for t in (q_t, k_t, q_s, k_s)]


def _close(actual, expected, atol, rtol, what):
    scale = expected.detach().abs().max().clamp_min(1e-30).item()
    # one rounding step of the dtype near zero (fp16 subnormals: 2^-24) is resolution, not error (as Liger's tests)
    step = torch.finfo(actual.dtype).smallest_normal * torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=max(atol * scale, step),
                               rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check(backend, seed, b, h, n, d_t, d_s, dtype, atol, rtol, grad_output=1.0):
    q_t, k_t, q_s, k_s = _inputs(seed, b, h, n, d_t, d_s, dtype)
    q_s.requires_grad_()
    k_s.requires_grad_()
    shape = f"backend={backend} seed={seed} B={b} H={h} L={n} D_t={d_t} D_s={d_s} {dtype}"
    loss = kernel.attention_kl(q_t, k_t, q_s, k_s, backend=backend)
    # the reference at float64 on the same (rounded) inputs
    exact = [t.detach().double().requires_grad_(i >= 2) for i, t in enumerate((q_t, k_t, q_s, k_s))]
    expected = reference.attention_kl(*exact)
    assert loss.dtype == torch.float32, f"loss dtype {loss.dtype} at {shape}"
    _close(loss, expected, atol, rtol, f"loss at {shape}")
    g = torch.tensor(grad_output, device=DEVICE)
    dq, dk = torch.autograd.grad(loss, [q_s, k_s], grad_outputs=g)
    edq, edk = torch.autograd.grad(expected, exact[2:], grad_outputs=g.double())
    assert dq.dtype == dk.dtype == dtype, f"gradient dtypes {dq.dtype}, {dk.dtype} at {shape}"
    _close(dq, edq, atol, rtol, f"dL/dQ_s at {shape}, grad_output={grad_output}")
    _close(dk, edk, atol, rtol, f"dL/dK_s at {shape}, grad_output={grad_output}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed, b, h, n, d_t, d_s", SHAPES)
def test_triton_loss_and_grads_match_float64_reference(seed, b, h, n, d_t, d_s, dtype, atol, rtol):
    _check("triton", seed, b, h, n, d_t, d_s, dtype, atol, rtol)


@pytest.mark.parametrize("seed, b, h, n, d_t, d_s", SHAPES[:3])
def test_blockwise_torch_form_matches_float64_reference(seed, b, h, n, d_t, d_s, monkeypatch):
    monkeypatch.setattr(kernel, "_TORCH_BLOCK", 16)  # several query blocks, the last one partial
    _check("torch", seed, b, h, n, d_t, d_s, torch.float32, 1e-5, 1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_output_scales_the_gradients(backend):
    _check(backend, 5, 1, 2, 21, 8, 8, torch.float32, 1e-5, 1e-4, grad_output=-2.5)


def test_identical_maps_give_zero_loss_and_gradient():
    q, k = _inputs(6, 1, 2, 19, 16, 16, torch.float32)[:2]
    q_s, k_s = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = kernel.attention_kl(q, k, q_s, k_s, backend="triton")
    dq, dk = torch.autograd.grad(loss, [q_s, k_s])
    torch.testing.assert_close(loss, torch.zeros((), device=DEVICE), atol=1e-6, rtol=0, msg="KL(A || A)")
    torch.testing.assert_close(dq, torch.zeros_like(dq), atol=1e-7, rtol=0, msg="dQ_s at A_s = A_t")
    torch.testing.assert_close(dk, torch.zeros_like(dk), atol=1e-7, rtol=0, msg="dK_s at A_s = A_t")


def test_teacher_gets_no_gradient_and_only_the_needed_side_is_computed():
    q_t, k_t, q_s, k_s = _inputs(7, 1, 1, 17, 8, 8, torch.float32)
    q_t.requires_grad_()
    k_s.requires_grad_()
    loss = kernel.attention_kl(q_t, k_t, q_s, k_s, backend="triton")
    (dk,) = torch.autograd.grad(loss, [k_s])
    exact = [t.detach().double() for t in (q_t, k_t, q_s)] + [k_s.detach().double().requires_grad_()]
    (edk,) = torch.autograd.grad(reference.attention_kl(*exact), exact[3:])
    _close(dk, edk, 1e-5, 1e-4, "dL/dK_s with Q_s constant")
    assert q_t.grad is None


def test_reference_equals_kl_of_materialised_probability_maps():
    """An independent form: softmax maps, then sum A_t log(A_t / A_s), worked out with F.kl_div."""
    q_t, k_t, q_s, k_s = (t.double() for t in _inputs(8, 2, 3, 11, 5, 7, torch.float32))
    a_t = (q_t @ k_t.transpose(-2, -1) / 5**0.5).softmax(-1)
    log_s = (q_s @ k_s.transpose(-2, -1) / 7**0.5).log_softmax(-1)
    expected = torch.nn.functional.kl_div(log_s.flatten(0, 2), a_t.flatten(0, 2), reduction="batchmean")
    torch.testing.assert_close(reference.attention_kl(q_t, k_t, q_s, k_s), expected, msg="reference vs F.kl_div")
    torch.testing.assert_close(reference.attention_kl_probs(a_t, log_s.exp()), expected, msg="probability form")


def test_bad_inputs_are_one_line_errors():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"teacher and student need the same non-empty \(B, H, L\)"):
        kernel.attention_kl(q, q, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    with pytest.raises(ValueError, match=r"q_s must be \(B, H, L, D\)"):
        kernel.attention_kl(q, q, torch.randn(2, 5, 4), q)
    with pytest.raises(ValueError, match="head dim 300 exceeds the kernel's cap of 128; use backend='torch'"):
        big = torch.randn(1, 1, 4, 300)
        kernel.attention_kl(big, big, big, big, backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernel.attention_kl(q, q, q, q, backend="cuda")


def test_auto_falls_back_with_one_warning_where_the_kernel_cannot_run(monkeypatch):
    # on CUDA, auto picks Triton; inputs it cannot take (a head dim over the cap, float64) run the torch form
    from fastdistill.kernels import _utils

    monkeypatch.setattr(_utils, "use_triton", lambda backend, *tensors: backend != "torch")
    _utils._warn_fallback.cache_clear()
    for d, dtype, reason in ((136, torch.float32, "head dim 136 exceeds"), (8, torch.float64, "got torch.float64")):
        q_t, k_t, q_s, k_s = (t.to(dtype) for t in _inputs(9, 1, 1, 6, d, d, torch.float32))
        with pytest.warns(UserWarning, match=f"attention_kl: .*{reason}.*running the PyTorch path"):
            loss = kernel.attention_kl(q_t, k_t, q_s, k_s, backend="auto")
        torch.testing.assert_close(loss, kernel.attention_kl(q_t, k_t, q_s, k_s, backend="torch"), atol=0, rtol=0)


def test_fp16_gradients_are_scaled_before_rounding():
    # near-identical maps give dQ_s, dK_s below fp16's smallest normal number, as the 1 / (B H L) of the mean does
    # at published sizes; a GradScaler's 2^16 brings them back only if it multiplies before the rounding
    scale = 2.0**16
    q_t, k_t, q_s, k_s = _inputs(10, 2, 2, 40, 16, 16, torch.float32)
    gen = torch.Generator().manual_seed(11)
    q_s = (q_t + 0.001 * torch.randn(q_t.shape, generator=gen).to(DEVICE)).half().requires_grad_()
    k_s = (k_t + 0.001 * torch.randn(k_t.shape, generator=gen).to(DEVICE)).half().requires_grad_()
    q_t, k_t = q_t.half(), k_t.half()
    loss = kernel.attention_kl(q_t, k_t, q_s, k_s, backend="triton")
    dq, dk = torch.autograd.grad(loss, [q_s, k_s], grad_outputs=torch.tensor(scale, device=DEVICE))
    exact = [t.detach().double().requires_grad_(i >= 2) for i, t in enumerate((q_t, k_t, q_s, k_s))]
    edq, edk = torch.autograd.grad(reference.attention_kl(*exact) * scale, exact[2:])
    for name, got, want in (("dQ_s", dq, edq), ("dK_s", dk, edk)):
        unscaled = want.abs().max().item() / scale
        assert unscaled < torch.finfo(torch.float16).smallest_normal, f"{name} up to {unscaled:.2e} is not subnormal"
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < 2e-3, f"scaled fp16 {name} off the float64 reference by {error:.2e} (rounded before scaling?)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n", [197, 577, 1025])
def test_published_sizes_on_gpu(n, dtype, atol, rtol, monkeypatch):
    """ViT-B/16 at 224, 384 and 512 px (12 heads of 64), at the kernel's own 64 x 64 tiles and dot precision."""
    monkeypatch.setattr(kernel, "_BLOCK_M", 64)
    monkeypatch.setattr(kernel, "_BLOCK_N", 64)
    _check("triton", 12, 2, 12, n, 64, 64, dtype, atol, rtol, grad_output=0.5)
