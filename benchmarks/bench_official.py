"""FADRM's recovery iteration side by side with the official one, on the same network and batch, in one run.

The official iteration (Jiacheng8/FADRM ``recover/recover.py``, ``get_images``) is run with the official code's own
pieces, imported from a checkout given on the command line (``--fadrm-repo``; nothing of it is copied here): its
``BNFeatureHook`` on every BatchNorm layer, its ``lr_cosine_policy`` and ``clip``. Around them, the step as that file
runs it: torchvision ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on the batch tensor, a random roll, forward,
cross-entropy + ``r_bn`` x the hooks' sum (the first BN layer x ``first_bn_multiplier``), backward, Adam (betas
0.5 / 0.9), clip to the normalised pixel range. fp32, as the published CPU-comparable path (its fp16 autocast needs
CUDA). fastdistill's iteration is the recipe's own ``recover_batch`` (``bench_fadrm.recovery_closure``, provider
``fast_bn``: fused BN statistics, fp32, every stage at full resolution). Both use a random-init ResNet-18 teacher (timm
for fastdistill, torchvision for the official step: the same layers) and ``--classes`` images, one per class.

    git -C <mirror of Jiacheng8/FADRM> archive HEAD recover models | tar x -C /tmp/fadrm   # any checkout
    python benchmarks/bench_official.py --fadrm-repo /tmp/fadrm --threads 1 --resolution 64 --classes 10

The official ``utils_recover`` imports OpenCV (``opencv-python-headless``) at module level.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_fadrm import recovery_closure  # noqa: E402
from benchmarks._harness import print_table, write_results  # noqa: E402

# ImageNet normalisation, as the official recovery clips to it
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def official_iterations(repo: Path, args):
    """A closure running ``args.iterations`` x 4 official recovery iterations on one batch, and that count."""
    sys.path.insert(0, str(repo / "recover"))
    import torchvision
    import utils_recover as official
    from torchvision import transforms

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=args.classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = [official.BNFeatureHook(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    clip_args = argparse.Namespace(mean_norm=MEAN, std_norm=STD)
    size, total = args.resolution, 4 * args.iterations
    augment = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()])
    targets = torch.arange(args.classes)
    criterion = torch.nn.CrossEntropyLoss()
    rescale = [args.first_bn_multiplier] + [1.0] * (len(hooks) - 1)

    def run():
        inputs = torch.randn(args.classes, 3, size, size, requires_grad=True)
        schedule = official.lr_cosine_policy(args.lr, 0, total)
        optimizer = torch.optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        for it in range(total):
            schedule(optimizer, it, it)
            x = torch.roll(augment(inputs), shifts=(random.randint(0, args.roll), random.randint(0, args.roll)),
                           dims=(2, 3))
            optimizer.zero_grad()
            out = model(x)
            loss = criterion(out, targets) + args.r_bn * sum(h.r_feature * r for h, r in zip(hooks, rescale))
            loss.backward()
            optimizer.step()
            inputs.data = official.clip(inputs.data, clip_args)
    return run, total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fadrm-repo", type=Path, required=True, help="a checkout of Jiacheng8/FADRM")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5, help="per stage; 4 stages")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians over them")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.fadrm_repo / "recover" / "utils_recover.py").is_file():
        parser.error(f"--fadrm-repo {args.fadrm_repo} holds no recover/utils_recover.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the recipe's defaults, shared by both steps
    args.lr, args.r_bn, args.first_bn_multiplier, args.roll = 0.25, 0.01, 10.0, max(1, args.resolution // 8)
    args.low, args.device = args.resolution, "cpu"
    device = torch.device("cpu")

    official_run, total = official_iterations(args.fadrm_repo, args)
    with tempfile.TemporaryDirectory() as tmp:
        ours_run = recovery_closure("fast_bn", args, device, tmp)
        runs = {"official": official_run, "fastdistill": ours_run}
        for fn in runs.values():  # warm-up: allocator, first-call dispatch
            fn()
        times = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[name]()
                times[name].append((time.perf_counter() - t0) * 1e3 / total)
    base = statistics.median(times["official"])
    rows = [{"benchmark": "fadrm_vs_official", "provider": name, "mode": "full", "dtype": "float32",
             "shape": f"{args.arch} {args.resolution}px batch {args.classes}", "iterations": total,
             "ms_per_iteration": statistics.median(t), "ms_p50": statistics.median(t),
             "speedup": base / statistics.median(t), "rounds": len(t), "threads": torch.get_num_threads()}
            for name, t in times.items()]
    print_table(rows, ["shape", "provider", "iterations", "ms_per_iteration", "speedup", "threads"])
    print(f"wrote {write_results('fadrm_vs_official', rows, device, out_dir=args.out_dir)}")


if __name__ == "__main__":
    main()
