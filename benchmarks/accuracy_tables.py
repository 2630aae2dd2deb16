"""The README's FADRM and LGM accuracy tables, re-measured as the papers judge them, in parallel runs.

FADRM (the published pipeline at a 32-px-class dataset, applied to the embedded 28-px digits): CIFAR-stem ResNet-18
teacher and students, recovery at one resolution for 4 x 500 iterations at lr 0.25 in batches of 100 with MPT,
RDED's selection ('medium' patches, square crops of scale 0.08-1 scored at the patch size, strided stitching),
relabelling with BN over half-batches (BSSL) and CutMix, students at batch 16 as 2 x 8, crops of scale 0.08-1 and
the per-epoch cosine. Two deliberate differences, both the digits preset's: 100 student epochs (published 1000 at
32 px) and one student schedule at every ipc, lr 1e-2 ending at half of it (published for CIFAR-100's ResNet-18:
lr 5e-4 / 1e-3 / 1e-3, eta 2 / 2 / 1 at ipc 1 / 10 / 50; 1e-3 leaves 100 epochs of the ipc-1 set at 100 steps). FADRM,
SRe2L and the RDED-style init at each ipc, random real in the RDED-style runs; `--seeds` student seeds each.

LGM: the default preset (ResNet-18 trained on the digits) at each ipc; the linear probe on the unseen RegNetX,
5 runs, against random real and all real images.

`--pipeline default` runs the FADRM cells with the digits' default preset as it ships (no published overrides;
SRe2L at its published lr 0.25, as the default preset's 0.01 leaves its noise noise).

Each (method, ipc, variant) is one `python -m fastdistill.run` process, both students in it; a FADRM run without
recovery or students (and the first LGM run) goes first, so the cached teachers are trained once, then the rest
run `--jobs` at a time. Results are
re-aggregated after every finished run, so a run cut off by `--budget` still leaves what it finished. Run again
into the same `--out-dir`, finished runs are read back, not re-run, and a run cut off continues from its checkpoint
(mid-recovery, or mid-student from the student's last checkpoint); with the teachers already in that folder's cache
nothing runs alone. On 2 CPU cores ipc 1 takes about an hour (a recovery: 57 s per image); ipc 10 about 4 h; ipc 50
about 15 core-hours (recoveries 2.6 h and 3.1 h, students 8 h), over several calls with one variant per core
(`--variants`), or a GPU.

    python benchmarks/accuracy_tables.py --out-dir DIR                # everything
    python benchmarks/accuracy_tables.py --out-dir DIR --dry          # tiny sizes: the plumbing, on CPU
    python benchmarks/accuracy_tables.py --report DIR/accuracy_tables.json [MORE.json]   # the README's markdown
    python benchmarks/accuracy_tables.py --out-dir DIR --snapshot SNAP      # a few MB: continue on another machine
    python benchmarks/accuracy_tables.py --out-dir NEW --ipc 50 --resume-from SNAP   # ...there (same other flags)

A snapshot is taken with the runs paused or stopped (a file being written is copied as it stands).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, the repo root is not on sys.path
from benchmarks._harness import device_name, git_sha  # noqa: E402

FADRM_PUBLISHED = [
    "method.cifar_stem=auto", "method.lr=0.25", "method.stage_sizes=[1.0,1.0,1.0,1.0]", "method.stage_iterations=500",
    "method.batch_size=100", "method.mpt=true", "method.candidate_scale=[0.08,1.0]", "method.candidate_ratio=[1.0,1.0]",
    "method.candidate_scoring=patch", "method.patch_difficulty=medium", "method.stitching=strided",
    "method.eval.batch_size=16", "method.eval.accumulation_steps=2", "method.eval.lr_schedule=epoch",
    "method.eval.crop_scale=[0.08,1.0]", "method.eval.cutmix=1.0", "method.eval.teacher_bn=half_batch",
    "method.eval.epochs=100", "method.eval.lr=1.0e-2"]
FADRM_DRY = ["preset=smoke", "method.stage_iterations=2", "method.eval.epochs=1", "method.candidates_per_class=4"]
VARIANTS = ("fadrm", "sre2l", "rded")
STUDENTS = ("timm:resnet18", "timm:regnetx_002")
COMMON = ["progress=false", "checkpoint_every=100", "compile=false", "kernels=torch", "num_workers=0"]  # the torch
# kernels: the same maths as the Triton ones (tests/kernels), and the path every CPU run of these tables takes


def jobs(ipcs, seeds: int, dry: bool, lgm_ipcs=(1, 10), variants=VARIANTS, parallel: int = 1,
         pipeline: str = "published") -> list[dict]:
    """Every run, the ones that train a cached teacher first (``warm``). A FADRM run trains both students on the set
    it recovers: the recovery, the dear part, runs once per cell. FADRM's teacher is trained by a run of its own
    (``role: teachers``: the same teacher settings, no recovery, no student), so the cells then start together."""
    fadrm = ["+method=fadrm", *(FADRM_PUBLISHED if pipeline == "published" else []), *(FADRM_DRY if dry else [])]
    out = [{"method": "fadrm", "pipeline": pipeline, "role": "teachers", "ipc": 1, "warm": True,
            "args": [*fadrm, "ipc=1", "method.variant=rded", "method.eval.students=[]",
                     "method.eval.real_random=false"]}] if variants else []
    students = f"method.eval.students=[{','.join(STUDENTS)}]"
    for ipc in ipcs:
        for variant in variants:
            # the default preset's lr 0.01 leaves SRe2L's noise noise (students at chance): its published 0.25
            lr = ["method.lr=0.25"] if pipeline == "default" and variant == "sre2l" else []
            args = [*fadrm, *lr, f"ipc={ipc}", f"method.parallel_batches={parallel}",
                    f"method.variant={variant}", students, f"method.eval.seeds={seeds}",
                    f"method.eval.real_random={str(variant == 'rded').lower()}"]
            out.append({"method": "fadrm", "pipeline": pipeline, "ipc": ipc, "variant": variant, "args": args,
                        "warm": False})
        if ipc not in lgm_ipcs:
            continue
        args = ["+method=lgm", f"ipc={ipc}", *(["preset=smoke", "method.iterations=2", "eval.epochs=1", "eval.runs=2",
                                               "eval.full_epochs=1"] if dry else [])]
        out.append({"method": "lgm", "ipc": ipc, "args": args, "warm": ipc == ipcs[0]})
    # the longest first among the rest: larger ipc, then the recovering variants
    return sorted(out, key=lambda j: (not j["warm"], -j["ipc"], j.get("variant") == "rded"))


def name(job: dict) -> str:
    """The run's folder under runs/: a FADRM run of the default pipeline is named so (it may share an --out-dir)."""
    method = job["method"] if job.get("pipeline", "published") == "published" else f"{job['method']}_{job['pipeline']}"
    if job.get("role"):
        return f"{method}_{job['role']}"
    return "_".join(p for p in (method, f"ipc{job['ipc']}", job.get("variant", "")) if p)


def collect(job: dict, folder: Path) -> list[dict] | None:
    """The table rows of a finished run (one per student of a FADRM run), None without its metrics.json."""
    f = folder / "metrics.json"
    if not f.is_file():
        return None
    m = json.loads(f.read_text())
    base = {k: job[k] for k in ("method", "ipc", "variant") if k in job}
    if job["method"] == "lgm":
        return [{**base, **{k: v for k, v in m["eval"].items() if isinstance(v, dict)},
                 "backbone": m["eval"]["backbone"]}]
    recovery = {"recovery_s_per_image": m.get("seconds_per_image", 0.0)}
    if m.get("recovery"):  # the recovery loss per batch: first and last logged means, averaged over batches
        recovery.update({f"recovery_{k}": statistics.fmean(r[k] for r in m["recovery"])
                         for k in ("loss_first", "loss_last")})
    rows = []
    for student, sets in m["students"].items():
        seeds = m.get("student_seeds", {}).get(student)
        row = {**base, "student": student, **recovery}
        for set_name, mean in sets.items():
            per_seed = seeds[set_name]["per_seed"] if seeds else [mean]
            row[set_name] = {"mean": mean, "std": statistics.pstdev(per_seed), "per_seed": per_seed}
        rows.append(row)
    return rows


def resume(todo: list[dict], out: Path) -> tuple[list[dict], list[dict]]:
    """The rows of the runs already finished in ``out`` and the runs still to launch, those cut off (a checkpoint in
    their folder) continuing with ``resume=true``."""
    rows, rest = [], []
    for job in todo:
        folder = out / "runs" / name(job)
        found = collect(job, folder)
        if found:
            rows.extend({"name": name(job), **r} for r in found)
        elif any(folder.glob("checkpoint*.pt")):
            rest.append({**job, "args": [*job["args"], "resume=true"]})
        else:
            rest.append(job)
    return rows, rest


# what a snapshot leaves out: a student's checkpoint is its weights and optimizer moments (30-130 MB; the finished
# students are in students_done.json, so a cut-off student restarts) and stored labels are rebuilt from the teachers
NOT_IN_SNAPSHOT = ("students", "soft_labels")


def teacher_digests(out: Path) -> dict[str, str]:
    """sha256 of each cached teacher's weights (the model tensors of its checkpoint, by name), by cache folder."""
    digests = {}
    for ckpt in sorted((out / "cache" / "teachers").glob("*/*/checkpoint.pt")):
        model = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
        h = hashlib.sha256()
        for key in sorted(model):
            h.update(key.encode())
            h.update(model[key].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        digests[str(ckpt.parent.relative_to(out / "cache"))] = h.hexdigest()
    return digests


def snapshot(out: Path, to: Path) -> None:
    """What a later call on another machine needs to continue ``out`` (``--resume-from``), small enough to keep: the
    run folders without their students' checkpoints and stored labels, and the digests of the cached teachers,
    which that call retrains (bitwise the same on the same CPU and torch; it says so where they differ): the runs
    that only train teachers (``*_teachers``) are left out with the weights, so they run again."""
    if to.exists():
        shutil.rmtree(to)
    for run_dir in sorted((out / "runs").iterdir()):
        if run_dir.is_dir() and not run_dir.name.endswith("_teachers"):
            shutil.copytree(run_dir, to / "runs" / run_dir.name, ignore=shutil.ignore_patterns(*NOT_IN_SNAPSHOT))
    for f in ("runs.log", "accuracy_tables.json"):
        if (out / f).is_file():
            shutil.copy2(out / f, to / f)
    (to / "teachers.json").write_text(json.dumps(teacher_digests(out), indent=1))
    print(f"snapshot of {out} in {to}")


def restore(snap: Path, out: Path) -> dict[str, str]:
    """Copies a snapshot's run folders into ``out`` (a file already there is kept: it is as new or newer); returns
    the snapshot's teacher digests."""
    for f in sorted((snap / "runs").rglob("*")):
        dest = out / "runs" / f.relative_to(snap / "runs")
        if f.is_file() and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    if (snap / "runs.log").is_file() and not (out / "runs.log").exists():
        shutil.copy2(snap / "runs.log", out / "runs.log")
    return json.loads((snap / "teachers.json").read_text())


def run(args) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    expected = restore(Path(args.resume_from), out) if args.resume_from else {}
    every = jobs(args.ipc, args.seeds, args.dry, args.lgm_ipc, tuple(args.variants), args.parallel_batches,
                 args.pipeline)
    todo = [j for j in every if not j.get("role")]  # the table's runs
    rows, launch_list = resume(todo, out)
    # a method's teachers are trained once, first: by its teachers run (FADRM) unless that run finished in an
    # earlier call, or by its first run (LGM) unless one of its runs finished; only for a method with runs to do
    finished = lambda j: (out / "runs" / name(j) / "metrics.json").is_file()  # noqa: E731
    trained = {r["method"] for r in rows} | {j["method"] for j in every if j.get("role") and finished(j)}
    pending = {j["method"] for j in launch_list}
    launch_list = [j for j in every if j.get("role") and j["method"] in pending and not finished(j)] + \
        [{**j, "warm": j["warm"] and j["method"] not in trained} for j in launch_list]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "FASTDISTILL_CACHE": str(out / "cache")}
    start, running, log = time.time(), [], open(out / "runs.log", "a")
    # the runs' device (device=auto), named once: the runs are child processes
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def write():
        (out / "accuracy_tables.json").write_text(json.dumps(
            {"benchmark": "accuracy_tables", "device": device, "git_sha": git_sha(), "seeds": args.seeds,
             "pipeline": args.pipeline,
             "fadrm_overrides": FADRM_PUBLISHED if args.pipeline == "published" else ["method.lr=0.25 (SRe2L)"],
             "rows": rows, "teachers": digests, **({"teachers_note": teachers_note} if teachers_note else {}),
             "missing": [name(j) for j in todo if name(j) not in {r["name"] for r in rows}]},
            indent=1))

    def launch(job):
        folder = out / "runs" / name(job)
        cmd = [sys.executable, "-m", "fastdistill.run", *job["args"], *COMMON, f"out={folder}"]
        print(f"{time.time() - start:6.0f}s start {name(job)}", flush=True)
        return job, folder, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()

    def reap():  # waits for one run to end (killed past the budget) and records it
        while running:
            for item in list(running):
                job, folder, proc, t0 = item
                over = time.time() - start > args.budget
                if over and proc.poll() is None:
                    proc.kill()
                if proc.poll() is not None:
                    running.remove(item)
                    found = collect(job, folder) if proc.returncode == 0 and not job.get("role") else None
                    ok = bool(found) or (job.get("role") is not None and proc.returncode == 0)
                    status = "ok" if ok else f"rc={proc.returncode}"
                    print(f"{time.time() - start:6.0f}s {status} {name(job)} ({time.time() - t0:.0f} s)", flush=True)
                    if job["warm"] and not ok:
                        failed.add(job["method"])
                    if found:
                        rows.extend({"name": name(job), "seconds": round(time.time() - t0, 1), **r} for r in found)
                        write()
                    return
            time.sleep(1)

    # the cached teachers' digests, read once the runs that train them have ended (a checkpoint is ~90 MB), and any
    # that differ from the ones a restored snapshot's runs used
    digests, teachers_note = {}, {}
    failed = set()  # methods whose first run (the one that trains the teachers) failed: runs.log says why
    for warm in (True, False):
        for job in [j for j in launch_list if j["warm"] == warm]:
            if time.time() - start > args.budget:
                break
            if not warm and job["method"] in failed:
                continue
            while len(running) >= args.jobs:
                reap()
            running.append(launch(job))
        while running:
            reap()
        if warm:
            digests.update(teacher_digests(out))
        if warm and expected:  # the teachers the snapshot's runs used, retrained here
            changed = sorted(k for k, v in expected.items() if digests.get(k) not in (None, v))
            teachers_note.update({k: "retrained, other weights than the snapshot's" for k in changed})
            for k in changed:
                print(f"teacher {k}: retrained here with other weights than the snapshot's runs used (another CPU "
                      "or torch); the runs continue with it", flush=True)
    write()
    done = len({r["name"] for r in rows})
    print(f"{done} of {len(todo)} runs finished in {time.time() - start:.0f} s: {out / 'accuracy_tables.json'}")


def cell(r: dict | None, key: str) -> str:
    if not r or key not in r:
        return "-"
    return f"{r[key]['mean']:.3f} ± {r[key]['std']:.3f}"


def paired(ours: dict | None, other: dict | None, key: str) -> str:
    """FADRM's per-seed accuracies minus another set's at the same seeds: mean, range and how many FADRM leads."""
    if not ours or not other or key not in other:
        return "-"
    diffs = [a - b for a, b in zip(ours["synthetic"]["per_seed"], other[key]["per_seed"], strict=True)]
    return (f"{statistics.fmean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}], "
            f"{sum(x > 0 for x in diffs)} of {len(diffs)}")


def report(paths: list[str]) -> None:
    """The tables of one or more result files (e.g. ipc 1 and ipc 10 measured by separate calls); a row in a later
    file replaces the same row in an earlier one."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    d = {"rows": list({(r["name"], r.get("student")): r for f in files for r in f["rows"]}.values()),
         "missing": sorted({m for f in files for m in f["missing"]} - {r["name"] for f in files for r in f["rows"]})}
    fadrm = {(r["ipc"], r["variant"], r["student"]): r for r in d["rows"] if r["method"] == "fadrm"}
    where = "; ".join(f"{f.get('pipeline', 'published')} pipeline, {f['device']}, git {f['git_sha']}, "
                      f"{f['seeds']} student seeds" for f in files)
    print(f"FADRM, mean ± std over student seeds (population, as the runs report it): {where}\n")
    print("| ipc | student | FADRM | SRe2L | RDED-style | random real |\n|---|---|---|---|---|---|")
    for ipc in sorted({k[0] for k in fadrm}):
        for s in STUDENTS:
            g = lambda v, key="synthetic": cell(fadrm.get((ipc, v, s)), key)  # noqa: E731
            print(f"| {ipc} | {s} | {g('fadrm')} | {g('sre2l')} | {g('rded')} | {g('rded', 'real_random')} |")
    # paired by student seed: a seed is the same initial student and crops on every set of its cell
    print("\nFADRM minus each baseline, paired by student seed: the mean difference, [lowest, highest], and at how "
          "many seeds FADRM is ahead\n")
    print("| ipc | student | vs SRe2L | vs RDED-style | vs random real |\n|---|---|---|---|---|")
    for ipc in sorted({k[0] for k in fadrm}):
        for s in STUDENTS:
            ours = fadrm.get((ipc, "fadrm", s))
            cells = [paired(ours, fadrm.get((ipc, v, s)), key) for v, key in
                     (("sre2l", "synthetic"), ("rded", "synthetic"), ("rded", "real_random"))]
            print(f"| {ipc} | {s} | {' | '.join(cells)} |")
    lgm = [r for r in d["rows"] if r["method"] == "lgm"]
    if lgm:
        print("\nLGM, linear probe on the unseen evaluator, mean ± std over its runs\n")
        print("| ipc | synthetic | random real | all real |\n|---|---|---|---|")
        for r in sorted(lgm, key=lambda r: r["ipc"]):
            print(f"| {r['ipc']} | {cell(r, 'synthetic')} | {cell(r, 'real_random')} | {cell(r, 'full')} |")
    if d["missing"]:
        print(f"\nnot finished: {', '.join(d['missing'])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="benchmarks/results/accuracy_tables")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--lgm-ipc", type=int, nargs="*", default=[1, 10], help="the LGM rows (of those in --ipc); none: "
                   "FADRM only")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="the FADRM columns to run (calls with different ones can share an --out-dir)")
    p.add_argument("--pipeline", choices=("published", "default"), default="published",
                   help="FADRM with the published pipeline's overrides, or the digits' default preset as it ships")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--parallel-batches", type=int, default=1, help="FADRM recovery batches side by side (a GPU: "
                   "all of a run's; the same images to rounding, faster where one batch leaves the device idle)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run; more than 1 where fewer runs than "
                   "cores are left (e.g. the RDED-style run, with twice the students, going on alone)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; runs still going then are killed")
    p.add_argument("--dry", action="store_true", help="tiny sizes (smoke presets, a couple of iterations)")
    p.add_argument("--snapshot", metavar="DIR", help="copy the --out-dir's resumable state (no student checkpoints, "
                   "no teacher weights) to DIR and exit")
    p.add_argument("--resume-from", metavar="DIR", help="a --snapshot to continue from (on another machine)")
    p.add_argument("--report", nargs="+", help="print the markdown tables of these accuracy_tables.json and exit")
    args = p.parse_args()
    if args.report:
        report(args.report)
    elif args.snapshot:
        snapshot(Path(args.out_dir), Path(args.snapshot))
    else:
        run(args)


if __name__ == "__main__":
    main()
