"""Benchmark KD student training: images/s and peak memory of one training step with and without the fused paths.

One function per recipe (``bench_<recipe>``), each building the recipe from its config exactly as a run does and
timing its own ``train_step`` on a fixed batch, providers alternated (benchmarks/_harness.py):

    kd_multi  eager  attention KL on materialised (B, 1, L, L) maps (fastdistill/losses/attention_kl.py)
              fused  kernels/attention_kl: Triton on CUDA; on CPU the blockwise torch form (no Triton there)
              alone  the student's CE step without teachers, for scale (what the KD terms cost)
    kd_clip   eager  the frozen teacher embeds every augmented view (method.kd.teacher_targets=online)
              cached teacher targets computed once per image before training (teacher_targets=cached; CP always)
              alone  the student's CE step (the SUP baseline), for scale

Teachers are randomly initialised (``weights=none``): the step's cost does not depend on their weights.

    python benchmarks/bench_kd.py                                   # kd_multi; paper shapes on CUDA, default on CPU
    python benchmarks/bench_kd.py --device cpu --threads 1 --overrides '++method.model_kwargs={patch_size:4}'
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import add_ratios, measure_alternating, print_table, write_results  # noqa: E402


def bench_kd_multi(args, device: torch.device) -> list[dict]:
    from fastdistill.recipes.kd_multi import KDMultiRecipe
    from fastdistill.config import compose

    preset = args.preset or ("paper" if device.type == "cuda" else "default")
    base = ["+method=kd_multi", f"preset={preset}", f"device={device.type}", "progress=false", "data=mnist5k",
            "method.teachers.cl.weights=none", "method.teachers.mim.weights=none", f"method.batch_size={args.batch}",
            f"out={args.scratch}/kd_multi", *args.overrides]
    recipes = {}
    for name, fused in (("eager", False), ("fused", True), ("alone", True)):
        cfg = compose([*base, f"method.fused_attention_kl={str(fused).lower()}"])
        recipe = KDMultiRecipe(cfg)
        recipe.setup()
        recipe.start_stage("baseline" if name == "alone" else "kd")
        recipes[name] = recipe
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 1, 28, 28), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step(recipe):
        def fn():
            recipe.step = 0  # the schedule's first entry each call: the step's cost does not depend on the lr
            recipe.train_step(x, y)
        return fn

    results = measure_alternating({n: step(r) for n, r in recipes.items()}, device, args.rounds, args.warmup,
                                  args.repeats)
    r = recipes["fused"]
    tokens = r.student_tap.attn.num_heads, (r.image_size[0] // r.student.spec.patch_size) ** 2 + 1
    shape = f"{preset}: B={args.batch} {r.student.spec.name} {r.image_size[0]}px L={tokens[1]}"
    rows = []
    for name, stats in results.items():
        rows.append({"recipe": "kd_multi", "provider": name, "mode": "train_step", "shape": shape, "dtype": "float32",
                     "images_per_s": args.batch / (stats["ms_p50"] / 1e3), **stats})
    return add_ratios(rows)


def bench_kd_clip(args, device: torch.device) -> list[dict]:
    """kd_clip's stage-1 step (FD): ``eager`` runs the frozen teacher on every augmented view
    (``method.kd.teacher_targets=online``), ``cached`` reads targets computed once before training (the fast path,
    and what CP always does), ``alone`` is the student's CE step (SUP) for scale."""
    from fastdistill.recipes.kd_clip import KDClipRecipe
    from fastdistill.config import compose

    # teacher weights do not change the step's cost: random ones (paper: the CLIP ViT-B/16 image tower at 224 px)
    preset = args.preset or ("paper" if device.type == "cuda" else "default")
    size = 224 if preset == "paper" else 28
    base = ["+method=kd_clip", f"preset={preset}", f"device={device.type}", "progress=false", "data=mnist5k",
            "method.teacher_weights=none", "method.gen.mode=none", "method.kd.objective=fd",
            f"method.kd.batch_size={args.batch}", f"method.baseline.batch_size={args.batch}",
            "method.real_per_class=20", f"out={args.scratch}/kd_clip", *args.overrides]
    recipes = {}
    for name, targets in (("eager", "online"), ("cached", "cached"), ("alone", "cached")):
        recipe = KDClipRecipe(compose([*base, f"method.kd.teacher_targets={targets}"]))
        recipe.setup()
        recipe.begin_stage("baseline" if name == "alone" else "kd")
        recipes[name] = recipe
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 1, size, size), generator=gen, dtype=torch.uint8)
    rows_of = torch.arange(args.batch) % len(recipes["cached"].kd_set)  # KD-set rows (cached targets)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step(name, recipe):
        def fn():
            recipe.step = 0  # the schedule's first entry each call: the step's cost does not depend on the lr
            recipe.train_step("baseline" if name == "alone" else "kd", x, y if name == "alone" else rows_of)
        return fn

    results = measure_alternating({n: step(n, r) for n, r in recipes.items()}, device, args.rounds, args.warmup,
                                  args.repeats)
    r = recipes["eager"]
    shape = f"{preset}: B={args.batch} {r.teacher.spec.name} -> {r.student.spec.name} {size}px"
    return add_ratios([{"recipe": "kd_clip", "provider": name, "mode": "train_step", "shape": shape,
                        "dtype": "float32", "images_per_s": args.batch / (stats["ms_p50"] / 1e3), **stats}
                       for name, stats in results.items()])


BENCHES = {"kd_multi": bench_kd_multi, "kd_clip": bench_kd_clip}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="preset of the recipe (default: paper on CUDA, default on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 64 on CUDA, 50 on CPU)")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value for the recipe's config")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/fastdistill-bench-kd"),
                        help="folder for the recipes' (unused) run outputs")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 64 if args.device.startswith("cuda") else 50
    device = torch.device(args.device)
    rows = []
    for name in args.recipes:
        rows += BENCHES[name](args, device)
    print_table(rows, ["recipe", "shape", "provider", "images_per_s", "ms_p50", "ms_p20", "ms_p80", "speedup",
                       "peak_mib", "memory_ratio"])
    path = write_results("kd", rows, device, out_dir=args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
