"""DD-Ranking's scores against hand computations, and the protocol: lr and epoch chosen on validation, the lr
shared with the random twin, the test split read once after all training, the cost under 20 % of DD-Ranking's."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import Precision
from fastdistill.eval import ddranking
from fastdistill.eval.ddranking import (ROWS, augmentation_robust_score, ddranking_eval, label_robust_score,
                                        mean_std, normalised_exp, scores)

ACC = {"full_hard": 0.95, "distilled_hard": 0.60, "distilled_soft": 0.85, "random_soft": 0.70,
       "distilled_soft_noaug": 0.80, "random_soft_noaug": 0.75}


def test_scores_from_fixed_accuracies_by_hand():
    s = scores(ACC)
    assert s["hlr"] == pytest.approx(0.35, abs=1e-12), "HLR = 0.95 - 0.60"
    assert s["ior"] == pytest.approx(0.15, abs=1e-12), "IOR = 0.85 - 0.70"
    assert s["ior_noaug"] == pytest.approx(0.05, abs=1e-12), "IOR without augmentation = 0.80 - 0.75"
    # LRS: a = 0.5 * 0.15 - 0.5 * 0.35 = -0.1; (e^-0.1 - e^-1) / (e - e^-1) = 0.536958 / 2.350402
    assert s["lrs"] == pytest.approx(0.22845363830836396, abs=1e-12)
    # ARS: b = 0.5 * 0.15 + 0.5 * 0.05 = 0.1; (e^0.1 - e^-1) / (e - e^-1) = 0.737291 / 2.350402
    assert s["ars"] == pytest.approx(0.31368734174706575, abs=1e-12)


def test_normalisation_bounds_and_weight():
    assert normalised_exp(-1.0) == pytest.approx(0.0, abs=1e-15) and normalised_exp(1.0) == pytest.approx(1.0)
    # w = 1: LRS sees only IOR; w = 0: only -HLR
    assert label_robust_score(0.35, 0.15, weight=1.0) == pytest.approx(normalised_exp(0.15))
    assert label_robust_score(0.35, 0.15, weight=0.0) == pytest.approx(normalised_exp(-0.35))
    assert augmentation_robust_score(1.0, 1.0) == pytest.approx(1.0), "the best possible set scores 1"
    assert label_robust_score(1.0, -1.0) == pytest.approx(0.0, abs=1e-15), "the worst scores 0"


def test_percent_accuracies_are_refused():
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\], got 85.0 \(percent"):
        scores({**ACC, "distilled_soft": 85.0})


def test_mean_std_over_seeds():
    r = mean_std([0.2, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["std"] == pytest.approx(math.sqrt(0.08 / 3)), "population std"


# ------------------------------------------------------------------ the protocol, with a stand-in trainer
class CountingTest(ImageDataset):
    """A test split whose every image read is counted (read from 'files', so the loader goes through decode)."""

    def decode(self, i, seed=None):
        self.meta["reads"][i] += 1
        return self.meta["pixels"][i]


def _data(n_per_class=20, classes=4):
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    pixels = torch.randint(0, 255, (len(labels), 1, 8, 8), dtype=torch.uint8)
    names = [str(c) for c in range(classes)]
    return ImageDataset(labels=labels, classes=names, images=pixels)


class Constant(torch.nn.Module):
    """Predicts class ``c`` for every image."""

    def __init__(self, c, classes):
        super().__init__()
        self.c, self.classes = c, classes

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.c), self.classes).float()


def test_protocol_selects_on_validation_and_reads_the_test_split_once(monkeypatch):
    train = _data()
    distilled = train.subset(torch.arange(0, 80, 10))  # 2 per class
    test_labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 1 + [3] * 1)
    test = CountingTest(labels=test_labels, classes=[str(c) for c in range(4)], paths=["x"] * 10, image_size=(8, 8),
                        channels=1, meta={"reads": [0] * 10, "pixels": torch.zeros(10, 1, 8, 8, dtype=torch.uint8)})
    e = OmegaConf.create({"student": "stand-in", "seeds": 3, "lrs": [0.1, 0.2, 0.3], "epochs": 4, "full_epochs": 2,
                          "full_lr": None, "check_every": 2, "val_fraction": 0.25, "batch_size": 4,
                          "weight_decay": 0.0, "final_lr_fraction": 0.5, "temperature": 20.0,
                          "crop_scale": [0.5, 1.0], "weight": 0.5})
    calls = []

    def trainer(arch, data, teachers, test_set, image_size, cfg, device, precision, seed, **kw):
        assert test_set is None, "training never sees the test split"
        assert sum(test.meta["reads"]) == 0, "the test split is read after all training"
        val = kw["val_set"]
        assert len(val) == 20 and torch.bincount(val.labels).tolist() == [5] * 4, "stratified validation"
        kind = "distilled" if data is distilled else "full" if len(data) == 60 else "random"
        calls.append((kind, cfg.targets, cfg.augment, cfg.lr, seed, cfg.epochs))
        # validation prefers lr 0.2; the model predicts class 0 (6 of 10 test images) at the chosen lr
        return {"val_acc": 1.0 - abs(cfg.lr - 0.2), "best_epoch": 2, "model": Constant(0 if cfg.lr == 0.2 else 1, 4)}

    r = ddranking_eval(distilled, train, test, [], (8, 8), e, seed=7, hflip=False, device=torch.device("cpu"),
                       precision=Precision("fp32", torch.device("cpu")), num_workers=0, trainer=trainer)
    assert test.meta["reads"] == [1] * 10, "every test image read exactly once"
    assert r["seeds"] == [7, 8, 9] and r["test_reads"] == 1
    assert set(r["lr"].values()) == {0.2}, "the validation winner, shared with the twins"
    sweep = [c for c in calls if c[0] == "distilled" and c[4] == 7]
    assert sorted(c[3] for c in sweep) == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3], "3 protocols x 3 lrs"
    assert {c[3] for c in calls if c[0] == "distilled" and c[4] != 7} == {0.2}, "later seeds at the chosen lr"
    twins = [c for c in calls if c[0] == "random"]
    assert {c[3] for c in twins} == {0.2} and len(twins) == 2 * 3, "twins: the distilled set's lr, 2 protocols x 3"
    assert {(c[1], c[2]) for c in twins} == {("soft", True), ("soft", False)}
    full = [c for c in calls if c[0] == "full"]  # 80 training images minus 20 for validation
    assert len(full) == 3 and {c[1] for c in full} == {"hard"} and {c[5] for c in full} == {2}, "full_epochs"
    for name in ROWS:
        assert r["accuracy"][name]["mean"] == pytest.approx(0.6), name
    assert r["scores"]["hlr"]["mean"] == pytest.approx(0.0) and r["scores"]["lrs"]["mean"] == pytest.approx(
        normalised_exp(0.0))
    assert r["cost"]["runs"] == len(calls) == 24 and r["cost"]["fraction_epochs"] <= 0.2
    assert r["validation"]["val"] == 20 and r["validation"]["seed"] == 7


def test_bad_eval_keys_are_one_clear_error():
    e = OmegaConf.create({"seeds": 0, "lrs": [0.1], "val_fraction": 0.1, "check_every": 1, "weight": 0.5})
    with pytest.raises(ValueError, match="eval.seeds must be an integer >= 1, got 0"):
        ddranking.check_ddranking_config(e)
    with pytest.raises(ValueError, match="eval.lrs must be a non-empty list"):
        ddranking.check_ddranking_config(OmegaConf.merge(e, {"seeds": 3, "lrs": []}))
