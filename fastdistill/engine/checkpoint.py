"""One checkpoint format: a dict of everything the next step needs, written atomically.

A checkpoint holds model/synthetic tensors, optimiser, scaler, loss state, every RNG state and the step,
so a resumed run ends where an unbroken one does.

Under torchrun a checkpoint is either replicated (training: every rank holds the same model, rank 0 writes it
with every rank's RNG state) or sharded (FADRM: each rank owns other batches and writes its own file).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdistill.engine import distributed as dist
from fastdistill.engine.seeding import rng_state, set_rng_state

CHECKPOINT = "checkpoint.pt"


def shard_name(rank: int) -> str:
    """The sharded checkpoint of ``rank``; rank 0's is the plain one, so one process reads it as usual."""
    return CHECKPOINT if rank == 0 else f"checkpoint.rank{rank}.pt"


def save_checkpoint(out_dir: Path, state: dict, sharded: bool = False) -> Path:
    """Write ``state`` plus the RNG states (temp file + rename: a kill during the write leaves the previous
    checkpoint intact). Replicated (default): every rank calls it, rank 0 writes. Sharded: every rank writes its
    own file."""
    path = Path(out_dir) / (shard_name(dist.rank()) if sharded else CHECKPOINT)
    rngs = [rng_state()] if sharded else dist.all_gather_object(rng_state())
    if sharded or dist.is_main():
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**state, "rng": rngs[0], "rng_ranks": rngs}, tmp)
        os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path, sharded: bool = False) -> dict | None:
    """This rank's checkpoint of ``out_dir`` with its RNG states restored, or None when there is none."""
    path = Path(out_dir) / (shard_name(dist.rank()) if sharded else CHECKPOINT)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    rngs = state.pop("rng_ranks", [state["rng"]])
    # resumed with another number of processes: the ranks beyond the saved ones start from rank 0's streams
    set_rng_state(rngs[dist.rank()] if len(rngs) == dist.world_size() else state["rng"])
    state.pop("rng")
    return state


def load_shards(out_dir: Path) -> list[dict]:
    """Every rank's sharded checkpoint in ``out_dir`` (rank 0's first), RNG states left alone."""
    paths = sorted(Path(out_dir).glob("checkpoint*.pt"), key=lambda p: (p.name != CHECKPOINT, p.name))
    return [torch.load(p, map_location="cpu", weights_only=False) for p in paths]


def resume_checkpoint(out_dir: Path, config, sharded: bool = False) -> dict:
    """For ``resume=true``: this rank's checkpoint of ``out_dir`` (RNG restored), which must exist and must have
    been saved with ``state["config"] == config``; one-line errors otherwise."""
    state = load_checkpoint(out_dir, sharded)
    if state is None:
        raise FileNotFoundError(f"resume=true but '{out_dir}' has no {CHECKPOINT}; pass the out= of the run")
    if state.get("config") != config:
        raise ValueError(f"the checkpoint in '{out_dir}' was made with another config; resume with the same overrides")
    return state
