"""Compact stored soft labels (``method.relabel=store``): label bytes per image and student accuracy per format,
against online relabelling, on a saved FADRM set.

    python -m fastdistill.run +method=fadrm "method.eval.students=[]" out=runs/fadrm_ipc10   # the set, ipc 10
    python benchmarks/bench_compact_labels.py runs/fadrm_ipc10 --student timm:resnet18 --epochs 50 --seeds 0 1 2

Every format trains the same student from the same seed (same initial weights, same crops in the same order), so
the accuracies differ by the labels alone; online relabelling is the reference. Writes
``benchmarks/results/compact_labels_cpu.json`` and prints the README table (mean +- std over the seeds). On a busy
machine, one process per seed (``--seeds 0``, ``--seeds 1``, ...) and ``--merge OUT.json PARTS...`` join them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ["online", "fp16", "topk:1", "topk:2", "topk:5", "quant:8", "quant:4"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a fadrm run folder (distilled/, config.yaml)")
    ap.add_argument("--student", default="timm:resnet18")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "compact_labels_cpu.json"))
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from fastdistill.artifacts import git_revision, read_distilled
    from fastdistill.data import build_dataset
    from fastdistill.engine import Precision, resolve_device
    from fastdistill.eval.student import StudentConfig, store_soft_labels, train_student
    from fastdistill.recipes import get_recipe
    from fastdistill.teachers import frozen_backbone

    cfg = OmegaConf.load(Path(args.run) / "config.yaml")
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device)
    splits = build_dataset(cfg.data)
    train_set, test_set = splits["train"], splits["test"]
    distilled = read_distilled(args.run, train_set.classes, train_set.channels)
    m, e = cfg.method, cfg.method.eval
    teachers = [frozen_backbone(name, m.teacher_weights, cfg, m.teacher_preset, train_set.classes,
                                train=get_recipe("teacher").main, num_classes=train_set.num_classes)[0].to(device)
                for name in m.teachers]
    scfg = StudentConfig.from_eval(e, hflip=bool(cfg.data.get("hflip", True)), epochs=args.epochs)
    image_size = tuple(train_set.image_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for fmt in args.formats:
                t0 = time.perf_counter()
                stored, stats = None, {"bytes_per_image": 0.0, "file_bytes_per_image": 0.0}
                if fmt != "online":
                    stored = Path(tmp) / f"{fmt.replace(':', '_')}_{seed}"
                    stats = store_soft_labels(stored, distilled, teachers, image_size, scfg, device, precision, seed,
                                              fmt, num_workers=0)
                r = train_student(args.student, distilled, teachers, test_set, image_size, scfg, device, precision,
                                  seed=seed, num_workers=0, stored_labels=stored)
                rows.append({"format": fmt, "seed": seed, "test_acc": r["test_acc"],
                             "bytes_per_image": stats["bytes_per_image"],
                             "file_bytes_per_image": stats["file_bytes_per_image"],
                             "seconds": time.perf_counter() - t0})
                print(json.dumps(rows[-1]), flush=True)
    record = {"benchmark": "compact_labels", "device": str(device), "torch": torch.__version__,
              "git_sha": git_revision(), "date": time.strftime("%Y-%m-%d"), "run": str(args.run),
              "student": args.student, "epochs": args.epochs, "ipc": int(cfg.ipc), "images": len(distilled),
              "seeds": args.seeds, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(report(record))
    return record


def report(record: dict) -> str:
    """The README table: per format, bytes per image (and relative to fp16), accuracy mean +- std, and the mean
    paired difference to online relabelling (same seed) in points."""
    by = {}
    for r in record["rows"]:
        by.setdefault(r["format"], []).append(r)
    online = {r["seed"]: r["test_acc"] for r in by.get("online", [])}
    fp16 = by["fp16"][0]["bytes_per_image"] if "fp16" in by else None
    lines = [f"{record['student']}, {record['epochs']} epochs, {record['images']} images (ipc {record['ipc']}), "
             f"seeds {record['seeds']}, {record['device']}, git {record['git_sha']}, {record['date']}", "",
             "| labels | bytes / image | vs fp16 | student accuracy | vs online (points) |", "|---|---|---|---|---|"]
    for fmt, rs in by.items():
        acc = [r["test_acc"] for r in rs]
        sd = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        nbytes = rs[0]["bytes_per_image"]
        rel = "-" if not fp16 or fmt == "online" else f"{nbytes / fp16:.3f}"
        diff = [100 * (r["test_acc"] - online[r["seed"]]) for r in rs if r["seed"] in online]
        d = "-" if fmt == "online" or not diff else \
            f"{statistics.mean(diff):+.2f} +- {statistics.pstdev(diff) if len(diff) > 1 else 0.0:.2f}"
        lines.append(f"| {fmt} | {nbytes:.0f} | {rel} | {statistics.mean(acc):.4f} +- {sd:.4f} | {d} |")
    return "\n".join(lines)


def merge(out: str, parts: list[str]) -> dict:
    """One record from runs of single seeds (run side by side, one process per seed, on a shared machine)."""
    records = [json.loads(Path(f).read_text()) for f in parts]
    record = {**records[0], "seeds": [s for r in records for s in r["seeds"]],
              "rows": [row for r in records for row in r["rows"]]}
    Path(out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":  # --report RESULT.json
        print(report(json.loads(Path(sys.argv[2]).read_text())))
    elif len(sys.argv) > 1 and sys.argv[1] == "--merge":  # --merge OUT.json SEED0.json SEED1.json ...
        print(report(merge(sys.argv[2], sys.argv[3:])))
    else:
        main()
