"""Benchmark FADRM's side-by-side recovery (``method.parallel_batches``): seconds per image when G recovery batches
share one forward, against the same G batches recovered one at a time as the published loop does, and peak memory.

A small-image dataset recovers few images per batch (CIFAR-10: the 10 classes of one ipc index at 32 px), which
leaves a GPU mostly waiting on kernel launches; side by side, G batches fill it and give the same images (equal to
rounding in float64: tests/recipes/test_fadrm.py). The recipe's own ``recover_batches`` with a random-init
CIFAR-stem ResNet-18 teacher, 4 stages of ``--iterations`` at one resolution, MPT on (fp16 on CUDA, bf16 on CPU).

Providers, per G: ``eager`` the G batches one after another (the baseline of the ratios), ``side_by_side`` one
call with all G. ``s_per_image_published_budget`` scales to the published 4 x 500 iterations.

    python benchmarks/bench_parallel_batches.py                     # CUDA: 32 px, 10 classes, G = 1 5 10 50
    python benchmarks/bench_parallel_batches.py --device cpu --groups 1 5 --iterations 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import add_ratios, measure, print_table, write_results  # noqa: E402
from fastdistill import console  # noqa: E402
from fastdistill.config import compose  # noqa: E402
from fastdistill.models import create_backbone  # noqa: E402
from fastdistill.models.timm_source import cifar_stem_kwargs  # noqa: E402
from fastdistill.recipes.fadrm import FADRMRecipe  # noqa: E402


def closures(args, device: torch.device, out_dir: str, groups: int) -> dict:
    """``eager`` and ``side_by_side`` recoveries of batches 0..groups-1 (one ipc index of every class each)."""
    cfg = compose(["+method=fadrm", f"device={device.type}", "precision=fp32", f"ipc={groups}", "progress=false",
                   f"out={out_dir}", "method.stage_sizes=[1.0,1.0,1.0,1.0]", f"method.stage_iterations={args.iterations}",
                   "method.mpt=true", "method.roll=4", f"method.batch_size={args.classes}", "data.hflip=true"])
    recipe = FADRMRecipe(cfg)
    torch.manual_seed(0)
    teacher = create_backbone("timm:resnet18", pretrained="none", num_classes=args.classes,
                              **cifar_stem_kwargs("timm:resnet18")).freeze()
    size = (args.resolution, args.resolution)
    recipe.prepare_recovery([teacher], size, 3, args.classes)
    patches = torch.rand(groups, args.classes, 3, *size, generator=torch.Generator().manual_seed(0))
    bar = console.progress(False)
    task = bar.add_task("", total=None, info="")
    gens = lambda: [torch.Generator().manual_seed(b) for b in range(groups)]  # noqa: E731

    def eager():
        for b, g in enumerate(gens()):
            recipe.recover_batches([b], patches[b], [g], bar, task)

    def side_by_side():
        recipe.recover_batches(list(range(groups)), patches.flatten(0, 1), gens(), bar, task)
    return {"eager": eager, "side_by_side": side_by_side}


def run(args, device: torch.device) -> list[dict]:
    rows = []
    for groups in args.groups:
        with tempfile.TemporaryDirectory() as tmp:
            for provider, fn in closures(args, device, tmp, groups).items():
                if groups == 1 and provider == "side_by_side":
                    continue  # one batch: the same call
                stats = measure(fn, device, warmup=1, repeats=args.repeats)
                images = groups * args.classes
                s_per_image = stats["ms_p50"] / 1e3 / images
                rows.append({"kernel": "fadrm_parallel_batches", "provider": provider, "groups": groups,
                             "shape": f"resnet18-cifar {args.resolution}px x{args.classes}", "mode": "full",
                             "dtype": "mixed", "images": images, "iterations": 4 * args.iterations, **stats,
                             "s_per_image": s_per_image,
                             "s_per_image_published_budget": s_per_image * 2000 / (4 * args.iterations)})
                print(f"G={groups} {provider}: {s_per_image:.3g} s/image, peak {stats['peak_mib']:.0f} MiB",
                      flush=True)
    return add_ratios(rows, key=("shape", "groups"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10, help="images per batch (one per class)")
    parser.add_argument("--groups", type=int, nargs="+", help="batches side by side (default 1 5 10 50 on CUDA, "
                        "1 5 on CPU)")
    parser.add_argument("--iterations", type=int, help="per stage, 4 stages (default 25 CUDA, 2 CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.groups = args.groups or ([1, 5, 10, 50] if device.type == "cuda" else [1, 5])
    args.iterations = args.iterations or (25 if device.type == "cuda" else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args, device)
    print_table(rows, ["shape", "provider", "groups", "images", "s_per_image", "s_per_image_published_budget",
                       "speedup", "peak_mib", "memory_ratio"])
    print(f"wrote {write_results('parallel_batches', rows, device, out_dir=args.out_dir)}")


if __name__ == "__main__":
    main()
