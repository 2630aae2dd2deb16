"""Per-run profile: wall time per phase, images/s, peak CUDA memory and peak host RSS -> ``profile.json``.

Phases are NVTX ranges too (``nvtx`` package, a cheap no-op without a GPU), so an Nsight timeline of a run
shows the same names as its profile.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict

import nvtx
import torch


class Profiler:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.images: dict[str, int] = defaultdict(int)
        self.rss: dict[str, float] = {}  # peak host RSS (MiB) of the process when the phase last ended
        self.start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def phase(self, name: str, images: int = 0):
        """Time a phase (accumulating over calls) and count the images it processed.

        On CUDA the device is synchronised at the phase's end so that its time is the device's, not the
        launch queue's; phases wrap whole loops, never single steps, so this sync is rare.
        """
        with nvtx.annotate(name):
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - t0
            self.images[name] += images
            self.rss[name] = _peak_rss_mib()

    def add_images(self, name: str, n: int) -> None:
        self.images[name] += n

    def report(self) -> dict:
        out = {
            "device": str(self.device),
            "wall_s": time.perf_counter() - self.start,
            "phases": {k: {"s": v, "images": self.images.get(k, 0),
                           "images_per_s": self.images.get(k, 0) / v if v > 0 and self.images.get(k) else None,
                           "peak_host_rss_mib": self.rss.get(k)}
                       for k, v in self.seconds.items()},
            "peak_host_rss_mib": _peak_rss_mib(),
        }
        if self.device.type == "cuda":
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["cuda_device"] = torch.cuda.get_device_name(self.device)
        return out


def _peak_rss_mib() -> float:
    """Peak resident set of this process so far (``ru_maxrss`` is KiB on Linux); DataLoader workers not included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
