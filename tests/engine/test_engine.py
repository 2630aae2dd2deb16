import pytest
import torch

from fastdistill.engine import (Precision, load_checkpoint, resolve_device, resume_checkpoint, save_checkpoint,
                                seed_everything)
from fastdistill.engine.compile import should_compile
from fastdistill.engine.schedules import cosine_schedule


def test_cosine_schedule_warmup_and_end():
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=2)
    assert s.numel() == 10
    torch.testing.assert_close(s[:3], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert s[-1] > 0.1 and torch.all(s[2:].diff() <= 0)
    with pytest.raises(ValueError, match="at least one step"):
        cosine_schedule(1.0, 0.0, 0)


def test_checkpoint_restores_rng(tmp_path):
    seed_everything(3)
    torch.rand(5)
    save_checkpoint(tmp_path, {"step": 7, "x": torch.ones(2)})
    expected = torch.rand(4)
    torch.rand(100)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 7 and torch.equal(state["x"], torch.ones(2))
    torch.testing.assert_close(torch.rand(4), expected, msg="RNG state after resume")
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temp file"
    assert load_checkpoint(tmp_path / "empty") is None


def test_resume_checkpoint_checks_presence_and_config(tmp_path):
    save_checkpoint(tmp_path, {"step": 2, "config": {"lr": 0.1}})
    assert resume_checkpoint(tmp_path, {"lr": 0.1})["step"] == 2
    with pytest.raises(ValueError, match="made with another config"):
        resume_checkpoint(tmp_path, {"lr": 0.2})
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt"):
        resume_checkpoint(tmp_path / "empty", {"lr": 0.1})


def test_fp16_scaler_skips_non_finite_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    prec = Precision("fp16", torch.device("cpu"))
    assert prec.scaler.is_enabled()
    prec.backward((p * torch.tensor([1.0, float("inf"), 1.0])).sum())
    prec.step(opt)
    assert torch.equal(p.detach(), torch.ones(3)), "an inf gradient must skip the step"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        Precision("fp8", torch.device("cpu"))


def test_bf16_autocast_on_cpu():
    with Precision("bf16", torch.device("cpu")).autocast():
        y = torch.nn.Linear(4, 4)(torch.rand(2, 4))
    assert y.dtype == torch.bfloat16


def test_device_and_compile_choices():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    assert not should_compile("auto", torch.device("cpu")) and should_compile("auto", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be"):
        should_compile("sometimes", torch.device("cpu"))


def test_per_tensor_clipping_scales_each_gradient_on_its_own():
    # DINO's published clipping: each parameter's gradient to norm 3, not the norm of all gradients together
    from fastdistill.engine.precision import clip_each_tensor

    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([6.0, 0.0, 0.0, 0.0]), torch.tensor([0.6, 0.8, 0.0])
    clip_each_tensor([big, small], 3.0)
    torch.testing.assert_close(big.grad, torch.tensor([3.0, 0.0, 0.0, 0.0]), msg="norm 6 -> 3")
    torch.testing.assert_close(small.grad, torch.tensor([0.6, 0.8, 0.0]), msg="norm 1 stays")
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    for p in params:
        p.grad = torch.tensor([3.0, 4.0])
    precision = Precision("fp32", torch.device("cpu"))
    optimizer = torch.optim.SGD(params, lr=0.0)
    precision.step(optimizer, 5.0, params, clip_scope="global")  # global norm sqrt(50) > 5: both scaled
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 4.0]) * 5 / 50**0.5)
    with pytest.raises(ValueError, match="unknown clip scope 'layer'; expected global or tensor"):
        precision.step(optimizer, 5.0, params, clip_scope="layer")
