"""ImageNet-shaped rehearsal on CPU: peak memory and time per phase of FADRM, LGM and their evaluations on a folder
of 1000 classes of real JPEG files, at k = 2 and k = 10 images per class; peak RSS must not grow with k.

The runs are the README's ImageNet commands (``data=imagefolder data.root=/data/imagenet``, ``preset=paper``) with
only sizes changed (resolution, iterations, epochs, students) and, as no hub weights are at hand, random-initialised
networks: FADRM's ResNet-18 teacher gets its BN statistics from 2 real batches (``method.teacher_calibration``, a
benchmark option), LGM runs two small timm backbones and probes with a third. Each run is one ``python -m
fastdistill.run`` process; its peak RSS is read from the run's ``profile.json`` (the run alone, per phase) and the
peak of the run with its loader workers is sampled from /proc as the run's RSS plus each worker's private memory
(its USS: forked workers share the run's pages, which a sum of RSS would count once per process; PSS would also
divide the shared libraries' pages among unrelated processes on a shared machine). With ``--torchrun N`` the
README's torchrun commands run too (``torchrun --standalone --nproc_per_node=N ... device=cpu``, one thread per
process): every rank's peak RSS (VmHWM) and its peak with its workers, which must be flat in k as well. Then the loader's images/s on the k = 10 JPEGs: torch workers, and DALI (CPU,
``device_id=None``) when the ``dali`` extra is installed.

    python benchmarks/bench_scale_rehearsal.py                   # k = 2 and 10, 1000 classes, ~10 min on 2 cores
    python benchmarks/bench_scale_rehearsal.py --torchrun 2      # and the torchrun commands with 2 processes
    python benchmarks/bench_scale_rehearsal.py --classes 100 --ks 2 4 --root /tmp/rehearsal
    python benchmarks/bench_scale_rehearsal.py --report benchmarks/results/scale_rehearsal_cpu.json  # README tables

Writes ``benchmarks/results/scale_rehearsal_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, the repo root is not on sys.path
from benchmarks._harness import git_sha, print_table, write_results  # noqa: E402
from fastdistill.data.rehearsal import write_jpeg_folder  # noqa: E402

# the README's ImageNet commands; the rehearsal replaces the root and appends SIZES. data.cache=false: at 64 px the
# generated folder would fit the memory budget and data.cache=auto would decode it; at 224 px ImageNet-1k does not
# (about 193 GB), so auto streams there, and the rehearsal streams too
# torchrun: the same arguments after `torchrun --standalone --nproc_per_node=N -m fastdistill.run`
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
CEILING_MIB = 4096  # and no run above 4 GiB (process tree, workers included; under torchrun: per rank)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _rollup_kib(pid: int, *fields: str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.split(":")[0] in fields)


def tree_mib(pid: int) -> float:
    """Resident MiB of ``pid`` (RSS) plus the private MiB (USS) of all its descendants (its loader workers), from
    /proc: what the tree holds, counting the pages the workers share with their parent once, and the shared
    libraries' pages in full whoever else maps them."""
    total, todo, root = 0, [pid], True
    while todo:
        p = todo.pop()
        try:
            total += _rollup_kib(p, "Rss") if root else _rollup_kib(p, "Private_Clean", "Private_Dirty")
        except OSError:
            continue
        finally:
            root = False
        todo += _children(p)
    return total / 1024


def rank_processes(agent: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun's agent ``agent`` started (its children with RANK in their
    environment; their loader workers inherit it, but are not the agent's children)."""
    ranks = {}
    for pid in _children(agent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def hwm_mib(pid: int) -> float:
    """Peak resident MiB of one process so far (VmHWM, kept by the kernel: no sampling gap)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def recipe_command(name: str, root: Path, out: Path, nproc: int = 0) -> list[str]:
    """The README's command for ``name`` on ``root`` with the rehearsal's sizes: one process, or under torchrun."""
    base = FADRM if name == "fadrm" else LGM
    args = [a if not a.startswith("data.root=") else f"data.root={root}" for a in base]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    return [sys.executable, *launch, "-m", "fastdistill.run", *args, *SIZES[name], f"out={out}", "progress=false",
            "device=cpu"]


def run_recipe(name: str, root: Path, out: Path, threads: int, nproc: int = 0) -> dict:
    """One run of the recipe on ``root`` (under torchrun with ``nproc`` processes when given); its phases from
    profile.json (rank 0's) and the sampled peaks: the whole tree's (:func:`tree_mib`), and per rank its RSS (VmHWM)
    and its peak with its loader workers."""
    cmd = recipe_command(name, root, out, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0.0, "rank_rss": {}, "rank_tree": {}}

    def sample():
        while proc.poll() is None:
            peak["tree"] = max(peak["tree"], tree_mib(proc.pid))
            for r, pid in rank_processes(proc.pid).items() if nproc else ():
                peak["rank_rss"][r] = max(peak["rank_rss"].get(r, 0.0), hwm_mib(pid))
                peak["rank_tree"][r] = max(peak["rank_tree"].get(r, 0.0), tree_mib(pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{stderr[-3000:]}")
    profile = json.loads((out / "profile.json").read_text())
    shown = (["torchrun", *cmd[3:5]] if nproc else ["python"]) + cmd[5 if nproc else 1:]
    record = {"command": " ".join(shown), "wall_s": time.perf_counter() - t0, "peak_tree_mib": peak["tree"],
              "peak_run_rss_mib": profile["peak_host_rss_mib"],
              "phases": {k: {"s": v["s"], "peak_rss_mib": v.get("peak_host_rss_mib")}
                         for k, v in profile["phases"].items()}}
    if nproc:
        if sorted(peak["rank_rss"]) != list(range(nproc)):
            raise RuntimeError(f"{name}: sampled ranks {sorted(peak['rank_rss'])} of {nproc}")
        record.update(nproc=nproc, rank_rss_mib=[peak["rank_rss"][r] for r in range(nproc)],
                      rank_tree_mib=[peak["rank_tree"][r] for r in range(nproc)])
        # flat in k per rank: the largest rank, by its own RSS and with its workers
        record.update(peak_rank_rss_mib=max(record["rank_rss_mib"]), peak_rank_tree_mib=max(record["rank_tree_mib"]))
    return record


def loader_rows(root: Path, workers: int, batches: int) -> list[dict]:
    """Images/s decoding the train JPEGs to 224 px (evaluation decode) with torch workers, and with DALI's CPU
    decoder when installed: ``batches`` batches of 128 after a first one (workers started). DALI runs first: the torch
    workers would go on decoding their prefetched batches after the timed ones."""
    from omegaconf import OmegaConf

    from fastdistill.data import build_dataset, build_loader

    cfg = OmegaConf.create({"name": "imagefolder", "root": str(root), "image_size": 224, "crop_pct": 0.875,
                            "channels": 3, "test_fraction": 0.2, "split_seed": 0, "cache": False})
    train = build_dataset(cfg)["train"]
    rows = []
    for name in ("dali", "torch"):
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
        rate = n / (time.perf_counter() - t0) if n else None
        rows.append({**row, "images": n, "images_per_s": rate, "note": "" if n else "one batch only: not timed"})
        del it, loader
    return rows[::-1]


def peak_keys(run: dict) -> tuple[str, str]:
    """The peaks that must be flat in k: one process, its own RSS (profile) and its tree's PSS; under torchrun, the
    largest rank's RSS and its PSS with its workers."""
    return ("peak_rank_rss_mib", "peak_rank_tree_mib") if "nproc" in run else ("peak_run_rss_mib", "peak_tree_mib")


def _fmt(v) -> str:
    if isinstance(v, list):
        return " / ".join(f"{x:.0f}" for x in v)
    if isinstance(v, float):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(record: dict) -> str:
    """The README's tables from a result file: runs (phases, peaks per rank under torchrun) and loaders."""
    rows = [r for r in record["rows"] if "recipe" in r]
    summary = next(r for r in record["rows"] if "loader_rows" in r)
    runs = ["| recipe | k | phase | s | peak RSS MiB (run; per rank) | peak MiB with workers (run; per rank) |",
            "|---|---|---|---|---|---|"]
    runs += [f"| {r['recipe']} | {r['k']} | {r['phase']} | {_fmt(r['s'])} | "
             f"{_fmt(r.get('rank_rss_mib', r.get('peak_rss_mib')))} | "
             f"{_fmt(r.get('rank_tree_mib', r.get('peak_tree_mib')))} |" for r in rows]
    loaders = ["| loader | workers | images | images/s | note |", "|---|---|---|---|---|"]
    loaders += [f"| {r['loader']} | {r['workers']} | {r['images']} | {_fmt(r['images_per_s']) or '-'} | {r['note']} |"
                for r in summary["loader_rows"]]
    return "\n".join(runs) + "\n\n" + "\n".join(loaders)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 10], help="train JPEGs per class")
    p.add_argument("--root", type=Path, default=None,
                   help="where the folders go (kept, with each finished run's record: a rehearsal stopped part way "
                        "resumes there and runs only what is missing; default: a temp dir)")
    # one core is left to the loader workers: on a 2-core machine two OpenMP threads that share their cores with
    # workers (or anything else) spin-wait, measured 0.79 s instead of 0.017 s for a 2-image ResNet-18 forward
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="OpenMP threads of each run (default: the cores less one)")
    p.add_argument("--torchrun", type=int, default=0, metavar="N",
                   help="also run the torchrun commands with N processes, one OpenMP thread each (default: off)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--report", type=Path, default=None, help="print the README tables of this result file and exit")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or Path(tmp.name)
    rows, runs = [], {}
    modes = [0] + ([args.torchrun] if args.torchrun else [])
    t_start = time.perf_counter()
    for k in args.ks:
        t0 = time.perf_counter()
        folder = write_jpeg_folder(root / f"k{k}", args.classes, k)
        print(f"k={k}: {args.classes} classes x {k} JPEGs written in {time.perf_counter() - t0:.0f} s", flush=True)
        for nproc in modes:
            for name in ("fadrm", "lgm"):
                label = f"{name} (torchrun {nproc})" if nproc else name
                key = f"{name}_torchrun{nproc}" if nproc else name
                out = root / f"out_{key}_k{k}"
                record = out / "rehearsal_run.json"
                if record.is_file():  # finished by an earlier, stopped invocation at this commit
                    r = json.loads(record.read_text())
                    if r.get("git_sha") != git_sha():
                        raise SystemExit(f"{record} was measured at {r.get('git_sha')}, not {git_sha()}: remove it")
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    r = {**run_recipe(name, folder, out, 1 if nproc else args.threads, nproc), "git_sha": git_sha()}
                    record.write_text(json.dumps(r))
                runs[f"{key}_k{k}"] = r
                for phase, v in r["phases"].items():
                    rows.append({"recipe": label, "k": k, "phase": phase, "s": v["s"],
                                 "peak_rss_mib": v["peak_rss_mib"]})
                whole = {"recipe": label, "k": k, "phase": "(whole run)", "s": r["wall_s"],
                         "peak_rss_mib": r["peak_run_rss_mib"], "peak_tree_mib": r["peak_tree_mib"]}
                if nproc:
                    whole.update(peak_rss_mib=r["peak_rank_rss_mib"], peak_tree_mib=r["peak_rank_tree_mib"],
                                 rank_rss_mib=r["rank_rss_mib"], rank_tree_mib=r["rank_tree_mib"],
                                 all_ranks_mib=r["peak_tree_mib"])
                rows.append(whole)
                print(f"{label} k={k}: {r['wall_s']:.0f} s, peak RSS {_fmt(whole.get('rank_rss_mib', whole['peak_rss_mib']))}"
                      f" MiB (with workers {_fmt(whole.get('rank_tree_mib', whole['peak_tree_mib']))} MiB)", flush=True)
    loaders = loader_rows(root / f"k{max(args.ks)}", len(os.sched_getaffinity(0)), args.loader_batches)
    lo, hi = min(args.ks), max(args.ks)
    families = sorted({key.rsplit("_k", 1)[0] for key in runs})
    growth = {f: {m: runs[f"{f}_k{hi}"][m] / runs[f"{f}_k{lo}"][m] for m in peak_keys(runs[f"{f}_k{lo}"])}
              for f in families}
    peak = max(max(r[m] for m in peak_keys(r)) for r in runs.values())
    print_table(rows, ["recipe", "k", "phase", "s", "peak_rss_mib", "peak_tree_mib"])
    print_table(loaders, ["loader", "workers", "images", "images_per_s", "note"])
    flat = all(v <= 1 + GROWTH_LIMIT for g in growth.values() for v in g.values())
    print(f"peak memory at k = {hi} over k = {lo}: "
          + ", ".join(f"{n} " + " ".join(f"{m[5:-4]} {v:.3f}" for m, v in g.items()) for n, g in growth.items())
          + f" ({'flat' if flat else 'GROWS'}: limit +{GROWTH_LIMIT:.0%}); highest {peak:.0f} MiB "
          f"({'under' if peak <= CEILING_MIB else 'OVER'} the {CEILING_MIB} MiB ceiling, per process tree or rank)")
    result = rows + [{"loader_rows": loaders, "growth": growth, "peak_mib": peak, "ceiling_mib": CEILING_MIB,
                      "classes": args.classes, "ks": args.ks, "threads": args.threads, "torchrun": args.torchrun,
                      "total_s": time.perf_counter() - t_start,
                      "commands": {k: v["command"] for k, v in runs.items()}}]
    path = write_results("scale_rehearsal", result, torch.device("cpu"), args.out)
    print(f"wrote {path}")
    print(markdown(json.loads(path.read_text())))
    if tmp:
        tmp.cleanup()
    if not flat or peak > CEILING_MIB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
