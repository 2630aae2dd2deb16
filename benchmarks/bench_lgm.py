"""Benchmark one LGM distillation step (``recipes/lgm.py``): iterations/s and peak memory, eager vs compiled.

Providers (each the recipe's own ``distill_step`` on random-init backbones and random real images):
    eager        the published formulation of the loss inside the step: head forward, F.cross_entropy,
                 torch.autograd.grad(create_graph=True) on (W, b), cosine, backward through the second-order graph
    closed_form  the recipe's default: ``kernels/grad_cosine.py`` (closed-form head gradient; Triton on CUDA)
    compiled     closed_form with the backbones' ``embed`` under torch.compile (CUDA default; 60-70 s to compile
                 and no gain measured on 2 CPU cores, PLATFORM.md)
    two_pass     closed_form as the two-pass step (``method.chunk_size = --chunk-size``): memory flat in augs

    python benchmarks/bench_lgm.py                                             # ViT-S/16 + ResNet-18, 224 px on CUDA
    python benchmarks/bench_lgm.py --device cpu --backbones timm:resnet18 --classes 10 --image-size 32 --augs 2

``--sweep``: the memory of the one-pass step (every view's activations kept for one backward) against the two-pass
step (``method.chunk_size``), augs_per_batch in {2, 5, 10, 20}: time per step and peak memory, each measurement in
a fresh process so that the host's peak RSS (CPU) or ``max_memory_allocated`` (CUDA) is that step's alone.

    python benchmarks/bench_lgm.py --sweep --device cpu --threads 1 --backbones timm:resnet18 --classes 10 \
        --image-size 64 --chunk-size 20                                         # the README table
    python benchmarks/bench_lgm.py --sweep --backbones timm:vit_base_patch16_224 --classes 1000 --augs-list 10 \
        --chunk-size 256 --precision bf16                                       # ImageNet-1k shape on one GPU
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (add_ratios, host_rss_mib, measure_alternating, print_table,  # noqa: E402
                                 write_results)
from fastdistill.models import create_backbone  # noqa: E402
from fastdistill.recipes.lgm import LGMRecipe  # noqa: E402
from fastdistill.config import compose  # noqa: E402

PROVIDERS = ("eager", "closed_form", "compiled", "two_pass")
SWEEP_AUGS = (2, 5, 10, 20)


def double_backward_loss(feats, labels, weights, biases, real_grads, backbone_weights, backend="auto"):
    """The published head gradient: autograd through the cross-entropy with create_graph=True."""
    loss = 0.0
    for f, w, b, (g_r, gb_r), w_m in zip(feats, weights, biases, real_grads, backbone_weights):
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        ce = F.cross_entropy(F.linear(f.float(), w, b), labels)
        grad_w, grad_b = torch.autograd.grad(ce, [w, b], create_graph=True)
        syn, real = torch.cat([grad_w.flatten(), grad_b]), torch.cat([g_r.flatten(), gb_r])
        loss = loss + w_m * (1 - F.cosine_similarity(syn, real, dim=0))
    return loss


def setup_lgm(args, provider: str, tmp: Path, chunk_size: int = 0):
    cfg = compose(["+method=lgm", f"ipc={args.ipc}", f"method.augs_per_batch={args.augs}",
                   f"method.chunk_size={chunk_size}",
                   f"method.backbones=[{','.join(args.backbones)}]", "method.backbone_pretrained=none",
                   f"method.backbone_weights=[{','.join(['1.0'] * len(args.backbones))}]",
                   f"method.image_size={args.image_size}", "eval.backbone=timm:test_byobnet", "eval.pretrained=none",
                   f"device={args.device}", f"precision={args.precision}",
                   f"compile={'true' if provider == 'compiled' else 'false'}", f"out={tmp / provider}",
                   "progress=false"])
    recipe = LGMRecipe(cfg)
    backbones = [create_backbone(name, **({"img_size": args.image_size} if "vit" in name else {}))
                 for name in args.backbones]
    recipe.prepare(backbones, (args.image_size, args.image_size), 3, args.classes)
    recipe.init_synthetic()
    if provider == "eager":
        recipe.matching_loss = double_backward_loss
    n_real = args.augs * recipe.n_images
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(n_real, 3, args.image_size, args.image_size, generator=gen).to(recipe.device),
            torch.randint(0, args.classes, (n_real,), generator=gen).to(recipe.device))
    return lambda: recipe.distill_step(real)


def sweep_child(args) -> dict:
    """One measurement, in this (fresh) process: the median time of ``args.repeats`` steps after ``args.warmup``;
    the peak memory of all the steps, and above the memory held before them (model, synthetic set, real batch)."""
    import tempfile

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        step = setup_lgm(args, "closed_form", Path(tmp), chunk_size=args.chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / 2**20
        else:
            # ru_maxrss is the process's all-time peak: it is the steps' only if it exceeds setup's (recorded)
            base = host_rss_mib()
            setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms_p50": statistics.median(times), "ms_min": min(times), "peak_mib": peak, "base_mib": base,
            "step_peak_mib": peak - base, **({} if device.type == "cuda" else {"setup_peak_mib": setup_peak})}


def sweep(args) -> None:
    """augs_per_batch x {one_pass, two_pass}, each in a fresh process, ``rounds`` times in alternating order."""
    runs: dict[tuple[int, str], list[dict]] = {}
    for r in range(args.rounds):
        for augs in args.augs_list:
            modes = [("one_pass", 0), ("two_pass", args.chunk_size)]
            for mode, chunk in (modes if r % 2 == 0 else modes[::-1]):
                cmd = [sys.executable, __file__, "--sweep-child", "--augs", str(augs), "--chunk-size", str(chunk),
                       "--device", args.device, "--classes", str(args.classes), "--ipc", str(args.ipc),
                       "--image-size", str(args.image_size), "--precision", args.precision,
                       "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--backbones", *args.backbones]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{mode} augs {augs} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"round {r} augs {augs} {mode}: {result}", file=sys.stderr)
                runs.setdefault((augs, mode), []).append(result)
    device = torch.device(args.device)
    rows = []
    for (augs, mode), rs in sorted(runs.items()):
        n = augs * args.ipc * args.classes
        rows.append({"benchmark": "lgm_augs_sweep", "provider": mode, "mode": "full", "dtype": args.precision,
                     "shape": f"M={len(args.backbones)} C={args.classes} ipc={args.ipc} augs={augs} "
                              f"px={args.image_size}",
                     "augs_per_batch": augs, "views": n, "chunk_size": args.chunk_size if mode == "two_pass" else 0,
                     "backbones": args.backbones,
                     "ms_p50": statistics.median(x["ms_p50"] for x in rs),
                     "peak_mib": statistics.median(x["peak_mib"] for x in rs),
                     "step_peak_mib": statistics.median(x["step_peak_mib"] for x in rs),
                     "rounds": len(rs)})
    base = {r["augs_per_batch"]: r for r in rows if r["provider"] == "one_pass"}
    for r in rows:
        ref = base[r["augs_per_batch"]]
        r["time_ratio"] = r["ms_p50"] / ref["ms_p50"]
        r["memory_ratio"] = r["peak_mib"] / ref["peak_mib"]
    print_table(rows, ["augs_per_batch", "views", "provider", "chunk_size", "ms_p50", "time_ratio", "peak_mib",
                       "step_peak_mib", "memory_ratio"])
    print(f"wrote {write_results('lgm_augs_sweep', rows, device, out_dir=args.out_dir)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS[:3]), choices=PROVIDERS)
    parser.add_argument("--backbones", nargs="+", default=["timm:vit_small_patch16_224", "timm:resnet18"])
    parser.add_argument("--classes", type=int, default=100, help="C (ImageNet-100 scale by default)")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--augs", type=int, default=10, help="augs_per_batch (published 10)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="one-pass vs two-pass over --augs-list, fresh processes")
    parser.add_argument("--augs-list", type=int, nargs="+", default=list(SWEEP_AUGS))
    parser.add_argument("--chunk-size", type=int, default=20, help="views per backbone pass of the two-pass step")
    parser.add_argument("--sweep-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "eager" not in args.providers:
        parser.error("--providers must include eager: speed and memory are ratios to it")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep_child:
        result = sweep_child(args)
        if args.out_dir:  # one measured configuration as a results file (the GPU suite's ImageNet-1k step)
            row = {"benchmark": "lgm_step", "provider": "two_pass" if args.chunk_size else "one_pass",
                   "mode": "full", "dtype": args.precision, "backbones": args.backbones,
                   "shape": f"M={len(args.backbones)} C={args.classes} ipc={args.ipc} augs={args.augs} "
                            f"px={args.image_size}", "chunk_size": args.chunk_size, **result}
            write_results("lgm_step_single", [row], torch.device(args.device), out_dir=args.out_dir)
        print(json.dumps(result))
        return
    if args.sweep:
        sweep(args)
        return
    import tempfile

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        closures = {p: setup_lgm(args, p, Path(tmp), chunk_size=args.chunk_size if p == "two_pass" else 0)
                    for p in args.providers}
        results = measure_alternating(closures, device, args.rounds, args.warmup, args.repeats)
    shape = f"M={len(args.backbones)} C={args.classes} ipc={args.ipc} augs={args.augs} px={args.image_size}"
    rows = [{"benchmark": "lgm_step", "provider": p, "mode": "full", "shape": shape, "dtype": args.precision,
             "backbones": args.backbones, **stats, "iterations_per_s": 1e3 / stats["ms_p50"]}
            for p, stats in results.items()]
    rows = add_ratios(rows)
    print_table(rows, ["shape", "dtype", "provider", "ms_p50", "ms_p20", "ms_p80", "iterations_per_s", "speedup",
                       "peak_mib", "memory_ratio"])
    print(f"wrote {write_results('lgm', rows, device, out_dir=args.out_dir)}")


if __name__ == "__main__":
    main()
