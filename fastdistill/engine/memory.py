"""Memory budgets: host memory available now (``data.cache: auto``) and the activations a backbone saves per view
(LGM's ``chunk_size: auto``)."""
from __future__ import annotations

import torch


def available_mib() -> float:
    """``MemAvailable`` of /proc/meminfo in MiB (what can be allocated without swapping); the total RAM where
    /proc is absent."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def activation_mib_per_view(backbone, size: tuple[int, int], precision) -> float:
    """MiB that autograd saves per view in one forward of ``backbone`` (a models.Backbone, under ``precision``, an
    engine.Precision; the slope between 2 and 4 views, so that
    batch-independent buffers do not count; weights excluded): what a pass-2 chunk of views keeps alive."""
    device = backbone.mean.device
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}

    def saved_bytes(n: int) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.zeros(n, 3, *size, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast():
            backbone.embed(x)
        return sum(seen.values())

    return max(saved_bytes(4) - saved_bytes(2), 1) / 2 / 2**20


def memory_budget_mib(device: torch.device) -> float:
    """Default activation budget of ``chunk_size: auto``: half the free CUDA memory, a quarter of the host's
    available memory on CPU (pass 1's features, the decode and the allocator need the rest)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2 / 2**20
    return available_mib() / 4


def auto_chunk_size(backbones: list, size: tuple[int, int], precision,
                    budget_mib: float | None) -> int:
    """The largest chunk whose saved activations fit the budget in the largest backbone (pass 2 runs one backbone
    at a time)."""
    budget = budget_mib or memory_budget_mib(backbones[0].mean.device)
    per_view = max(activation_mib_per_view(b, size, precision) for b in backbones)
    return max(1, int(budget // per_view))
