"""Benchmark FADRM recovery: time per synthetic image and peak memory with MPT + MRO on and off, and the fused
BN-statistics kernel against the published hook over the BN layers of resnet18.

Recovery providers (one batch of ``--classes`` images through every stage of ``recover_batches``, the recipe's own
code, random-init resnet18 teacher, ARC on):
    eager      the published recovery step as its authors' code computes it: fp32 teacher, every stage at the full
               resolution (no MRO), and the published BN hook written plainly below (mean, permute-contiguous var,
               torch.norm) on every BN layer
    fast_bn    the same fp32 / full-resolution recovery with fastdistill's fused BN-statistics kernel
    mro        + multi-resolution optimisation (stages alternate --low and the full resolution)
    mpt_mro    + mixed precision: the teacher, logits and CE in fp16 on CUDA (bf16 on CPU) with the BN divergences
               and the loss gradient in fp32 (FADRM's MPT + MRO, what ``+method=fadrm precision=fp16`` runs)

Seconds per image = recovery time of the batch / batch size, for ``--iterations`` per stage x 4 stages; the
published budget (4 x 500 at 224 px, batch 100 = one image per class of 100 classes) scales it linearly. The
second table is ``bench_bn_stats`` at batch 100 and 32/64/224 px (``--bn-resolutions``): the share of the step
that the kernel replaces is measured too (``bn_hooks_share_of_step``: the eager step with every BN term zeroed).

    python benchmarks/bench_fadrm.py                          # CUDA: 224 px, batch 100, 4 x 20 iterations
    python benchmarks/bench_fadrm.py --device cpu --resolution 64 --classes 10 --iterations 5
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_bn_stats  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    add_ratios, kernel_parser, measure, parse_kernel_args, print_table, write_results)
from fastdistill import console  # noqa: E402
from fastdistill.models import create_backbone  # noqa: E402
from fastdistill.models.taps import BNStatsTap  # noqa: E402
from fastdistill.recipes.fadrm import FADRMRecipe  # noqa: E402
from fastdistill.config import compose  # noqa: E402

PROVIDERS = ("eager", "fast_bn", "mro", "mpt_mro")


class PublishedBNTap(BNStatsTap):
    """The SRe2L/FADRM ``BNFeatureHook`` as published: a second contiguous copy of every BN input for the var."""

    def _hook(self, module, inputs, output):
        if self.active:
            x = inputs[0]
            nch = x.shape[1]
            mean = x.mean([0, 2, 3])
            var = x.permute(1, 0, 2, 3).contiguous().view(nch, -1).var(1, unbiased=False)
            self.terms.append(torch.norm(module.running_var.data - var, 2) +
                              torch.norm(module.running_mean.data - mean, 2))


class NoBNTap(BNStatsTap):
    """No BN-statistics term (a zero per layer): the eager step without it shows the share the kernel replaces."""

    def _hook(self, module, inputs, output):
        if self.active:
            self.terms.append(inputs[0].new_zeros((), dtype=torch.float32))


def recovery_closure(provider: str, args, device: torch.device, out_dir: str, precision: str | None = None,
                     stages: int = 4):
    """A closure recovering one batch (one image per class) with ``provider``'s settings; ``precision`` overrides
    the provider's, ``stages`` the number of stages (``args.iterations`` each), ``args.roll`` the roll (default
    resolution / 8)."""
    full, low = args.resolution, args.low
    sizes = [full] * stages if provider in ("eager", "no_bn", "fast_bn") else [low, full] * (stages // 2)
    if precision is None:
        precision = "fp32"
        if provider == "mpt_mro":
            precision = "fp16" if device.type == "cuda" else "bf16"
    cfg = compose(["+method=fadrm", f"device={device.type}", f"precision={precision}", "ipc=1", "progress=false",
                   f"out={out_dir}/{provider}", f"method.stage_sizes=[{','.join(map(str, sizes))}]",
                   f"method.stage_iterations={args.iterations}", f"method.roll={getattr(args, 'roll', max(1, full // 8))}",
                   f"method.batch_size={args.classes}"])
    recipe = FADRMRecipe(cfg)
    torch.manual_seed(0)
    teacher = create_backbone(f"timm:{args.arch}", pretrained="none", num_classes=args.classes).freeze()
    recipe.prepare_recovery([teacher], (full, full), 3, args.classes)
    if provider in ("eager", "no_bn"):
        for tap in recipe.taps:
            tap.remove()
        tap = PublishedBNTap if provider == "eager" else NoBNTap
        recipe.taps = [tap(t, cfg.method.first_bn_multiplier) for t in recipe.teachers]
    patches = torch.rand(args.classes, 3, full, full)
    bar = console.progress(False)
    task = bar.add_task("", total=None, info="")

    def fn():
        recipe.history = {}
        return recipe.recover_batches([0], patches, [torch.Generator().manual_seed(0)], bar, task)
    return fn


def measure_one(provider: str, args, device: torch.device) -> dict:
    """Time ``provider`` in this process; the peak memory is what the recovery adds to the process: CUDA's
    allocator peak, or on CPU the growth of the process's peak RSS (hence one fresh process per provider)."""
    with tempfile.TemporaryDirectory() as out_dir:
        fn = recovery_closure(provider, args, device, out_dir)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stats = measure(fn, device, warmup=1, repeats=args.repeats)
        if device.type == "cpu":
            stats["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return stats


def run_recovery(args, argv: list[str], device: torch.device) -> list[dict]:
    rows = []
    stages = 4 * args.iterations
    for provider in args.providers + ["no_bn"]:
        child = subprocess.run([sys.executable, __file__, *argv, "--one", provider], capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{provider} failed:\n{child.stderr[-2000:]}")
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        if provider == "no_bn":
            # profile first: the share of the published step spent in the BN-statistics hooks is what the kernel
            # can act on (the eager step timed again with every hook term replaced by a zero)
            rows[0]["bn_hooks_share_of_step"] = 1 - stats["ms_p50"] / rows[0]["ms_p50"]
            print(f"BN-statistics hooks: {rows[0]['bn_hooks_share_of_step']:.1%} of the eager step")
            break
        s_per_image = stats["ms_p50"] / 1e3 / args.classes
        rows.append({"kernel": "fadrm_recovery", "provider": provider, "shape": f"{args.arch} {args.resolution}px",
                     "mode": "full", "dtype": "mixed" if provider == "mpt_mro" else "float32",
                     "batch": args.classes, "resolution": args.resolution, "low_resolution": args.low,
                     "iterations": stages, **stats, "s_per_image": s_per_image,
                     "s_per_image_published_budget": s_per_image * 2000 / stages})
        print(f"{provider}: {s_per_image:.3g} s/image for {stages} iterations, peak {stats['peak_mib']:.0f} MiB",
              flush=True)
    return add_ratios(rows, key=("shape", "mode"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--arch", default="resnet18", help="timm BN teacher")
    parser.add_argument("--resolution", type=int, help="full resolution in px (default: 224 on CUDA, 64 on CPU)")
    parser.add_argument("--low", type=int, help="MRO reduced resolution (default: resolution * 200 / 224, even)")
    parser.add_argument("--classes", type=int, help="batch = one image per class (default: 100 on CUDA, 10 on CPU)")
    parser.add_argument("--iterations", type=int, help="iterations per stage, 4 stages (default: 20 CUDA, 5 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed recoveries per provider (one warm-up before)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--bn-resolutions", type=int, nargs="*", default=[32, 64, 224],
                        help="resolutions of the BN-statistics kernel table (none: skip it)")
    parser.add_argument("--bn-batch", type=int, default=100, help="batch of the BN-statistics kernel table")
    parser.add_argument("--threads", type=int, help="CPU threads")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--one", choices=PROVIDERS + ("no_bn",), help=argparse.SUPPRESS)  # child process: one provider
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if "eager" not in args.providers:
        parser.error("--providers must include eager: speed and memory are ratios to it")
    args.providers = ["eager"] + [p for p in args.providers if p != "eager"]
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.resolution = args.resolution or (224 if on_gpu else 64)
    args.low = args.low or max(8, round(args.resolution * 200 / 224 / 2) * 2)
    args.classes = args.classes or (100 if on_gpu else 10)
    args.iterations = args.iterations or (20 if on_gpu else 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(measure_one(args.one, args, device)))
        return
    rows = run_recovery(args, argv, device)
    print_table(rows, ["shape", "provider", "batch", "iterations", "s_per_image", "s_per_image_published_budget",
                       "speedup", "peak_mib", "memory_ratio"])
    if args.bn_resolutions:
        bn_args = parse_kernel_args(kernel_parser(bench_bn_stats.__doc__, bench_bn_stats.PROVIDERS, "BN inputs"), [
            "--device", args.device, "--rounds", "1", "--repeats", "3", "--warmup", "1"])
        bn_args.arch, bn_args.batch, bn_args.resolutions = args.arch, args.bn_batch, args.bn_resolutions
        bn_args.layouts, bn_args.dtype = ["nchw"], "float32"
        bn_rows = bench_bn_stats.run(bn_args)
        print_table(bn_rows, ["shape", "provider", "ms_p50", "speedup", "peak_mib", "memory_ratio", "saved_mib"])
        rows += bn_rows
    path = write_results("fadrm", rows, device, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
