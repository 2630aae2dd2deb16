"""Images/s of each loader over the embedded dataset (mnist5k train, 4,000 x 1 x 28 x 28), as a ratio to ``torch``.

    python benchmarks/bench_loaders.py

Every loader reads the same shuffled epochs (batch 256, drop_last=False, num_workers=0: in-process torch
indexing, FFCV threads on all cores, one DALI thread). The first epoch is reported apart (FFCV compiles its
numba pipeline there), then epochs are timed alternating between loaders. ffcv and dali rows say why when
the extra is missing. Writes ``benchmarks/results/loaders_cpu.json``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, the repo root is not on sys.path
from benchmarks._harness import measure, print_table, write_results  # noqa: E402
from fastdistill.data import build_dataset, build_loader  # noqa: E402

BATCH_SIZE = 256
CPU = torch.device("cpu")


def setup_loaders(dataset) -> tuple[dict, list[dict]]:
    """Built loaders by name, and a row per loader with its import and construction seconds (or why it is missing)."""
    loaders, rows = {}, []
    for name in ("torch", "ffcv", "dali"):
        row = {"provider": name, "shape": "x".join(map(str, (len(dataset), dataset.channels, *dataset.image_size))),
               "dtype": "uint8", "batch_size": BATCH_SIZE}
        t0 = time.perf_counter()
        if name != "torch":
            importlib.import_module(f"fastdistill.data.{name}_loader")  # FFCV's import alone takes ~10 s
        t1 = time.perf_counter()
        try:
            loaders[name] = build_loader(name, dataset, BATCH_SIZE, shuffle=True, drop_last=False, seed=0)
        except ModuleNotFoundError as e:
            rows.append({**row, "status": f"unavailable: {e}"})
            continue
        # construction includes writing the .beton for ffcv
        rows.append({**row, "status": "ok", "import_s": t1 - t0, "setup_s": time.perf_counter() - t1})
    return loaders, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs per loader after the first (20 keep "
                        "the median stable on a shared machine; an epoch is 4,000 images)")
    args = parser.parse_args()
    # a fresh cache, so ffcv's setup_s always includes writing the .beton
    os.environ["FASTDISTILL_CACHE"] = tempfile.mkdtemp(prefix="bench_loaders_")

    dataset = build_dataset(OmegaConf.create({"name": "mnist5k", "train_per_class": 400}))["train"]
    n = len(dataset)
    loaders, rows = setup_loaders(dataset)

    def run_epoch(loader, epoch):
        def fn():
            for _ in loader.epoch(epoch):
                pass
        return fn

    first = {name: measure(run_epoch(loader, 0), CPU, warmup=0, repeats=1) for name, loader in loaders.items()}
    # alternate loaders epoch by epoch so drift on a shared machine hits all of them alike
    timed = {name: [] for name in loaders}
    for epoch in range(1, args.epochs + 1):
        for name, loader in loaders.items():
            timed[name].append(measure(run_epoch(loader, epoch), CPU, warmup=0, repeats=1))

    for row in rows:
        if row["status"] != "ok":
            continue
        ms = [t["ms_p50"] for t in timed[row["provider"]]]
        q = statistics.quantiles(ms, n=5) if len(ms) >= 2 else [ms[0]] * 4
        row.update(first_epoch_ms=first[row["provider"]]["ms_p50"], ms_p50=statistics.median(ms), ms_p20=q[0],
                   ms_p80=q[3], peak_mib=max(t["peak_mib"] for t in timed[row["provider"]]))
        row["first_epoch_images_per_s"] = n / row["first_epoch_ms"] * 1e3
        row["images_per_s"] = n / row["ms_p50"] * 1e3
    base = next(r for r in rows if r["provider"] == "torch")
    for row in rows:
        if row["status"] == "ok":
            row["speedup"] = base["ms_p50"] / row["ms_p50"]
            row["first_epoch_speedup"] = base["first_epoch_ms"] / row["first_epoch_ms"]

    path = write_results("loaders", rows, CPU)
    print_table(rows, ["provider", "shape", "batch_size", "images_per_s", "speedup", "ms_p50", "ms_p20", "ms_p80",
                       "first_epoch_images_per_s", "first_epoch_speedup", "import_s", "setup_s", "peak_mib", "status"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
