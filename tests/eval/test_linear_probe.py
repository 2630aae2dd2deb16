"""The linear probe's test images: resized whole, or as published (Resize 256 + CenterCrop 224, here at small sizes)
for image folders and decoded arrays alike; a bad eval.test_crop_pct is one clear error."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import Precision
from fastdistill.eval.linear_probe import check_probe_config, embed_test

CPU = torch.device("cpu")


class Pixels:
    """A stand-in backbone whose features are the pixels it is given."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _folder(tmp_path, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _reference(path, size, crop_pct):
    """torchvision's evaluation transform: Resize(size / crop_pct) + CenterCrop(size) on the PIL image."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as im:
        im = TF.center_crop(TF.resize(im.convert("RGB"), round(size / crop_pct), antialias=True), [size, size])
    return v2.functional.pil_to_tensor(im).float().div(255).flatten()


def test_probe_test_images_are_resized_and_centre_cropped_as_published(tmp_path):
    paths = _folder(tmp_path, [(20, 30), (33, 17), (16, 16)])
    common = {"device": CPU, "precision": Precision("fp32", CPU), "num_workers": 0}
    expected = torch.stack([_reference(p, 14, 0.875) for p in paths])
    labels = torch.zeros(3, dtype=torch.long)
    files = ImageDataset(labels=labels, classes=["a"], paths=paths, image_size=(24, 24), crop_pct=0.875)
    got = embed_test(Pixels(), files, (14, 14), 0.875, ((24, 24), 3), **common)
    torch.testing.assert_close(got, expected, msg="files: decoded as Resize 16 + CenterCrop 14, whatever the data size")
    # decoded arrays at the resize's size (data.crop_pct 1): the centre crop is a pure crop of them, torchvision's
    # crop where the margins are even (an odd one can shift the twice-rounded offset by a pixel: image 1 here)
    even = [0, 2]
    arrays = ImageDataset(labels=labels[even], classes=["a"], paths=[paths[i] for i in even], image_size=(16, 16))
    arrays = ImageDataset(labels=labels[even], classes=["a"], images=arrays.take(torch.arange(2)))
    got = embed_test(Pixels(), arrays, (14, 14), 0.875, ((16, 16), 3), **common)
    torch.testing.assert_close(got, expected[even], msg="arrays: the same crop of the stored images")
    whole = embed_test(Pixels(), arrays, (14, 14), None, ((16, 16), 3), **common)
    assert not torch.allclose(whole, expected[even]), "test_crop_pct null resizes the whole image instead"


@pytest.mark.parametrize("bad", [0.0, 1.5, True, "x"])
def test_bad_test_crop_pct_is_one_clear_error(bad):
    e = OmegaConf.create({"runs": 1, "epochs": 1, "full_epochs": 1, "max_batch_size": 10, "lr": 1e-3,
                          "crop_scale": [0.08, 1.0], "backbone": "timm:resnet18", "test_crop_pct": bad})
    with pytest.raises(ValueError, match="eval.test_crop_pct must be in"):
        check_probe_config(e)


def test_centre_crop_resizes_the_shorter_side_first():
    import torch.nn.functional as F

    from fastdistill.data.transforms import centre_crop

    x = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(16, 24), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(centre_crop(x, (14, 14), 0.875), resized[..., 1:15, 5:19],
                               msg="shorter side 40 -> 16 (aspect kept), then the centre 14 x 14")
    assert centre_crop(x.transpose(-1, -2), (14, 14), 0.875).shape == (2, 3, 14, 14)


class Scaled:
    """Features whose class signal is 1e-2 of a constant offset, as a ViT's class token can be before training."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + 1e-2 * x.flatten(1).mean(1, keepdim=True).repeat(1, 8)


def test_feature_bn_standardises_features_a_plain_linear_head_cannot_read():
    from fastdistill.eval.linear_probe import ProbeConfig, train_probe

    labels = torch.arange(2).repeat(100)
    images = (labels * 120 + 60).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    data = ImageDataset(labels=labels, classes=list("ab"), images=images, channels=1, image_size=(4, 4))
    test_feats = Scaled().embed(images.float().div(255))
    accs = {}
    for bn in (False, True):
        cfg = ProbeConfig(lr=0.1, max_batch_size=50, crop_scale=(1.0, 1.0), hflip=False, image_size=(4, 4),
                          feature_bn=bn)
        accs[bn] = train_probe(Scaled(), data, test_feats, labels, 2, cfg, 20, seed=0, device=CPU,
                               precision=Precision("fp32", CPU), num_workers=0)
    assert accs[True] == 1.0 and accs[False] < 0.75, accs
