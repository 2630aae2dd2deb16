"""+method=fadrm on the embedded data with a tiny budget: artifacts, baselines by switch, exact resume."""
import json

import pytest
import torch
from PIL import Image

from fastdistill.recipes.fadrm import FADRMRecipe
from fastdistill.api import run
from fastdistill.config import compose

TINY = ["+method=fadrm", "preset=smoke", "ipc=2", "method.stage_sizes=[24,28]", "method.stage_iterations=4",
        "method.candidates_per_class=4", "method.eval.epochs=2", "method.eval.real_random=false",
        "progress=false", "checkpoint_every=0"]


def _cfg(tmp_path, name, *extra):
    return compose([*TINY, f"out={tmp_path / name}", *extra])


def test_fadrm_end_to_end_artifacts(tmp_path):
    metrics = run(_cfg(tmp_path, "run", "method.relabel=store", "method.eval.real_random=true"))
    out = tmp_path / "run"
    assert set(metrics["students"]["timm:resnet18"]) == {"synthetic", "real_random"}
    assert metrics["ipc"] == 2 and metrics["teachers"] == ["timm:resnet18"] and metrics["seconds_per_image"] > 0
    pngs = sorted((out / "distilled").glob("*/*.png"))
    assert len(pngs) == 20 and Image.open(pngs[0]).size == (28, 28)
    from safetensors import safe_open

    with safe_open(str(out / "labels.safetensors"), "pt") as f:
        assert f.get_tensor("logits").shape == (20, 10) and json.loads(f.metadata()["classes"])[3] == "3"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teachers"][0]["classes"] == manifest["classes"], "teacher class order recorded and checked"
    for name in ("preview.png", "profile.json", "config.yaml", "checkpoint.pt"):
        assert (out / name).is_file(), name


def test_recovery_lowers_its_loss(tmp_path):
    # without the random crop and roll the objective is deterministic, so its fall is the optimiser's alone
    recipe = FADRMRecipe(_cfg(tmp_path, "r", "method.stage_iterations=15", "method.crop_scale=[1.0,1.0]",
                              "method.roll=0", "method.stage_sizes=[28,28]"))
    recipe.setup()
    recipe.train()
    assert len(recipe.history) == 2  # one record per batch (ipc 2, one image per class per batch)
    for h in recipe.history.values():
        assert h["loss_last"] < 0.8 * h["loss_first"], f"recovery loss must fall: {h}"
    assert not torch.equal(recipe.images, recipe.patches)


def test_baselines_by_switch(tmp_path):
    rded = FADRMRecipe(_cfg(tmp_path, "rded", "method.variant=rded"))
    rded.setup()
    rded.train()
    assert torch.equal(rded.images, rded.patches), "RDED-style: selected real patches, no optimisation"
    sre2l = FADRMRecipe(_cfg(tmp_path, "sre2l", "method.variant=sre2l"))
    sre2l.setup()
    assert sre2l.sizes == [(28, 28), (28, 28)] and not sre2l.residual and sre2l.init == "noise"
    with pytest.raises(ValueError, match="unknown method.variant 'srel'"):
        FADRMRecipe(_cfg(tmp_path, "bad", "method.variant=srel"))


def test_resume_mid_batch_equals_unbroken_run(tmp_path, monkeypatch):
    full = FADRMRecipe(_cfg(tmp_path, "full", "checkpoint_every=3"))
    full.setup()
    full.train()

    import fastdistill.recipes.fadrm as fadrm

    real_save, calls = fadrm.save_checkpoint, {"n": 0}

    def save_then_die(out_dir, state, **kwargs):
        real_save(out_dir, state, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # inside the first batch, stage 2 (after iterations 3 and 6)
            raise KeyboardInterrupt

    monkeypatch.setattr(fadrm, "save_checkpoint", save_then_die)
    broken = FADRMRecipe(_cfg(tmp_path, "broken", "checkpoint_every=3"))
    broken.setup()
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    monkeypatch.setattr(fadrm, "save_checkpoint", real_save)
    resumed = FADRMRecipe(_cfg(tmp_path, "broken", "checkpoint_every=3", "resume=true"))
    resumed.setup()
    assert resumed.inner is not None and resumed.inner["stage"] == 1
    resumed.train()
    torch.testing.assert_close(resumed.images, full.images, rtol=0, atol=0, msg="resumed synthetic images")


def test_patch_selection_keeps_one_crop_per_source_image(tmp_path):
    # near-full crops, so each selected patch is recognisably the candidate it came from
    recipe = FADRMRecipe(_cfg(tmp_path, "sel", "ipc=3", "method.candidates_per_class=5", "method.crops_per_image=4",
                              "method.candidate_scale=[0.97,1.0]"))
    recipe.setup()
    from fastdistill.data.transforms import to_input

    real = to_input(recipe.train_set.load_all(), recipe.image_size, recipe.channels)
    for c in range(recipe.num_classes):
        pool = real[recipe.train_set.labels == c]
        chosen = recipe.patches[c * 3:(c + 1) * 3]
        source = torch.cdist(chosen.flatten(1), pool.flatten(1)).argmin(1)
        assert source.unique().numel() == 3, f"class {c}: two patches from one source image {source.tolist()}"
    with pytest.raises(ValueError, match="candidate images for 12 patches"):
        FADRMRecipe(_cfg(tmp_path, "few", "ipc=3", "method.patches_per_side=2",
                         "method.candidates_per_class=5")).setup()


def test_whole_image_candidates_are_the_real_images(tmp_path):
    # scale [1, 1] and ratio [1, 1]: every candidate is its real image, untouched (no zoom, no stretch)
    recipe = FADRMRecipe(_cfg(tmp_path, "whole", "ipc=2", "method.candidates_per_class=2", "method.crops_per_image=1",
                              "method.candidate_scale=[1,1]", "method.candidate_ratio=[1,1]"))
    recipe.setup()
    from fastdistill.data.transforms import to_input

    real = to_input(recipe.train_set.load_all(), recipe.image_size, recipe.channels)
    nearest = torch.cdist(recipe.patches.flatten(1), real.flatten(1)).min(1).values
    # (grid_sample of the identity window is exact up to float rounding; another digit is > 3 away)
    assert nearest.max() < 0.02, f"a whole-image candidate differs from every real image by {nearest.max():.3g}"
