"""Benchmark the FADRM BN-statistics loss summed over the BN layers of timm resnet18: time, peak and saved memory.

Providers:
    eager        the published hook (SRe2L, kept by FADRM in recover/utils_recover.py), written plainly:
                 x.mean([0, 2, 3]), x.permute(1, 0, 2, 3).contiguous().view(C, -1).var(1, unbiased=False),
                 torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)
    torch_fused  fastdistill.kernels.bn_stats, backend="torch" (BNStatsTorchFunction, the CPU path)
    triton       fastdistill.kernels.bn_stats, backend="triton" (CUDA only; the CPU interpreter is ~500x slower)

Shapes are those of every BN input of a random-init resnet18 at the FADRM resolutions (32, 64 and 224 px; batch
100 in the published recovery). They depend on the batch only through N, so they are captured with forward hooks on
one image and N is set to --batch. saved_mib counts what the autograd graph keeps beyond the BN inputs themselves
(which the BN layers save anyway): the eager hook's .contiguous() copy shows up there.

    python benchmarks/bench_bn_stats.py                                  # batch 100 on CUDA, 16 on CPU
    python benchmarks/bench_bn_stats.py --batch 100 --resolutions 32 64 --layouts nchw
"""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

# run as a script, sys.path holds benchmarks/ but not the repository root that `benchmarks._harness` needs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import (  # noqa: E402
    add_ratios, kernel_parser, measure_alternating, mode_fn, parse_kernel_args, print_table, saved_mib,
    write_results)
from fastdistill.kernels import bn_stats as kernel  # noqa: E402

PROVIDERS = ("eager", "torch_fused", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# batch 224 px x 100 on 2 CPU cores takes minutes per provider: 16 unless asked
DEFAULT_BATCH = {"cuda": 100, "cpu": 16}


def bn_layer_inputs(arch: str, resolution: int) -> list[tuple[tuple[int, ...], torch.nn.BatchNorm2d]]:
    """(input shape at batch 1, layer) for every BatchNorm2d of a random-init timm ``arch``, in forward order."""
    model = timm.create_model(arch, pretrained=False).eval()
    found = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: found.append((tuple(inp[0].shape), mod)))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return found


def _eager_loss(x, running_mean, running_var):
    nch = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().view(nch, -1).var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


def setup_bn_stats(layers, batch, layout, dtype, device, providers, seed=0):
    """One BN input per layer and one closure per provider returning the loss summed over layers (graph attached)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs, stats = [], []
    for shape, bn in layers:
        x = torch.randn((batch,) + shape[1:], generator=gen).to(device, dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        inputs.append(x.requires_grad_())
        stats.append((bn.running_mean.to(device), bn.running_var.to(device)))
    losses = {
        "eager": _eager_loss,
        "torch_fused": lambda x, rm, rv: kernel.bn_stats_loss(x, rm, rv, backend="torch"),
        "triton": lambda x, rm, rv: kernel.bn_stats_loss(x, rm, rv, backend="triton"),
    }
    closures = {
        name: (lambda loss=losses[name]: sum(loss(x, rm, rv) for x, (rm, rv) in zip(inputs, stats)))
        for name in providers
    }
    return inputs, closures


def run(args) -> list[dict]:
    device = torch.device(args.device)
    providers = [p for p in args.providers if p != "triton" or device.type == "cuda"]
    if len(providers) < len(args.providers):
        print("triton skipped: it runs on CUDA only (the CPU interpreter measures nothing useful)")
    dtype = DTYPES[args.dtype]
    rows = []
    for resolution in args.resolutions:
        layers = bn_layer_inputs(args.arch, resolution)
        bn_shapes = [[args.batch, *shape[1:]] for shape, _ in layers]
        elements = sum(args.batch * torch.Size(shape[1:]).numel() for shape, _ in layers)
        shape = f"{args.arch} N={args.batch} {resolution}px"
        for layout in args.layouts:
            inputs, closures = setup_bn_stats(layers, args.batch, layout, dtype, device, providers)
            saved = {name: saved_mib(fn, inputs) for name, fn in closures.items()}
            for mode in args.modes:
                results = measure_alternating({n: mode_fn(fn, inputs, mode) for n, fn in closures.items()}, device,
                                              args.rounds, args.warmup, args.repeats)
                for name, stats in results.items():
                    rows.append({"kernel": "bn_stats", "provider": name, "mode": mode, "shape": shape,
                                 "layout": layout, "dtype": args.dtype, "arch": args.arch, "batch": args.batch,
                                 "resolution": resolution, "bn_layers": len(layers), "elements": elements,
                                 "bn_shapes": bn_shapes, **stats, "saved_mib": saved[name]})
                print(f"{shape} {layout} {mode}: " + ", ".join(
                    f"{r['provider']} {r['ms_p50']:.3g} ms" for r in rows[-len(results):]), flush=True)
    return add_ratios(rows, key=("shape", "layout", "mode", "dtype"))


def main(argv=None):
    parser = kernel_parser(__doc__, PROVIDERS, "BN inputs")
    parser.add_argument("--arch", default="resnet18", help="timm model whose BatchNorm2d inputs set the shapes")
    parser.add_argument("--batch", type=int, help="N of every BN input (default: 100 on CUDA as published, 16 on CPU)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 224],
                        help="input sizes in px (FADRM: 32 and 64 for CIFAR/Tiny-ImageNet, 224 for ImageNet)")
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"],
                        help="memory format of the BN inputs (channels_last convolutions are faster on CPU)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="BN input dtype (float16 is what FADRM's MPT feeds the hook on a GPU)")
    args = parse_kernel_args(parser, argv)
    if args.batch is None:
        args.batch = DEFAULT_BATCH["cuda" if args.device.startswith("cuda") else "cpu"]

    rows = run(args)
    print_table(rows, ["shape", "layout", "dtype", "mode", "provider", "ms_p50", "ms_p20", "ms_p80", "speedup",
                       "peak_mib", "memory_ratio", "saved_mib"])
    path = write_results("bn_stats", rows, torch.device(args.device), out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
