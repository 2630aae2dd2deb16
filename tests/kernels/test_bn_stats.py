"""The BN-statistics kernels (Triton forced, TRITON_INTERPRET=1 on CPU; the torch fast path) against losses/."""
import random

import pytest
import torch

from fastdistill.kernels import bn_stats as kernel
from fastdistill.losses import bn_stats as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "torch"]

# Tolerances on dL/dx; atol is relative to the largest reference entry (the gradient scales as 1/M). Half
# precision: both sides compute in fp32 and round once to the input dtype, so they differ by at most 1 ulp
# (2^-10 fp16, 2^-7 bf16; the interpreter rounds bf16 by truncation, which makes the 1 ulp common).
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-5, 2e-3),
    (torch.bfloat16, 1e-5, 1.6e-2),
]
# the loss is fp32 whatever the input dtype: one-pass shifted sums vs two-pass var_mean differ by fp32 rounding
LOSS_ATOL, LOSS_RTOL = 1e-6, 2e-5


def _random_shape(seed):
    rng = random.Random(seed)
    shape = (rng.randint(1, 8), rng.randint(1, 16), rng.randint(1, 9), rng.randint(1, 9))
    return [pytest.param(seed, shape, layout, id=f"random{seed}-{layout}") for layout in ("nchw", "channels_last")]


# (seed, shape, layout); interpreter-sized: N <= 8, C <= 16, H, W <= 9
SHAPES = [
    pytest.param(0, (4, 8, 8, 8), "nchw", id="regular-nchw"),
    pytest.param(0, (4, 8, 8, 8), "channels_last", id="regular-channels_last"),
    # odd: no power of two, no block multiple
    pytest.param(1, (3, 5, 7, 9), "nchw", id="odd-nchw"),
    pytest.param(1, (3, 5, 7, 9), "channels_last", id="odd-channels_last"),
    pytest.param(2, (8, 16), "nc", id="regular-nc"),
    pytest.param(3, (7, 13), "nc", id="odd-nc"),
    *(p for seed in (4, 5, 6) for p in _random_shape(seed)),
]


def _inputs(seed, shape, layout, dtype):
    """Batch mean about 3 and std about 2: far enough from 0 that an unshifted sum of squares would lose digits."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen)).to(dtype)
    running_mean = 3.0 + 0.3 * torch.randn(c, generator=gen)
    running_var = 4.0 + torch.rand(c, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(DEVICE).requires_grad_(), running_mean.to(DEVICE), running_var.to(DEVICE)


def _close(actual, expected, atol, rtol, what):
    scale = expected.detach().float().abs().max().clamp_min(1e-30)
    # one rounding step of the dtype near zero (fp16 subnormals: 2^-24) is resolution, not error (as Liger's tests)
    step = torch.finfo(actual.dtype).smallest_normal * torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(),
                               atol=max(atol * scale.item(), step), rtol=rtol, msg=lambda m: f"{what}: {m}")


def _same_layout(grad, x):
    if x.dim() == 4 and not x.is_contiguous():
        return grad.is_contiguous(memory_format=torch.channels_last)
    return grad.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("seed, shape, layout", SHAPES)
def test_loss_and_grad_match_reference(backend, dtype, atol, rtol, seed, shape, layout, loss_rtol=LOSS_RTOL):
    where = f"seed={seed} shape={shape} layout={layout} {dtype} backend={backend}"
    x, running_mean, running_var = _inputs(seed, shape, layout, dtype)
    # grad_output != 1: a loss weight as r_bn * m_l in FADRM, or a GradScaler's scale
    grad_output = torch.tensor(0.5 + random.Random(seed).random(), device=DEVICE)

    loss = kernel.bn_stats_loss(x, running_mean, running_var, backend=backend)
    expected = reference.bn_stats_loss(x, running_mean, running_var)
    assert loss.dtype == torch.float32 and loss.shape == (), f"loss {loss.dtype} {tuple(loss.shape)} at {where}"
    _close(loss, expected, LOSS_ATOL, loss_rtol, f"loss at {where}")

    (grad,) = torch.autograd.grad(loss, x, grad_outputs=grad_output)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_outputs=grad_output)
    assert grad.dtype == dtype, f"dL/dx dtype {grad.dtype} at {where}"
    assert _same_layout(grad, x), f"dL/dx strides {grad.stride()} for x strides {x.stride()} at {where}"
    _close(grad, expected_grad, atol, rtol, f"dL/dx at {where}, grad_output={grad_output.item():.3f}")


@pytest.mark.parametrize("seed, shape, layout", [(1, (3, 5, 7, 9), "nchw"), (1, (3, 5, 7, 9), "channels_last"),
                                                 (3, (37, 13), "nc")])
def test_triton_small_tiles(monkeypatch, seed, shape, layout):
    """A lowered tile cap makes every grid and loop span several masked blocks at interpreter size: 3-7 channel
    blocks, 6-12 row tiles summed 2 per program (the last split of (37, 13) holds 1), 2-6 partial rows
    reduced up to 4 at a time."""
    monkeypatch.setattr(kernel, "_TILE", 32)
    monkeypatch.setattr(kernel, "_target_programs", lambda device: 20)
    test_loss_and_grad_match_reference("triton", torch.float32, 1e-5, 1e-5, seed, shape, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_saves_only_input_and_channel_vectors(backend, layout):
    """The hook's permute().contiguous() keeps a second copy of every BN input for the backward; these do not."""
    x, running_mean, running_var = _inputs(0, (4, 8, 5, 5), layout, torch.float32)
    loss = kernel.bn_stats_loss(x, running_mean, running_var, backend=backend)
    saved = loss.grad_fn.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].stride() == x.stride(), f"x copied ({layout})"
    assert all(t.numel() <= 2 * x.shape[1] for t in saved[1:]), f"saved {[tuple(t.shape) for t in saved]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matched_statistics_give_finite_zero_gradient(backend):
    """Both norms exactly 0 (constant channels equal to the running mean, running variance 0): grad 0, not NaN."""
    running_mean = torch.tensor([0.5, -0.25, 2.0], device=DEVICE)
    x = running_mean.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous().requires_grad_()
    loss = kernel.bn_stats_loss(x, running_mean, torch.zeros(3, device=DEVICE), backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0, f"loss {loss.item()} at matched statistics"
    assert torch.isfinite(grad).all() and (grad == 0).all(), f"dL/dx {grad.flatten()[:4]} at matched statistics"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_matched_term_gives_finite_gradient(backend):
    """Mean term exactly 0, variance term not: the gradient is the variance term's alone, as in the reference."""
    running_mean = torch.tensor([0.5, -0.25, 2.0], device=DEVICE)
    x = running_mean.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous().requires_grad_()
    running_var = torch.ones(3, device=DEVICE)
    (grad,) = torch.autograd.grad(kernel.bn_stats_loss(x, running_mean, running_var, backend=backend), x)
    (expected,) = torch.autograd.grad(reference.bn_stats_loss(x, running_mean, running_var), x)
    assert torch.isfinite(grad).all(), f"dL/dx not finite with one matched term ({backend})"
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0, msg=lambda m: f"dL/dx, one matched term: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, c",
    [((2, 3, 4), 3), ((2, 3, 4, 4, 4), 3), ((2, 4, 5, 5), 3), ((4,), 4), ((0, 3, 2, 2), 3)],
    ids=["3d", "5d", "channels", "1d", "empty"],
)
def test_bad_shapes_raise_one_line_error(backend, shape, c):
    x = torch.randn(shape, device=DEVICE)
    stats = torch.zeros(c, device=DEVICE)
    with pytest.raises(ValueError, match=r"^bn_stats: x must [^\n]*got x \(") as info:
        kernel.bn_stats_loss(x, stats, stats, backend=backend)
    assert str(tuple(shape)) in str(info.value)


def test_unknown_backend_is_rejected():
    x = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernel.bn_stats_loss(x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), backend="cuda")


def test_auto_falls_back_with_one_warning_where_the_kernel_cannot_run(monkeypatch):
    # on CUDA, auto picks Triton; float64 inputs must run the torch path (fp32 sums would lose their precision)
    from fastdistill.kernels import _utils

    monkeypatch.setattr(_utils, "use_triton", lambda backend, *tensors: backend != "torch")
    _utils._warn_fallback.cache_clear()
    x, running_mean, running_var = _inputs(8, (3, 4, 5, 5), "nchw", torch.float64)
    with pytest.warns(UserWarning, match=r"bn_stats: .*got torch.float64; running the PyTorch path"):
        loss = kernel.bn_stats_loss(x, running_mean, running_var, backend="auto")
    torch.testing.assert_close(loss, kernel.bn_stats_loss(x, running_mean, running_var, backend="torch"), atol=0,
                               rtol=0)
    with pytest.raises(ValueError, match=r"got torch.float64; use backend='torch'"):
        kernel.bn_stats_loss(x, running_mean, running_var, backend="triton")


# ImageNet normalisation: the valid range of each channel is ((0 - mean) / std, (1 - mean) / std)
_MEAN, _STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
BOUNDS = [
    pytest.param(-_MEAN / _STD, (1 - _MEAN) / _STD, id="per-channel"),
    pytest.param(-0.8, 0.9, id="float"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lo, hi", BOUNDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_arc_update_matches_reference(backend, lo, hi, layout, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(7)
    x = (1.5 * torch.randn(3, 3, 7, 9, generator=gen)).to(dtype)
    patches = (1.5 * torch.randn(3, 3, 7, 9, generator=gen)).to(dtype)
    if layout == "channels_last":
        x, patches = x.to(memory_format=torch.channels_last), patches.to(memory_format=torch.channels_last)
    x, patches = x.to(DEVICE), patches.to(DEVICE)
    lo, hi = (b.to(DEVICE) if isinstance(b, torch.Tensor) else b for b in (lo, hi))
    where = f"shape={tuple(x.shape)} layout={layout} {dtype} backend={backend}"

    expected = reference.arc_update(x, patches, 0.5, lo, hi)
    out = kernel.arc_update(x, patches, 0.5, lo, hi, backend=backend)
    assert out.dtype == dtype, f"arc_update dtype {out.dtype} at {where}"
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=rtol, msg=lambda m: f"arc_update at {where}: {m}")

    in_place = x.clone()
    result = kernel.arc_update(in_place, patches, 0.5, lo, hi, out=in_place, backend=backend)
    assert result is in_place, f"out=x did not return x at {where}"
    torch.testing.assert_close(in_place, expected, atol=1e-6, rtol=rtol, msg=lambda m: f"in-place arc at {where}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_arc_update_small_blocks(monkeypatch, layout):
    """Several programs, the last one masked (567 elements in blocks of 64)."""
    monkeypatch.setattr(kernel, "_ARC_BLOCK", 64)
    test_arc_update_matches_reference("triton", -_MEAN / _STD, (1 - _MEAN) / _STD, layout, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arc_update_rejects_unresampled_patches(backend):
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^arc_update: patches must be resampled to x's shape"):
        kernel.arc_update(x, torch.randn(2, 3, 4, 4, device=DEVICE), 0.5, -1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"^arc_update: lo must be a float or a \(3,\) tensor"):
        kernel.arc_update(x, x, 0.5, torch.zeros(2, device=DEVICE), 1.0, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(100, 64, 112, 112), (100, 512, 7, 7), (256, 2048)], ids=str)
def test_large_shapes_on_gpu(dtype, atol, rtol, layout, shape):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4 dims")
    # fp32 sums over up to 1.25 M values per channel, in a different order from var_mean's
    test_loss_and_grad_match_reference("triton", dtype, atol, rtol, 11, shape, layout, loss_rtol=1e-4)
