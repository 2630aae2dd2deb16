"""+method=fadrm on the embedded data with a tiny budget: artifacts, baselines by switch, exact resume, the set
on disk equal to the in-memory recovery."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdistill.artifacts import read_distilled
from fastdistill.data.transforms import random_resized_crop, to_input
from fastdistill.engine import seed_everything
from fastdistill.engine.metric_log import read_history
from fastdistill.recipes.fadrm import FADRMRecipe
from fastdistill.api import run
from fastdistill.config import compose

TINY = ["+method=fadrm", "preset=smoke", "ipc=2", "method.stage_sizes=[24,28]", "method.stage_iterations=4",
        "method.candidates_per_class=4", "method.eval.epochs=2", "method.eval.real_random=false",
        "progress=false", "checkpoint_every=0"]


def _cfg(tmp_path, name, *extra):
    return compose([*TINY, f"out={tmp_path / name}", *extra])


def test_fadrm_end_to_end_artifacts(tmp_path):
    metrics = run(_cfg(tmp_path, "run", "method.relabel=store", "method.eval.real_random=true",
                       "method.log_every=3"))
    out = tmp_path / "run"
    assert set(metrics["students"]["timm:resnet18"]) == {"synthetic", "real_random"}
    assert metrics["ipc"] == 2 and metrics["teachers"] == ["timm:resnet18"] and metrics["seconds_per_image"] > 0
    pngs = sorted((out / "distilled").glob("*/*.png"))
    assert len(pngs) == 20 and Image.open(pngs[0]).size == (28, 28)
    from safetensors import safe_open

    shards = sorted((out / "labels").glob("*.safetensors"))
    assert len(shards) == 2, "one soft-label file per recovery batch"
    with safe_open(str(shards[1]), "pt") as f:
        assert f.get_tensor("logits").shape == (10, 10) and json.loads(f.metadata()["classes"])[3] == "3"
        assert f.get_tensor("index").tolist() == [2 * c + 1 for c in range(10)], "batch 1: ipc index 1 of each class"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teachers"][0]["classes"] == manifest["classes"], "teacher class order recorded and checked"
    for name in ("preview.png", "profile.json", "config.yaml", "checkpoint.pt", "curves.png"):
        assert (out / name).is_file(), name
    # the metric history: recovery loss every log_every (3) of a batch's 8 iterations, each student's epochs
    history = read_history(out / "metrics.jsonl")
    recover = [(r["step"], r["batch"]) for r in history if r["phase"] == "recover"]
    assert recover == [(3, 0), (6, 0), (8, 0), (11, 1), (14, 1), (16, 1)], recover
    for name in ("synthetic", "real_random"):
        student = [r for r in history if r["phase"] == f"student/timm:resnet18/{name}/0"]
        assert [r["step"] for r in student] == [0, 1, 2] and "train_loss" in student[0]
        assert student[-1]["test_acc"] == metrics["students"]["timm:resnet18"][name]
    assert history[-1]["phase"] == "final" and history[-1]["metrics"]["students"] == metrics["students"]


def test_recovery_lowers_its_loss(tmp_path):
    # without the random crop and roll the objective is deterministic, so its fall is the optimiser's alone
    recipe = FADRMRecipe(_cfg(tmp_path, "r", "method.stage_iterations=15", "method.crop_scale=[1.0,1.0]",
                              "method.roll=0", "method.stage_sizes=[28,28]"))
    recipe.setup()
    recipe.train()
    assert len(recipe.history) == 2  # one record per batch (ipc 2, one image per class per batch)
    for h in recipe.history.values():
        assert h["loss_last"] < 0.8 * h["loss_first"], f"recovery loss must fall: {h}"
    assert not torch.equal(_saved(tmp_path / "r"), _rounded_patches(recipe))


def _saved(out) -> torch.Tensor:
    """The set on disk, uint8 (N, C, H, W), class-major."""
    ds = read_distilled(out, [str(d) for d in range(10)], 1)
    return ds.take(torch.arange(len(ds)))


def _rounded_patches(recipe) -> torch.Tensor:
    """Every batch's starting patches, rounded as a saved set is, class-major."""
    n, ipc = recipe.n_images, recipe.cfg.ipc
    out = torch.zeros(n, recipe.channels, *recipe.image_size, dtype=torch.uint8)
    for b in range(len(recipe.batches)):
        out[recipe.batch_index(b)] = (recipe.batch_patches(b).cpu() * 255).round().to(torch.uint8)
    assert n == ipc * recipe.num_classes
    return out


def test_baselines_by_switch(tmp_path):
    rded = FADRMRecipe(_cfg(tmp_path, "rded", "method.variant=rded"))
    rded.setup()
    rded.train()
    assert torch.equal(_saved(tmp_path / "rded"), _rounded_patches(rded)), \
        "RDED-style: selected real patches, no optimisation"
    sre2l = FADRMRecipe(_cfg(tmp_path, "sre2l", "method.variant=sre2l"))
    sre2l.setup()
    assert sre2l.sizes == [(28, 28), (28, 28)] and not sre2l.residual and sre2l.init == "noise"
    with pytest.raises(ValueError, match="unknown method.variant 'srel'"):
        FADRMRecipe(_cfg(tmp_path, "bad", "method.variant=srel"))


@pytest.mark.parametrize("parallel", [1, 2])
def test_resume_mid_batch_equals_unbroken_run(tmp_path, monkeypatch, parallel):
    side = f"method.parallel_batches={parallel}"  # 2: both batches side by side, killed and resumed as a group
    full = FADRMRecipe(_cfg(tmp_path, "full", "checkpoint_every=3", side))
    full.out.write_config(full.cfg)  # as main() does: opens the run's metric history
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
    broken = FADRMRecipe(_cfg(tmp_path, "broken", "checkpoint_every=3", side))
    broken.out.write_config(broken.cfg)
    broken.setup()
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    monkeypatch.setattr(fadrm, "save_checkpoint", real_save)
    resumed = FADRMRecipe(_cfg(tmp_path, "broken", "checkpoint_every=3", "resume=true", side))
    resumed.out.write_config(resumed.cfg)
    resumed.setup()
    assert resumed.inner is not None and resumed.inner["stage"] == 1
    assert resumed.recover_before > 0, "the recovery time before the kill counts in seconds_per_image"
    resumed.train()
    torch.testing.assert_close(_saved(tmp_path / "broken"), _saved(tmp_path / "full"), rtol=0, atol=0,
                               msg="resumed synthetic images")
    # one continuous history, the iterations before the kill included
    logged = [[(r["step"], r["loss"]) for r in read_history(tmp_path / d / "metrics.jsonl") if r["phase"] == "recover"]
              for d in ("full", "broken")]
    assert [s for s, _ in logged[0]] == [8, 16] and logged[1] == logged[0]
    assert resumed.history == full.history


def test_resume_trains_only_the_missing_students(tmp_path, monkeypatch):
    full = run(_cfg(tmp_path, "s", "method.eval.seeds=2"))
    assert not (tmp_path / "s" / "students").exists(), "finished students leave no checkpoint"
    done = json.loads((tmp_path / "s" / "students_done.json").read_text())
    assert sorted(done) == ["timm:resnet18/synthetic/0", "timm:resnet18/synthetic/1"]
    del done["timm:resnet18/synthetic/1"]  # as if killed while the second seed trained
    (tmp_path / "s" / "students_done.json").write_text(json.dumps(done))

    import fastdistill.recipes.fadrm as fadrm

    real_train, seeds = fadrm.train_student, []

    def counted(*args, **kwargs):
        seeds.append(kwargs["seed"])
        # a student cut off mid-training continues from its own checkpoint (tests/eval/test_student.py)
        assert kwargs["checkpoint"] == tmp_path / "s" / "students" / "timm_resnet18_synthetic_1" and kwargs["resume"]
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fadrm, "train_student", counted)
    history = read_history(tmp_path / "s" / "metrics.jsonl")
    resumed = run(_cfg(tmp_path, "s", "method.eval.seeds=2", "resume=true"))
    assert seeds == [1], "only the student that had not finished is trained again"
    assert resumed["student_seeds"] == full["student_seeds"], "the same seeds give the same accuracies"
    # the recovery's and the first student's records stay, the second's are logged once more: one unbroken history
    again = read_history(tmp_path / "s" / "metrics.jsonl")
    drop = ("time", "metrics")  # the final record's metrics hold the run's wall times
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in history]


@pytest.mark.parametrize("variant", ["fadrm", "sre2l"])
def test_batches_side_by_side_recover_the_same_images_in_float64(tmp_path, variant):
    # in float64 the side-by-side recovery is the one-at-a-time recovery to rounding (in fp32 Adam turns the
    # rounding of a larger batch's convolutions into steps on pixels whose gradient is ~0, as any change would)
    recipe = FADRMRecipe(_cfg(tmp_path, variant, "ipc=3", f"method.variant={variant}", "method.parallel_batches=2"))
    recipe.setup()
    assert recipe.recovery_groups([0, 1, 2]) == [[0, 1], [2]], "up to 2 consecutive batches of one size"
    recipe.teachers = [t.double() for t in recipe.teachers]

    def start(b):
        seed_everything(recipe.batch_seed(b))
        return recipe.batch_patches(b).double(), torch.Generator().manual_seed(recipe.batch_seed(b))
    alone, history = [], {}
    for b in (0, 1):
        patches, g = start(b)
        alone.append(recipe.recover_batches([b], patches, [g], _NoBar(), None))
        history[b] = dict(recipe.history[b])
    (p0, g0), (p1, g1) = start(0), start(1)
    together = recipe.recover_batches([0, 1], torch.cat([p0, p1]), [g0, g1], _NoBar(), None)
    assert together.dtype == torch.float64
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-9)
    for b in (0, 1):
        for key in ("loss_first", "loss_last"):
            assert recipe.history[b][key] == pytest.approx(history[b][key], rel=1e-10), (b, key)


def test_patch_selection_keeps_one_crop_per_source_image(tmp_path):
    # near-full crops, so each selected patch is recognisably the candidate it came from
    recipe = FADRMRecipe(_cfg(tmp_path, "sel", "ipc=3", "method.candidates_per_class=5", "method.crops_per_image=4",
                              "method.candidate_scale=[0.97,1.0]"))
    recipe.setup()
    real = to_input(recipe.train_set.images, recipe.image_size, recipe.channels)
    for c in range(recipe.num_classes):
        pool = real[recipe.train_set.labels == c]
        chosen = recipe.class_patches(c, [0, 1, 2])
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
    real = to_input(recipe.train_set.images, recipe.image_size, recipe.channels)
    patches = torch.cat([recipe.class_patches(c, [0, 1]) for c in range(recipe.num_classes)])
    nearest = torch.cdist(patches.flatten(1), real.flatten(1)).min(1).values
    # (grid_sample of the identity window is exact up to float rounding; another digit is > 3 away)
    assert nearest.max() < 0.02, f"a whole-image candidate differs from every real image by {nearest.max():.3g}"


def _in_memory_patches(recipe) -> torch.Tensor:
    """The patch selection as fastdistill ran it before the set moved to disk: every candidate of a class decoded
    and all its crops held at once, all classes' patches in one tensor, class-major ([0, 1] (N, C, H, W))."""
    m, ipc, f = recipe.cfg.method, recipe.cfg.ipc, recipe.cfg.method.patches_per_side
    need, (h, w) = ipc * f * f, recipe.image_size
    g = torch.Generator().manual_seed(recipe.cfg.seed)
    out = []
    for c in range(recipe.num_classes):
        idx = (recipe.train_set.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)[:m.candidates_per_class]]
        real = to_input(recipe.train_set.images[idx], recipe.image_size, recipe.channels)
        crops = torch.stack([random_resized_crop(real, (h, w), scale=tuple(m.candidate_scale),
                                                 ratio=tuple(m.candidate_ratio), generator=g)
                             for _ in range(m.crops_per_image)], 1)
        flat = crops.flatten(0, 1)
        with torch.no_grad():
            logits = torch.cat([recipe.teachers[0](flat[i:i + 256]) for i in range(0, len(flat), 256)])
        ce, best_crop = F.cross_entropy(logits, torch.full((len(flat),), c), reduction="none").view(
            crops.shape[:2]).min(1)
        keep = ce.argsort()[:need]
        best = crops[keep, best_crop[keep]]
        if f > 1:
            ph, pw = h // f, w // f
            best = F.interpolate(best, size=(ph, pw), mode="bilinear", antialias=True, align_corners=False)
            best = best.view(ipc, f, f, recipe.channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
            best = F.interpolate(best.reshape(ipc, recipe.channels, f * ph, f * pw), size=(h, w), mode="bilinear",
                                 align_corners=False)
        out.append(best)
    return torch.cat(out)


@pytest.mark.parametrize("factor", [1, 2])
def test_set_on_disk_equals_the_in_memory_recovery(tmp_path, factor):
    # the set recovered batch by batch into PNGs, patches rebuilt from their sources, equals the recovery of the
    # in-memory path (all patches selected up front, all images in one tensor), pixel for pixel; checked on this
    # change against the previous commit's runs as well (identical PNGs at factor 1 and 2)
    extra = ["method.candidates_per_class=8", f"method.patches_per_side={factor}"]
    streamed = FADRMRecipe(_cfg(tmp_path, "disk", *extra))
    streamed.setup()
    streamed.train()
    ref = FADRMRecipe(_cfg(tmp_path, "memory", *extra))
    ref.setup()
    patches = _in_memory_patches(ref)
    images = torch.zeros_like(patches)
    for b in range(len(ref.batches)):
        index = ref.batch_index(b)
        images[index] = ref.recover_batches([b], patches[index], [torch.Generator().manual_seed(ref.batch_seed(b))],
                                            _NoBar(), None)
    expected = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    np.testing.assert_array_equal(_saved(tmp_path / "disk").numpy(), expected.numpy())


class _NoBar:
    def update(self, *args, **kwargs):
        pass


def test_batch_size_splits_classes_and_keeps_per_batch_seeds(tmp_path):
    recipe = FADRMRecipe(_cfg(tmp_path, "bs", "method.batch_size=4"))
    recipe.setup()
    assert [(k, list(c)) for k, c in recipe.batches][:4] == [(0, [0, 1, 2, 3]), (0, [4, 5, 6, 7]), (0, [8, 9]),
                                                              (1, [0, 1, 2, 3])]
    recipe.train()
    assert len(recipe.history) == 6 and len(list((tmp_path / "bs" / "distilled").glob("*/*.png"))) == 20
    with pytest.raises(ValueError, match="method.batch_size must be an integer >= 1"):
        FADRMRecipe(_cfg(tmp_path, "bad", "method.batch_size=0"))


def test_student_seeds_report_mean_and_spread(tmp_path):
    """method.eval.seeds=2: every seed trains on the set (and a new random-real draw), students holds the means,
    student_seeds each seed and the std; seed 0 is the one-seed run's student."""
    small = ["method.eval.students=[timm:test_resnet]", "method.eval.epochs=1", "method.eval.real_random=true"]
    two = run(_cfg(tmp_path, "two", *small, "method.eval.seeds=2"))
    one = run(_cfg(tmp_path, "one", *small))
    runs = two["student_seeds"]["timm:test_resnet"]
    for name in ("synthetic", "real_random"):
        accs = runs[name]["per_seed"]
        assert len(accs) == 2 and two["students"]["timm:test_resnet"][name] == pytest.approx(sum(accs) / 2)
        assert runs[name]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
        assert accs[0] == one["students"]["timm:test_resnet"][name], f"{name}: seed 0 is the one-seed run"
    assert "student_seeds" not in one
