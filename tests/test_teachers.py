"""Frozen teachers: one cache layout, trained once, moved (never retrained) from the earlier layouts, resumed after a
kill; run folders load with their class order checked."""
import json

import pytest
import torch
from safetensors.torch import save_model

from fastdistill.config import compose
from fastdistill.models import create_backbone
from fastdistill.teachers import (CARD, CHECKPOINT, WEIGHTS, cache_folder, cache_root, config_hash, ensure_trained,
                                  frozen_backbone, load_run, training_config)

MODEL = "timm:test_resnet"


def _write_run(folder, classes, method="teacher"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = create_backbone(MODEL, num_classes=len(classes))
    save_model(net.model, str(folder / WEIGHTS))
    (folder / CARD).write_text(json.dumps({"model": MODEL, "model_kwargs": {}, "classes": classes, "method": method}))
    return net


class FakeTraining:
    """Stands for a recipe's ``main``: records its calls, writes a run folder (or dies after a checkpoint)."""

    def __init__(self, die_once=False):
        self.calls, self.die_once = [], die_once

    def __call__(self, cfg):
        self.calls.append({"out": cfg.out, "resume": cfg.resume, "cache": cfg.method.get("cache")})
        from pathlib import Path

        out = Path(cfg.out)
        if self.die_once:
            self.die_once = False
            out.mkdir(parents=True, exist_ok=True)
            (out / CHECKPOINT).write_bytes(b"step 3")
            raise KeyboardInterrupt
        _write_run(out, [str(d) for d in range(10)])
        return {}


@pytest.fixture
def tcfg(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_CACHE", str(tmp_path / "cache"))  # an empty cache for each test
    return training_config("teacher", MODEL, "smoke", compose(["+method=fadrm", "preset=smoke"]))


def test_trained_once_in_one_layout_then_reused(tcfg):
    train = FakeTraining()
    folder = ensure_trained(train, tcfg)
    assert folder == cache_root() / "teachers" / "teacher" / config_hash(tcfg) == cache_folder(tcfg)
    assert ensure_trained(train, tcfg) == folder and len(train.calls) == 1
    # the run trains in the cache folder itself, with the recipe's own copy to the cache switched off
    assert train.calls[0] == {"out": str(folder), "resume": False, "cache": False}
    assert tcfg.method.cache is True, "the caller's config is left as it was"


def test_a_killed_training_resumes_in_place(tcfg):
    train = FakeTraining(die_once=True)
    with pytest.raises(KeyboardInterrupt):
        ensure_trained(train, tcfg)
    folder = ensure_trained(train, tcfg)
    assert [c["resume"] for c in train.calls] == [False, True] and (folder / CARD).is_file()


@pytest.mark.parametrize("legacy", ["teachers/{hash}", "kd_multi/teacher/{hash}"])
def test_earlier_cache_layouts_are_moved_not_retrained(tcfg, legacy):
    old = cache_root() / legacy.format(hash=config_hash(tcfg))
    _write_run(old, [str(d) for d in range(10)])
    train = FakeTraining()
    folder = ensure_trained(train, tcfg)
    assert not train.calls and not old.exists() and (folder / CARD).is_file() and folder == cache_folder(tcfg)


def test_load_run_checks_a_supervised_teachers_class_order(tmp_path):
    net = _write_run(tmp_path / "sup", ["a", "b", "c"])
    loaded, card = load_run(tmp_path / "sup", ["a", "b", "c"])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net.eval()(x), msg="the classifier is loaded with the weights")
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match=r"trained with classes \['a', 'b', 'c'\]... but the dataset has \['c', 'b'"):
        load_run(tmp_path / "sup", ["c", "b", "a"])
    # a self-supervised run has no class order to keep: it gets a fresh head of the asked size
    _write_run(tmp_path / "ssl", ["a", "b", "c"], method="dino")
    ssl, _ = load_run(tmp_path / "ssl", ["c", "b", "a", "d"], num_classes=4)
    assert ssl(x).shape == (2, 4)
    with pytest.raises(FileNotFoundError, match="has no teacher.json"):
        load_run(tmp_path)


def test_trained_weights_need_the_training_entry():
    cfg = compose(["+method=fadrm", "preset=smoke"])
    with pytest.raises(ValueError, match="weights=trained needs the teacher recipe's entry"):
        frozen_backbone(MODEL, "trained", cfg, "smoke", [str(d) for d in range(10)])


def test_model_kwargs_reach_the_trained_teacher_and_its_cache_key(tmp_path, monkeypatch):
    # the CIFAR stem changes the network: a teacher trained with it is another cached run, loaded with it
    monkeypatch.setenv("FASTDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = compose(["+method=fadrm", "preset=smoke"])
    seen = []

    def fake_training(tcfg):
        seen.append(tcfg)
        out = tcfg.out
        from pathlib import Path

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = create_backbone("timm:resnet18", num_classes=10, **tcfg.method.model_kwargs)
        save_model(net.model, str(folder / WEIGHTS))
        (folder / CARD).write_text(json.dumps({"model": "timm:resnet18", "classes": [str(d) for d in range(10)],
                                               "model_kwargs": dict(tcfg.method.model_kwargs)}))
        return {}

    classes = [str(d) for d in range(10)]
    net, _ = frozen_backbone("timm:resnet18", "trained", cfg, "smoke", classes, train=fake_training,
                             model_kwargs={"cifar_stem": True})
    plain, _ = frozen_backbone("timm:resnet18", "trained", cfg, "smoke", classes, train=fake_training)
    assert len(seen) == 2 and dict(seen[0].method.model_kwargs) == {"cifar_stem": True}
    assert config_hash(seen[0]) != config_hash(seen[1]), "the stem must be part of the teacher cache key"
    assert net.model.conv1.stride == (1, 1) and plain.model.conv1.stride == (2, 2), "each loaded with its own stem"


def test_a_run_folder_loads_as_its_card_builds_it(tmp_path):
    # a CIFAR-stem run: its weights fit only the network its card's kwargs build, and no caller has to repeat them
    folder, classes, kwargs = tmp_path / "run", ["a", "b", "c"], {"cifar_stem": True}
    folder.mkdir()
    torch.manual_seed(0)
    net = create_backbone(MODEL, num_classes=3, **kwargs).eval()
    save_model(net.model, str(folder / WEIGHTS))
    (folder / CARD).write_text(json.dumps({"model": MODEL, "model_kwargs": kwargs, "classes": classes,
                                           "method": "teacher"}))
    cfg = compose(["+method=fadrm", "preset=smoke"])
    loaded, card = frozen_backbone(MODEL, str(folder), cfg, "smoke", classes)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), net(x), msg="the run's classifier through its CIFAR stem")
    assert card["model_kwargs"] == kwargs and card["weights"] == str(folder)
    with pytest.raises(ValueError, match=r"holds timm:test_resnet with \{'cifar_stem': True\}; name timm:test_resnet"):
        frozen_backbone("timm:resnet18", str(folder), cfg, "smoke", classes)
    with pytest.raises(ValueError, match=r"no constructor kwargs for it \(got timm:test_resnet, \{'img_size': 16\}"):
        frozen_backbone(MODEL, str(folder), cfg, "smoke", classes, img_size=16)
    with pytest.raises(ValueError, match="class indices would not match"):
        frozen_backbone(MODEL, str(folder), cfg, "smoke", ["c", "b", "a"])
