"""Look at what ViT teachers attend to (``+method=attention model=PATH``; Caron et al. 2021, Dosovitskiy et al. 2021).

For each model: the CLS token's attention to the patches in one block (the last by default), per head, upsampled to
the image and written as ``attention_<name>.png`` (one row per test image: input | each head | head mean over the
input); and the mean attention distance per layer and head over a fixed sample of test images, written to
``attention_distance.json`` and plotted with one curve per model in ``attention_distance.png``, so a DINO (global)
and an MAE (local) teacher compare in one picture.

``model`` is one entry or a list (``"model=[outputs/dino/RUN,outputs/mae/RUN]"``); an entry is a run folder of
``+method=dino|mae|teacher`` (``model.safetensors`` + ``teacher.json``) or a backbone id with ``method.pretrained``
and ``method.model_kwargs``. Keys that matter: ``model``, ``data``, ``method.images``, ``method.layer``.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir, _safe
from fastdistill.data import build_dataset
from fastdistill.engine import resolve_device, seed_everything
from fastdistill.eval.attention import write_attention_report
from fastdistill.models import Backbone, create_backbone
from fastdistill.profiling import Profiler
from fastdistill.teachers import load_run


def load_model(entry: str, pretrained: str, model_kwargs: dict) -> tuple[str, Backbone]:
    """(name, frozen backbone) of a run folder holding ``teacher.json`` or of a backbone id."""
    path = Path(str(entry)).expanduser()
    if path.is_dir():
        backbone, card = load_run(path)
        return card.get("method", "teacher"), backbone
    if ":" not in str(entry):
        raise FileNotFoundError(f"model '{entry}' is neither a run folder nor a backbone id (SOURCE:NAME)")
    return str(entry), create_backbone(str(entry), pretrained=pretrained, **model_kwargs).freeze()


def main(cfg: DictConfig) -> dict:
    m = cfg.method
    if not cfg.get("model"):
        raise ValueError("+method=attention needs model=PATH (a +method=dino/mae run folder) or a list "
                         "\"model=[PATH1,PATH2]\" to compare teachers")
    entries = list(cfg.model) if isinstance(cfg.model, (list, ListConfig)) else [cfg.model]
    device = resolve_device(cfg.device)
    out = RunDir(cfg.out)
    out.write_config(cfg)
    seed_everything(cfg.seed)
    profiler = Profiler(device)
    models: dict[str, Backbone] = {}
    for entry in entries:
        name, backbone = load_model(entry, m.pretrained, OmegaConf.to_container(m.model_kwargs) if m.model_kwargs else {})
        if backbone.num_layers == 0:
            raise ValueError(f"model '{entry}' ({backbone.spec.name}) has no attention layers: attention maps need a ViT")
        name = _safe(name)
        while name in models:  # two runs of one method: keep both, numbered
            name = f"{name}_{len(models)}"
        models[name] = backbone
    test_set = build_dataset(cfg.data)["test"]
    with profiler.phase("attention", images=len(models) * (m.images + min(m.distance_images, len(test_set)))):
        distances = write_attention_report(out, models, test_set, m, device)
    metrics = {"models": dict(zip(models, map(str, entries))), "attention_distance": distances}
    out.write_json("metrics.json", metrics)
    out.write_manifest(cfg, device, backbones={k: v.spec.to_dict() for k, v in models.items()})
    out.write_json("profile.json", profiler.report())
    rows = [[name, len(d["per_layer"]), d["per_layer"][0], d["per_layer"][-1], f"attention_{name}.png"]
            for name, d in distances.items()]
    console.print_results(f"attention on {cfg.data.name} test images",
                          ["model", "layers", "distance layer 1 (px)", "distance last layer (px)", "overlay"], rows,
                          out.path)
    return metrics
