"""Every recipe and probe on an image folder streamed from disk: no code path decodes a whole split.

A small ImageNet-shaped folder (50 classes x 4 JPEGs of mixed sizes) with ``data.cache=false``; ``load_all`` raises,
and so does any single read of a whole split, while FADRM (recovery, selection, students), LGM (real batches,
probe), ``+method=evaluate``, the k-NN / linear probes, DINO and kd_clip run on it.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.rehearsal import write_jpeg_folder
from fastdistill.api import run
from fastdistill.config import compose

DATA = ["data=imagefolder", "data.image_size=32", "data.cache=false", "progress=false", "checkpoint_every=0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("in50"), classes=50, per_class=4, sizes=(40, 80))


@pytest.fixture(autouse=True)
def no_whole_split(monkeypatch):
    def refuse(self):
        raise AssertionError(f"load_all() on {self.name!r} ({len(self)} images): a whole split decoded")

    take = ImageDataset.take

    def bounded_take(self, index, seeds=None):
        if self.paths is not None and len(self) > 100 and len(index) >= len(self):
            raise AssertionError(f"take() of all {len(self)} images of {self.name!r}: a whole split decoded")
        return take(self, index, seeds)

    monkeypatch.setattr(ImageDataset, "load_all", refuse)
    monkeypatch.setattr(ImageDataset, "take", bounded_take)


def _cfg(folder, *args):
    return compose([*args, *DATA, f"data.root={folder}"])


def test_fadrm_then_evaluate_stream(folder, tmp_path):
    out = tmp_path / "fadrm"
    metrics = run(_cfg(folder, "+method=fadrm", "preset=smoke", "ipc=1", "method.teacher_weights=none",
                       "method.teacher_calibration=2", "method.candidates_per_class=3", "method.crops_per_image=2",
                       "method.stage_sizes=[32]", "method.stage_iterations=2", "method.batch_size=25", "method.roll=2",
                       "method.relabel=store", "method.eval.epochs=1", "method.eval.students=[timm:resnet18]",
                       f"out={out}"))
    assert len(list((out / "distilled").glob("*/*.png"))) == 50 and len(list((out / "labels").glob("*"))) == 2
    assert set(metrics["students"]["timm:resnet18"]) == {"synthetic", "real_random"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teachers"][0]["bn_calibration_batches"] == 2
    ev = run(_cfg(folder, "+method=evaluate", f"distilled={out}", "eval.backbone=timm:test_byobnet",
                  "eval.pretrained=none", "eval.runs=1", "eval.epochs=1", "eval.full=true", "eval.full_epochs=1",
                  f"out={tmp_path / 'eval'}"))
    assert ev["images"] == 50 and set(ev["eval"]) == {"backbone", "synthetic", "real_random", "full"}


def test_lgm_streams_its_real_batches(folder, tmp_path):
    metrics = run(_cfg(folder, "+method=lgm", "preset=smoke", "method.backbones=[timm:test_resnet]",
                       "method.backbone_pretrained=none", "method.backbone_weights=1.0", "method.iterations=2",
                       "method.augs_per_batch=2", "method.real_crop=random",
                       "method.init=real", "eval.backbone=timm:test_byobnet", "eval.pretrained=none", "eval.runs=1",
                       "eval.epochs=1", "eval.full=true", "eval.full_epochs=1", f"out={tmp_path / 'lgm'}"))
    assert metrics["iterations"] == 2 and 0.0 <= metrics["eval"]["full"]["mean"] <= 1.0


def test_lgm_random_real_crop_is_new_per_draw_and_the_same_on_every_rank(folder, tmp_path):
    from fastdistill.recipes.lgm import LGMRecipe

    cfg = _cfg(folder, "+method=lgm", "preset=smoke", "method.backbones=[timm:test_resnet]",
               "method.backbone_pretrained=none", "method.backbone_weights=1.0", "method.real_crop=random",
               "eval.backbone=timm:test_byobnet", "eval.pretrained=none", f"out={tmp_path / 'lgm'}")
    recipe = LGMRecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    n = 12
    batch, _ = recipe.real_batch(n)
    x = batch[:]
    half, _ = recipe.real_batch(n, slice(5, n))  # another rank's slice of the same step
    torch.testing.assert_close(half[:], x[5:], msg="a rank's slice decodes the crops of the whole batch")
    torch.testing.assert_close(torch.cat([batch[:5], batch[5:]]), x, msg="chunks decode the same crops")
    same = batch.index
    step0 = recipe.real_set.take(same, batch.seeds)
    recipe.step = 1
    step1 = recipe.real_set.take(same, recipe.real_batch(n)[0].seeds)
    moved = [not torch.equal(a, b) for a, b in zip(step0, step1)]
    assert sum(moved) > n // 2, "the same images drawn at another step are cropped at new positions"


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_probes_stream(folder, kind):
    from fastdistill.data import build_dataset
    from fastdistill.engine import Precision
    from fastdistill.eval.knn import probe_accuracy
    from fastdistill.models import create_backbone

    cfg = _cfg(folder, "+method=evaluate", "distilled=unused")
    splits = build_dataset(cfg.data)
    assert splits["train"].paths is not None and splits["train"].images is None
    p = OmegaConf.create({"kind": kind, "k": 5, "temperature": 0.07, "epochs": 1, "lr": 0.1, "batch_size": 64,
                          "crop_scale": [0.5, 1.0], "hflip": True})
    torch.manual_seed(0)
    net = create_backbone("timm:test_resnet", pretrained="none").freeze()
    cpu = torch.device("cpu")
    acc = probe_accuracy(net, splits["train"], splits["test"], p, (32, 32), cpu, Precision("fp32", cpu), seed=0)
    assert 0.0 <= acc <= 1.0


def test_teacher_crops_files_as_it_decodes(folder, tmp_path):
    from fastdistill.recipes.teacher import TeacherRecipe

    cfg = _cfg(folder, "+method=teacher", "preset=smoke", "model=timm:test_resnet", "method.epochs=1",
               "method.batch_size=50", "method.cache=false", f"out={tmp_path / 'teacher'}")
    recipe = TeacherRecipe(cfg)
    recipe.setup()
    assert not recipe.crop_on_device and recipe.loader.dataset.train_crop is not None
    recipe.train()
    assert len(recipe.history) == 1 and torch.isfinite(torch.tensor(recipe.history[0]["train_loss"]))


VIT32 = "{img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}"


def test_mae_crops_files_as_it_decodes_bicubic(folder, tmp_path):
    from fastdistill.recipes.mae import MAERecipe

    cfg = _cfg(folder, "+method=mae", "preset=smoke", "model=timm:vit_tiny_patch16_224",
               f"++method.model_kwargs={VIT32}", "method.epochs=1", "method.batch_size=50", f"out={tmp_path / 'mae'}")
    recipe = MAERecipe(cfg)
    recipe.setup()
    crop = recipe.loader.dataset.train_crop
    assert not recipe.crop_on_device and crop.interpolation == "bicubic" and crop.scale == (0.2, 1.0)
    recipe.train()
    assert len(recipe.history) == 1 and torch.isfinite(torch.tensor(recipe.history[0]["train_loss"]))


def test_kd_multi_student_crops_files_as_it_decodes(folder, tmp_path):
    from fastdistill.recipes.kd_multi import KDMultiRecipe

    vit = [f"++method.model_kwargs={VIT32}", "method.teachers.cl.weights=none", "method.teachers.mim.weights=none",
           f"++method.teachers.cl.model_kwargs={VIT32}", f"++method.teachers.mim.model_kwargs={VIT32}"]
    cfg = _cfg(folder, "+method=kd_multi", "preset=smoke", "model=timm:vit_tiny_patch16_224", *vit,
               "method.train_per_class=2", "method.epochs=1", "method.batch_size=50", f"out={tmp_path / 'kd'}")
    recipe = KDMultiRecipe(cfg)
    recipe.setup()
    assert not recipe.crop_on_device and recipe.loader.dataset.train_crop is not None
    x, _ = next(iter(recipe.loader.epoch(0)))
    assert recipe._augment(x).shape[-2:] == (32, 32)


def test_dino_takes_its_views_from_each_file_as_it_decodes(folder, tmp_path):
    from fastdistill.eval.ssl_run import finish_ssl_run
    from fastdistill.recipes.dino import DINORecipe

    vit = "{img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, dynamic_img_size: true}"
    cfg = _cfg(folder, "+method=dino", "preset=smoke", "model=timm:vit_tiny_patch16_224", f"++method.model_kwargs={vit}",
               "method.crops.local_size=16", "method.batch_size=50", "method.head.out_dim=64",
               "method.head.hidden_dim=32", "method.head.bottleneck_dim=16", "method.attention.distance_images=20", "method.attention.object_threshold=null",
               f"out={tmp_path / 'dino'}")
    recipe = DINORecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    crops = recipe.loader.dataset.train_crop
    assert not recipe.crop_on_device and [c.size for c in crops] == [(32, 32)] * 2 + [(16, 16)] * 2
    assert all(c.interpolation == "bicubic" for c in crops) and [c.scale for c in crops] == \
        [(0.5, 1.0)] * 2 + [(0.2, 0.5)] * 2, crops
    views, _ = next(iter(recipe.loader.epoch(0)))
    assert [tuple(v.shape) for v in views] == [(50, 3, 32, 32)] * 2 + [(50, 3, 16, 16)] * 2
    differ = lambda a, b: (a.float() - b.float()).abs().mean((1, 2, 3)) > 1  # noqa: E731
    assert differ(views[0], views[1]).all() and differ(views[2], views[3]).all(), "every view its own crop"
    again, _ = next(iter(recipe.loader.epoch(0)))
    assert all(torch.equal(a, b) for a, b in zip(views, again)), "a sample's views are seeded by (seed, epoch, sample)"
    out = recipe.multicrop([v.float() / 255 for v in views])
    assert [o.shape for o in out] == [v.shape for v in views] and all(0 <= o.min() and o.max() <= 1 for o in out)
    recipe.train()
    metrics = finish_ssl_run(recipe, "dino", recipe.teacher.backbone, "DINO")
    assert len(metrics["history"]) == 1 and torch.isfinite(torch.tensor(metrics["history"][0]["train_loss"]))


def test_kd_clip_streams_its_real_and_generated_files(folder, tmp_path):
    from fastdistill import make_augmented
    from fastdistill.recipes.kd_clip import KDClipRecipe

    gen = tmp_path / "aug"
    make_augmented.main(["--out", str(gen), "--per-image", "1", "--real-per-class", "2", *DATA, f"data.root={folder}"])
    cfg = _cfg(folder, "+method=kd_clip", "preset=smoke", "method.teacher=timm:resnet10t", "method.teacher_weights=none",
               "+method.teacher_kwargs.num_classes=50", "method.real_per_class=2", "method.gen.mode=folder",
               f"method.gen.folder={gen}", "method.kd.epochs=1", "method.finetune.epochs=1", "method.baseline.epochs=1",
               "method.baseline.cache=false", "method.eval_batch_size=64", f"out={tmp_path / 'kd'}")
    recipe = KDClipRecipe(cfg)
    recipe.setup()
    kd = recipe.kd_set
    assert kd.images is None and len(kd.paths) == 200 and sum(p.suffix == ".png" for p in kd.paths) == 100
    assert recipe.cached.shape[0] == 200, "one cached target per real and generated file"
    recipe.train()
    assert recipe.crop_at_decode and recipe.loader.dataset.train_crop is not None
    assert set(recipe.results) == {"finetune", "baseline"} and all(0 <= v <= 1 for v in recipe.results.values())


@pytest.mark.slow
def test_rehearsal_memory_is_flat_in_images_per_class(tmp_path):
    # the benchmark at a tenth of its size: 100 classes, 2 and 6 JPEGs per class; it exits 1 when peak memory grows
    # by more than 15 % with k or passes its ceiling
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scale_rehearsal.py"
    r = subprocess.run([sys.executable, str(script), "--classes", "100", "--ks", "2", "6", "--root", str(tmp_path),
                        "--out", str(tmp_path / "results"), "--loader-batches", "2"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "scale_rehearsal_cpu.json").read_text())
    growth = record["rows"][-1]["growth"]
    assert all(v <= 1.15 for g in growth.values() for v in g.values()), growth
