"""Soft-label student training: how a distilled set is judged (SRe2L, RDED, FADRM evaluation).

A student of any architecture trains from scratch on the distilled images; every batch is augmented
(random-resized-crop, flip where allowed, optionally CutMix) and relabelled online by the frozen teacher(s): the
loss is ``KL(softmax(t / T) || softmax(s / T))`` with the teachers' logits averaged (FADRM+), no ``T^2`` factor as
in the published validation. The published pipeline's switches (Jiacheng8/FADRM ``relabel/``, ``validate/``):
``teacher_bn="half_batch"`` (teachers in train mode over each half of the batch), ``cutmix`` (the teachers label
the mixed images), ``accumulation_steps`` (a batch of 16 as 2 x 8), ``lr_schedule="epoch"`` (the cosine with eta,
stepped per epoch); weight decay is on weights only, as published. Nothing is written per epoch (the published FKD
label files reach ~30 GB at ImageNet-1k IPC 50). The reported accuracy is the FINAL epoch's, never the best over
test evaluations; a caller that selects a best epoch passes a validation split carved from the training data
(``data/splits.py``).

``relabel=store`` instead relabels ahead of training (FKD style, :func:`store_soft_labels`): the crops of every
epoch are replayed from the student's seed and their teacher logits stored in a compact format (fp16, top-k,
8/4-bit; ``data/soft_labels.py``), which the training then reads back through a stock ``DataLoader``.

Under torchrun the student is a DistributedDataParallel replica: every rank draws the same global batch and
augmentation, keeps its slice, and the loss is scaled so that the averaged gradient is the one-process batch
mean. The learning rate is defined for the global batch and never divided by the number of processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fastdistill import console
from fastdistill.artifacts import write_json
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.soft_labels import SoftLabelShards, SoftLabelWriter
from fastdistill.data.transforms import to_input, train_augment
from fastdistill.engine import distributed as dist
from fastdistill.engine.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fastdistill.engine.optim import param_groups
from fastdistill.engine.precision import Precision
from fastdistill.engine.schedules import cosine_per_epoch, cosine_schedule
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
    accumulation_steps: int = 1  # micro-batches per batch: BN sees batch_size / steps images, the step the batch mean
    cutmix: float = 0.0  # Beta(a, a) CutMix of every augmented batch, labelled by the teachers after mixing; 0 = off
    teacher_bn: str = "running"  # running: teachers in eval mode | half_batch: BN over each half of the batch
    lr_schedule: str = "step"  # step: cosine per step to lr * final | epoch: the published per-epoch cosine with eta

    @classmethod
    def from_eval(cls, e, hflip: bool, **overrides) -> "StudentConfig":
        """A ``method.eval`` section (keys a saved run's config may predate take their defaults here)."""
        keys = {f: e.get(f) for f in cls.__dataclass_fields__ if e.get(f) is not None}
        if "crop_scale" in keys:
            keys["crop_scale"] = tuple(keys["crop_scale"])
        return cls(**{**keys, "hflip": hflip, **overrides})


TARGETS = ("soft", "hard")
TEACHER_BN = ("running", "half_batch")
LR_SCHEDULES = ("step", "epoch")


def check_student_config(cfg: StudentConfig) -> None:
    """One line for a choice the trainer does not know or a batch the micro-batches do not divide."""
    for name, value, choices in (("targets", cfg.targets, TARGETS), ("teacher_bn", cfg.teacher_bn, TEACHER_BN),
                                 ("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)):
        if value not in choices:
            raise ValueError(f"student {name} must be one of {', '.join(choices)}, got {value!r}")
    steps = cfg.accumulation_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or cfg.batch_size % steps:
        raise ValueError(f"student accumulation_steps must be an integer >= 1 dividing batch_size {cfg.batch_size}, "
                         f"got {steps!r}")
    if cfg.cutmix < 0:
        raise ValueError(f"student cutmix must be >= 0 (the Beta parameter; 0 = off), got {cfg.cutmix!r}")
    if cfg.cutmix > 0 and cfg.targets == "hard":
        raise ValueError("student cutmix needs soft targets: the teachers label the mixed images")


@contextlib.contextmanager
def batch_statistics(net: torch.nn.Module):
    """BN layers of ``net`` normalise with the statistics of the batch they see (train mode) inside the block; their
    mode and running statistics are restored on exit (a frozen teacher stays as it was)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, {k: v.clone() for k, v in m.named_buffers()}) for m in bns]
    for m in bns:
        m.train()
    try:
        yield net
    finally:
        with torch.no_grad():
            for m, (training, buffers) in zip(bns, saved):
                m.train(training)
                for k, v in m.named_buffers():
                    v.copy_(buffers[k])


@torch.no_grad()
def teacher_logits(teachers: list[Backbone], x: torch.Tensor, precision: Precision,
                   bn: str = "running") -> torch.Tensor:
    """Mean logits of the teachers (FADRM+ relabelling averages the ensemble's logits), fp32.

    ``bn="half_batch"``: every BN layer normalises each half of ``x`` with that half's statistics, as the published
    relabelling runs its teachers in train mode on the two halves of each batch (BSSL, Jiacheng8/FADRM
    ``relabel/relabel.py``); the running statistics are left as they are. A batch of fewer than 4 images is one
    group, and a single image uses the running statistics."""
    if bn == "running" or len(x) < 2:
        with precision.autocast():
            return torch.stack([t(x).float() for t in teachers]).mean(0)
    half = len(x) // 2
    groups = [x[:half], x[half:]] if len(x) >= 4 else [x]
    out = []
    for t in teachers:
        with precision.autocast(), batch_statistics(t):
            out.append(torch.cat([t(g).float() for g in groups]))
    return torch.stack(out).mean(0)


def cutmix(x: torch.Tensor, alpha: float, g: torch.Generator) -> torch.Tensor:
    """CutMix of a batch (Yun et al. 2019) as the published FKD relabelling draws it (Jiacheng8/FADRM
    ``relabel/utils_fkd.py``): one ratio lam ~ Beta(alpha, alpha) and one box for the whole batch, each image taking
    the box from the image a random permutation pairs it with. The box side is int(side sqrt(1 - lam)), halved about
    a uniform pixel centre and clipped to the image. No label mixing: the teachers label the mixed images."""
    n, _, height, width = x.shape
    lam = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g))).beta(alpha, alpha)
    perm = torch.randperm(n, generator=g)
    cut = math.sqrt(1.0 - lam)
    centre = torch.randint(0, height, (1,), generator=g).item(), torch.randint(0, width, (1,), generator=g).item()
    (r1, r2), (c1, c2) = [(min(max(c - int(side * cut) // 2, 0), side), min(max(c + int(side * cut) // 2, 0), side))
                          for c, side in zip(centre, (height, width))]
    x = x.clone()
    x[:, :, r1:r2, c1:c2] = x[perm.to(x.device), :, r1:r2, c1:c2]
    return x


def student_optimizer(student: torch.nn.Module, cfg: StudentConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the multi-dimensional weights only (convolutions, linear layers), none on biases
    and norm gains, as the published validation groups them (Jiacheng8/FADRM ``validate/utils_validate.py``)."""
    return torch.optim.AdamW(param_groups(student), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_per_step(cfg: StudentConfig, per_epoch: int) -> torch.Tensor:
    """float64 (epochs * per_epoch,): ``step``, a cosine per step from lr to lr * final_lr_fraction; ``epoch``, the
    published cosine stepped once per epoch (:func:`~fastdistill.engine.schedules.cosine_per_epoch`)."""
    final = cfg.lr * cfg.final_lr_fraction
    if cfg.lr_schedule == "epoch":
        return cosine_per_epoch(cfg.lr, final, cfg.epochs).repeat_interleave(per_epoch)
    return cosine_schedule(cfg.lr, final, cfg.epochs * per_epoch)


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
            if cfg.cutmix > 0:
                x = cutmix(x, cfg.cutmix, g)
        yield x, y


def steps_per_epoch(n: int, batch_size: int) -> int:
    return len(range(0, n - dist.world_size() + 1, batch_size))


STORED = "stored.json"  # written last by store_soft_labels: what the folder's labels are of, and their sizes


def _fingerprint(train_set: ImageDataset, teachers: list[Backbone]) -> str:
    """What a set of soft labels depends on beyond the training's settings: the images (their pixels in memory, else
    each file's path, size and mtime), their labels and every teacher weight."""
    h = hashlib.blake2b(digest_size=16)
    h.update(train_set.labels.cpu().numpy().tobytes())
    if train_set.images is not None:
        h.update(train_set.images.contiguous().numpy().tobytes())
    else:
        for path in train_set.paths:
            st = Path(path).stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    for t in teachers:
        for v in t.state_dict().values():
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def store_soft_labels(folder: str | Path, train_set: ImageDataset, teachers: list[Backbone],
                      image_size: tuple[int, int], cfg: StudentConfig, device: torch.device, precision: Precision,
                      seed: int, fmt: str, num_workers="auto", reuse: bool = False) -> dict:
    """FKD-style relabelling ahead of training: the teachers' logits of every crop :func:`train_student` will draw
    with ``seed`` (one row per image per epoch, in step order) as compact shards (``data/soft_labels.py``).
    Returns the folder's sizes; training reads it back through a stock ``DataLoader`` with no teacher in memory.
    ``reuse``: labels this folder already holds for the same seed, images, teachers, format, precision and training
    are kept, not relabelled (a resumed student: at ImageNet scale the pass is hours)."""
    folder = Path(folder)
    identity = {"seed": seed, "images": len(train_set), "classes": len(train_set.classes), "format": fmt,
                "precision": precision.name, "config": asdict(cfg), "fingerprint": _fingerprint(train_set, teachers)}
    marker = folder / STORED
    if reuse and marker.is_file():
        with contextlib.suppress(ValueError, KeyError):
            saved = json.loads(marker.read_text())
            if saved["identity"] == json.loads(json.dumps(identity)):  # tuples read back as lists
                return saved["stats"]
    marker.unlink(missing_ok=True)  # a pass cut off leaves no marker: its partial shards are never reused
    g = torch.Generator().manual_seed(seed)
    loader = TorchLoader(train_set, cfg.batch_size, shuffle=False, num_workers=num_workers)
    with SoftLabelWriter(folder, fmt, len(train_set.classes), cfg.temperature,
                         rows_per_shard=max(1, len(train_set))) as writer:  # one shard per epoch
        for epoch in range(cfg.epochs):
            for x, _ in _batches(loader, image_size, cfg, g, device, epoch):
                writer.add(teacher_logits(teachers, x, precision, cfg.teacher_bn))
    files = sum(f.stat().st_size for f in folder.glob("shard_*.safetensors"))
    n = max(len(train_set), 1)
    stats = {"format": fmt, "rows": writer.rows, "payload_bytes": writer.payload_bytes,
             "bytes_per_image": writer.payload_bytes / n, "file_bytes_per_image": files / n}
    write_json(marker, {"identity": identity, "stats": stats})
    return stats


def _stored_targets(folder: str | Path, sizes: list[int], start: int = 0):
    """Stored probabilities batch by batch (``sizes``: the rows of every step), in the order
    :func:`store_soft_labels` wrote them, from step ``start`` (a resumed training)."""
    shards = SoftLabelShards(folder)
    if len(shards) != sum(sizes):
        raise ValueError(f"stored soft labels '{folder}' hold {len(shards)} rows, the training draws {sum(sizes)} "
                         "crops; relabel with the same epochs, batch size and seed")
    starts = [0, *accumulate(sizes)][:-1]
    # a stock DataLoader, sequential: row i is the i-th crop of the training stream
    batches = [list(range(a, a + n)) for a, n in zip(starts, sizes)][start:]
    # its own generator: iterating draws a seed, which must not move the global stream a resume restores
    return iter(torch.utils.data.DataLoader(shards, batch_sampler=batches, generator=torch.Generator()))


def _student_loss(logits: torch.Tensor, target: torch.Tensor, cfg: StudentConfig, stored: bool) -> torch.Tensor:
    """The summed loss of a micro-batch: CE on hard labels, or KL(teacher || student) at temperature T without the
    T^2 factor (published) against stored probabilities or online log-probabilities."""
    if cfg.targets == "hard":
        return F.cross_entropy(logits.float(), target, reduction="sum")
    log_p = F.log_softmax(logits.float() / cfg.temperature, 1)
    if stored:
        return F.kl_div(log_p, target, reduction="sum")
    return F.kl_div(log_p, target, reduction="sum", log_target=True)


def train_student(arch: str, train_set: ImageDataset, teachers: list[Backbone], test_set: ImageDataset | None,
                  image_size: tuple[int, int], cfg: StudentConfig, device: torch.device, precision: Precision,
                  seed: int, model_kwargs: dict | None = None, num_workers="auto", progress: bool = False,
                  description: str = "student", *, stored_labels: str | Path | None = None,
                  val_set: ImageDataset | None = None, check_every: int = 0, num_classes: int | None = None,
                  out=None, phase: str = "student", checkpoint: str | Path | None = None, checkpoint_every: int = 0,
                  checkpoint_min_s: float = 60.0, resume: bool = False) -> dict:
    """Train ``arch`` from scratch on ``train_set`` (a distilled set read from disk, or real images).

    Targets: ``cfg.targets == "soft"``: the teachers' soft labels, online, or read from ``stored_labels`` (a folder
    of :func:`store_soft_labels`); ``"hard"``: cross-entropy on the set's own labels (no teacher).

    Model selection: with ``val_set`` the student is checked on it every ``check_every`` epochs and after the last;
    the best check's weights are kept (earliest on ties), and ``test_set=None`` leaves the test split untouched:
    the caller reads it once at the end with the returned ``model``. Without ``val_set`` the FINAL epoch is
    reported, never the best over test evaluations. ``out``: the run's folder (a ``RunDir``), whose metric history
    gets each epoch's loss and learning rate, the validation checks and the test accuracy under ``phase``.

    Checkpoints: with ``checkpoint`` (a folder of this training's own) and ``checkpoint_every`` > 0 the student,
    optimiser, scaler, sampling generator, RNG states and checks are saved at the end of the first epoch after
    every ``checkpoint_every`` steps and ``checkpoint_min_s`` seconds (whole epochs, so a resume replays no batch;
    the seconds because a student's state is tens of MB and fast epochs would write it every few seconds), and
    removed when the training ends. With ``resume`` a checkpoint there continues the training, which ends as an
    unbroken one does; one saved by another student, seed, set size or config is refused.
    """
    check_student_config(cfg)
    precision = Precision(precision.name, precision.device)  # its own loss scale: no student inherits another's
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = num_classes or (test_set.num_classes if test_set is not None else len(train_set.classes))
    student = create_backbone(arch, num_classes=classes, **(model_kwargs or {})).to(device).train()
    net = dist.wrap_ddp(student, device)
    opt = student_optimizer(student, cfg)
    world = dist.world_size()
    if cfg.batch_size < world:
        raise ValueError(f"student batch size {cfg.batch_size} is smaller than the {world} processes")
    loader = TorchLoader(train_set, cfg.batch_size, shuffle=False, num_workers=num_workers)
    n = len(train_set)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    lr = lr_per_step(cfg, per_epoch)
    # micro-batches of the published gradient accumulation (a loader batch of 16 as 2 x 8): BN sees each on its own.
    # The published training runs in one process; ranks take whole micro-batches while there are enough of them
    # (2 ranks: one 8 each, the published step up to summation order), else each rank's share at once
    published = cfg.batch_size // cfg.accumulation_steps
    micro = max(1, min(published, cfg.batch_size // world))
    if micro < published:
        console.note(f"student {arch}: {world} processes share a batch of {cfg.batch_size}, so BatchNorm sees {micro} "
                     f"images per micro-batch instead of {published}; at most {cfg.accumulation_steps} processes keep "
                     "the training of one")
    t = cfg.temperature
    step, losses, checks, best, first = 0, [], [], None, 0
    identity = {"arch": arch, "seed": seed, "images": n, "processes": world, "config": asdict(cfg)}
    folder = Path(checkpoint) if checkpoint is not None and checkpoint_every > 0 else None
    if folder is not None and resume and (folder / CHECKPOINT).is_file():
        state = load_checkpoint(folder)  # restores the RNG streams of the epoch boundary it was saved at
        if state["identity"] != identity:
            raise ValueError(f"the student checkpoint in '{folder}' was made by another training; remove it or "
                             "train with the same student, seed, set, config and number of processes")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        precision.load_state_dict(state["scaler"])
        g.set_state(state["generator"])
        first, step, losses, checks, best = (state[k] for k in ("epoch", "step", "losses", "checks", "best"))
    if resume and out is not None:  # what a killed attempt logged after the checkpoint (or at all) is logged again
        out.rewind(phase, first - 1)
    stored = None
    if stored_labels is not None:
        sizes = [min(cfg.batch_size, n - i) for i in range(0, n - world + 1, cfg.batch_size)] * cfg.epochs
        stored = _stored_targets(stored_labels, sizes, start=step)
    saved_at, saved_time = step, time.monotonic()
    with console.progress(progress) as bar:
        task = bar.add_task(description, total=cfg.epochs * per_epoch, completed=step, info="")
        for epoch in range(first, cfg.epochs):
            epoch_loss = torch.zeros((), device=device)
            for x, y in _batches(loader, image_size, cfg, g, device, epoch):
                batch, part = len(x), dist.shard(len(x))
                if cfg.targets == "hard":
                    target = y[part.start:part.stop].to(device)
                elif stored is not None:
                    target = next(stored)[part.start:part.stop].to(device)
                else:  # online: BN over halves of the global batch gives every rank the labels of one process
                    half = cfg.teacher_bn == "half_batch"
                    soft = teacher_logits(teachers, x if half else x[part.start:part.stop], precision, cfg.teacher_bn)
                    target = F.log_softmax((soft[part.start:part.stop] if half else soft) / t, 1)
                x = x[part.start:part.stop]
                for group in opt.param_groups:
                    group["lr"] = float(lr[step])
                opt.zero_grad(set_to_none=True)
                starts = range(0, len(x), micro)
                for i in starts:
                    last = i == starts[-1]
                    # DDP reduces the gradients once, after the last micro-batch
                    with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                        with precision.autocast():
                            logits = net(x[i:i + micro])
                        # this rank's sum over the global batch size, times the ranks DDP averages over: the
                        # micro-batches add up to the batch mean
                        loss = _student_loss(logits, target[i:i + micro], cfg, stored is not None) * (world / batch)
                        precision.backward(loss)
                    epoch_loss += loss.detach()
                precision.step(opt)
                step += 1
                bar.update(task, advance=1)
            dist.all_reduce(epoch_loss, "mean")
            losses.append(epoch_loss.item() / per_epoch)  # one sync per epoch
            bar.update(task, info=f"loss {losses[-1]:.4f}")
            if out is not None:
                out.log(phase, epoch, train_loss=losses[-1], lr=float(lr[step - 1]))
            if val_set is not None and ((check_every and (epoch + 1) % check_every == 0) or epoch + 1 == cfg.epochs):
                acc = accuracy(student, val_set, device, image_size, precision, num_workers=num_workers)
                checks.append({"epoch": epoch + 1, "val_acc": acc})
                if out is not None:
                    out.log(phase, epoch, val_acc=acc)
                if best is None or acc > best["val_acc"]:  # strict: the earliest of equal checks
                    best = {"epoch": epoch + 1, "val_acc": acc,
                            "state": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}}
            due = folder is not None and step - saved_at >= checkpoint_every and epoch + 1 < cfg.epochs
            # rank 0's clock decides: every rank takes part in the save
            if due and dist.broadcast(torch.tensor(time.monotonic() - saved_time, device=device)).item() \
                    >= checkpoint_min_s:
                folder.mkdir(parents=True, exist_ok=True)
                save_checkpoint(folder, {"identity": identity, "epoch": epoch + 1, "step": step, "losses": losses,
                                         "checks": checks, "best": best, "student": student.state_dict(),
                                         "optimizer": opt.state_dict(), "scaler": precision.state_dict(),
                                         "generator": g.get_state()})
                saved_at, saved_time = step, time.monotonic()
    result = {"final_loss": losses[-1] if losses else float("nan"),
              "first_loss": losses[0] if losses else float("nan")}
    if best is not None:
        student.load_state_dict(best.pop("state"))
        result.update(best_epoch=best["epoch"], val_acc=best["val_acc"], checks=checks)
    if test_set is not None:
        result["test_acc"] = accuracy(student, test_set, device, image_size, precision, num_workers=num_workers,
                                      progress=progress)
        if out is not None:
            out.log(phase, cfg.epochs, test_acc=result["test_acc"])
    if folder is not None and dist.is_main():
        for name in (CHECKPOINT, CHECKPOINT + ".tmp"):  # the temp file of a save a kill interrupted
            (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept when something else is in it
            folder.rmdir()
    result["model"] = student
    return result
