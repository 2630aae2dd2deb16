"""One checkpoint format: a dict of everything the next step needs, written atomically.

A checkpoint holds model/synthetic tensors, optimiser, scaler, loss state, every RNG state and the step,
so a resumed run ends where an unbroken one does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdistill.engine.seeding import rng_state, set_rng_state

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out_dir: Path, state: dict) -> Path:
    """Write ``state`` plus the RNG states to ``out_dir/checkpoint.pt`` (temp file + rename: a kill
    during the write leaves the previous checkpoint intact)."""
    path = Path(out_dir) / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "rng": rng_state()}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path) -> dict | None:
    """The checkpoint of ``out_dir`` with the RNG states restored, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return state
