"""+method=fadrm eval=ddranking end to end on a tiny budget: every row and score, mean +- std over 3 seeds, the
validation split in the manifest, the scores equal to the formulas applied to the recorded accuracies."""
import json

import pytest

from fastdistill.api import run
from fastdistill.config import compose
from fastdistill.eval.ddranking import ROWS, scores

TINY = ["+method=fadrm", "preset=smoke", "ipc=2", "method.stage_sizes=[24,28]", "method.stage_iterations=4",
        "method.candidates_per_class=4", "progress=false", "checkpoint_every=0",
        # a tiny student and a 200-image full-data row keep the run to seconds
        "eval=ddranking", "eval.student=timm:test_resnet", "eval.epochs=2", "eval.full_epochs=1",
        "eval.lrs=[0.01,0.03]", "eval.check_every=1", "eval.full_per_class=20"]


def test_fadrm_ddranking_end_to_end(tmp_path):
    metrics = run(compose([*TINY, f"out={tmp_path / 'run'}"]))
    r = metrics["ddranking"]
    assert r["seeds"] == [0, 1, 2] and set(r["accuracy"]) == set(ROWS)
    for p in r["per_seed"]:
        again = scores(p["accuracy"], r["weight"])
        for k in ("hlr", "ior", "lrs", "ior_noaug", "ars"):
            assert p[k] == pytest.approx(again[k]), f"seed {p['seed']}: {k}"
            assert -1.0 <= p[k] <= 1.0
    assert 0.0 <= r["scores"]["lrs"]["mean"] <= 1.0 and r["scores"]["ars"]["std"] >= 0.0
    assert r["cost"]["fraction_epochs"] <= 0.2 and r["test_reads"] == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["validation_split"]["val"] == 400 and manifest["validation_split"]["val_per_class"] == [40] * 10


def test_bad_ddranking_key_stops_before_any_work(tmp_path):
    from fastdistill.recipes.fadrm import FADRMRecipe

    with pytest.raises(ValueError, match="eval.seeds must be an integer >= 1"):
        FADRMRecipe(compose([*TINY, "eval.seeds=0", f"out={tmp_path / 'bad'}"]))


def test_evaluate_ddranking_on_a_saved_folder(tmp_path):
    """+method=evaluate eval=ddranking on a folder a fadrm run saved: the same rows and scores, the soft labels from
    eval.teachers (here the same cached smoke teacher the run used), the test split read once."""
    run(compose([*TINY[:8], "method.eval.students=[]", f"out={tmp_path / 'set'}"]))
    metrics = run(compose(["+method=evaluate", f"distilled={tmp_path / 'set'}", "progress=false", *TINY[8:],
                           "eval.teacher_preset=smoke", f"out={tmp_path / 'scores'}"]))
    r = metrics["ddranking"]
    assert metrics["images"] == 20 and set(r["accuracy"]) == set(ROWS) and r["test_reads"] == 1
    for p in r["per_seed"]:
        assert p["lrs"] == pytest.approx(scores(p["accuracy"], r["weight"])["lrs"])
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["validation_split"]["val_per_class"] == [40] * 10
