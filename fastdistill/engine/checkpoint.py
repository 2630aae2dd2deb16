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


def resume_checkpoint(out_dir: Path, config) -> dict:
    """For ``resume=true``: the checkpoint of ``out_dir`` (RNG restored), which must exist and must have been saved
    with ``state["config"] == config``; one-line errors otherwise."""
    state = load_checkpoint(out_dir)
    if state is None:
        raise FileNotFoundError(f"resume=true but '{out_dir}' has no checkpoint.pt; pass the out= of the run")
    if state.get("config") != config:
        raise ValueError(f"the checkpoint in '{out_dir}' was made with another config; resume with the same overrides")
    return state
