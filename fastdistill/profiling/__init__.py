"""Run profiling: phase timers with NVTX ranges, images/s, peak memory."""
from fastdistill.profiling.profiler import Profiler

__all__ = ["Profiler"]
