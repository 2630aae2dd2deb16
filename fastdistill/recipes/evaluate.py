"""Evaluate a saved distilled set (``+method=evaluate distilled=PATH eval=linear_probe``).

Reads the ImageFolder PNGs every distillation run writes (``distilled/<class>/<index>.png``, class folders named
after the dataset's classes) and runs the linear probe of ``eval/linear_probe.py`` on ``eval.backbone``: the
synthetic images, as many random real images per class, and all real training images, ``eval.runs`` seeds each.

Keys that matter: ``distilled``, ``data``, ``eval.backbone``, ``eval.pretrained``, ``eval.epochs``, ``eval.runs``.
"""
from __future__ import annotations

from omegaconf import DictConfig

from fastdistill import console
from fastdistill.artifacts import RunDir, read_distilled
from fastdistill.data import build_dataset
from fastdistill.engine import Precision, resolve_device, seed_everything
from fastdistill.eval.linear_probe import check_probe_config, linear_probe_eval, load_evaluator, result_rows
from fastdistill.profiling import Profiler
from fastdistill.recipes import get_recipe


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
    distilled = read_distilled(cfg.distilled, train_set.classes, train_set.channels)
    console.note(f"evaluate: {len(distilled)} distilled images from {cfg.distilled}; writing to {out.path}")
    with profiler.phase("evaluate"):
        evaluator, card = load_evaluator(cfg, train_set.classes, get_recipe("teacher").main)
        ev = linear_probe_eval(evaluator, distilled, train_set, test_set, cfg.eval, cfg.seed,
                               bool(cfg.data.get("hflip", True)), device, precision, cfg.num_workers, cfg.progress,
                               log=out.log)
    metrics = {"eval": ev, "distilled": str(cfg.distilled), "images": len(distilled)}
    out.write_json("metrics.json", metrics)
    out.write_manifest(cfg, device, evaluator=card, classes=train_set.classes)
    out.write_json("profile.json", profiler.report())
    console.print_results(f"linear probe on {ev['backbone']}: {len(distilled)} distilled images from {cfg.distilled}",
                          ["training set", "test acc mean", "std", "runs"], result_rows(ev), out.path)
    return metrics
