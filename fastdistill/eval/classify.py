"""Test accuracy of a classifier over a dataset split, batch by batch through the loader, without autograd."""
from __future__ import annotations

import torch

from fastdistill import console
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.transforms import to_input
from fastdistill.engine.precision import Precision


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: ImageDataset, device: torch.device, image_size: tuple[int, int],
             precision: Precision | None = None, batch_size: int = 512, num_workers="auto",
             progress: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` ([0, 1] images -> logits) on every image of ``dataset``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    loader = TorchLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    with console.progress(progress) as bar:
        task = bar.add_task("test accuracy", total=len(loader), info="")
        for x, y in loader.epoch(0):
            x = to_input(x.to(device, non_blocking=True), image_size)
            with precision.autocast() if precision else torch.autocast(device.type, enabled=False):
                logits = model(x)
            correct += (logits.argmax(1).cpu() == y).sum()
            bar.update(task, advance=1)
    model.train(was_training)
    return correct.item() / max(len(dataset), 1)


@torch.no_grad()
def accuracies(models: dict, dataset: ImageDataset, device: torch.device, image_size: tuple[int, int],
               precision: Precision | None = None, batch_size: int = 512, num_workers="auto",
               progress: bool = False) -> dict:
    """Top-1 accuracy in [0, 1] of every model in ``models`` (key -> module) from ONE pass over ``dataset``: each
    batch is read once and shown to all models, so a split that must be touched once (the test split after model
    selection) is."""
    states = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    correct = {k: torch.zeros((), dtype=torch.long) for k in models}
    loader = TorchLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    with console.progress(progress) as bar:
        task = bar.add_task("test accuracy", total=len(loader), info="")
        for x, y in loader.epoch(0):
            x = to_input(x.to(device, non_blocking=True), image_size)
            for k, m in models.items():
                with precision.autocast() if precision else torch.autocast(device.type, enabled=False):
                    logits = m(x)
                correct[k] += (logits.argmax(1).cpu() == y).sum()
            bar.update(task, advance=1)
    for k, m in models.items():
        m.train(states[k])
    return {k: c.item() / max(len(dataset), 1) for k, c in correct.items()}
