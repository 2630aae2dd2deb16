"""What a self-supervised teacher run (DINO, MAE) ends with: probes against the same ViT at its random
initialisation, the backbone saved as a teacher run folder, attention overlays and distances, metrics and table."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from fastdistill import console
from fastdistill.engine import distributed as dist
from fastdistill.eval.attention import write_attention_report
from fastdistill.eval.knn import probe_accuracy, probe_names
from fastdistill.models import create_backbone
from fastdistill.models.ssl import set_pos_embed
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
    set_pos_embed(random_init.model, m.get("pos_embed", "learned"))  # the same initial draw as the trained ViT's
    kinds = probe_names(m.probe)
    probes = {}
    with recipe.profiler.phase("evaluate", images=2 * len(kinds) * (len(recipe.train_set) + len(recipe.test_set))):
        for kind_pool in kinds:
            kind, _, pool = kind_pool.partition("/")
            probes[kind_pool] = {
                n: probe_accuracy(net, recipe.train_set, recipe.test_set, m.probe, recipe.image_size, recipe.device,
                                  recipe.precision, cfg.seed, progress=cfg.progress, log=recipe.out.log,
                                  phase=f"probe/{kind_pool}/{n}", kind=kind, pool=pool)
                for n, net in ((name, backbone), ("random_init", random_init))}
    probe = probes[kinds[0]]
    metrics = {"probe": probe, "probe_kind": kinds[0], "probes": probes, "history": recipe.history}
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
    console.print_results(f"{title} {cfg.model} on {cfg.data.name} (probes on the test split)",
                          ["weights", *kinds, "first loss", "last loss", "epochs"],
                          [[name, *(probes[k][name] for k in kinds), recipe.history[0]["train_loss"],
                            recipe.history[-1]["train_loss"], m.epochs],
                           ["random_init", *(probes[k]["random_init"] for k in kinds), "", "", 0]], recipe.out.path)
    return metrics


def knn_curve_point(recipe, backbone, epoch: int) -> dict:
    """``{"knn": test accuracy}`` of ``backbone`` (the headline pool's k-NN) after every ``probe.curve_every``-th
    epoch and the last, for the history; ``{}`` otherwise. Its time is the profile's ``knn_curve`` phase (inside
    ``train``)."""
    m = recipe.cfg.method
    every = m.probe.get("curve_every", 0)
    if not every or ((epoch + 1) % every and epoch + 1 != m.epochs):
        return {}
    with recipe.profiler.phase("knn_curve"):
        return {"knn": probe_accuracy(backbone, recipe.train_set, recipe.test_set, m.probe, recipe.image_size,
                                      recipe.device, recipe.precision, recipe.cfg.seed, kind="knn",
                                      pool=m.probe.get("pool", "cls"))}
