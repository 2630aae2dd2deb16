"""Test accuracy of a classifier over a dataset split, batched on the device without autograd."""
from __future__ import annotations

import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.transforms import to_input
from fastdistill.engine.precision import Precision


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: ImageDataset, device: torch.device, image_size: tuple[int, int],
             precision: Precision | None = None, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` ([0, 1] images -> logits) on every image of ``dataset``."""
    was_training = model.training
    model.eval()
    correct = 0
    images = dataset.load_all()
    for i in range(0, len(dataset), batch_size):
        x = to_input(images[i:i + batch_size].to(device, non_blocking=True), image_size)
        with precision.autocast() if precision else torch.autocast(device.type, enabled=False):
            logits = model(x)
        correct += (logits.argmax(1).cpu() == dataset.labels[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(dataset), 1)
