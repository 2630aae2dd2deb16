"""Soft-label student training: how a distilled set is judged (SRe2L, RDED, FADRM evaluation).

A student of any architecture trains from scratch on the distilled images; every batch is augmented
(random-resized-crop, flip where allowed) and relabelled online by the frozen teacher(s): the loss is
``KL(softmax(t / T) || softmax(s / T))`` with the teachers' logits averaged (FADRM+), no ``T^2`` factor as in
the published validation. Nothing is written per epoch (the published FKD label files reach ~30 GB at
ImageNet-1k IPC 50). The reported accuracy is the FINAL epoch's, never the best over test evaluations; a caller
that selects a best epoch passes a validation split carved from the training data (``data/splits.py``).

``relabel=store`` instead relabels ahead of training (FKD style, :func:`store_soft_labels`): the crops of every
epoch are replayed from the student's seed and their teacher logits stored in a compact format (fp16, top-k,
8/4-bit; ``data/soft_labels.py``), which the training then reads back through a stock ``DataLoader``.

Under torchrun the student is a DistributedDataParallel replica: every rank draws the same global batch and
augmentation, keeps its slice, and the loss is scaled so that the averaged gradient is the one-process batch
mean. The learning rate is defined for the global batch and never divided by the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from fastdistill import console
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.soft_labels import SoftLabelShards, SoftLabelWriter
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
    augment: bool = True  # random-resized-crop + flip; False trains on the images as stored (DD-Ranking's ARS)
    targets: str = "soft"  # soft: the teachers' soft labels (online or stored); hard: CE on the set's labels


TARGETS = ("soft", "hard")


@torch.no_grad()
def teacher_logits(teachers: list[Backbone], x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Mean logits of the teachers (FADRM+ relabelling averages the ensemble's logits), fp32."""
    with precision.autocast():
        return torch.stack([t(x).float() for t in teachers]).mean(0)


def _batches(loader: TorchLoader, image_size: tuple[int, int], cfg: StudentConfig, g: torch.Generator,
             device: torch.device, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of augmented global batches ([0, 1] pixels on the device, labels): the order, crops and flips all
    come from ``g``, so a relabelling pass and the training it feeds see the same crops from the same seed."""
    world, n = dist.world_size(), len(loader.dataset)
    order = torch.randperm(n, generator=g)
    # a last batch without a sample per rank is left out
    starts = range(0, n - world + 1, cfg.batch_size)
    for x, y in loader.iterate([order[i:i + cfg.batch_size] for i in starts], epoch):
        x = to_input(x.to(device, non_blocking=True), image_size, x.shape[1])
        if cfg.augment:
            x = train_augment(x, image_size, cfg.crop_scale, cfg.hflip, generator=g)
        yield x, y


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(range(0, n - dist.world_size() + 1, batch_size))


def store_soft_labels(folder: str | Path, train_set: ImageDataset, teachers: list[Backbone],
                      image_size: tuple[int, int], cfg: StudentConfig, device: torch.device, precision: Precision,
                      seed: int, fmt: str, num_workers="auto") -> dict:
    """FKD-style relabelling ahead of training: the teachers' logits of every crop :func:`train_student` will draw
    with ``seed`` (one row per image per epoch, in step order) as compact shards (``data/soft_labels.py``).
    Returns the folder's sizes; training reads it back through a stock ``DataLoader`` with no teacher in memory."""
    g = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    loader = TorchLoader(train_set, cfg.batch_size, shuffle=False, num_workers=num_workers)
    with SoftLabelWriter(folder, fmt, len(train_set.classes), cfg.temperature,
                         rows_per_shard=max(1, len(train_set))) as writer:  # one shard per epoch
        for epoch in range(cfg.epochs):
            for x, _ in _batches(loader, image_size, cfg, g, device, epoch):
                writer.add(teacher_logits(teachers, x, precision))
    files = sum(f.stat().st_size for f in folder.glob("shard_*.safetensors"))
    n = max(len(train_set), 1)
    return {"format": fmt, "rows": writer.rows, "payload_bytes": writer.payload_bytes,
            "bytes_per_image": writer.payload_bytes / n, "file_bytes_per_image": files / n}


def _stored_targets(folder: str | Path, sizes: list[int]):
    """Stored probabilities batch by batch (``sizes``: the rows of every step), in the order
    :func:`store_soft_labels` wrote them."""
    shards = SoftLabelShards(folder)
    if len(shards) != sum(sizes):
        raise ValueError(f"stored soft labels '{folder}' hold {len(shards)} rows, the training draws {sum(sizes)} "
                         "crops; relabel with the same epochs, batch size and seed")
    starts = [0, *accumulate(sizes)][:-1]
    # a stock DataLoader, sequential: row i is the i-th crop of the training stream
    batches = [list(range(a, a + n)) for a, n in zip(starts, sizes)]
    return iter(torch.utils.data.DataLoader(shards, batch_sampler=batches))


def train_student(arch: str, train_set: ImageDataset, teachers: list[Backbone], test_set: ImageDataset | None,
                  image_size: tuple[int, int], cfg: StudentConfig, device: torch.device, precision: Precision,
                  seed: int, model_kwargs: dict | None = None, num_workers="auto", progress: bool = False,
                  description: str = "student", *, stored_labels: str | Path | None = None,
                  val_set: ImageDataset | None = None, check_every: int = 0, num_classes: int | None = None,
                  log=None, phase: str = "student") -> dict:
    """Train ``arch`` from scratch on ``train_set`` (a distilled set read from disk, or real images).

    Targets: ``cfg.targets == "soft"``: the teachers' soft labels, online, or read from ``stored_labels`` (a folder
    of :func:`store_soft_labels`); ``"hard"``: cross-entropy on the set's own labels (no teacher).

    Model selection: with ``val_set`` the student is checked on it every ``check_every`` epochs and after the last;
    the best check's weights are kept (earliest on ties), and ``test_set=None`` leaves the test split untouched:
    the caller reads it once at the end with the returned ``model``. Without ``val_set`` the FINAL epoch is
    reported, never the best over test evaluations. ``log``: the run's metric history (``RunDir.log``), which gets
    each epoch's loss and learning rate, the validation checks and the test accuracy under ``phase``.
    """
    if cfg.targets not in TARGETS:
        raise ValueError(f"student targets must be one of {', '.join(TARGETS)}, got {cfg.targets!r}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = num_classes or (test_set.num_classes if test_set is not None else len(train_set.classes))
    student = create_backbone(arch, num_classes=classes, **(model_kwargs or {})).to(device).train()
    net = dist.wrap_ddp(student, device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    world = dist.world_size()
    if cfg.batch_size < world:
        raise ValueError(f"student batch size {cfg.batch_size} is smaller than the {world} processes")
    loader = TorchLoader(train_set, cfg.batch_size, shuffle=False, num_workers=num_workers)
    n = len(train_set)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    lr = cosine_schedule(cfg.lr, cfg.lr * cfg.final_lr_fraction, cfg.epochs * per_epoch)
    t = cfg.temperature
    stored = None
    if stored_labels is not None:
        sizes = [min(cfg.batch_size, n - i) for i in range(0, n - world + 1, cfg.batch_size)] * cfg.epochs
        stored = _stored_targets(stored_labels, sizes)
    step, losses, checks, best = 0, [], [], None
    with console.progress(progress) as bar:
        task = bar.add_task(description, total=cfg.epochs * per_epoch, info="")
        for epoch in range(cfg.epochs):
            epoch_loss = torch.zeros((), device=device)
            for x, y in _batches(loader, image_size, cfg, g, device, epoch):
                batch, part = len(x), dist.shard(len(x))
                x = x[part.start:part.stop]
                for group in opt.param_groups:
                    group["lr"] = float(lr[step])
                with precision.autocast():
                    logits = net(x)
                log_p = F.log_softmax(logits.float() / t, 1)
                # this rank's sum over the global batch size, times the ranks DDP averages over: the batch mean
                if cfg.targets == "hard":
                    loss = F.cross_entropy(logits.float(), y[part.start:part.stop].to(device), reduction="sum")
                elif stored is not None:
                    probs = next(stored)[part.start:part.stop].to(device)
                    loss = F.kl_div(log_p, probs, reduction="sum")
                else:
                    soft = teacher_logits(teachers, x, precision)
                    loss = F.kl_div(log_p, F.log_softmax(soft / t, 1), reduction="sum", log_target=True)
                loss = loss * (world / batch)
                opt.zero_grad(set_to_none=True)
                precision.backward(loss)
                precision.step(opt)
                epoch_loss += loss.detach()
                step += 1
                bar.update(task, advance=1)
            dist.all_reduce(epoch_loss, "mean")
            losses.append(epoch_loss.item() / per_epoch)  # one sync per epoch
            bar.update(task, info=f"loss {losses[-1]:.4f}")
            if log:
                log(phase, epoch, train_loss=losses[-1], lr=float(lr[step - 1]))
            if val_set is not None and ((check_every and (epoch + 1) % check_every == 0) or epoch + 1 == cfg.epochs):
                acc = accuracy(student, val_set, device, image_size, precision, num_workers=num_workers)
                checks.append({"epoch": epoch + 1, "val_acc": acc})
                if log:
                    log(phase, epoch, val_acc=acc)
                if best is None or acc > best["val_acc"]:  # strict: the earliest of equal checks
                    best = {"epoch": epoch + 1, "val_acc": acc,
                            "state": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}}
    result = {"final_loss": losses[-1] if losses else float("nan"),
              "first_loss": losses[0] if losses else float("nan")}
    if best is not None:
        student.load_state_dict(best.pop("state"))
        result.update(best_epoch=best["epoch"], val_acc=best["val_acc"], checks=checks)
    if test_set is not None:
        result["test_acc"] = accuracy(student, test_set, device, image_size, precision, num_workers=num_workers,
                                      progress=progress)
        if log:
            log(phase, cfg.epochs, test_acc=result["test_acc"])
    result["model"] = student
    return result
