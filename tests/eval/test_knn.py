"""The SSL probes: weighted k-NN on hand-made features with a known answer, and both probe kinds on a tiny ViT."""
import pytest
import torch
from omegaconf import OmegaConf

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import Precision
from fastdistill.eval.knn import check_probe, knn_predict, probe_accuracy
from fastdistill.models import create_backbone


def test_knn_votes_by_similarity_weighted_by_temperature():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 1.05]])
    assert knn_predict(train, labels, test, 2, k=2).tolist() == [0, 1, 1]
    # with all 5 neighbours a sharp temperature lets the two nearest win against the three-vote majority
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.2]]), 2, k=5, temperature=0.01).tolist() == [0]
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.2]]), 2, k=5, temperature=100.0).tolist() == [1]


def _split(n_per_class: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(2 * n_per_class, 1, 28, 28, dtype=torch.uint8)
    images[:n_per_class, :, ::2] = 255  # class 0: horizontal stripes, class 1: vertical stripes
    images[n_per_class:, :, :, ::2] = 255
    images = (images.float() * (0.97 + 0.03 * torch.rand(images.shape, generator=g))).to(torch.uint8)
    labels = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return ImageDataset(labels=labels, classes=["horizontal", "vertical"], images=images, name="stripes")


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_probes_separate_an_easy_two_class_set(kind):
    torch.manual_seed(0)
    # mean-pooled patch tokens: a fresh ViT's CLS output is nearly the same for every image (README, DINO section)
    vit = create_backbone("timm:vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2,
                          global_pool="avg")
    p = OmegaConf.create({"kind": kind, "k": 5, "temperature": 0.07, "epochs": 30, "lr": 1.0, "batch_size": 20,
                          "crop_scale": [0.9, 1.0], "hflip": False})
    check_probe(p)
    acc = probe_accuracy(vit, _split(20, 0), _split(10, 1), p, (28, 28), torch.device("cpu"),
                         Precision("fp32", torch.device("cpu")), seed=0)
    assert acc >= 0.9, f"{kind} probe on horizontal vs vertical stripes: {acc}"


def test_bad_probe_is_clear():
    with pytest.raises(ValueError, match="unknown probe 'svm'"):
        check_probe(OmegaConf.create({"kind": "svm", "k": 1, "temperature": 1.0, "epochs": 1}))


def test_mean_pool_averages_the_patch_tokens_and_restores_the_class_token():
    from fastdistill.eval.knn import pooled

    torch.manual_seed(0)
    vit = create_backbone("timm:vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2)
    x = torch.rand(3, 1, 28, 28)
    tokens = vit.model.forward_features(vit.normalize(x))  # (3, 1 + 16, 32) after the final norm
    with pooled(vit, "mean") as net:
        torch.testing.assert_close(net.embed(x), tokens[:, 1:].mean(1), msg="mean of the 16 patch tokens")
    torch.testing.assert_close(vit.embed(x), tokens[:, 0], msg="the class token again after the block")
    with pytest.raises(ValueError, match="needs a timm ViT"):
        with pooled(create_backbone("timm:resnet18"), "mean"):
            pass


@pytest.mark.parametrize("extra, message", [({"also": ["knn/max"]}, "unknown probe 'knn/max'"),
                                            ({"pool": "avg"}, "unknown probe 'knn/avg'"),
                                            ({"curve_every": -1}, "curve_every must be >= 0")])
def test_bad_probe_pools_and_curves_are_clear(extra, message):
    with pytest.raises(ValueError, match=message):
        check_probe(OmegaConf.create({"kind": "knn", "k": 1, "temperature": 1.0, "epochs": 1, **extra}))
