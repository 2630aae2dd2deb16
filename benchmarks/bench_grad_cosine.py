"""Benchmark the LGM gradient-cosine loss: forward + backward to the features, time and peak memory.

Providers:
    eager        the authors' formulation: head forward, F.cross_entropy, torch.autograd.grad(create_graph=True)
                 on (W, b), flatten + cat, 1 - cosine, backward through the second-order graph to the features
    closed_form  the reference in fastdistill/losses/grad_cosine.py (closed-form head gradient, autograd)
    triton       fastdistill.kernels.grad_cosine (CUDA only; the CPU interpreter is ~500x slower than torch)

Shapes follow the method (Cazenavette et al. 2025; METHODS.md): C in {10, 100, 1000} classes, D in {384, 768, 1024,
1536} (ViT-S/B/L/g features), N in {100, 256, 512} synthetic views, 1 to 4 backbones (all of dim D; 4 = DINOv1 +
DINOv2 + CLIP + SigLIP), head W = 0.01 randn, b = 0.
The real-side gradients are computed once, outside the timed region (they carry no graph).

    python benchmarks/bench_grad_cosine.py                       # all shapes on CUDA, a subset on CPU
    python benchmarks/bench_grad_cosine.py --classes 1000 --dims 1536 --batches 512 --backbones 3 --dtype bfloat16
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# run as a script, sys.path holds benchmarks/ but not the repository root that `benchmarks._harness` needs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (  # noqa: E402
    add_ratios, kernel_parser, measure_alternating, mode_fn, parse_kernel_args, print_table, saved_mib,
    write_results)
from fastdistill.kernels import grad_cosine as kernel  # noqa: E402
from fastdistill.losses import grad_cosine as reference  # noqa: E402

PROVIDERS = ("eager", "closed_form", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# CUDA: the grid (C 10/100/1000, D 384/768/1024, N 100/256, M 1-4) plus the published extremes D 1536, N 512.
# CPU: a corner of it (2 cores: the full grid takes several minutes per provider).
DEFAULTS = {
    "cuda": dict(classes=[10, 100, 1000], dims=[384, 768, 1024, 1536], batches=[100, 256, 512],
                 backbones=[1, 2, 3, 4]),
    "cpu": dict(classes=[10, 100, 1000], dims=[384, 1024], batches=[100, 256], backbones=[1, 4]),
}


def _eager_loss(feats, labels, weights, biases, real_grads):
    loss = 0.0
    for f, w, b, (g_r, gb_r) in zip(feats, weights, biases, real_grads):
        ce = F.cross_entropy(F.linear(f, w, b), labels)
        grad_w, grad_b = torch.autograd.grad(ce, [w, b], create_graph=True)
        syn = torch.cat([grad_w.flatten(), grad_b])
        real = torch.cat([g_r.flatten(), gb_r])
        loss = loss + (1 - F.cosine_similarity(syn, real, dim=0))
    return loss


def setup_grad_cosine(n, c, d, num_backbones, dtype, device, providers, seed=0):
    """Inputs and one loss closure per provider; each closure returns the loss (its graph attached)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen).to(device)
    real_labels = torch.randint(0, c, (n,), generator=gen).to(device)
    feats, weights, biases, real_grads = [], [], [], []
    for _ in range(num_backbones):
        weights.append((0.01 * torch.randn(c, d, generator=gen)).to(device, dtype))
        biases.append(torch.zeros(c, device=device, dtype=dtype))
        feats.append(torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_())
        real = torch.randn(n, d, generator=gen).to(device, dtype)
        real_grads.append(reference.linear_head_grad(real, real_labels, weights[-1], biases[-1]))
    # the published code draws a fresh head with requires_grad every step; here the leaves are made once
    head_leaves = [w.clone().requires_grad_() for w in weights], [b.clone().requires_grad_() for b in biases]
    closures = {
        "eager": lambda: _eager_loss(feats, labels, *head_leaves, real_grads),
        "closed_form": lambda: reference.grad_cosine_loss(feats, labels, weights, biases, real_grads),
        "triton": lambda: kernel.grad_cosine_loss(feats, labels, weights, biases, real_grads, backend="triton"),
    }
    inputs = [labels, *feats, *weights, *biases, *head_leaves[0], *head_leaves[1], *(t for p in real_grads for t in p)]
    return feats, inputs, {name: closures[name] for name in providers}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    providers = [p for p in args.providers if p != "triton" or device.type == "cuda"]
    if len(providers) < len(args.providers):
        print("triton skipped: it runs on CUDA only (the CPU interpreter measures nothing useful)")
    dtype = DTYPES[args.dtype]
    rows = []
    for num_backbones in args.backbones:
        for n in args.batches:
            for c in args.classes:
                for d in args.dims:
                    shape = f"M={num_backbones} N={n} C={c} D={d}"
                    feats, inputs, closures = setup_grad_cosine(n, c, d, num_backbones, dtype, device, providers)
                    for mode in args.modes:
                        results = measure_alternating({n: mode_fn(fn, feats, mode) for n, fn in closures.items()},
                                                      device, args.rounds, args.warmup, args.repeats)
                        for name, stats in results.items():
                            rows.append({"kernel": "grad_cosine", "provider": name, "mode": mode, "shape": shape,
                                         "dtype": args.dtype, "M": num_backbones, "N": n, "C": c, "D": d, **stats,
                                         "saved_mib": saved_mib(closures[name], inputs)})
                        print(f"{shape} {mode}: " + ", ".join(
                            f"{r['provider']} {r['ms_p50']:.3g} ms" for r in rows[-len(results):]), flush=True)
    rows = add_ratios(rows)
    eager = {(r["shape"], r["mode"]): r["saved_mib"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager[(r["shape"], r["mode"])]
        r["saved_ratio"] = r["saved_mib"] / base if base > 0 else float("nan")
    return rows


def main(argv=None):
    parser = kernel_parser(__doc__, PROVIDERS, "features")
    parser.add_argument("--classes", type=int, nargs="+", help="C values (default: 10 100 1000)")
    parser.add_argument("--dims", type=int, nargs="+", help="D values (default: 384 768 1024 1536; CPU 384 1024)")
    parser.add_argument("--batches", type=int, nargs="+", help="N values, synthetic views (default: 100 256 512; CPU 100 256)")
    parser.add_argument("--backbones", type=int, nargs="+", help="numbers of backbones M (default: 1 2 3 4; CPU 1 4)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="feature and head dtype")
    args = parse_kernel_args(parser, argv)
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    rows = run(args)
    print_table(rows, ["shape", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "speedup", "peak_mib",
                       "memory_ratio", "saved_mib", "saved_ratio"])
    path = write_results("grad_cosine", rows, torch.device(args.device), out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
