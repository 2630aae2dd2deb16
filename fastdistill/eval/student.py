"""Soft-label student training: how a distilled set is judged (SRe2L, RDED, FADRM evaluation).

A student of any architecture trains from scratch on the distilled images; every batch is augmented
(random-resized-crop, flip where allowed) and relabelled online by the frozen teacher(s): the loss is
``KL(softmax(t / T) || softmax(s / T))`` with the teachers' logits averaged (FADRM+), no ``T^2`` factor as in
the published validation. Nothing is written per epoch (the published FKD label files reach ~30 GB at
ImageNet-1k IPC 50). The reported accuracy is the FINAL epoch's, never the best over test evaluations.

Under torchrun the student is a DistributedDataParallel replica: every rank draws the same global batch and
augmentation, keeps its slice, and the loss is scaled so that the averaged gradient is the one-process batch
mean. The learning rate is defined for the global batch and never divided by the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdistill import console
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.transforms import to_input, train_augment
from fastdistill.engine import distributed as dist
from fastdistill.engine.precision import Precision
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.classify import accuracy
from fastdistill.models import Backbone, create_backbone


@dataclass
class StudentConfig:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    final_lr_fraction: float = 0.0  # cosine from lr to lr * this
    temperature: float = 20.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True


@torch.no_grad()
def teacher_logits(teachers: list[Backbone], x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Mean logits of the teachers (FADRM+ relabelling averages the ensemble's logits), fp32."""
    with precision.autocast():
        return torch.stack([t(x).float() for t in teachers]).mean(0)


def train_student(arch: str, train_set: ImageDataset, teachers: list[Backbone], test_set: ImageDataset,
                  image_size: tuple[int, int], cfg: StudentConfig, device: torch.device, precision: Precision,
                  seed: int, model_kwargs: dict | None = None, num_workers="auto", progress: bool = False,
                  description: str = "student", log=None, phase: str = "student") -> dict:
    """Train ``arch`` from scratch on ``train_set`` (a distilled set read from disk, or real images) with online
    soft labels; final test accuracy. The images stream through the loader batch by batch; the set's own labels
    are not used (the training signal is the teachers' soft labels). ``log``: the run's metric history
    (``RunDir.log``), which gets each epoch's loss and learning rate and the test accuracy under ``phase``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = create_backbone(arch, num_classes=test_set.num_classes, **(model_kwargs or {})).to(device).train()
    net = dist.wrap_ddp(student, device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    world = dist.world_size()
    if cfg.batch_size < world:
        raise ValueError(f"student batch size {cfg.batch_size} is smaller than the {world} processes")
    # every rank reads the global batch and draws its augmentation, then keeps its slice; a last batch without a
    # sample per rank is left out
    loader = TorchLoader(train_set, cfg.batch_size, shuffle=False, num_workers=num_workers)
    n = len(train_set)
    starts = range(0, n - world + 1, cfg.batch_size)
    steps_per_epoch = len(starts)
    lr = cosine_schedule(cfg.lr, cfg.lr * cfg.final_lr_fraction, cfg.epochs * steps_per_epoch)
    t = cfg.temperature
    step, losses = 0, []
    with console.progress(progress) as bar:
        task = bar.add_task(description, total=cfg.epochs * steps_per_epoch, info="")
        for epoch in range(cfg.epochs):
            epoch_loss = torch.zeros((), device=device)
            order = torch.randperm(n, generator=g)
            for x, _ in loader.iterate([order[i:i + cfg.batch_size] for i in starts], epoch):
                x = to_input(x.to(device, non_blocking=True), image_size, x.shape[1])
                x = train_augment(x, image_size, cfg.crop_scale, cfg.hflip, generator=g)
                batch, part = len(x), dist.shard(len(x))
                x = x[part.start:part.stop]
                soft = teacher_logits(teachers, x, precision)
                for group in opt.param_groups:
                    group["lr"] = float(lr[step])
                with precision.autocast():
                    logits = net(x)
                # this rank's sum over the global batch size, times the ranks DDP averages over: the batch mean
                loss = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(soft / t, 1), reduction="sum",
                                log_target=True) * (world / batch)
                opt.zero_grad(set_to_none=True)
                precision.backward(loss)
                precision.step(opt)
                epoch_loss += loss.detach()
                step += 1
                bar.update(task, advance=1)
            dist.all_reduce(epoch_loss, "mean")
            losses.append(epoch_loss.item() / steps_per_epoch)  # one sync per epoch
            bar.update(task, info=f"loss {losses[-1]:.4f}")
            if log:
                log(phase, epoch, train_loss=losses[-1], lr=float(lr[step - 1]))
    acc = accuracy(student, test_set, device, image_size, precision, num_workers=num_workers, progress=progress)
    if log:
        log(phase, cfg.epochs, test_acc=acc)
    return {"test_acc": acc, "final_loss": losses[-1], "first_loss": losses[0]}
