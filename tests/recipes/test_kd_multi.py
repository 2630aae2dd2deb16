"""+method=kd_multi end to end on the embedded data with 1-block ViTs: artifacts, loss terms, teacher adaptation,
fused vs eager attention KL, resume, cached teacher training, bad input."""
import json
from pathlib import Path

import pytest
import torch

from fastdistill.recipes import get_recipe, kd_multi
from fastdistill.teachers import CARD, ensure_trained, training_config
from fastdistill.api import run
from fastdistill.config import compose

VIT = "timm:vit_tiny_patch16_224"
TINY = "{img_size: 28, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 3}"
# 450 training digits per class leave 50 per class (500) for the test split; the student sees 10 per class
SMALL = ["+method=kd_multi", "preset=smoke", f"model={VIT}", f"++method.model_kwargs={TINY}",
         "data.train_per_class=450", "method.train_per_class=10", "method.epochs=2", "method.batch_size=25", "method.lambda_attention=0.5",
         "method.attention.distance_images=20", "progress=false"]


def _teachers(cl="none", mim="none", mim_kwargs=TINY):
    return [f"method.teachers.cl.weights={cl}", f"++method.teachers.cl.model_kwargs={TINY}",
            f"method.teachers.mim.weights={mim}", f"++method.teachers.mim.model_kwargs={mim_kwargs}"]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A 1-block ViT trained for one epoch on 200 digits by +method=teacher through kd_multi's cache."""
    cfg = compose([*SMALL, "data.train_per_class=20"])
    overrides = ["method.optimizer._target_=torch.optim.AdamW", "~method.optimizer.momentum",
                 "~method.optimizer.nesterov", "method.optimizer.lr=1e-3"]
    kwargs = {"img_size": 28, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3}
    train = get_recipe("teacher").main
    folder = ensure_trained(train, training_config("teacher", VIT, "smoke", cfg, overrides, kwargs))
    again = ensure_trained(train, training_config("teacher", VIT, "smoke", cfg, overrides, kwargs))
    return folder, again


def test_trained_teacher_is_cached_by_config(trained_teacher):
    folder, again = trained_teacher
    assert (folder / CARD).is_file() and (folder / "model.safetensors").is_file()
    assert again == folder
    assert json.loads((folder / CARD).read_text())["model_kwargs"]["depth"] == 1


def test_kd_multi_end_to_end_writes_metrics_and_every_loss_term(tmp_path, trained_teacher):
    folder, _ = trained_teacher
    # the MIM teacher has patch 7 (a 4x4 grid): its queries and keys are resampled onto the student's 7x7 grid
    mim_kwargs = "{img_size: 28, patch_size: 7, depth: 1, embed_dim: 48, num_heads: 3}"
    cfg = compose([*SMALL, *_teachers(cl=str(folder), mim="none", mim_kwargs=mim_kwargs), f"out={tmp_path / 'a'}"])
    metrics = run(cfg)
    out = tmp_path / "a"
    for name in ("config.yaml", "manifest.json", "metrics.json", "profile.json", "checkpoint.pt",
                 "attention_student_kd.png", "attention_teacher_cl.png", "attention_teacher_mim.png",
                 "attention_distance.json", "attention_distance.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["student"]) == {"kd", "baseline"} and set(saved["teachers"]) == {"cl", "mim"}
    assert saved["train_images"] == 100
    kd = metrics["history"]["kd"]
    assert set(kd[0]) == {"epoch", "loss", "ce_s", "ce_cl", "ce_mim", "kd", "attn"}
    assert set(metrics["history"]["baseline"][0]) == {"epoch", "loss", "ce_s"}
    for epoch in kd:
        assert all(torch.isfinite(torch.tensor(v)) for v in epoch.values()), epoch
    # one head per teacher chosen per KD step: 2 epochs x 4 steps
    for role in ("cl", "mim"):
        assert sum(saved["teachers"][role]["chosen_heads"]) == 8
    # the trained CL teacher loaded its card's weights: its head starts from the card's accuracy, not chance
    assert saved["teachers"]["cl"]["pretrained_card_acc"] is not None
    profile = json.loads((out / "profile.json").read_text())
    assert profile["phases"]["baseline"]["images"] == profile["phases"]["kd"]["images"] == 200


def test_dino_and_mae_teachers_are_trained_and_loaded(tmp_path):
    """The published pairing through kd_multi's cache: CL from +method=dino, MIM from +method=mae (1-block ViTs,
    one epoch on 200 digits); each KD teacher starts from the backbone its SSL run saved."""
    from safetensors.torch import load_file

    ssl = "{img_size: 28, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 3, dynamic_img_size: true}"
    cfg = compose([*SMALL, "data.train_per_class=20", f"out={tmp_path / 'kd'}",
                   "method.teachers.cl.weights=trained", "method.teachers.cl.recipe=dino",
                   f"++method.teachers.cl.model_kwargs={ssl}", "method.teachers.cl.overrides=['method.crops.num_local=1']",
                   "method.teachers.mim.weights=trained", "method.teachers.mim.recipe=mae",
                   f"++method.teachers.mim.model_kwargs={ssl}", "method.teachers.mim.overrides=[]"])
    recipe = kd_multi.KDMultiRecipe(cfg)
    recipe.setup()
    for role, name in (("cl", "dino"), ("mim", "mae")):
        info = recipe.teacher_info[role]
        folder = Path(info["source"])
        assert info["recipe"] == name and folder.parent.name == name and (folder / CARD).is_file()
        saved = load_file(str(folder / "model.safetensors"))
        mine = recipe.teachers[role].state_dict()
        shared = [k for k in saved if k.startswith("blocks.")]
        assert shared, f"{name}: no transformer blocks in {sorted(saved)[:5]}"
        for k in shared:
            assert any(torch.equal(saved[k], v) for mk, v in mine.items() if mk.endswith(k)), f"{name}: {k} not loaded"


def _recipe(tmp_path, *extra):
    cfg = compose([*SMALL, *_teachers(), f"out={tmp_path}", *extra])
    recipe = kd_multi.KDMultiRecipe(cfg)
    recipe.setup()
    recipe.start_stage("kd")
    return recipe


def _kd_step(recipe, x, y):
    torch.manual_seed(0)
    return recipe.train_step(x, y)


def test_fused_and_eager_attention_kl_give_the_same_step(tmp_path):
    x, y = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), torch.arange(6) % 10
    fused = _recipe(tmp_path / "f", "method.fused_attention_kl=true")
    eager = _recipe(tmp_path / "e", "method.fused_attention_kl=false")
    a, b = _kd_step(fused, x, y), _kd_step(eager, x, y)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"term {k}")
    for (name, p), q in zip(fused.student.named_parameters(), eager.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"student {name} after one step")


DEIT = ["method.augment.randaugment=rand-m9-mstd0.5-inc1", "method.augment.random_erasing=0.25",
        "method.augment.mixup=0.8", "method.augment.cutmix=1.0", "method.interpolation=bicubic",
        "method.lr_reference_batch=512", "method.min_lr=1e-5", "method.batch_size=24",
        "+method.model_kwargs.drop_path_rate=0.1", "method.model_kwargs.depth=2"]  # depth 1 would get rate 0


def test_deit_recipe_switches_reach_the_training_step(tmp_path, monkeypatch):
    from timm.layers import DropPath

    off = _recipe(tmp_path / "off")
    assert off.randaugment is None and off.batch_augment.erase is None and not off.batch_augment.mixes
    recipe = _recipe(tmp_path / "on", *DEIT)
    m = recipe.cfg.method
    peak = m.optimizer.lr * 24 / 512
    assert recipe.lr.max() == pytest.approx(peak), "DeiT's lr: given per 512 images, scaled to the batch"
    assert recipe.lr.min() >= 1e-5 and recipe.lr[-1] < 1e-5 + 0.05 * peak, "cosine down to min_lr, not to 0"
    assert len(recipe.loader) == 100 // 24, "Mixup / CutMix: the odd last batch is dropped, as DeiT drops it"
    rates = [l.drop_prob for l in recipe.student.modules() if isinstance(l, DropPath)]
    assert rates and all(r > 0 for r in rates), "drop-path on the student"
    assert not any(isinstance(l, DropPath) and l.drop_prob > 0 for net in recipe.teachers.values()
                   for l in net.modules()), "no drop-path in the teachers"
    targets = []
    real_ce = recipe.cross_entropy
    monkeypatch.setattr(recipe, "cross_entropy", lambda logits, y: targets.append(y) or real_ce(logits, y))
    x, y = torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8), torch.arange(24) % 10
    terms = _kd_step(recipe, x, y)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert len(targets) == 3 and all(t.shape == (24, 10) for t in targets), "every CE takes the mixed soft targets"
    torch.testing.assert_close(targets[0].sum(1), torch.ones(24), msg="soft targets are distributions")


@pytest.mark.parametrize("rule", ["none", "timm"])
def test_weight_decay_filter_spares_biases_norms_and_tokens(tmp_path, rule):
    # zero gradients: AdamW's step is then weight decay alone, p <- p (1 - lr wd), on the decayed parameters only
    recipe = _recipe(tmp_path, f"method.weight_decay_filter={rule}", "method.adaptation=partial1")
    nets = {"student": recipe.student.model, "mim": recipe.teachers["mim"].model}
    before = {(n, k): p.detach().clone() for n, net in nets.items() for k, p in net.named_parameters()}
    for group in recipe.optimizer.param_groups:
        group["lr"] = 0.1
    for p in recipe.params:
        p.grad = torch.zeros_like(p)
    recipe.optimizer.step()
    wd = recipe.cfg.method.optimizer.weight_decay
    for (n, k), p0 in before.items():
        p = dict(nets[n].named_parameters())[k]
        if not p.requires_grad:
            torch.testing.assert_close(p, p0, rtol=0, atol=0, msg=f"{n} {k} is frozen")
        elif rule == "timm" and (p.ndim <= 1 or k in ("pos_embed", "cls_token")):  # biases, norms, tokens
            torch.testing.assert_close(p, p0, rtol=0, atol=0, msg=f"{n} {k}: no weight decay")
        else:
            torch.testing.assert_close(p, p0 * (1 - 0.1 * wd), msg=f"{n} {k}: decayed")
    decayed = {k for (n, k), p0 in before.items() if n == "student" and
               not torch.equal(p0, dict(nets[n].named_parameters())[k])}
    assert ("pos_embed" in decayed) == (rule == "none") and "blocks.0.attn.qkv.weight" in decayed


def test_repeated_augmentation_feeds_each_image_three_times(tmp_path):
    recipe = _recipe(tmp_path, "method.repeated_augmentation=3", "method.batch_size=24")
    x, y = next(iter(recipe.loader.epoch(0)))
    torch.testing.assert_close(x.view(8, 3, *x.shape[1:]), x[::3, None].expand(8, 3, *x.shape[1:]), rtol=0, atol=0,
                               msg="three copies of each image in a row, augmented later on the device")
    assert len(recipe.loader) == 100 // 24 + 1, "an epoch keeps its length"
    augmented = recipe._augment(x)
    assert not torch.equal(augmented[0], augmented[1]), "each copy gets its own crop"


def test_paper_student_is_vit_tiny_normalised_as_deit():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from fastdistill.models import create_backbone

    cfg = compose(["+method=kd_multi", "preset=paper"])
    deit = create_backbone(cfg.model, pretrained="none", num_classes=10, **cfg.method.model_kwargs)
    vit = create_backbone(VIT, pretrained="none", num_classes=10, **cfg.method.model_kwargs)
    assert str(deit.model) == str(vit.model), "DeiT-Ti is timm's ViT-Tiny/16"
    assert (deit.spec.mean, deit.spec.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "DeiT's Normalize"
    assert vit.spec.mean == (0.5, 0.5, 0.5), "the ViT spec would normalise otherwise"
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(deit.normalize(x), (x - mean) / std, msg="student input")


def test_test_images_are_decoded_again_with_the_test_interpolation(tmp_path):
    from fastdistill.data.dataset import read_image
    from fastdistill.data.rehearsal import write_jpeg_folder

    folder = write_jpeg_folder(tmp_path / "data", classes=2, per_class=3, test_per_class=2, sizes=(30, 50))
    args = [*(a for a in SMALL if not a.startswith("data.")), *_teachers(), "data=imagefolder", f"data.root={folder}",
            "data.image_size=28", "data.cache=true", "method.train_per_class=3", "method.batch_size=6"]

    def test_set(name, *extra):
        recipe = kd_multi.KDMultiRecipe(compose([*args, f"out={tmp_path / name}", *extra]))
        recipe.setup()
        return recipe.test_set

    cached = test_set("a")
    assert cached.images is not None, "bilinear: the cached split as it is"
    test = test_set("b", "method.test_interpolation=bicubic")
    assert test.images is None and test.interpolation == "bicubic" and test.crop_pct == 0.875
    torch.testing.assert_close(test[0][0], read_image(test.paths[0], (28, 28), 3, 0.875, interpolation="bicubic"),
                               rtol=0, atol=0, msg="test image decoded with the bicubic resize")
    assert not torch.equal(test[0][0], cached[0][0]), "bicubic and bilinear test images differ"


@pytest.mark.parametrize("adaptation, changed, frozen", [
    ("linear", ["head.weight"], ["blocks.0.attn.qkv.weight", "norm.weight"]),
    ("partial1", ["head.weight", "blocks.0.attn.qkv.weight", "norm.weight"], ["patch_embed.proj.weight"]),
])
def test_teacher_adaptation_trains_only_its_part(tmp_path, adaptation, changed, frozen):
    recipe = _recipe(tmp_path, f"method.adaptation={adaptation}")
    teacher = recipe.teachers["mim"].model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _kd_step(recipe, torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), torch.arange(5))
    after = teacher.state_dict()
    for k in changed:
        assert not torch.equal(before[k], after[k]), f"{adaptation}: {k} must be trained"
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{adaptation}: {k} must stay frozen"


def test_resume_after_interruption_equals_unbroken_run(tmp_path, monkeypatch):
    args = [*SMALL, *_teachers(), "checkpoint_every=3"]
    full = run(compose([*args, f"out={tmp_path / 'full'}"]))
    real_save = kd_multi.save_checkpoint
    calls = {"n": 0}

    def save_then_die(out_dir, state):
        real_save(out_dir, state)
        calls["n"] += 1
        if state["stage"] == "kd" and state["position"]["step"] == 3:  # mid-epoch 0 of the KD stage
            raise KeyboardInterrupt

    monkeypatch.setattr(kd_multi, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(compose([*args, f"out={tmp_path / 'broken'}"]))
    monkeypatch.setattr(kd_multi, "save_checkpoint", real_save)
    resumed = run(compose([*args, f"out={tmp_path / 'broken'}", "resume=true"]))
    assert resumed["history"] == full["history"], "loss history differs after resume"
    assert resumed["student"] == full["student"] and resumed["teachers"] == full["teachers"]


@pytest.mark.parametrize("override, error, match", [
    ("method.adaptation=partial2", ValueError, "unknown method.adaptation 'partial2'"),
    ("method.lambda_output=1.5", ValueError, r"method.lambda_output must be in \[0, 1\]"),
    ("method.teachers.cl.weights=/nonexistent/dino.safetensors", FileNotFoundError,
     "method.teachers.cl.weights '/nonexistent/dino.safetensors' not found"),
    ("method.teachers.mim.recipe=mea", ValueError, "method.teachers.mim.recipe 'mea' is not a method"),
    ("method.student_heads=[0,5]", ValueError, r"must index the student's 3 heads"),
    ("method.augment.mixup=0.8", ValueError, "method.batch_size 25 must be even with Mixup / CutMix"),
    ("method.augment.randaugment=autoaug", ValueError, "must be a timm RandAugment policy"),
    ("method.interpolation=nearest", ValueError, "unknown method.interpolation 'nearest'"),
    ("method.repeated_augmentation=0", ValueError, "method.repeated_augmentation must be an integer >= 1"),
    ("loader=ffcv method.repeated_augmentation=3", ValueError, "needs loader=torch"),
    ("method.test_interpolation=nearest", ValueError, "unknown method.test_interpolation 'nearest'"),
    ("method.weight_decay_filter=deit", ValueError, "unknown method.weight_decay_filter 'deit'"),
    ("method.lr_reference_batch=0", ValueError, "method.lr_reference_batch must be an integer >= 1 or null"),
    ("method.teachers.cl.model=timm:resnet18 method.teachers.cl.model_kwargs=null", ValueError,
     "is not a ViT with qkv attention"),
])
def test_bad_input_is_one_line(tmp_path, override, error, match):
    teachers = _teachers() if "recipe" not in override else _teachers()[:2] + ["method.teachers.mim.weights=trained"]
    with pytest.raises(error, match=match):
        run(compose([*SMALL, *teachers, f"out={tmp_path}", *override.split()]))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_preset_kd_student_beats_the_student_alone(tmp_path):
    """The README's claim: the default preset (teachers trained and cached first: about 15 minutes on 2 idle cores)."""
    metrics = run(compose(["+method=kd_multi", "preset=default", "progress=false", f"out={tmp_path}"]))
    assert metrics["student"]["kd"] > metrics["student"]["baseline"] + 0.02, metrics["student"]
