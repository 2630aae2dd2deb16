"""Attention analysis: mean attention distance on hand-made maps with known answers, CLS maps, overlays, the plot,
and +method=attention end to end."""
import json
import math

import pytest
import torch

from fastdistill.eval.attention import (attention_distances, attention_on_object, cls_attention,
                                        mean_attention_distance, overlay_grid, patch_distances,
                                        plot_attention_distance)
from fastdistill.models import create_backbone
from fastdistill.api import run
from fastdistill.config import compose


def _one_hot_rows(targets: list[int], prefix: int = 1) -> torch.Tensor:
    """(1, 1, L, L) attention where patch query q puts all its weight on patch targets[q]; prefix rows uniform."""
    n = len(targets)
    a = torch.full((prefix + n, prefix + n), 1.0 / (prefix + n))
    for q, k in enumerate(targets):
        a[prefix + q] = 0
        a[prefix + q, prefix + k] = 1
    return a[None, None]


def test_distance_zero_for_self_attention_and_one_patch_for_neighbours():
    grid, p = (3, 4), 7
    self_attn = _one_hot_rows(list(range(12)))
    torch.testing.assert_close(mean_attention_distance(self_attn, grid, p), torch.zeros(1, dtype=torch.float64))
    # every query looks at its horizontal neighbour (right, or left in the last column): exactly one patch away
    right = [q + 1 if q % 4 < 3 else q - 1 for q in range(12)]
    torch.testing.assert_close(mean_attention_distance(_one_hot_rows(right), grid, p),
                               torch.tensor([7.0], dtype=torch.float64))
    # diagonal neighbour on a 2x2 grid: sqrt(2) patches
    torch.testing.assert_close(mean_attention_distance(_one_hot_rows([3, 2, 1, 0]), (2, 2), 4),
                               torch.tensor([4 * math.sqrt(2)], dtype=torch.float64))


def test_distance_of_uniform_attention_and_cls_weight_is_left_out():
    # 2x2 grid, patch 4: from any patch the others are at 0, 4, 4, 4 sqrt(2) px -> mean (8 + 4 sqrt 2) / 4
    expected = (8 + 4 * math.sqrt(2)) / 4
    a = torch.zeros(2, 3, 5, 5)
    a[..., 0] = 0.6  # weight on CLS: dropped, the patch part renormalised
    a[..., 1:] = 0.1
    got = mean_attention_distance(a, (2, 2), 4)
    torch.testing.assert_close(got, torch.full((3,), expected, dtype=torch.float64), msg="per head")
    assert patch_distances((2, 2), 4)[0, 3] == pytest.approx(4 * math.sqrt(2))
    with pytest.raises(ValueError, match="attention must be"):
        mean_attention_distance(torch.rand(1, 1, 4, 4), (2, 2), 4)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_backbone("timm:vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=32, depth=3,
                           num_heads=2).eval()


def test_distances_cls_maps_and_overlays_on_a_real_vit(vit, tmp_path):
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    x = pixels.float() / 255
    d = attention_distances(vit, pixels, (28, 28), torch.device("cpu"), batch_size=2)
    assert d.shape == (3, 2) and (d > 0).all() and (d <= patch_distances((7, 7), 4).max()).all()
    # the batched average equals one pass over all images
    attn = vit.attention(x, [1])[1]
    torch.testing.assert_close(d[1], mean_attention_distance(attn, (7, 7), 4), msg="layer 1 distances")
    maps = cls_attention(vit, x)
    assert maps.shape == (5, 2, 7, 7) and (maps.sum((2, 3)) <= 1 + 1e-5).all()
    tiles = overlay_grid(x, maps, scale=2)
    assert tiles.shape == (5 * 4, 3, 56, 56) and 0 <= tiles.min() and tiles.max() <= 1
    path = plot_attention_distance({"a": d, "b": d / 2}, tmp_path / "plot.png", (28, 28))
    assert path.stat().st_size > 1000


def test_attention_needs_a_vit():
    cnn = create_backbone("timm:resnet18")
    with pytest.raises(ValueError, match="no patch grid"):
        cls_attention(cnn, torch.rand(1, 3, 32, 32))


def test_attention_method_end_to_end(tmp_path):
    cfg = compose(["+method=attention", "preset=smoke", f"out={tmp_path / 'run'}", "progress=false",
                   "model=[timm:vit_tiny_patch16_224,timm:vit_tiny_patch16_224]",
                   "method.model_kwargs={img_size:28,patch_size:4,embed_dim:32,depth:2,num_heads:2}"])
    metrics = run(cfg)
    out = tmp_path / "run"
    names = list(metrics["attention_distance"])
    assert len(names) == 2 and names[0] != names[1], "two entries of one model are kept apart"
    for name in names:
        assert (out / f"attention_{name}.png").is_file()
    data = json.loads((out / "attention_distance.json").read_text())
    assert len(data[names[0]]["per_layer"]) == 2 and len(data[names[0]]["per_head"][0]) == 2
    assert (out / "attention_distance.png").is_file() and (out / "metrics.json").is_file()
    on_object = data[names[0]]["attention_on_object"]
    assert len(on_object["per_head"]) == 2 and on_object["images"] > 0 and on_object["mean"] > 0


@pytest.mark.parametrize("model, error, message", [
    ("null", ValueError, "needs model=PATH"),
    ("/no/such/run", FileNotFoundError, "neither a run folder nor a backbone id"),
])
def test_attention_method_bad_model_is_clear(tmp_path, model, error, message):
    cfg = compose(["+method=attention", f"model={model}", f"out={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(error, match=message):
        run(cfg)


def test_run_folder_without_card_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose(["+method=attention", f"model={tmp_path / 'empty'}", f"out={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(FileNotFoundError, match="has no teacher.json"):
        run(cfg)


def test_attention_on_object_against_hand_made_maps():
    # a 2 x 2 patch grid of 4 x 4 px patches; the object is the top-left patch (a quarter of the image)
    image = torch.zeros(1, 1, 8, 8)
    image[..., :4, :4] = 1.0
    uniform = torch.full((1, 1, 2, 2), 0.25)
    half_on_object = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]).view(1, 1, 2, 2)
    only_object = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    maps = torch.cat([uniform, half_on_object, only_object], dim=1) * 3.0  # unnormalised rows are renormalised
    got = attention_on_object(maps, image, threshold=0.2)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64))
    # an image of ground only has no object share to compare with: left out
    assert attention_on_object(maps, torch.zeros(1, 1, 8, 8), threshold=0.2).shape == (0, 3)
