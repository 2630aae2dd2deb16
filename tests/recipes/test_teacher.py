"""+method=teacher end to end on the embedded data: learns, writes its artifacts, resumes exactly, caches."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastdistill.api import run
from fastdistill.config import compose
from fastdistill.engine.metric_log import read_history

SMALL = ["+method=teacher", "preset=smoke", "model=timm:resnet18", "data.train_per_class=60", "method.epochs=2",
         "method.batch_size=50", "progress=false", "checkpoint_every=7"]


def _run(tmp_path, name, *extra):
    cfg = compose([*SMALL, f"out={tmp_path / name}", *extra])
    return run(cfg), tmp_path / name


def test_teacher_learns_and_writes_artifacts(tmp_path):
    metrics, out = _run(tmp_path, "a", "method.cache=false")
    for name in ("config.yaml", "manifest.json", "metrics.json", "profile.json", "model.safetensors", "teacher.json",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    losses = [h["train_loss"] for h in metrics["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], f"loss must fall: {losses}"
    assert metrics["test_acc"] > 0.3, f"2 epochs on 600 digits must beat chance (0.1): {metrics['test_acc']}"
    profile = json.loads((out / "profile.json").read_text())
    assert profile["phases"]["train"]["images"] == 2 * 600 and profile["peak_host_rss_mib"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["config"]["model"] == "timm:resnet18" and "torch" in manifest["versions"]


def test_resume_after_interruption_equals_unbroken_run(tmp_path, monkeypatch):
    _, full = _run(tmp_path, "full", "method.cache=false")

    import fastdistill.recipes.teacher as teacher

    real_save = teacher.save_checkpoint
    calls = {"n": 0}

    def save_then_die(out_dir, state):
        real_save(out_dir, state)
        calls["n"] += 1
        if calls["n"] == 3:  # killed right after the checkpoint of step 14 (mid-epoch 1 of 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(teacher, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "broken", "method.cache=false")
    monkeypatch.setattr(teacher, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=False)["position"]["step"] == 14
    _run(tmp_path, "broken", "method.cache=false", "resume=true")

    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs from the unbroken one at {k}"
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((tmp_path / "broken" / "metrics.json").read_text())
    assert ma["history"] == mb["history"] and ma["test_acc"] == mb["test_acc"]
    # the metric history: one record per epoch, as in the unbroken run, then the final metrics
    ha, hb = (read_history(d / "metrics.jsonl") for d in (full, tmp_path / "broken"))
    train = [[{k: v for k, v in r.items() if k != "time"} for r in h if r["phase"] == "train"] for h in (ha, hb)]
    assert [r["step"] for r in train[1]] == [0, 1] and train[0] == train[1], f"resumed history {train[1]}"
    assert hb[-1]["phase"] == "final" and hb[-1]["metrics"] == mb, "the last line must be metrics.json"
    assert (tmp_path / "broken" / "curves.png").is_file()


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt"):
        _run(tmp_path, "never", "resume=true", "method.cache=false")


def test_cached_teacher_is_reused(tmp_path):
    first, _ = _run(tmp_path, "first", "method.epochs=1")
    second, out = _run(tmp_path, "second", "method.epochs=1")
    assert "cached" in second and second["test_acc"] == first["test_acc"]
    from fastdistill.teachers import load_run

    model, card = load_run(out)
    assert card["classes"] == [str(d) for d in range(10)]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
