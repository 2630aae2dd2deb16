"""+method=fadrm method.relabel=store with a compact format, end to end: every crop's labels on disk in that
format, read back by the student, and their bytes per image in metrics.json."""
import json

from fastdistill.api import run
from fastdistill.config import compose
from fastdistill.data.soft_labels import bytes_per_row

TINY = ["+method=fadrm", "preset=smoke", "ipc=2", "method.stage_sizes=[24,28]", "method.stage_iterations=4",
        "method.candidates_per_class=4", "method.eval.epochs=2", "method.eval.real_random=false",
        "progress=false", "checkpoint_every=0"]


def test_compact_labels_end_to_end(tmp_path):
    out = tmp_path / "run"
    metrics = run(compose([*TINY, "method.relabel=store", "method.label_format=quant:4", f"out={out}"]))
    index = json.loads((out / "soft_labels" / "timm_resnet18" / "synthetic" / "index.json").read_text())
    assert index["format"] == "quant:4" and index["rows"] == 2 * 20, "one row per image per epoch"
    assert metrics["label_format"] == "quant:4"
    assert metrics["label_bytes_per_image"] == 2 * bytes_per_row("quant:4", 10) == 18, "2 epochs x (10 / 2 + 4) B"
    stored = metrics["stored_labels"]["timm:resnet18"]["synthetic"]
    assert stored["file_bytes_per_image"] > stored["bytes_per_image"], "on disk: payload plus safetensors headers"
    assert 0.0 <= metrics["students"]["timm:resnet18"]["synthetic"] <= 1.0


def test_unknown_label_format_is_one_clear_error(tmp_path):
    import pytest

    from fastdistill.recipes.fadrm import FADRMRecipe

    with pytest.raises(ValueError, match="unknown soft-label format 'topk:0'"):
        FADRMRecipe(compose([*TINY, "method.label_format=topk:0", f"out={tmp_path / 'bad'}"]))
