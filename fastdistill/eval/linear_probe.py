"""Linear probe on frozen features: how LGM judges a distilled set (Cazenavette et al. 2025, ``eval=linear_probe``).

A fresh linear classifier ``logits = F W^T + b`` on the frozen features F of an evaluator backbone that was not
used for distillation is trained with cross-entropy on (a) the synthetic images, (b) the same number of random
real images per class, (c) all real training images, and tested on the held-out split. As published: Adam with
lr ``1e-3 * B / 256`` (B the global batch, never divided by a device count, a defect of the published code),
cosine schedule per step, batch ``B = min(100, N)``, random-resized-crop + flip on every batch, the final epoch's
test accuracy (no selection on the test set), ``runs`` seeds -> mean +- std. Real and synthetic images take the
same path: [0, 1] pixels -> the same crop -> the backbone's own normalisation. Test images: resized whole to the
probe's size, or with ``test_crop_pct`` (published 0.875) the shorter side to ``size / test_crop_pct`` and the centre
``size`` crop (Resize 256 + CenterCrop 224), decoded from the files where the split has them.

Every set is a dataset read batch by batch through the loader (features of the test split, the probe's training
batches): nothing holds a whole split, so the full-data row works on an image folder of any size.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fastdistill import console
from fastdistill.data.dataset import ImageDataset
from fastdistill.data.loaders import TorchLoader
from fastdistill.data.transforms import centre_crop, check_crop_scale, to_input, train_augment
from fastdistill.engine import distributed as dist
from fastdistill.engine.precision import Precision
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.models import Backbone, parse_backbone_id
from fastdistill.teachers import frozen_backbone


@dataclass
class ProbeConfig:
    epochs: int = 100
    lr: float = 1e-3  # for a batch of 256; scaled by B / 256
    max_batch_size: int = 100
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    image_size: tuple[int, int] = (224, 224)
    feature_bn: bool = False  # a BatchNorm without affine on the features before the head (MAE's linear probe)


def check_probe_config(e: DictConfig) -> None:
    """One-line errors for the ``eval`` block, before any work."""
    if not isinstance(e.runs, int) or e.runs < 1:
        raise ValueError(f"eval.runs must be an integer >= 1, got {e.runs!r}")
    if e.epochs < 1 or e.full_epochs < 1:
        raise ValueError(f"eval.epochs and eval.full_epochs must be >= 1, got {e.epochs!r} and {e.full_epochs!r}")
    if e.max_batch_size < 1 or not e.lr > 0:
        raise ValueError(f"eval.max_batch_size must be >= 1 and eval.lr > 0, got {e.max_batch_size!r}, {e.lr!r}")
    check_crop_scale(e.crop_scale, "eval.crop_scale")
    crop = e.get("test_crop_pct")
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
        raise ValueError(f"eval.test_crop_pct must be in (0, 1] or null, got {crop!r} (0.875: Resize 256 + "
                         f"CenterCrop 224)")
    parse_backbone_id(e.backbone)


def same_architecture(a: str, b: str) -> bool:
    """``timm:resnet18.a1_in1k`` and ``timm:resnet18`` are one architecture (tags name weights, not networks)."""
    (sa, na), (sb, nb) = parse_backbone_id(a), parse_backbone_id(b)
    if sa != sb:
        return False
    strip = (lambda n: n.split("/")[0]) if sa == "open_clip" else (lambda n: n.split(".")[0])
    return strip(na) == strip(nb)


def load_evaluator(cfg: DictConfig, classes: list[str], train=None) -> tuple[Backbone, dict]:
    """The frozen evaluator ``cfg.eval.backbone``: trained on the run's data by the teacher recipe (``train``: its
    ``main``; cached), or created with ``eval.pretrained`` weights (none | hub | PATH | a packaged name)."""
    e = cfg.eval
    # a random-init evaluator is the same for every run of one seed, and training one (trained, not yet cached)
    # leaves the caller's RNG stream as a cached one would
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return frozen_backbone(e.backbone, e.pretrained, cfg, e.teacher_preset, classes, train=train)


@torch.no_grad()
def embed_all(backbone: Backbone, dataset: ImageDataset, image_size: tuple[int, int], device: torch.device,
              precision: Precision, batch_size: int = 256, like: tuple[tuple[int, int], int] | None = None,
              num_workers="auto", progress: bool = False, crop_pct: float | None = None) -> torch.Tensor:
    """fp32 features (N, D) of every image of ``dataset``, in order, batch by batch through the loader: resized to
    ``image_size`` (no crop), or with ``crop_pct`` the shorter side resized to ``image_size / crop_pct`` and the
    centre cropped. ``like`` = (size, channels) first brings the images to another set's size (None: keep it) and
    channels (real images probed next to a synthetic set)."""
    out = []
    loader = TorchLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    with console.progress(progress) as bar:
        task = bar.add_task("features", total=len(loader), info="")
        for x, _ in loader.epoch(0):
            x = x.to(device, non_blocking=True)
            if like is not None:
                x = to_input(x, *like)
            x = to_input(x, image_size) if crop_pct is None else centre_crop(to_input(x), image_size, crop_pct)
            with precision.autocast():
                out.append(backbone.embed(x).float())
            bar.update(task, advance=1)
    return torch.cat(out)


def embed_test(backbone: Backbone, test_set: ImageDataset, image_size: tuple[int, int], crop_pct: float | None,
               like: tuple[tuple[int, int], int], **common) -> torch.Tensor:
    """fp32 features (N, D) of the test split: resized whole to ``image_size`` after ``like`` (crop_pct None), or
    with ``crop_pct`` the shorter side resized to ``image_size / crop_pct`` and the centre ``image_size`` crop
    (published: Resize 256 + CenterCrop 224), decoded from the files where the split has them."""
    if crop_pct is None:
        return embed_all(backbone, test_set, image_size, like=like, **common)
    if test_set.paths is not None:  # one decode from the file, as the published pipeline (cached pixels unused)
        view = replace(test_set, images=None, image_size=tuple(image_size), crop_pct=float(crop_pct), train_crop=None)
        return embed_all(backbone, view, image_size, like=(None, like[1]), **common)
    return embed_all(backbone, test_set, image_size, like=(None, like[1]), crop_pct=float(crop_pct), **common)


def train_probe(backbone: Backbone, train_set: ImageDataset, test_feats: torch.Tensor, test_labels: torch.Tensor,
                num_classes: int, cfg: ProbeConfig, epochs: int, seed: int, device: torch.device,
                precision: Precision, like: tuple[tuple[int, int], int] | None = None, num_workers="auto",
                progress: bool = False, description: str = "linear probe", log=None, phase: str = "probe") -> float:
    """Train a fresh linear head on augmented features of ``train_set`` (read batch by batch through the loader;
    ``like`` as in :func:`embed_all`) for ``epochs``; return the final test accuracy in [0, 1] on precomputed
    ``test_feats`` (N_test, D). ``log``: the run's metric history (``RunDir.log``), which gets each epoch's loss
    and learning rate and the test accuracy under ``phase``.

    Under torchrun the head is a DDP replica; every rank draws the same global batch and augmentation and embeds
    its slice, the loss is scaled so that the averaged gradient is the one-process batch mean."""
    g = torch.Generator().manual_seed(seed)
    d = test_feats.shape[1]
    linear = torch.nn.Linear(d, num_classes)
    with torch.no_grad():  # W ~ N(0, 0.01^2), b = 0, as the published probes (LGM, DINO, MAE); the run's generator
        linear.weight.copy_(torch.randn(num_classes, d, generator=g).mul_(0.01))
        linear.bias.zero_()
    # MAE's features differ in scale by orders of magnitude between dimensions: its probe standardises them first
    head = (torch.nn.Sequential(torch.nn.BatchNorm1d(d, affine=False, eps=1e-6), linear) if cfg.feature_bn
            else linear).to(device)
    net, world = dist.wrap_ddp(head, device), dist.world_size()
    n = len(train_set)
    batch = min(cfg.max_batch_size, n)
    starts = range(0, n - world + 1, batch)  # a last batch without a sample per rank is left out
    lr = cosine_schedule(cfg.lr * batch / 256, 0.0, epochs * len(starts))
    opt = torch.optim.Adam(head.parameters(), lr=float(lr[0]))
    loader = TorchLoader(train_set, batch, shuffle=False, num_workers=num_workers)
    step = 0
    with console.progress(progress) as bar:
        task = bar.add_task(description, total=epochs * len(starts), info="")
        for epoch in range(epochs):
            epoch_loss = torch.zeros((), device=device)
            order = torch.randperm(n, generator=g)
            for x, y in loader.iterate([order[i:i + batch] for i in starts], epoch):
                x = to_input(x.to(device, non_blocking=True), *(like or (None, x.shape[1])))
                x = train_augment(x, cfg.image_size, cfg.crop_scale, cfg.hflip, generator=g)
                part = dist.shard(len(y))
                with torch.no_grad(), precision.autocast():
                    f = backbone.embed(x[part.start:part.stop]).float()
                # this rank's sum over the global batch, times the ranks DDP averages over: the batch mean
                loss = F.cross_entropy(net(f), y[part.start:part.stop].to(device), reduction="sum") * (world / len(y))
                for group in opt.param_groups:
                    group["lr"] = float(lr[step])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_loss += loss.detach()
                step += 1
                bar.update(task, advance=1)
            if log:  # one sync per epoch, only when logging
                log(phase, epoch, train_loss=dist.all_reduce(epoch_loss, "sum").item() / (world * len(starts)),
                    lr=float(lr[step - 1]))
    head.eval()  # the BatchNorm's running statistics for the test features
    with torch.no_grad():
        pred = head(test_feats).argmax(1)
    acc = (pred.cpu() == test_labels.cpu()).float().mean().item()
    if log:
        log(phase, epochs, test_acc=acc)
    return acc


def probe_config(e: DictConfig, image_size: tuple[int, int], hflip: bool) -> ProbeConfig:
    size = (int(e.image_size), int(e.image_size)) if e.image_size else tuple(image_size)
    return ProbeConfig(epochs=int(e.epochs), lr=float(e.lr), max_batch_size=int(e.max_batch_size),
                       crop_scale=tuple(e.crop_scale), hflip=hflip, image_size=size)


def linear_probe_eval(backbone: Backbone, synthetic: ImageDataset, train_set: ImageDataset, test_set: ImageDataset,
                      e: DictConfig, seed: int, hflip: bool, device: torch.device, precision: Precision,
                      num_workers="auto", progress: bool = False, log=None) -> dict:
    """The three rows of the LGM table: ``{"backbone", "synthetic", "real_random", "full"}``, each
    ``{"mean", "std", "runs"}`` of test accuracy over ``e.runs`` seeds.

    ``synthetic``: the distilled set (class-major); real images are brought to its size and channels by
    :func:`to_input` before the common pipeline. Random real images are redrawn every run (ipc per class).
    ``log``: the run's metric history (``RunDir.log``); each probe logs under ``probe/<set>/<run>``.
    """
    backbone = backbone.to(device).eval()
    like = (tuple(synthetic.image_size), synthetic.channels)
    pcfg = probe_config(e, like[0], hflip)
    common = {"device": device, "precision": precision, "num_workers": num_workers, "progress": progress}
    test_feats = embed_test(backbone, test_set, pcfg.image_size, e.get("test_crop_pct"), like, **common)
    num_classes = test_set.num_classes
    ipc = max(1, len(synthetic) // num_classes)
    out = {"backbone": backbone.spec.name}
    rows = {"synthetic": []}
    if e.real_random:
        rows["real_random"] = []
    if e.full:
        rows["full"] = []
    for r in range(e.runs):
        run_seed = seed + 1000 * r
        rows["synthetic"].append(train_probe(backbone, synthetic, test_feats, test_set.labels, num_classes, pcfg,
                                             pcfg.epochs, run_seed, description=f"probe synthetic, run {r}",
                                             log=log, phase=f"probe/synthetic/{r}", **common))
        if e.real_random:
            real = train_set.subset(train_set.per_class(ipc, torch.Generator().manual_seed(run_seed)))
            rows["real_random"].append(train_probe(backbone, real, test_feats, test_set.labels, num_classes, pcfg,
                                                   pcfg.epochs, run_seed, like=like,
                                                   description=f"probe random real, run {r}", log=log,
                                                   phase=f"probe/real_random/{r}", **common))
        if e.full:
            rows["full"].append(train_probe(backbone, train_set, test_feats, test_set.labels, num_classes, pcfg,
                                            int(e.full_epochs), run_seed, like=like,
                                            description=f"probe full data, run {r}", log=log,
                                            phase=f"probe/full/{r}", **common))
    for name, accs in rows.items():
        # the spread as the published evaluation reports it (np.std: ddof 0)
        out[name] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
                     "runs": accs}
    return out


def result_rows(ev: dict) -> list[list]:
    """Table rows ``[training set, mean, std, runs]`` for :func:`fastdistill.console.print_results`."""
    return [[name, ev[name]["mean"], ev[name]["std"], len(ev[name]["runs"])]
            for name in ("synthetic", "real_random", "full") if name in ev]
