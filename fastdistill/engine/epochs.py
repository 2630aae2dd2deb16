"""The resumable epoch loop of the training recipes (teacher, DINO, MAE): one way to count steps, average the
loss over the ranks, checkpoint and resume mid-epoch."""
from __future__ import annotations

import math
from typing import Callable

import torch

from fastdistill import console
from fastdistill.engine import distributed as dist


def train_epochs(run, name: str, step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], loss_name: str,
                 log: Callable[[int], dict] | None = None) -> None:
    """Train ``run`` from its saved position (``run.epoch``, ``run.step``) to ``cfg.method.epochs``.

    ``run`` is a recipe with ``cfg``, ``device``, ``loader`` (whose ``epoch(e, start=k)`` replays epoch ``e`` from
    its step ``k``), ``lr`` (one value per step), ``steps_per_epoch``, ``profiler``, ``history``, ``loss_sum`` (of
    the epoch in progress) and ``save_checkpoint(epoch)`` (``epoch``: the next to run, or the one in progress for
    a mid-epoch checkpoint). ``step(x, y, epoch)`` makes one optimiser step and returns its loss. The epoch's mean
    loss is read once per epoch (one device sync) and a non-finite one stops the run, naming ``loss_name``;
    ``log(epoch)`` adds keys to the epoch's history entry, which also goes to the run's metric history
    (``run.out``, a RunDir) with the last step's learning rate. A checkpoint is written every ``cfg.checkpoint_every``
    steps and after every epoch."""
    every = run.cfg.checkpoint_every
    if run.step:
        run.out.rewind("train", run.epoch - 1)  # the epochs before the checkpoint stay; the rest is logged again
    with console.progress(run.cfg.progress) as bar, run.profiler.phase("train"):
        task = bar.add_task(f"{name} {run.cfg.model}", total=len(run.lr), completed=run.step, info="")
        for epoch in range(run.epoch, run.cfg.method.epochs):
            start = run.step - epoch * run.steps_per_epoch
            if start == 0:
                run.loss_sum = torch.zeros((), device=run.device)
            for x, y in run.loader.epoch(epoch, start=start):
                loss = step(x, y, epoch)
                run.loss_sum += loss.detach()
                run.profiler.add_images("train", x.shape[0])
                run.step += 1
                bar.update(task, advance=1)
                if every and run.step % every == 0:
                    run.save_checkpoint(epoch)
            mean_loss = dist.all_reduce(run.loss_sum.clone(), "mean").item() / run.steps_per_epoch
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"non-finite {loss_name} at epoch {epoch}, step {run.step}")
            run.history.append({"epoch": epoch, "train_loss": mean_loss, **(log(epoch) if log else {})})
            run.out.log("train", epoch, **{"lr": run.lr[run.step - 1], **run.history[-1]})
            bar.update(task, info=f"loss {mean_loss:.3f}")
            run.epoch = epoch + 1
            run.save_checkpoint(run.epoch)
