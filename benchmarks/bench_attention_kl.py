"""Benchmark the attention-map KL of multi-teacher KD: forward + backward to the student's Q and K, time and memory.

Providers:
    eager     the reference in fastdistill/losses/attention_kl.py: both (B, H, L, L) maps materialised, log-softmax,
              KL, autograd (what a published implementation does with the attention maps it returns)
    blockwise fastdistill.kernels.attention_kl with backend="torch": blocks of 64 query rows, recomputed in the
              backward; the form the fused path takes on CPU (no Triton there)
    triton    fastdistill.kernels.attention_kl with backend="triton": online log-sum-exp over key blocks, no L x L
              map (CUDA only; the CPU interpreter measures nothing useful)

Shapes follow ViTs at 224 px / patch 16 (L 197), 384 px / patch 16 (L 577) and 512 px / patch 16 (L 1025), heads 3
(ViT-Ti), 6 (ViT-S) and 12 (ViT-B), head dim 64, both sides. ``peak_mib`` is max_memory_allocated on CUDA and host
RSS growth on CPU (a lower bound); ``saved_mib`` is what autograd keeps between forward and backward.

    python benchmarks/bench_attention_kl.py                       # all shapes, CUDA when available
    python benchmarks/bench_attention_kl.py --device cpu --threads 1 --batch 4
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (  # noqa: E402
    add_ratios, kernel_parser, measure_alternating, mode_fn, parse_kernel_args, print_table, saved_mib,
    write_results)
from fastdistill.kernels import attention_kl as kernel  # noqa: E402
from fastdistill.losses import attention_kl as reference  # noqa: E402

PROVIDERS = ("eager", "blockwise", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def setup_attention_kl(b, h, n, d, dtype, device, providers, seed=0):
    """Inputs and one loss closure per provider (teacher and student heads of dim ``d``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q_t, k_t, q_s, k_s = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(4))
    q_s.requires_grad_()
    k_s.requires_grad_()
    closures = {
        "eager": lambda: reference.attention_kl(q_t, k_t, q_s, k_s),
        "blockwise": lambda: kernel.attention_kl(q_t, k_t, q_s, k_s, backend="torch"),
        "triton": lambda: kernel.attention_kl(q_t, k_t, q_s, k_s, backend="triton"),
    }
    return [q_s, k_s], [q_t, k_t, q_s, k_s], {name: closures[name] for name in providers}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    providers = [p for p in args.providers if p != "triton" or device.type == "cuda"]
    if len(providers) < len(args.providers):
        print("triton skipped: it runs on CUDA only; on CPU the fused path is the blockwise torch form")
    rows = []
    for n in args.tokens:
        for h in args.heads:
            shape = f"B={args.batch} H={h} L={n} D={args.head_dim}"
            grads, inputs, closures = setup_attention_kl(args.batch, h, n, args.head_dim, DTYPES[args.dtype], device,
                                                         providers)
            for mode in args.modes:
                results = measure_alternating({p: mode_fn(fn, grads, mode) for p, fn in closures.items()}, device,
                                              args.rounds, args.warmup, args.repeats)
                for name, stats in results.items():
                    rows.append({"kernel": "attention_kl", "provider": name, "mode": mode, "shape": shape,
                                 "dtype": args.dtype, "B": args.batch, "H": h, "L": n, "D": args.head_dim, **stats,
                                 "saved_mib": saved_mib(closures[name], inputs)})
                print(f"{shape} {mode}: " + ", ".join(
                    f"{r['provider']} {r['ms_p50']:.3g} ms {r['peak_mib']:.3g} MiB" for r in rows[-len(results):]),
                    flush=True)
            del grads, inputs, closures
    rows = add_ratios(rows)
    eager = {(r["shape"], r["mode"]): r["saved_mib"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        base = eager[(r["shape"], r["mode"])]
        r["saved_ratio"] = r["saved_mib"] / base if base > 0 else float("nan")
    return rows


def main(argv=None):
    parser = kernel_parser(__doc__, PROVIDERS, "student's Q and K")
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 577, 1025], help="L, tokens per image")
    parser.add_argument("--heads", type=int, nargs="+", default=[3, 6, 12], help="head pairs H")
    parser.add_argument("--head-dim", type=int, default=64, help="D of teacher and student heads")
    parser.add_argument("--batch", type=int, default=None, help="images B (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parse_kernel_args(parser, argv)
    if args.batch is None:
        args.batch = 32 if args.device.startswith("cuda") else 4
    rows = run(args)
    print_table(rows, ["shape", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "speedup", "peak_mib",
                       "memory_ratio", "saved_mib", "saved_ratio"])
    path = write_results("attention_kl", rows, torch.device(args.device), out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
