"""+method=kd_clip on the embedded data with a tiny budget: end to end with gen=folder, CP pairs each generated image
with its source, the KD loss falls, exact resume, and one-line errors. The teacher is a random-init ResNet-10t with a
10-class head (a feature teacher needs no training to test the plumbing; the trained teacher is the README's run)."""
import json

import pytest
import torch

from fastdistill.data import build_dataset
from fastdistill import make_augmented
from fastdistill.data.generated import read_folder
from fastdistill.data.transforms import to_input
from fastdistill.recipes.kd_clip import KDClipRecipe
from fastdistill.api import run
from fastdistill.config import compose

TINY = ["+method=kd_clip", "preset=smoke", "method.teacher=timm:resnet10t", "method.teacher_weights=none",
        "+method.teacher_kwargs.num_classes=10", "method.real_per_class=2", "method.kd.epochs=2",
        "method.finetune.epochs=1", "method.baseline.epochs=1", "method.kd.batch_size=16",
        "method.finetune.batch_size=16", "method.baseline.batch_size=16", "method.baseline.cache=false",
        "progress=false", "checkpoint_every=0"]


def _cfg(tmp_path, name, *extra):
    return compose([*TINY, f"out={tmp_path / name}", *extra])


@pytest.fixture(scope="module")
def gen_folder(tmp_path_factory):
    """A gen=folder of 2 augmented variants of each of the student's real images (seed 0), sources recorded, written
    by ``python -m fastdistill.make_augmented``."""
    train = build_dataset(compose(TINY).data)["train"]
    ids = train.real_subset(2, 0)
    root = tmp_path_factory.mktemp("gen") / "aug"
    make_augmented.main(["--out", str(root), "--per-image", "2", "--real-per-class", "2", "--seed", "0"])
    gen = read_folder(root, train.classes, tuple(train.image_size), train.channels)
    rows = torch.tensor([ids.tolist().index(int(i)) for i in gen.source_ids()])
    return root, ids, gen.load(), rows


def test_end_to_end_gen_folder_cp(tmp_path, gen_folder):
    root, ids, _, _ = gen_folder
    metrics = run(_cfg(tmp_path, "run", "method.gen.mode=folder", f"method.gen.folder={root}",
                       "method.kd.objective=cp"))
    assert set(metrics["student"]) == {"kd", "baseline"}
    assert all(0.0 <= a <= 1.0 for a in metrics["student"].values())
    assert metrics["objective"] == "cp" and metrics["gen"] == "folder"
    assert metrics["images"] == {"real": 20, "generated": 40, "kd_stage": 60}
    out = tmp_path / "run"
    for name in ("config.yaml", "manifest.json", "profile.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["student"] == metrics["student"]
    assert json.loads((out / "manifest.json").read_text())["real_ids"] == ids.tolist()
    stages = [h["stage"] for h in metrics["history"]]
    assert stages == ["kd", "kd", "finetune", "baseline"]


def test_cp_pairs_each_generated_image_with_its_source(tmp_path, gen_folder):
    root, ids, images, rows = gen_folder
    recipe = KDClipRecipe(_cfg(tmp_path, "cp", "method.gen.mode=folder", f"method.gen.folder={root}",
                               "method.kd.objective=cp"))
    recipe.setup()
    assert torch.equal(recipe.real_ids, ids)
    # the KD set is the real images, then the generated ones; a real image is its own source
    n_real = ids.numel()
    assert torch.equal(recipe.kd_source[:n_real], torch.arange(n_real))
    assert torch.equal(recipe.kd_source[n_real:], rows), "generated image k was made from real image rows[k]"
    assert torch.equal(recipe.kd_set.images[n_real:], images)
    # the CP target of every generated image is the teacher's embedding of its source real image (never its own)
    real = to_input(recipe.train_set.load_all()[ids], recipe.image_size)
    with torch.no_grad():
        source_emb = recipe.teacher.embed(to_input(real, recipe.teacher_size, 3))
        own_emb = recipe.teacher.embed(to_input(to_input(images, recipe.image_size), recipe.teacher_size, 3))
    targets = recipe.cached[recipe.kd_source[n_real:]]
    torch.testing.assert_close(targets, source_emb[rows], msg=lambda m: f"CP targets: {m}")
    assert not torch.allclose(targets, own_emb, atol=1e-3), "the teacher must not embed the generated images"


def test_kd_loss_falls_with_cached_targets(tmp_path):
    recipe = KDClipRecipe(_cfg(tmp_path, "fd", "method.kd.epochs=8", "method.crop_scale=[1.0,1.0]",
                               "method.kd.lr=0.02", "method.finetune.epochs=0", "method.baseline.epochs=0"))
    recipe.setup()
    recipe.train()
    kd = [h["loss"] for h in recipe.history if h["stage"] == "kd"]
    assert kd[-1] < 0.7 * kd[0], f"FD loss must fall: {kd}"


def test_resume_equals_unbroken_run(tmp_path, monkeypatch):
    extra = ("method.kd.objective=ld", "method.kd.teacher_targets=online", "checkpoint_every=1")
    full = KDClipRecipe(_cfg(tmp_path, "full", *extra))
    full.setup()
    full.train()

    import fastdistill.recipes.kd_clip as kd_clip

    real_save, calls = kd_clip.save_checkpoint, {"n": 0}

    def save_then_die(out_dir, state):
        real_save(out_dir, state)
        calls["n"] += 1
        if calls["n"] == 4:  # steps 1, 2, end of epoch 0, then step 3: inside the second KD epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(kd_clip, "save_checkpoint", save_then_die)
    broken = KDClipRecipe(_cfg(tmp_path, "broken", *extra))
    broken.setup()
    with pytest.raises(KeyboardInterrupt):
        broken.train()
    monkeypatch.setattr(kd_clip, "save_checkpoint", real_save)
    resumed = KDClipRecipe(_cfg(tmp_path, "broken", *extra, "resume=true"))
    resumed.setup()
    assert (resumed.stage, resumed.position.step) == ("kd", 3)
    resumed.train()
    assert resumed.results == full.results
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for name, p in full.student.model.state_dict().items():
        torch.testing.assert_close(resumed.student.model.state_dict()[name], p, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("extra,exc,match", [
    (["method.kd.objective=xd"], ValueError, "unknown method.kd.objective 'xd'; expected one of fd, ld, cp"),
    (["method.kd.objective=cp", "method.gen.mode=cls2img"], ValueError, "gen=cls2img images come from prompts"),
    (["method.gen.mode=gan"], ValueError, "unknown method.gen.mode 'gan'"),
    (["method.gen.mode=img2img"], ValueError, "gen=img2img needs method.gen.pipeline=/path/to/a/diffusers"),
    (["method.student=open_clip:RN50"], ValueError, "method.student must be a timm backbone"),
    (["method.teacher=keras:vgg"], ValueError, "unknown backbone source 'keras'"),
])
def test_bad_config_fails_before_work(tmp_path, extra, exc, match):
    with pytest.raises(exc, match=match):
        KDClipRecipe(_cfg(tmp_path, "bad", *extra))


def test_bad_generation_input_fails_in_setup(tmp_path, gen_folder):
    root, _, _, _ = gen_folder
    # the same folder for a student with other real images: its sources would leak real data
    with pytest.raises(ValueError, match="not among the student's real images"):
        KDClipRecipe(_cfg(tmp_path, "leak", "method.gen.mode=folder", f"method.gen.folder={root}", "seed=1")).setup()
    with pytest.raises(FileNotFoundError, match="generated-image folder '/no/such/dir' does not exist"):
        KDClipRecipe(_cfg(tmp_path, "nf", "method.gen.mode=folder", "method.gen.folder=/no/such/dir")).setup()
    with pytest.raises(ValueError, match="gen=folder needs method.gen.folder"):
        KDClipRecipe(_cfg(tmp_path, "nofolder", "method.gen.mode=folder")).setup()
    with pytest.raises(ValueError, match="objective=ld needs class logits"):
        KDClipRecipe(_cfg(tmp_path, "ld", "method.kd.objective=ld", "method.teacher_kwargs.num_classes=0")).setup()
