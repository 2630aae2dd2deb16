"""The CPU steps side by side with the official ones: FADRM's recovery iteration and LGM's distillation step, each
on the same network and batch, in one process, alternating, 1 thread by default.

The official code is imported from checkouts given on the command line (nothing of it is copied here):

FADRM (``--fadrm-repo``, Jiacheng8/FADRM): the iteration of ``recover/recover.py`` (``get_images``) with the
official code's own pieces: its ``BNFeatureHook`` on every BatchNorm layer, its ``lr_cosine_policy`` and ``clip``.
Around them, the step as that file runs it: torchvision ``RandomResizedCrop`` + ``RandomHorizontalFlip`` on the
batch tensor, a random roll, forward, cross-entropy + ``r_bn`` x the hooks' sum (the first BN layer x
``first_bn_multiplier``), backward, Adam (betas 0.5 / 0.9), clip to the normalised pixel range. fp32: its fp16
autocast is CUDA's, so on CPU the official step runs fp32. fastdistill's iteration is the recipe's own
``recover_batches`` (``bench_fadrm.recovery_closure``: fused BN statistics, every stage at full resolution) in fp32
and bf16. A random-init ResNet-18 (torchvision for the official step, timm for fastdistill: the same layers);
``--classes`` images, one per class (published batch 100).

LGM (``--lgm-repo``, GeorgeCazenavette/linear-gradient-matching): ``LinearGM.match_gradients`` itself, with its
``get_real_grad`` / ``get_syn_grad``, the official ``AugStandard`` augmentation (flip, random-resized-crop through
``affine_grid`` / ``grid_sample``, noise of mean 0.5), the official ``PyramidDataset.decode_pyramid`` and Adam, and
the official ``LinearClassifier`` head. Only what ties that code to CUDA and its logging is replaced: the head is
built on the CPU (``get_fc`` calls ``.cuda()``), the real batch is a fixed CPU tensor (``get_real_batch`` reads a
DataLoader), the pyramid's levels are allocated on the CPU; package ``__init__`` files that import the model zoo
(clip, transformers), wandb and the datasets are skipped, as the step calls none of them. Its autocast is
``torch.cuda.amp``'s, a no-op for CPU tensors: the official step runs fp32. The backbone is timm's random-init
model, left trainable as the official code leaves it (``.eval()`` only). fastdistill's step is the recipe's
``distill_step``: one pass, and two passes (``method.chunk_size``: ``auto`` and a fixed chunk), fp32 and bf16.
Both sides: the full pyramid at ``--lgm-size`` px (synthetic and view size equal), ipc 1, ``--lgm-augs`` views
per image, as many real images.

Times are medians of ``--rounds`` rounds (providers rotated each round); the ratio to the official step is taken
within each round, and reported as its median and range. ``--peak-memory`` adds, per provider, the growth of a
fresh process's peak RSS over one step (the official step's included).

    git clone https://github.com/Jiacheng8/FADRM /tmp/fadrm                     # or the paths: recover models
    git clone https://github.com/GeorgeCazenavette/linear-gradient-matching /tmp/lgm
    python benchmarks/bench_official.py --fadrm-repo /tmp/fadrm --lgm-repo /tmp/lgm --peak-memory

The official FADRM utilities import OpenCV (``opencv-python-headless``); the LGM pyramid imports ``einops``.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_fadrm import recovery_closure  # noqa: E402
from benchmarks._harness import print_table, write_results  # noqa: E402

# ImageNet normalisation: the official recovery clips to it, the official LGM datasets normalise with it
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------------- FADRM
def official_fadrm(repo: Path, args, resolution: int):
    """A closure running ``args.iterations`` official recovery iterations on one batch."""
    if str(repo / "recover") not in sys.path:
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
    total = args.iterations
    augment = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip()])
    targets = torch.arange(args.classes)
    criterion = torch.nn.CrossEntropyLoss()
    rescale = [args.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    roll = fadrm_roll(resolution)

    def run():
        inputs = torch.randn(args.classes, 3, resolution, resolution, requires_grad=True)
        schedule = official.lr_cosine_policy(args.lr, 0, total)
        optimizer = torch.optim.Adam([inputs], lr=args.lr, betas=(0.5, 0.9), eps=1e-8)
        for it in range(total):
            schedule(optimizer, it, it)
            x = torch.roll(augment(inputs), shifts=(random.randint(0, roll), random.randint(0, roll)), dims=(2, 3))
            optimizer.zero_grad()
            out = model(x)
            loss = criterion(out, targets) + args.r_bn * sum(h.r_feature * r for h, r in zip(hooks, rescale))
            loss.backward()
            optimizer.step()
            inputs.data = official.clip(inputs.data, clip_args)
    return run


def fadrm_roll(resolution: int) -> int:
    """The published jitter: 4 px at 32/64 px, 32 px at 224 px (``recover/recover.py`` argument defaults)."""
    return 4 if resolution <= 64 else 32


def fastdistill_fadrm(args, resolution: int, precision: str, tmp: str):
    """The recipe's ``recover_batches`` over ``args.iterations`` iterations (one stage) at ``resolution``."""
    ns = argparse.Namespace(arch="resnet18", resolution=resolution, low=resolution, classes=args.classes,
                            iterations=args.iterations, roll=fadrm_roll(resolution))
    return recovery_closure("fast_bn", ns, torch.device("cpu"), tmp, precision=precision, stages=1)


def fadrm_providers(args, resolution: int, tmp: str, only: str | None = None) -> dict:
    """Closures by provider name (``only``: that one alone)."""
    names = ["official"] + [f"fastdistill_{p}" for p in args.precisions]
    runs = {}
    for name in [only] if only else names:
        if name == "official":
            runs[name] = official_fadrm(args.fadrm_repo, args, resolution)
        else:
            precision = name.rsplit("_", 1)[1]
            runs[name] = fastdistill_fadrm(args, resolution, precision, f"{tmp}/{precision}")
    return runs


# ---------------------------------------------------------------------------------------------------- LGM
class _Skipped(types.ModuleType):
    """A package ``__init__`` or a library that the official step never calls: its submodules still load from disk
    (``__path__``), any name imported from it is None."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def _import_official_lgm(repo: Path) -> dict:
    src = repo / "src"
    if not (src / "distillation" / "linear_gm.py").is_file():
        raise FileNotFoundError(f"--lgm-repo {str(repo)!r} holds no src/distillation/linear_gm.py; pass a checkout of "
                                f"GeorgeCazenavette/linear-gradient-matching")
    names = ("wandb", "my_utils.log_utils", "augmentation", "synsets", "models", "distillation", "config", "data",
             "data.dataloaders", "my_utils")
    # top-level names the official FADRM code may hold too (its models/): swapped in for the import, then restored
    held = {name: sys.modules.pop(name) for name in list(sys.modules)
            if name.split(".")[0] in {n.split(".")[0] for n in names}}
    try:
        for name in names:
            module = _Skipped(name)
            if name not in ("wandb", "my_utils.log_utils"):
                module.__path__ = [str(src / name.replace(".", "/"))]
            sys.modules[name] = module
        import importlib

        mods = {name: importlib.import_module(name) for name in (
            "augmentation.standard_aug", "synsets.base", "synsets.pyramid", "models.linear_classifier",
            "data.dataloaders.base", "distillation.linear_gm")}
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in {k.split(".")[0] for k in names}]:
            del sys.modules[name]
        sys.modules.update(held)
    return mods


def official_lgm(repo: Path, args, backbone_name: str, backbone: torch.nn.Module, real: tuple):
    """A closure running one official ``match_gradients`` on ``backbone`` (a trainable copy of fastdistill's), the
    full pyramid and the fixed real batch ``real``."""
    mods = _import_official_lgm(repo)
    linear_gm, pyramid = mods["distillation.linear_gm"], mods["synsets.pyramid"]
    classifier = mods["models.linear_classifier"].LinearClassifier
    size, classes = args.lgm_size, args.lgm_classes
    model = copy.deepcopy(backbone.model).eval()  # the model alone: the official code normalises outside it
    for p in model.parameters():
        p.requires_grad_(True)  # official: .eval() only, never frozen
    cfg = types.SimpleNamespace(augs_per_batch=args.lgm_augs, syn_res=size, decorrelate_color=True, lr=2e-3, ipc=1)
    real_set = types.SimpleNamespace(num_classes=classes, mean=torch.tensor(MEAN).view(1, 3, 1, 1),
                                     std=torch.tensor(STD).view(1, 3, 1, 1))
    real_set.normalize = types.MethodType(mods["data.dataloaders.base"].BaseRealDataset.normalize, real_set)
    # PyramidDataset: the official constants and decode; levels allocated on the CPU (init_synset asks for CUDA),
    # the full pyramid as after its last extension: levels 1, 2, 4, ... px, each ~ N(0, 1) / L
    syn = object.__new__(pyramid.PyramidDataset)
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda t, *a, **k: t
    try:
        mods["synsets.base"].BaseDistilledDataset.__init__(syn)
    finally:
        torch.Tensor.cuda = cuda
    syn.cfg, syn.train_dataset = cfg, real_set
    resolutions = [min(2 ** k, size) for k in range(size.bit_length() + 1) if 2 ** (k - 1) < size]
    syn.pyramid = [(torch.randn(classes, 3, r, r) / len(resolutions)).requires_grad_() for r in resolutions[::-1]]
    syn.syn_labels = torch.arange(classes)
    syn.optimizer = syn.init_optimizer()

    def cpu_fc(num_feats, num_classes, distributed):  # get_fc without .cuda()
        return classifier(dim=num_feats, num_labels=num_classes).eval()

    linear_gm.get_fc = cpu_fc
    gm = types.SimpleNamespace(cfg=cfg, train_dataset=real_set, distilled_dataset=syn, backbone_model=model,
                               num_feats=backbone.spec.feature_dim, distributed=False,
                               syn_augmentor=mods["augmentation.standard_aug"].AugStandard(crop_res=size),
                               real_augmentor=mods["augmentation.standard_aug"].AugStandard(crop_res=size),
                               get_real_batch=lambda: real)
    for name in ("get_real_grad", "get_syn_grad"):
        setattr(gm, name, types.MethodType(getattr(linear_gm.LinearGM, name), gm))
    return lambda: linear_gm.LinearGM.match_gradients(gm)


def fastdistill_lgm(args, backbone, real: tuple, chunk_size, precision: str, tmp: str):
    """The recipe's ``distill_step`` on ``backbone`` (frozen by the recipe), the full pyramid, ``real``."""
    from fastdistill.config import compose
    from fastdistill.recipes.lgm import LGMRecipe

    cfg = compose(["+method=lgm", "ipc=1", f"method.augs_per_batch={args.lgm_augs}", f"method.chunk_size={chunk_size}",
                   f"method.backbones=[{backbone.spec.name}]", "method.backbone_pretrained=none",
                   "method.backbone_weights=[1.0]", f"method.image_size={args.lgm_size}", "method.noise_mean=0.5",
                   "eval.backbone=timm:test_byobnet", "eval.pretrained=none", "device=cpu", f"precision={precision}",
                   "compile=false", f"out={tmp}", "progress=false"])
    recipe = LGMRecipe(cfg)
    recipe.prepare([backbone], (args.lgm_size, args.lgm_size), 3, args.lgm_classes)
    recipe.init_synthetic()
    while len(recipe.levels) < len(recipe.sizes):
        recipe.extend_pyramid()
    step = lambda: recipe.distill_step(real)  # noqa: E731
    step.chunk_size = recipe.chunk_size
    return step


def lgm_providers(args, backbone_name: str, tmp: str, only: str | None = None) -> dict:
    """Closures by provider name (``only``: that one alone), each on its own copy of the same random-init backbone
    (a recipe may change its layout) and the same real batch."""
    from fastdistill.models import create_backbone

    def backbone():
        torch.manual_seed(0)
        return create_backbone(backbone_name, pretrained="none",
                               **({"img_size": args.lgm_size} if "vit" in backbone_name else {}))

    n = args.lgm_augs * args.lgm_classes
    gen = torch.Generator().manual_seed(0)
    real = (torch.rand(n, 3, args.lgm_size, args.lgm_size, generator=gen),
            torch.randint(0, args.lgm_classes, (n,), generator=gen))
    chunks = {"one_pass": 0, "two_pass_auto": "auto", **({f"two_pass_{args.lgm_chunk}": args.lgm_chunk}
                                                           if args.lgm_chunk else {})}
    names = ["official"] + [f"{c}_{p}" for p in args.precisions for c in chunks]
    runs = {}
    for name in [only] if only else names:
        if name == "official":
            runs[name] = official_lgm(args.lgm_repo, args, backbone_name, backbone(), real)
        else:
            step, precision = name.rsplit("_", 1)
            runs[name] = fastdistill_lgm(args, backbone(), real, chunks[step], precision, f"{tmp}/{name}")
    return runs


# ---------------------------------------------------------------------------------------------------- timing
def alternate(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every closure, ``rounds`` times in a rotated order after one warm-up call each."""
    names = list(runs)
    for fn in runs.values():  # allocator, first-call dispatch, oneDNN primitive caches
        fn()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def rows_of(benchmark: str, shape: str, times: dict[str, list[float]], per: int, extra: dict) -> list[dict]:
    """Median ms per iteration and the per-round speed-up over the official step (median, min, max)."""
    base = times["official"]
    rows = []
    for name, t in times.items():
        ratios = [b / x for b, x in zip(base, t)]
        rows.append({"benchmark": benchmark, "provider": name, "mode": "full", "shape": shape,
                     "dtype": "bfloat16" if name.endswith("bf16") else "float32", **extra.get(name, {}),
                     "ms_p50": statistics.median(t) * 1e3 / per, "ms_min": min(t) * 1e3 / per,
                     "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "rounds": len(t), "threads": torch.get_num_threads()})
    return rows


def peak_child(argv: list[str], job: str) -> float:
    """MiB by which one call of ``job`` (``fadrm:<res>:<provider>`` or ``lgm:<backbone>:<provider>``) raises the peak
    RSS of a fresh process that set up that provider alone (its first call: activations, optimiser state, caches)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--peak-child", job], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def run_peak_child(args, job: str) -> None:
    kind, rest = job.split(":", 1)
    what, provider = rest.rsplit(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "fadrm":
            res = int(what)
            sub = argparse.Namespace(**{**vars(args), "classes": args.classes_224 if res >= 224 else args.classes})
            fn = fadrm_providers(sub, res, tmp, only=provider)[provider]
        else:
            fn = lgm_providers(args, what, tmp, only=provider)[provider]
        before = _reset_peak_rss()
        fn()
        peak = _peak_rss() - before
    print(json.dumps({"peak_mib": peak}))


def _status_mib(key: str) -> float | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS where Linux allows it (``clear_refs`` 5), so that the
    peak after a call is that call's, not set-up's; returns the RSS to measure from (MiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss() -> float:
    return _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fadrm-repo", type=Path, help="a checkout of Jiacheng8/FADRM (recover/ is enough)")
    parser.add_argument("--lgm-repo", type=Path, help="a checkout of GeorgeCazenavette/linear-gradient-matching (src/)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 224], help="FADRM px")
    parser.add_argument("--classes", type=int, default=100, help="FADRM batch, one image per class (published 100)")
    parser.add_argument("--classes-224", type=int, default=16, help="FADRM batch at 224 px (CPU time)")
    parser.add_argument("--iterations", type=int, default=4, help="FADRM iterations per timed call")
    parser.add_argument("--lgm-backbones", nargs="+", default=["timm:vit_small_patch16_224", "timm:resnet18"])
    parser.add_argument("--lgm-size", type=int, default=64, help="LGM px: synthetic set and views")
    parser.add_argument("--lgm-classes", type=int, default=10)
    parser.add_argument("--lgm-augs", type=int, default=10, help="augs_per_batch (published 10)")
    parser.add_argument("--lgm-chunk", type=int, default=20, help="a fixed two-pass chunk besides auto (0: none)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians and ranges over them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-memory", action="store_true", help="peak RSS per provider, each in a fresh process")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.fadrm_repo and not args.lgm_repo:
        parser.error("nothing to compare: give --fadrm-repo and/or --lgm-repo")
    if args.fadrm_repo and not (args.fadrm_repo / "recover" / "utils_recover.py").is_file():
        parser.error(f"--fadrm-repo {str(args.fadrm_repo)!r} holds no recover/utils_recover.py")
    torch.set_num_threads(args.threads)
    # the recipe's defaults, shared by both FADRM steps
    args.lr, args.r_bn, args.first_bn_multiplier = 0.25, 0.01, 10.0
    if args.peak_child:
        run_peak_child(args, args.peak_child)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions if args.fadrm_repo else []:
            classes = args.classes_224 if res >= 224 else args.classes
            sub = argparse.Namespace(**{**vars(args), "classes": classes})
            runs = fadrm_providers(sub, res, f"{tmp}/fadrm{res}")
            times = alternate(runs, args.rounds)
            del runs
            extra = {name: {"iterations": args.iterations, "batch": classes, "resolution": res} for name in times}
            if args.peak_memory:
                for name in times:
                    extra[name]["peak_mib"] = peak_child(argv, f"fadrm:{res}:{name}")
            rows += rows_of("fadrm_vs_official", f"resnet18 {res}px batch {classes}", times, args.iterations, extra)
            print_table(rows[-len(times):], ["shape", "provider", "ms_p50", "speedup", "speedup_min", "speedup_max",
                                             "peak_mib"])
        for name in args.lgm_backbones if args.lgm_repo else []:
            runs = lgm_providers(args, name, f"{tmp}/lgm")
            chunks = {p: getattr(fn, "chunk_size", None) for p, fn in runs.items()}
            times = alternate(runs, args.rounds)
            del runs
            extra = {p: {"chunk_size": chunks[p], "views": args.lgm_augs * args.lgm_classes} for p in times}
            if args.peak_memory:
                for p in times:
                    extra[p]["peak_mib"] = peak_child(argv, f"lgm:{name}:{p}")
            shape = f"{name.split(':')[1]} {args.lgm_size}px C={args.lgm_classes} augs={args.lgm_augs}"
            rows += rows_of("lgm_vs_official", shape, times, 1, extra)
            print_table(rows[-len(times):], ["shape", "provider", "chunk_size", "ms_p50", "speedup", "speedup_min",
                                             "speedup_max", "peak_mib"])
    for r in rows:
        if "peak_mib" in r:
            base = next(b for b in rows if b["shape"] == r["shape"] and b["provider"] == "official")
            r["memory_ratio"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
    print(f"wrote {write_results('official', rows, torch.device('cpu'), out_dir=args.out_dir)}")


if __name__ == "__main__":
    main()
