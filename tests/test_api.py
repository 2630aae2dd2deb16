"""The Python API: the same config, the same run and the same errors as the command line."""
import json
import subprocess
import sys

import pytest
import torch

import fastdistill
from fastdistill.api import overrides_for
from fastdistill.artifacts import RunDir

# a tiny LGM run: one random-init ResNet backbone, 2 iterations, a 1-epoch probe
TINY = {"preset": "smoke", "ipc": 1, "method.backbones": ["timm:test_resnet"], "method.backbone_weights": [1.0],
        "method.backbone_pretrained": "none", "method.iterations": 2, "method.augs_per_batch": 2,
        "eval.backbone": "timm:test_byobnet", "eval.pretrained": "none", "eval.runs": 1, "eval.epochs": 1,
        "eval.full": False, "progress": False, "checkpoint_every": 0}


def _comparable(metrics: dict) -> dict:
    """metrics.json without the rates, which depend on the machine's load."""
    return {k: v for k, v in metrics.items() if not k.endswith("_per_s")}


def test_api_and_command_line_write_the_same_metrics(tmp_path):
    result = fastdistill.distill("lgm", out=str(tmp_path / "api"), **TINY)
    assert result.out == tmp_path / "api"
    assert result.metrics == json.loads((tmp_path / "api" / "metrics.json").read_text())
    args = [*overrides_for("lgm", TINY), f"out={tmp_path / 'cli'}"]
    r = subprocess.run([sys.executable, "-m", "fastdistill.run", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert _comparable(cli) == _comparable(result.metrics), "the API and the command line disagree"
    distilled = fastdistill.load_distilled(result.out)
    assert len(distilled) == 10 and distilled[0][0].shape == (1, 28, 28) and distilled[0][0].dtype == torch.float32
    assert distilled.classes == [str(i) for i in range(10)] and distilled.labels.tolist() == list(range(10))
    loader = torch.utils.data.DataLoader(distilled, batch_size=4)
    assert sum(len(x) for x, _ in loader) == 10


@pytest.mark.parametrize("method, options, error, message", [
    ("lgn", {}, ValueError, "unknown method 'lgn'; expected one of"),
    ("teacher", {"seed": "abc"}, ValueError, "seed must be an integer >= 0, got 'abc'"),
    ("teacher", {"data": "imagefolder", "data.root": "/no/such/dir"}, FileNotFoundError, "data.root '/no/such/dir'"),
])
def test_api_raises_what_the_command_line_reports(tmp_path, method, options, error, message):
    with pytest.raises(error, match=message):
        fastdistill.distill(method, out=str(tmp_path / "run"), **options)


def test_python_values_become_hydra_override_values():
    assert overrides_for("lgm", {"resume": True, "method.image_size": None, "method.backbones": ["a:b", "c"],
                                 "eval.lr": 0.5, "out": "/tmp/a b,c"}) == [
        "+method=lgm", "resume=true", "method.image_size=null", "method.backbones=['a:b',c]", "eval.lr=0.5",
        "out='/tmp/a b,c'"]


def test_load_distilled_aligns_stored_soft_labels_with_the_images(tmp_path):
    # images saved in a shuffled class order, as a recovery that interleaves classes writes them
    classes = ["cat", "dog", "emu"]
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    images = torch.stack([torch.full((3, 4, 4), (i + 1) / 10) for i in range(6)])
    logits = torch.stack([torch.arange(3.0) + 10 * i for i in range(6)])
    out = RunDir(tmp_path)
    out.save_images(images, labels, classes)
    out.save_tensors("labels.safetensors", {"logits": logits.half(), "labels": labels})
    out.write_json("manifest.json", {"classes": classes})
    distilled = fastdistill.load_distilled(tmp_path)
    assert distilled.classes == classes and distilled.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for image, label, soft in distilled:
        i = round(float(image[0, 0, 0]) * 10) - 1  # the index the image was saved at
        assert int(labels[i]) == int(label), f"image {i} came back as class {int(label)}"
        torch.testing.assert_close(soft, logits[i], msg=f"soft label of image {i}")


def test_load_distilled_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        fastdistill.load_distilled(tmp_path)
