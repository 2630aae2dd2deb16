"""Scale-out with torchrun: the one module that talks to ``torch.distributed``.

``torchrun --nproc_per_node=K -m fastdistill.run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``init`` joins the
process group (gloo on CPU, NCCL on CUDA). Without torchrun every function is the trivial single-process case,
so a recipe runs the same code either way and never checks which one it is in.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as td

OPS = {"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_alone: bool | None = None  # inside alone(): whether this process speaks (prints); None outside


def is_initialized() -> bool:
    return _alone is None and td.is_available() and td.is_initialized()


@contextlib.contextmanager
def alone(speaks: bool):
    """Within, this rank computes as a single process (e.g. a whole student of its own while the other ranks train
    theirs): every function here is the one-process case, rank 0 of 1, no collective; only a rank that ``speaks``
    prints (:func:`speaks`). The ranks meet again after."""
    global _alone
    before, _alone = _alone, speaks
    try:
        yield
    finally:
        _alone = before


def speaks() -> bool:
    """Whether this process prints: rank 0, and inside :func:`alone` the rank it names (one voice on the terminal
    while every rank is rank 0 of its own)."""
    return is_main() if _alone is None else _alone


def init(device: torch.device, timeout_min: float = 30.0) -> torch.device:
    """Join the torchrun process group once; the device this rank computes on (``cuda:LOCAL_RANK`` on CUDA)."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                              **({"device_id": device} if device.type == "cuda" else {}))
    return device


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place across ranks (``sum``, ``mean``, ``max``, ``min``) and return it."""
    if op not in (*OPS, "mean"):
        raise ValueError(f"unknown reduce op {op!r}; expected one of sum, mean, max, min")
    if world_size() > 1:
        td.all_reduce(t, OPS["sum" if op == "mean" else op])
        if op == "mean":
            t.div_(world_size())
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        td.broadcast(t, src)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def shard(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous slice of ``n`` items this rank owns: equal parts, the remainder to the first ranks."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def check_replicas(t: torch.Tensor, what: str) -> None:
    """Stop with a clear error when the replicas of ``t`` differ across ranks (they must stay identical)."""
    if world_size() == 1:
        return
    s = t.detach().double()
    # two checksums catch a permutation as well as a changed value
    local = torch.stack([s.sum(), (s.flatten() * torch.arange(1, s.numel() + 1, dtype=s.dtype,
                                                              device=s.device)).sum()])
    hi, lo = all_reduce(local.clone(), "max"), all_reduce(local.clone(), "min")
    if not torch.equal(hi, lo):
        raise RuntimeError(f"the replicas of {what} differ across ranks (checksums {lo.tolist()} .. {hi.tolist()}): "
                           "the ranks diverged")


def wrap_ddp(module: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` when there are several ranks, else ``module`` itself."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = device or next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup() -> None:
    if is_initialized():
        # torch's destroy does not join gloo's worker threads: one that frees the last collective's tensors after
        # interpreter shutdown has begun cannot take the GIL and aborts the process ('terminate called without an
        # active exception'). Collecting first frees what cycles hold and gives those threads time to finish: 2-rank
        # CPU runs aborted in 6 of 32 without, in 1 of about 110 with it
        gc.collect()
        td.destroy_process_group()
