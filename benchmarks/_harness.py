"""Shared timing and memory harness for ``benchmarks/bench_<name>.py`` (Liger-Kernel's benchmark/scripts/utils.py).

A benchmark builds inputs and one closure per provider (``eager`` = the authors' formulation or the
``losses/`` reference, then the fast paths), calls :func:`measure` on each, and :func:`write_results`.
Speed and memory are reported as ratios to the first provider measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")  # what decides CPU kernels


def cpu_info() -> dict:
    """This CPU's model name and which of ``CPU_FLAGS`` it has (Linux /proc/cpuinfo; empty where unreadable): bf16
    on CPU is 1.5-1.9x slower than fp32 without avx512_bf16 / AMX and about 2x faster with them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    field = lambda key: next((x.split(":", 1)[1].strip() for x in lines if x.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    return {"model": field("model name"), "flags": [f for f in CPU_FLAGS if f in flags]}


def git_sha() -> str:
    """The revision measured: ``FASTDISTILL_GIT_SHA`` when set (a copied checkout may carry stale git metadata),
    else ``git describe --always --dirty``."""
    if os.environ.get("FASTDISTILL_GIT_SHA"):
        return os.environ["FASTDISTILL_GIT_SHA"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> dict:
    """Median/p20/p80 milliseconds of ``fn`` and its peak memory in MiB above the state before the call.

    On CUDA the peak is ``max_memory_allocated`` after a reset; on CPU it is the growth of host RSS
    sampled after each call, a lower bound of the true peak (glibc returns freed pages lazily).
    """
    for _ in range(warmup):  # compile, autotune, allocator warm-up
        fn()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = host_rss_mib()
    times, peak = [], 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)  # the clock is read only after the device has finished
        times.append((time.perf_counter() - t0) * 1e3)
        if device.type != "cuda":
            peak = max(peak, host_rss_mib() - base)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"ms_p50": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], "peak_mib": max(peak, 0.0)}


def add_ratios(rows: list[dict], key: tuple[str, ...] = ("shape", "mode", "dtype")) -> list[dict]:
    """Add ``speedup`` and ``memory_ratio`` of each row against the ``eager`` row with the same key."""
    base = {tuple(r.get(k) for k in key): r for r in rows if r["provider"] == "eager"}
    for r in rows:
        ref = base.get(tuple(r.get(k) for k in key))
        if ref is not None:
            r["speedup"] = ref["ms_p50"] / r["ms_p50"] if r["ms_p50"] > 0 else float("nan")
            r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")
    return rows


def write_results(name: str, rows: list[dict], device: torch.device, out_dir: Path | None = None) -> Path:
    """Write rows with the device, versions and git revision to ``benchmarks/results/<name>_<device>.json``."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "device": device_name(device),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": rows,
    }
    if device.type == "cpu":
        record["cpu"] = cpu_info()
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    path = out_dir / f"{name}_{device.type}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table (the README tables are generated from the JSON)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def saved_mib(loss_fn: Callable[[], torch.Tensor], inputs) -> float:
    """MiB of distinct storages the loss's autograd graph saves for the backward, the inputs' own excepted: the
    memory alive between forward and backward (deterministic, where host RSS hardly moves on CPU)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(saved.values()) / 2**20


def mode_fn(loss_fn: Callable[[], torch.Tensor], inputs, mode: str) -> Callable[[], object]:
    """The closure timed for ``mode``: ``forward`` (the loss alone) or ``full`` (loss and its input gradients)."""
    if mode == "forward":
        return loss_fn

    def full():
        torch.autograd.grad(loss_fn(), inputs)
    return full


def measure_alternating(closures: dict[str, Callable], device: torch.device, rounds: int, warmup: int,
                        repeats: int) -> dict[str, dict]:
    """:func:`measure` every provider ``rounds`` times in a rotated order, so drift and CPU steal hit all of
    them alike; medians of the rounds' quantiles and the largest peak."""
    names = list(closures)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(measure(closures[name], device, warmup=warmup, repeats=repeats))
    return {name: {**{k: statistics.median(x[k] for x in rs) for k in ("ms_p50", "ms_p20", "ms_p80")},
                   "peak_mib": max(x["peak_mib"] for x in rs)} for name, rs in runs.items()}


def kernel_parser(doc: str, providers: tuple[str, ...], grad_target: str) -> argparse.ArgumentParser:
    """The options every kernel benchmark shares; the benchmark adds its shape options."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["forward", "full"],
                        help=f"full = forward + backward to the {grad_target} (what a step pays); forward = loss only")
    parser.add_argument("--providers", nargs="+", default=list(providers), choices=providers)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per provider; medians over rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per round (compile, autotune)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is steadier on a shared machine)")
    parser.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default: benchmarks/results)")
    return parser


def parse_kernel_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, require the eager baseline (every ratio is to it) and set the CPU threads."""
    args = parser.parse_args(argv)
    if "eager" not in args.providers:
        parser.error("--providers must include eager: speed and memory are ratios to it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args
