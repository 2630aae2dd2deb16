"""What a self-supervised teacher run (DINO, MAE) ends with: probes against the same ViT at its random
initialisation, the backbone saved as a teacher run folder, attention overlays and distances, metrics and table."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from fastdistill import console
from fastdistill.engine import distributed as dist
from fastdistill.eval.attention import write_attention_report
from fastdistill.eval.knn import probe_accuracy
from fastdistill.models import create_backbone
from fastdistill.teachers import CARD, WEIGHTS


def finish_ssl_run(recipe, name: str, backbone, title: str) -> dict:
    """What a self-supervised teacher run ends with (DINO here, MAE too): the probe on ``backbone`` and on the same
    ViT at its random initialisation (the run's initial draw: same seed, same shape), the backbone as a plain timm
    state dict + card (the teacher recipe's format), attention overlays and distances, metrics, manifest, table."""
    from safetensors.torch import save_model

    cfg, m = recipe.cfg, recipe.cfg.method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_init = create_backbone(cfg.model, pretrained="none", **m.model_kwargs).to(recipe.device)
    with recipe.profiler.phase("evaluate", images=2 * (len(recipe.train_set) + len(recipe.test_set))):
        probe = {n: probe_accuracy(net, recipe.train_set, recipe.test_set, m.probe, recipe.image_size, recipe.device,
                                   recipe.precision, cfg.seed, progress=cfg.progress, log=recipe.out.log,
                                   phase=f"probe/{n}")
                 for n, net in ((name, backbone), ("random_init", random_init))}
    metrics = {"probe": probe, "probe_kind": m.probe.kind, "history": recipe.history}
    if dist.is_main():
        save_model(backbone.model, str(recipe.out / WEIGHTS))
    recipe.out.write_json(CARD, {
        "model": cfg.model, "model_kwargs": OmegaConf.to_container(m.model_kwargs), "method": name,
        "classes": recipe.train_set.classes, "dataset": cfg.data.name, "image_size": list(recipe.image_size),
        "hash": recipe.hash, **metrics})
    with recipe.profiler.phase("attention"):
        metrics["attention_distance"] = None if not dist.is_main() else write_attention_report(
            recipe.out, {name: backbone}, recipe.test_set, m.attention, recipe.device)
    recipe.out.write_json("metrics.json", metrics)
    recipe.out.write_manifest(cfg, recipe.device, teacher_hash=recipe.hash, backbone=backbone.spec.to_dict())
    recipe.out.write_json("profile.json", recipe.profiler.report())
    console.print_results(f"{title} {cfg.model} on {cfg.data.name} ({m.probe.kind} probe, test split)",
                          ["weights", "probe acc", "first loss", "last loss", "epochs"],
                          [[name, probe[name], recipe.history[0]["train_loss"], recipe.history[-1]["train_loss"],
                            m.epochs], ["random_init", probe["random_init"], "", "", 0]], recipe.out.path)
    return metrics
