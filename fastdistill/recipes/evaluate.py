"""Evaluate a saved distilled set (``+method=evaluate distilled=PATH eval=linear_probe``).

Reads the ImageFolder PNGs every distillation run writes (``distilled/<class>/<index>.png``, class folders named
after the dataset's classes) and runs the linear probe of ``eval/linear_probe.py`` on ``eval.backbone``: the
synthetic images, as many random real images per class, and all real training images, ``eval.runs`` seeds each.

Keys that matter: ``distilled``, ``data``, ``eval.backbone``, ``eval.pretrained``, ``eval.epochs``, ``eval.runs``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fastdistill import console
from fastdistill.artifacts import RunDir, _safe
from fastdistill.data import build_dataset
from fastdistill.data.dataset import read_image
from fastdistill.engine import Precision, resolve_device, seed_everything
from fastdistill.eval.linear_probe import check_probe_config, linear_probe_eval, load_evaluator, result_rows
from fastdistill.profiling import Profiler


def read_distilled(path: str | Path, classes: list[str], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images (N, channels, H, W) and labels (N,), class-major, from a run folder or its ``distilled/``."""
    root = Path(path).expanduser()
    if (root / "distilled").is_dir():
        root = root / "distilled"
    if not root.is_dir():
        raise FileNotFoundError(f"distilled '{path}' is not a folder; pass a run folder holding distilled/<class>/*.png")
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    index = {_safe(c): i for i, c in enumerate(classes)}
    unknown = sorted(set(folders) - set(index))
    if unknown:
        raise ValueError(f"distilled '{root}' has class folders {unknown[:5]} that the dataset does not have "
                         f"(classes {list(classes)[:5]}...); evaluate with the data= the set was distilled from")
    files = [(index[name], f) for name, folder in folders.items() for f in sorted(folder.glob("*.png"))]
    if not files:
        raise FileNotFoundError(f"distilled '{root}' holds no <class>/*.png images")
    files.sort(key=lambda t: t[0])
    from PIL import Image

    with Image.open(files[0][1]) as first:
        size = (first.height, first.width)
    images = torch.stack([read_image(f, size, channels) for _, f in files]).float().div(255)
    labels = torch.tensor([c for c, _ in files], dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(classes))
    if int(counts.min()) == 0:
        missing = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(f"distilled '{root}' has no images for classes {missing[:5]}; every class needs at least one")
    return images, labels


def main(cfg: DictConfig) -> dict:
    if not cfg.get("distilled"):
        raise ValueError("+method=evaluate needs distilled=PATH (a run folder holding distilled/<class>/*.png)")
    check_probe_config(cfg.eval)
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device)
    out = RunDir(cfg.out)
    out.write_config(cfg)
    seed_everything(cfg.seed)
    profiler = Profiler(device)
    splits = build_dataset(cfg.data)
    train_set, test_set = splits["train"], splits["test"]
    images, labels = read_distilled(cfg.distilled, train_set.classes, train_set.channels)
    with profiler.phase("evaluate"):
        evaluator, card = load_evaluator(cfg, train_set.classes)
        ev = linear_probe_eval(evaluator, images, labels, train_set, test_set, cfg.eval, cfg.seed,
                               bool(cfg.data.get("hflip", True)), device, precision)
    metrics = {"eval": ev, "distilled": str(cfg.distilled), "images": len(labels)}
    out.write_json("metrics.json", metrics)
    out.write_manifest(cfg, device, evaluator=card, classes=train_set.classes)
    out.write_json("profile.json", profiler.report())
    console.print_results(f"linear probe on {ev['backbone']}: {len(labels)} distilled images from {cfg.distilled}",
                          ["training set", "test acc mean", "std", "runs"], result_rows(ev), out.path)
    return metrics
