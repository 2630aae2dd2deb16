"""The student training of the published FADRM validation, switch by switch: the per-epoch cosine with its eta,
weight decay on weights only, teachers labelling with BN over half-batches, CutMix, gradient accumulation."""
import copy
import math

import numpy as np
import pytest
import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import Precision
from fastdistill.engine.metric_log import MetricLog, read_history
from fastdistill.eval import student as st
from fastdistill.models import create_backbone

CPU = torch.device("cpu")
PREC = Precision("fp32", CPU)


@pytest.mark.parametrize("final_fraction, eta", [(0.5, 2), (0.0, 1)])
def test_per_epoch_cosine_is_the_published_lambda(final_fraction, eta):
    # the published scheduler (validate/train_fkd.py): LambdaLR(0.5 (1 + cos(pi step / epochs / eta))), stepped after
    # every epoch; here rebuilt with torch's LambdaLR and read once per epoch
    epochs, base = 7, 1e-3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs / eta)))
    want = []
    for _ in range(epochs):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = st.StudentConfig(epochs=epochs, lr=base, final_lr_fraction=final_fraction, lr_schedule="epoch")
    got = st.lr_per_step(cfg, per_epoch=3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64).repeat_interleave(3), rtol=1e-12,
                               atol=0, msg=lambda m: f"lr per step at eta {eta}: {m}")
    step = st.lr_per_step(st.StudentConfig(epochs=epochs, lr=base, final_lr_fraction=final_fraction), per_epoch=3)
    assert len(step.unique()) == 21, "the default cosine moves every step"


def test_weight_decay_on_multi_dimensional_weights_only():
    # the published grouping (validate/utils_validate.py get_parameters): decay where the name holds 'weight' and
    # the tensor has more than one dimension
    net = create_backbone("timm:resnet18", num_classes=10)
    opt = st.student_optimizer(net, st.StudentConfig(lr=1e-3, weight_decay=0.01))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    published = {id(p) for name, p in net.named_parameters() if "weight" in name and p.dim() > 1}
    assert decayed == published and len(decayed) == 21, "conv and fc weights only"
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_teachers_label_with_bn_over_half_batches():
    # as the published relabelling: the teacher in train mode, forwarded on each half of the batch separately
    torch.manual_seed(0)
    teacher = create_backbone("timm:resnet18", num_classes=5).freeze()
    x = torch.rand(10, 3, 16, 16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    got = st.teacher_logits([teacher], x, PREC, bn="half_batch")
    ref = copy.deepcopy(teacher).train()
    with torch.no_grad():
        want = torch.cat([ref(x[:5]), ref(x[5:])])
    torch.testing.assert_close(got, want, msg=lambda m: f"BSSL logits: {m}")
    assert not torch.allclose(got, st.teacher_logits([teacher], x, PREC)), "half-batch BN differs from eval mode"
    assert not teacher.training and all(not m.training for m in teacher.modules()), "the teacher is back in eval"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed while labelling"


def test_cutmix_is_the_published_box():
    # every image k is constant k: after CutMix image k holds perm[k] inside one box shared by the batch; the box
    # and its partners are the published rand_bbox of the same draws (relabel/utils_fkd.py), replayed here
    n, h, w = 6, 12, 20
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()
    out = st.cutmix(x, 1.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    lam = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g))).beta(1.0, 1.0)
    perm = torch.randperm(n, generator=g)
    cy, cx = torch.randint(0, h, (1,), generator=g).item(), torch.randint(0, w, (1,), generator=g).item()
    cut_rat = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut_rat), int(w * cut_rat)
    r1, r2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    c1, c2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    want = x.clone()
    want[:, :, r1:r2, c1:c2] = perm.view(n, 1, 1, 1).float()
    torch.testing.assert_close(out, want, rtol=0, atol=0, msg=lambda m: f"box ({r1}:{r2}, {c1}:{c2}): {m}")
    assert (r2 - r1) * (c2 - c1) > 0 and not torch.equal(out, x), "this draw mixes something"
    assert torch.equal(x[:, 0, 0, 0], torch.arange(n, dtype=torch.float32)), "the input batch is not modified"


def _data(n=12):
    images = torch.randint(0, 255, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return ImageDataset(labels=torch.arange(4).repeat_interleave(n // 4), classes=list("abcd"), images=images)


def test_accumulation_splits_the_forward_and_keeps_the_batch_gradient(monkeypatch):
    # a loader batch of 8 as 2 x 4: the student sees micro-batches of 4 (BN over 4), and for a network without BN
    # the step equals the one-forward step of the whole batch
    sizes = []
    real_create = st.create_backbone

    def create(*args, **kwargs):
        net = real_create(*args, **kwargs)
        net.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]) and None)
        return net

    monkeypatch.setattr(st, "create_backbone", create)
    data = _data()
    common = dict(epochs=1, batch_size=8, lr=1e-2, targets="hard", hflip=False)
    vit = {"img_size": 16, "patch_size": 8}
    one = st.train_student("timm:vit_tiny_patch16_224", data, [], None, (16, 16), st.StudentConfig(**common), CPU,
                           PREC, seed=0, model_kwargs=vit, num_workers=0)
    assert sizes == [8, 4], sizes
    sizes.clear()
    two = st.train_student("timm:vit_tiny_patch16_224", data, [], None, (16, 16),
                           st.StudentConfig(**common, accumulation_steps=2), CPU, PREC, seed=0, model_kwargs=vit,
                           num_workers=0)
    assert sizes == [4, 4, 4], f"micro-batches of batch_size / 2: {sizes}"
    # the loss is the batch mean either way (Adam alone would not see a wrong scale) ...
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-6), (one["first_loss"], two["first_loss"])
    # ... and the two steps move the weights alike. Adam divides by sqrt(v), so float32 rounding of gradients near 0
    # moves a few weights by up to lr / 10; steps on batches of 4 instead move 95 % of them by more than that
    a = torch.cat([v.flatten() for v in one["model"].state_dict().values()])
    b = torch.cat([v.flatten() for v in two["model"].state_dict().values()])
    diff = (a - b).abs()
    assert diff.max() < 1e-3 and diff.mean() < 1e-6, f"weights after accumulation: max {diff.max():.2g}, mean " \
        f"{diff.mean():.2g}"


def test_published_student_training_runs_and_its_errors():
    # all published switches at once, online soft labels from a BN teacher
    teacher = create_backbone("timm:test_resnet", num_classes=4).freeze()
    cfg = st.StudentConfig(epochs=2, batch_size=4, lr=1e-3, accumulation_steps=2, cutmix=1.0, teacher_bn="half_batch",
                           lr_schedule="epoch", crop_scale=(0.08, 1.0))
    r = st.train_student("timm:test_resnet", _data(), [teacher], None, (16, 16), cfg, CPU, PREC, seed=0,
                         num_workers=0)
    assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
    bad = [({"accumulation_steps": 3}, "accumulation_steps must be an integer >= 1 dividing batch_size 4"),
           ({"teacher_bn": "train"}, "teacher_bn must be one of running, half_batch, got 'train'"),
           ({"lr_schedule": "epochs"}, "lr_schedule must be one of step, epoch"),
           ({"cutmix": 1.0, "targets": "hard"}, "cutmix needs soft targets")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            st.check_student_config(st.StudentConfig(**{**cfg.__dict__, **change}))


def test_stored_labels_are_the_half_batch_labels_of_the_mixed_crops(tmp_path):
    # relabel=store replays the training stream: the rows are the BSSL labels of the CutMixed crops the student sees
    from fastdistill.data.loaders import TorchLoader
    from fastdistill.data.soft_labels import SoftLabelShards

    teacher = create_backbone("timm:test_resnet", num_classes=4).freeze()
    cfg = st.StudentConfig(epochs=2, batch_size=6, temperature=4.0, cutmix=1.0, teacher_bn="half_batch")
    data = _data()
    st.store_soft_labels(tmp_path / "s", data, [teacher], (16, 16), cfg, CPU, PREC, seed=3, fmt="fp16", num_workers=0)
    g = torch.Generator().manual_seed(3)
    loader = TorchLoader(data, cfg.batch_size, shuffle=False, num_workers=0)
    want = torch.cat([torch.softmax(st.teacher_logits([teacher], x, PREC, "half_batch") / 4.0, 1)
                      for epoch in range(2) for x, _ in st._batches(loader, (16, 16), cfg, g, CPU, epoch)])
    got = torch.stack([SoftLabelShards(tmp_path / "s")[i] for i in range(len(want))])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0, msg=lambda m: f"stored rows: {m}")


def test_stored_labels_are_reused_only_for_the_same_training(tmp_path, monkeypatch):
    # a resumed student keeps the labels its folder holds for its own seed and training; anything else relabels
    from fastdistill.data.soft_labels import SoftLabelShards

    teacher = create_backbone("timm:test_resnet", num_classes=4).freeze()
    cfg, data, folder = st.StudentConfig(epochs=2, batch_size=6, cutmix=1.0), _data(), tmp_path / "s"

    def store(seed, config=cfg, reuse=True):
        return st.store_soft_labels(folder, data, [teacher], (16, 16), config, CPU, PREC, seed=seed, fmt="fp16",
                                    num_workers=0, reuse=reuse)

    first = store(3)
    rows = SoftLabelShards(folder)[0].clone()
    calls, real = [], st.teacher_logits

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed  # a relabelling pass cut off after its first batch
        return real(*a, **k)

    monkeypatch.setattr(st, "teacher_logits", counted)
    assert store(3) == first and not calls, "the same seed and training: kept, no teacher call"
    with pytest.raises(_Killed):
        store(3, reuse=False)
    assert not (folder / st.STORED).exists(), "a pass cut off leaves no marker"
    monkeypatch.setattr(st, "teacher_logits", real)
    assert store(3) == first, "relabelled after the cut-off pass"
    torch.testing.assert_close(SoftLabelShards(folder)[0], rows, msg="the same rows again")
    store(4)
    assert not torch.equal(SoftLabelShards(folder)[0], rows), "another seed draws other crops: relabelled"
    other = create_backbone("timm:test_resnet", num_classes=4).freeze()
    changes = {"another training (epochs)": {"config": st.StudentConfig(epochs=3, batch_size=6, cutmix=1.0)},
               "other images of the same number": {"data": data.subset(torch.arange(len(data)).flip(0))},
               "another teacher": {"teachers": [other]}}
    for what, change in changes.items():
        monkeypatch.setattr(st, "teacher_logits", real)
        store(4)  # a finished seed-4 pass and its marker
        monkeypatch.setattr(st, "teacher_logits", counted)
        calls.clear()
        with pytest.raises(_Killed):
            st.store_soft_labels(folder, change.get("data", data), change.get("teachers", [teacher]), (16, 16),
                                 change.get("config", cfg), CPU, PREC, seed=4, fmt="fp16", num_workers=0, reuse=True)
        assert calls, f"{what}: relabelled"


class _Killed(Exception):
    pass


class _Out:
    """A run folder's metric history (``RunDir.log``/``rewind`` on a real MetricLog) that can kill the training when
    an epoch is logged; it starts with a record of an earlier phase, as a FADRM run's recovery."""

    def __init__(self, folder, kill_at: int | None = None):
        self.history, self.kill_at = MetricLog(folder), kill_at
        self.history.log("recover", 0, loss=1.0)

    def log(self, phase, step, **values):
        if step == self.kill_at and "train_loss" in values:
            raise _Killed
        self.history.log(phase, step, **values)

    def rewind(self, phase, step):
        self.history.rewind(phase, step)

    def records(self):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_history(self.history.path)]


@pytest.mark.parametrize("stored", [False, True])
def test_a_killed_student_resumes_and_ends_as_an_unbroken_one(stored, tmp_path):
    # the published switches with every random draw they make (crops, CutMix, order); killed after epoch 3's
    # checkpoint (saved at 3 * 3 steps >= 8), resumed from it: the same weights, losses and history
    teacher = create_backbone("timm:test_resnet", num_classes=4).freeze()
    cfg = st.StudentConfig(epochs=6, batch_size=4, lr=1e-2, accumulation_steps=2, cutmix=1.0, teacher_bn="half_batch",
                           lr_schedule="epoch", crop_scale=(0.08, 1.0))
    data = _data()
    labels = None
    if stored:
        labels = tmp_path / "labels"
        st.store_soft_labels(labels, data, [teacher], (16, 16), cfg, CPU, PREC, seed=5, fmt="fp16", num_workers=0)

    def train(out, checkpoint, resume=False, min_s=0, config=cfg):
        return st.train_student("timm:test_resnet", data, [] if stored else [teacher], None, (16, 16), config, CPU,
                                PREC, seed=5, num_workers=0, num_classes=4, stored_labels=labels, out=out,
                                phase="s", checkpoint=checkpoint, checkpoint_every=8, checkpoint_min_s=min_s,
                                resume=resume)

    whole_out = _Out(tmp_path / "whole")
    whole = train(whole_out, tmp_path / "other")
    whole_rng = torch.get_rng_state()
    assert not (tmp_path / "other").exists(), "a finished training leaves no checkpoint"
    cut = _Out(tmp_path / "cut", kill_at=4)
    with pytest.raises(_Killed):
        train(cut, tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (3, 9), "the first epoch end after 8 steps"
    assert cut.records()[-1]["step"] == 3, "epoch 3 was logged after the checkpoint: the resume logs it again"
    cut.kill_at = None
    torch.manual_seed(123)  # the resume restores the RNG streams, whatever ran before it
    resumed = train(cut, tmp_path / "ckpt", resume=True)
    for (k, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after the resume"
    assert resumed["final_loss"] == whole["final_loss"] and resumed["first_loss"] == whole["first_loss"]
    assert torch.equal(torch.get_rng_state(), whole_rng), "the global RNG stream is where the unbroken run left it"
    assert cut.records() == whole_out.records(), "the history reads as one unbroken run"
    # steps due but not the seconds: no checkpoint; the resume starts over and drops what the killed attempt logged
    slow = _Out(tmp_path / "slow_log", kill_at=4)
    with pytest.raises(_Killed):
        train(slow, tmp_path / "slow", min_s=1e9)
    assert not (tmp_path / "slow").exists(), "at most one student checkpoint per checkpoint_min_s"
    slow.kill_at = None
    train(slow, tmp_path / "slow", resume=True, min_s=1e9)
    assert slow.records() == whole_out.records()
    with pytest.raises(_Killed):
        train(_Out(tmp_path / "cut2", kill_at=4), tmp_path / "ckpt")
    changed = st.StudentConfig(**{**cfg.__dict__, "lr": 2e-2})
    with pytest.raises(ValueError, match="student checkpoint in .* was made by another training"):
        train(None, tmp_path / "ckpt", resume=True, config=changed)
