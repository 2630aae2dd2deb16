"""Host memory available now: the budget of ``data.cache: auto`` and of LGM's ``chunk_size: auto`` on CPU."""
from __future__ import annotations


def available_mib() -> float:
    """``MemAvailable`` of /proc/meminfo in MiB (what can be allocated without swapping); the total RAM where
    /proc is absent."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20

