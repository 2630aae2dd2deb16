"""The one resumable epoch loop of every training recipe (teacher, DINO, MAE, the stages of kd_clip and kd_multi):
one way to count steps, average the losses over the ranks, log them, checkpoint and resume mid-epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdistill import console
from fastdistill.engine import distributed as dist


@dataclass
class Position:
    """Where a run of epochs stands; saved in the recipe's checkpoint (``state_dict``) and restored from it."""

    epoch: int = 0  # the epoch in progress, or the next one to run
    step: int = 0  # optimiser steps done
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # loss sums of the epoch in progress, on the device

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "sums": dict(self.sums)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> "Position":
        return cls(state["epoch"], state["step"], {k: v.to(device) for k, v in state["sums"].items()})


def run_epochs(position: Position, loader, epochs: int, step: Callable[[torch.Tensor, torch.Tensor, int], object], *,
               lr, save: Callable[[], None], out, profiler, history: list, label: str, progress, checkpoint_every: int,
               phase: str = "train", log: Callable[[int], dict] | None = None) -> None:
    """Train from ``position`` to ``epochs``, moving ``position`` along.

    ``loader.epoch(e, start=k)`` replays epoch ``e`` from its step ``k``; ``step(x, y, epoch)`` makes one optimiser
    step and returns its loss (a tensor, logged as ``train_loss``) or a dict of loss terms. The epoch's means are
    read once per epoch (one device sync), averaged over the ranks, appended to ``history`` with ``log(epoch)``'s
    keys, and written to the run's metric history (``out``, a RunDir) under ``phase`` with the last step's
    learning rate (``lr``: one value per step). A non-finite mean stops the run naming its term. ``save()`` writes
    the recipe's checkpoint: every ``checkpoint_every`` steps (mid-epoch) and after every epoch."""
    steps_per_epoch = len(loader)
    if position.step:
        out.rewind(phase, position.epoch - 1)  # the epochs before the checkpoint stay; the rest is logged again
    with console.progress(progress) as bar, profiler.phase(phase):
        task = bar.add_task(label, total=epochs * steps_per_epoch, completed=position.step, info="")
        for epoch in range(position.epoch, epochs):
            position.epoch = epoch
            start = position.step - epoch * steps_per_epoch
            if start == 0:
                position.sums = {}
            for x, y in loader.epoch(epoch, start=start):
                terms = step(x, y, epoch)
                if isinstance(terms, torch.Tensor):
                    terms = {"train_loss": terms}
                for key, value in terms.items():
                    value = value.detach()
                    position.sums[key] = position.sums[key] + value if key in position.sums else value.clone()
                profiler.add_images(phase, len(y))  # x: a batch, or a list of views
                position.step += 1
                bar.update(task, advance=1)
                if checkpoint_every and position.step % checkpoint_every == 0:
                    save()
            keys = sorted(position.sums)
            sums = dist.all_reduce(torch.stack([position.sums[k].float() for k in keys]), "mean")
            means = dict(zip(keys, (sums / steps_per_epoch).tolist()))
            bad = [k for k, v in means.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"non-finite {bad[0]} in {label} at epoch {epoch}, step {position.step}")
            history.append({"epoch": epoch, **means, **(log(epoch) if log else {})})
            out.log(phase, epoch, **{"lr": float(lr[position.step - 1]), **history[-1]})
            main = means.get("train_loss", means.get("loss"))
            bar.update(task, info=f"loss {main:.3f}" if main is not None else "")
            position.epoch = epoch + 1
            save()
