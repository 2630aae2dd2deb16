"""ImageNet-shaped rehearsal on CPU: peak memory and time per phase of FADRM, LGM and their evaluations on a folder
of 1000 classes of real JPEG files, at k = 2 and k = 10 images per class; peak RSS must not grow with k.

The runs are the README's ImageNet commands (``data=imagefolder data.root=/data/imagenet``, ``preset=paper``) with
only sizes changed (resolution, iterations, epochs, students) and, as no hub weights are at hand, random-initialised
networks: FADRM's ResNet-18 teacher gets its BN statistics from 2 real batches (``method.teacher_calibration``, a
benchmark option), LGM runs two small timm backbones and probes with a third. Each run is one ``python -m
fastdistill.run`` process; its peak memory is sampled as PSS over the whole process tree (the run and its loader
workers) and its peak RSS read from the run's ``profile.json`` (the run alone, per phase). Then the loader's images/s on the k = 10 JPEGs: torch
workers, and DALI (CPU) when the ``dali`` extra is installed.

    python benchmarks/bench_scale_rehearsal.py                   # k = 2 and 10, 1000 classes, ~10 min on 2 cores
    python benchmarks/bench_scale_rehearsal.py --classes 100 --ks 2 4 --root /tmp/rehearsal

Writes ``benchmarks/results/scale_rehearsal_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, the repo root is not on sys.path
from benchmarks._harness import print_table, write_results  # noqa: E402
from fastdistill.data.rehearsal import write_jpeg_folder  # noqa: E402

# the README's ImageNet commands; the rehearsal replaces the root and appends SIZES. data.cache=false: at 64 px the
# generated folder would fit the memory budget and data.cache=auto would decode it; at 224 px ImageNet-1k does not
# (about 193 GB), so auto streams there, and the rehearsal streams too
FADRM = ["+method=fadrm", "preset=paper", "data=imagefolder", "data.root=/data/imagenet", "data.image_size=224"]
LGM = ["+method=lgm", "preset=paper", "data=imagefolder", "data.root=/data/imagenet", "data.image_size=256"]
SIZES = {
    "fadrm": ["data.image_size=64", "data.cache=false", "ipc=1", "method.stage_sizes=[56,64,56,64]", "method.stage_iterations=1",
              "method.roll=8", "method.patches_per_side=1", "method.crops_per_image=1",
              "method.teacher_weights=none", "method.teacher_calibration=2",
              "method.eval.students=[timm:resnet18]", "method.eval.epochs=1", "method.relabel=store",
              # the 224-px command's ImageNet stems (auto would pick the CIFAR stem at 64 px) and fp32 (MPT is fp16
              # on the GPU; on this CPU it would be bf16)
              "method.cifar_stem=false", "method.mpt=false"],
    "lgm": ["data.image_size=64", "data.cache=false", "method.image_size=56", "ipc=1", "precision=fp32",
            "method.backbones=[timm:test_resnet,timm:test_efficientnet]", "method.backbone_pretrained=none",
            "method.backbone_kwargs=[{},{}]", "method.backbone_weights=[1.0,1.0]", "method.iterations=2",
            "method.augs_per_batch=2", "method.chunk_size=256", "eval.backbone=timm:test_byobnet",
            "eval.pretrained=none", "eval.image_size=56", "eval.runs=1", "eval.epochs=1"],
}


GROWTH_LIMIT = 0.15  # peak memory at the largest k over the smallest: at most +15 %
CEILING_MIB = 4096  # and no run above 4 GiB (process tree, workers included)


def tree_pss_mib(pid: int) -> float:
    """Proportional resident MiB (PSS) of ``pid`` and all its descendants (the run and its DataLoader workers), from
    /proc: forked workers share their parent's pages, which a sum of RSS would count once per process."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def run_recipe(name: str, root: Path, out: Path, threads: int) -> dict:
    """One run of the recipe on ``root``; its phases from profile.json and the sampled peak RSS of its tree."""
    base = FADRM if name == "fadrm" else LGM
    cmd = [sys.executable, "-m", "fastdistill.run", *[a if not a.startswith("data.root=") else f"data.root={root}"
                                                      for a in base], *SIZES[name], f"out={out}", "progress=false",
           "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_mib(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{stderr[-3000:]}")
    profile = json.loads((out / "profile.json").read_text())
    return {"command": " ".join(cmd[2:]), "wall_s": time.perf_counter() - t0, "peak_tree_pss_mib": peak[0],
            "peak_run_rss_mib": profile["peak_host_rss_mib"],
            "phases": {k: {"s": v["s"], "peak_rss_mib": v.get("peak_host_rss_mib")} for k, v in profile["phases"].items()}}


def loader_rows(root: Path, workers: int, batches: int) -> list[dict]:
    """Images/s decoding the train JPEGs to 224 px (evaluation decode) with torch workers; DALI when installed."""
    from omegaconf import OmegaConf

    from fastdistill.data import build_dataset, build_loader

    cfg = OmegaConf.create({"name": "imagefolder", "root": str(root), "image_size": 224, "crop_pct": 0.875,
                            "channels": 3, "test_fraction": 0.2, "split_seed": 0, "cache": False})
    train = build_dataset(cfg)["train"]
    rows = []
    for name in ("torch", "dali"):
        row = {"loader": name, "workers": workers, "images": 0}
        try:
            loader = build_loader(name, train, 128, shuffle=True, seed=0, num_workers=workers)
        except ModuleNotFoundError as e:
            rows.append({**row, "images_per_s": None, "note": f"skipped: {e}"})
            continue
        it = iter(loader.epoch(0))
        next(it)  # workers started and warm
        t0 = time.perf_counter()
        n = 0
        for _, (x, _) in zip(range(batches), it):
            n += len(x)
        rows.append({**row, "images": n, "images_per_s": n / (time.perf_counter() - t0), "note": ""})
        del it, loader
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 10], help="train JPEGs per class")
    p.add_argument("--root", type=Path, default=None, help="where the folders go (kept; default: a temp dir)")
    # one core is left to the loader workers: on a 2-core machine two OpenMP threads that share their cores with
    # workers (or anything else) spin-wait, measured 0.79 s instead of 0.017 s for a 2-image ResNet-18 forward
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="OpenMP threads of each run (default: the cores less one)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or Path(tmp.name)
    rows, runs = [], {}
    t_start = time.perf_counter()
    for k in args.ks:
        t0 = time.perf_counter()
        folder = write_jpeg_folder(root / f"k{k}", args.classes, k)
        print(f"k={k}: {args.classes} classes x {k} JPEGs written in {time.perf_counter() - t0:.0f} s", flush=True)
        for name in ("fadrm", "lgm"):
            r = run_recipe(name, folder, root / f"out_{name}_k{k}", args.threads)
            runs[f"{name}_k{k}"] = r
            for phase, v in r["phases"].items():
                rows.append({"recipe": name, "k": k, "phase": phase, "s": v["s"], "peak_rss_mib": v["peak_rss_mib"]})
            rows.append({"recipe": name, "k": k, "phase": "(whole run)", "s": r["wall_s"],
                         "peak_rss_mib": r["peak_run_rss_mib"], "peak_tree_pss_mib": r["peak_tree_pss_mib"]})
            print(f"{name} k={k}: {r['wall_s']:.0f} s, peak RSS {r['peak_run_rss_mib']:.0f} MiB "
                  f"(PSS with workers {r['peak_tree_pss_mib']:.0f} MiB)", flush=True)
    loaders = loader_rows(root / f"k{max(args.ks)}", len(os.sched_getaffinity(0)), args.loader_batches)
    lo, hi = min(args.ks), max(args.ks)
    growth = {name: {m: runs[f"{name}_k{hi}"][m] / runs[f"{name}_k{lo}"][m]
                     for m in ("peak_run_rss_mib", "peak_tree_pss_mib")} for name in ("fadrm", "lgm")}
    peak = max(max(r["peak_run_rss_mib"], r["peak_tree_pss_mib"]) for r in runs.values())
    print_table(rows, ["recipe", "k", "phase", "s", "peak_rss_mib", "peak_tree_pss_mib"])
    print_table(loaders, ["loader", "workers", "images", "images_per_s", "note"])
    flat = all(v <= 1 + GROWTH_LIMIT for g in growth.values() for v in g.values())
    print(f"peak memory at k = {hi} over k = {lo}: "
          + ", ".join(f"{n} RSS {g['peak_run_rss_mib']:.3f} PSS {g['peak_tree_pss_mib']:.3f}" for n, g in growth.items())
          + f" ({'flat' if flat else 'GROWS'}: limit +{GROWTH_LIMIT:.0%}); highest {peak:.0f} MiB "
          f"({'under' if peak <= CEILING_MIB else 'OVER'} the {CEILING_MIB} MiB ceiling)")
    result = rows + [{"loader_rows": loaders, "growth": growth, "peak_mib": peak, "ceiling_mib": CEILING_MIB,
                      "classes": args.classes, "ks": args.ks, "threads": args.threads,
                      "total_s": time.perf_counter() - t_start,
                      "commands": {k: v["command"] for k, v in runs.items()}}]
    path = write_results("scale_rehearsal", result, torch.device("cpu"), args.out)
    print(f"wrote {path}")
    if tmp:
        tmp.cleanup()
    if not flat or peak > CEILING_MIB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
