"""Benchmark scale-out under torchrun: images/s and peak memory per process with 1 and K processes, in one run.

Workloads (each a real ``python -m fastdistill.run`` of the recipe, launched by ``torchrun --nproc_per_node=K``
for K > 1 and as one plain process for K = 1; numbers from the run's ``profile.json``):
    fadrm     sharded FADRM recovery: synthetic images recovered per second (ipc batches divided among ranks)
    teacher   DDP supervised training: training images per second (each rank a slice of every global batch)

On CPU the machine's cores are shared out: one process runs with all ``--threads`` threads, K processes with
``threads / K`` each, so every row uses the whole machine. On CUDA each rank takes one GPU.

    python benchmarks/bench_scaling.py                       # 1 and 2 processes, both workloads
    python benchmarks/bench_scaling.py --procs 1 2 4 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import print_table, write_results  # noqa: E402

WORKLOADS = {
    # the teacher cache is shared by the runs: the first run trains the smoke teacher FADRM recovers from
    "fadrm": (["+method=fadrm", "preset=smoke", "ipc=8", "method.stage_sizes=[24,28]",
               "method.stage_iterations=20", "method.eval.students=[]", "method.eval.real_random=false",
               "checkpoint_every=0"], "recover"),
    "teacher": (["+method=teacher", "preset=smoke", "method.cache=false", "checkpoint_every=0"], "train"),
}


def phase_images(workload: str, profile: dict, phase: str) -> float:
    """Images the phase processed, summed over ranks (rank 0's profile counts its own slice of a DDP batch)."""
    p = profile["phases"][phase]
    return p["images"] * (profile["world_size"] if workload == "teacher" else 1)


def run_one(workload: str, procs: int, threads: int, device: str, cache: Path) -> dict:
    overrides, phase = WORKLOADS[workload]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        launcher = [sys.executable] if procs == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs)), "FASTDISTILL_CACHE": str(cache)}
        cmd = [*launcher, "-m", "fastdistill.run", *overrides, f"out={out}", f"device={device}", "progress=false"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{workload} with {procs} processes failed:\n{r.stderr[-3000:]}")
        profile = json.loads((out / "profile.json").read_text())
    profile["world_size"] = procs
    seconds = profile["phases"][phase]["s"]
    row = {"workload": workload, "processes": procs, "threads_per_process": max(1, threads // procs),
           "phase": phase, "seconds": seconds, "images_per_s": phase_images(workload, profile, phase) / seconds,
           "wall_s": profile["wall_s"], "peak_mib_per_process": profile["peak_host_rss_mib"]}
    if "peak_cuda_mib" in profile:
        row["peak_cuda_mib_per_process"] = profile["peak_cuda_mib"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (1 first: the baseline)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared out among processes")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.procs[0] != 1:
        parser.error("--procs must start with 1: the speed-up is against one process")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for workload in args.workloads:
            run_one(workload, 1, args.threads, args.device, Path(cache))  # warm-up: teacher cache, imports
            base = None
            for k in args.procs:
                row = run_one(workload, k, args.threads, args.device, Path(cache))
                base = base or row
                row["speedup"] = row["images_per_s"] / base["images_per_s"]
                rows.append(row)
                print_table([row], list(row))
    print()
    print_table(rows, ["workload", "processes", "threads_per_process", "images_per_s", "speedup",
                       "peak_mib_per_process", "seconds"])
    path = write_results("scaling", rows, torch.device(args.device), args.out_dir)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
