"""Benchmark one LGM distillation step (``recipes/lgm.py``): iterations/s and peak memory, eager vs compiled.

Providers (each the recipe's own ``distill_step`` on random-init backbones and random real images):
    eager        the published formulation of the loss inside the step: head forward, F.cross_entropy,
                 torch.autograd.grad(create_graph=True) on (W, b), cosine, backward through the second-order graph
    closed_form  the recipe's default: ``kernels/grad_cosine.py`` (closed-form head gradient; Triton on CUDA)
    compiled     closed_form with the backbones' ``embed`` under torch.compile (CUDA default; 60-70 s to compile
                 and no gain measured on 2 CPU cores, PLATFORM.md)

    python benchmarks/bench_lgm.py                                             # ViT-S/16 + ResNet-18, 224 px on CUDA
    python benchmarks/bench_lgm.py --device cpu --backbones timm:resnet18 --classes 10 --image-size 32 --augs 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import add_ratios, measure_alternating, print_table, write_results  # noqa: E402
from fastdistill.models import create_backbone  # noqa: E402
from fastdistill.recipes.lgm import LGMRecipe  # noqa: E402
from fastdistill.run import compose  # noqa: E402

PROVIDERS = ("eager", "closed_form", "compiled")


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


def setup_lgm(args, provider: str, tmp: Path):
    cfg = compose(["+method=lgm", f"ipc={args.ipc}", f"method.augs_per_batch={args.augs}",
                   f"method.backbones=[{','.join(args.backbones)}]", "method.backbone_pretrained=none",
                   f"method.backbone_weights=[{','.join(['1.0'] * len(args.backbones))}]",
                   f"method.image_size={args.image_size}", "eval.backbone=timm:test_byobnet", "eval.pretrained=none",
                   f"device={args.device}", f"precision={args.precision}",
                   f"compile={'true' if provider == 'compiled' else 'false'}", f"out={tmp / provider}",
                   "progress=false"])
    recipe = LGMRecipe(cfg)
    backbones = [create_backbone(name) for name in args.backbones]
    recipe.prepare(backbones, (args.image_size, args.image_size), 3, args.classes)
    recipe.init_synthetic()
    if provider == "eager":
        recipe.matching_loss = double_backward_loss
    n_real = args.augs * recipe.n_images
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(n_real, 3, args.image_size, args.image_size, generator=gen).to(recipe.device),
            torch.randint(0, args.classes, (n_real,), generator=gen).to(recipe.device))
    return lambda: recipe.distill_step(real)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
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
    args = parser.parse_args(argv)
    if "eager" not in args.providers:
        parser.error("--providers must include eager: speed and memory are ratios to it")
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        closures = {p: setup_lgm(args, p, Path(tmp)) for p in args.providers}
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
