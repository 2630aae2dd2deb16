"""Evaluate a saved distilled set (``+method=evaluate distilled=PATH eval=linear_probe|ddranking``).

Reads the ImageFolder PNGs every distillation run writes (``distilled/<class>/<index>.png``, class folders named
after the dataset's classes) and runs the linear probe of ``eval/linear_probe.py`` on ``eval.backbone``: the
synthetic images, as many random real images per class, and all real training images, ``eval.runs`` seeds each.
``eval=ddranking`` scores it with DD-Ranking's HLR / IOR / LRS / ARS (``eval/ddranking.py``) on students trained
with the soft labels of ``eval.teachers``.

Keys that matter: ``distilled``, ``data``, ``eval.backbone``, ``eval.pretrained``, ``eval.epochs``, ``eval.runs``.
"""
from __future__ import annotations

from omegaconf import DictConfig

from fastdistill import console
from fastdistill.artifacts import RunDir, read_distilled
from fastdistill.data import build_dataset
from fastdistill.engine import Precision, resolve_device, seed_everything
from fastdistill.eval.ddranking import check_ddranking_config, ddranking_eval, print_result
from fastdistill.eval.linear_probe import check_probe_config, linear_probe_eval, load_evaluator, result_rows
from fastdistill.profiling import Profiler
from fastdistill.recipes import get_recipe
from fastdistill.teachers import frozen_backbone


def _setup(cfg: DictConfig):
    """What both evaluations start from: device, precision, the run folder (config written), a seeded profiler, the
    data's train and test splits and the saved set read from disk."""
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
    return device, precision, out, profiler, train_set, test_set, distilled


def main(cfg: DictConfig) -> dict:
    if not cfg.get("distilled"):
        raise ValueError("+method=evaluate needs distilled=PATH (a run folder holding distilled/<class>/*.png)")
    if cfg.eval.name == "ddranking":
        return _ddranking(cfg)
    check_probe_config(cfg.eval)
    device, precision, out, profiler, train_set, test_set, distilled = _setup(cfg)
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


def _ddranking(cfg: DictConfig) -> dict:
    """DD-Ranking's scores of a saved set, the soft labels from ``eval.teachers`` (trained on this data, cached)."""
    e = cfg.eval
    check_ddranking_config(e)
    device, precision, out, profiler, train_set, test_set, distilled = _setup(cfg)
    with profiler.phase("teachers"):
        loaded = [frozen_backbone(name, e.teacher_weights, cfg, e.teacher_preset, train_set.classes,
                                  train=get_recipe("teacher").main, num_classes=train_set.num_classes)
                  for name in e.teachers]
    teachers = [net.to(device) for net, _ in loaded]
    with profiler.phase("evaluate"):
        result = ddranking_eval(distilled, train_set, test_set, teachers, tuple(train_set.image_size), e, cfg.seed,
                                bool(cfg.data.get("hflip", True)), device, precision, cfg.num_workers, cfg.progress)
    metrics = {"ddranking": result, "distilled": str(cfg.distilled), "images": len(distilled)}
    out.write_json("metrics.json", metrics)
    out.write_manifest(cfg, device, teachers=[card for _, card in loaded], classes=train_set.classes,
                       validation_split=result["validation"])
    out.write_json("profile.json", profiler.report())
    print_result(result, f"{len(distilled)} distilled images from {cfg.distilled}", out.path)
    return metrics
