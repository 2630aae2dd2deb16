"""Frozen backbones for every role: the FADRM teacher, the LGM backbones, the probe's evaluator, the kd_clip and
kd_multi teachers. One way to get one, from three places:

- the factory's weights (``none``, ``hub``, a weights file): :func:`frozen_backbone`;
- a run folder of ``+method=teacher``, ``dino`` or ``mae`` (``model.safetensors`` + ``teacher.json``, the card):
  :func:`load_run`, which checks a supervised teacher's class order against the dataset's;
- trained on the run's data and cached: :func:`ensure_trained`. The caller passes the training recipe's entry
  (``recipes.get_recipe(name).main``), so this module imports no recipe. A cached run lives in
  ``<cache>/teachers/<method>/<config hash>``; it trains in place there, so a killed training resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from fastdistill import console
from fastdistill.data.transforms import to_input
from fastdistill.models import Backbone, create_backbone

WEIGHTS = "model.safetensors"
CARD = "teacher.json"
CHECKPOINT = "checkpoint.pt"


def cache_root() -> Path:
    return Path(os.environ.get("FASTDISTILL_CACHE", Path.home() / ".cache" / "fastdistill"))


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines the trained weights (not where they are written)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method.pop("cache", None)
    key = {"model": cfg.model, "method": method, "data": OmegaConf.to_container(cfg.data, resolve=True),
           "seed": cfg.seed, "precision": cfg.precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(cfg: DictConfig) -> Path:
    """Where the run ``cfg`` is cached: ``<cache>/teachers/<method>/<config hash>``."""
    return cache_root() / "teachers" / cfg.method.name / config_hash(cfg)


def read_card(folder: str | Path) -> dict:
    card_path = Path(folder) / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"model folder '{folder}' has no {CARD}; pass the out= folder of a +method=teacher, "
                                f"dino or mae run")
    return json.loads(card_path.read_text())


def check_class_order(card: dict, classes, name: str) -> None:
    """A supervised teacher's head indexes its training classes: they must be the dataset's, in order (mismatched
    indices are the most reported reason published numbers fail to reproduce). Self-supervised cards pass."""
    if card.get("method", "teacher") == "teacher" and card.get("classes") not in (None, list(classes)):
        raise ValueError(f"{name} was trained with classes {card['classes'][:5]}... but the dataset has "
                         f"{list(classes)[:5]}...: class indices would not match")


def load_run(folder: str | Path, classes=None, num_classes: int | None = None) -> tuple[Backbone, dict]:
    """The backbone of a run folder, frozen, on CPU, and its card. A supervised teacher keeps its classifier (and
    its class order is checked against ``classes`` when given); a self-supervised one gets a fresh head of
    ``num_classes`` outputs (None: the model's default)."""
    card = read_card(folder)
    if classes is not None:
        check_class_order(card, classes, f"teacher '{folder}'")
    if card.get("method", "teacher") == "teacher":
        num_classes = len(card["classes"])
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    net = create_backbone(card["model"], pretrained=str(Path(folder) / WEIGHTS), **kwargs,
                          **card.get("model_kwargs", {}))
    return net.freeze(), card


def training_config(method: str, model: str, preset: str, cfg: DictConfig, overrides=(),
                    model_kwargs=None) -> DictConfig:
    """The config of ``+method=<method>`` training ``model`` with ``preset`` on ``cfg``'s data, seed, device,
    precision and loader (``model_kwargs`` None keeps the training preset's own)."""
    from fastdistill.config import compose

    tcfg = compose([f"+method={method}", f"preset={preset}", f"model={model}", f"seed={cfg.seed}",
                    f"device={cfg.device}", f"precision={cfg.precision}", f"progress={cfg.progress}",
                    f"loader={cfg.loader}", *overrides])
    tcfg.data = cfg.data
    if model_kwargs is not None:
        tcfg.method.model_kwargs = model_kwargs
    return tcfg


def _legacy_folders(tcfg: DictConfig) -> list[Path]:
    """Where earlier versions cached the same run: supervised teachers in ``teachers/<hash>``, kd_multi's trained
    teachers in ``kd_multi/<method>/<hash>``."""
    digest = config_hash(tcfg)
    return [cache_root() / "teachers" / digest, cache_root() / "kd_multi" / tcfg.method.name / digest]


def ensure_trained(train: Callable[[DictConfig], dict], tcfg: DictConfig) -> Path:
    """The cached run folder of ``train(tcfg)``, training it there first if no finished one is cached (a killed
    training resumes from its checkpoint). ``train``: the training recipe's ``main``."""
    folder = cache_folder(tcfg)
    if not (folder / CARD).is_file():
        for old in _legacy_folders(tcfg):
            if (old / CARD).is_file():  # moved once, never retrained
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, folder)
                console.note(f"teacher cache: moved {old} to {folder}")
                break
    if not (folder / CARD).is_file():
        tcfg = tcfg.copy()
        tcfg.out = str(folder)
        tcfg.resume = (folder / CHECKPOINT).is_file()
        if "cache" in tcfg.method:
            tcfg.method.cache = False  # this folder is the cache
        train(tcfg)
    return folder


def frozen_backbone(model: str, weights: str, cfg: DictConfig, preset: str, classes: list[str],
                    train: Callable[[DictConfig], dict] | None = None, model_kwargs: dict | None = None,
                    **kwargs) -> tuple[Backbone, dict]:
    """A frozen backbone and its card (without the training history). ``weights=trained`` trains ``model`` on the
    run's data with ``+method=teacher preset=<preset>`` (``train``: that recipe's ``main``; cached, class order
    checked); a run folder (a ``teacher.json`` card) is loaded as its card builds it (:func:`load_run`), kwargs
    and all; anything else is the factory's ``pretrained`` (none | hub | a weights file), built with ``kwargs``.
    ``model_kwargs`` shape the network itself (e.g. ``{"cifar_stem": True}``): added to the teacher preset's own
    for a trained teacher, so they are part of its cache key, and passed to the factory otherwise."""
    if weights == "trained":
        if train is None:
            raise ValueError(f"{model}: weights=trained needs the teacher recipe's entry to train it")
        tcfg = training_config("teacher", model, preset, cfg)
        if model_kwargs:
            tcfg.method.model_kwargs = {**OmegaConf.to_container(tcfg.method.model_kwargs), **model_kwargs}
        folder, extra = ensure_trained(train, tcfg), {}
    elif Path(weights, CARD).is_file():  # a run folder (+method=teacher, dino, mae): its card names the network
        card = read_card(weights)  # checked before anything is built
        if card["model"] != model or model_kwargs or kwargs:
            raise ValueError(f"run folder '{weights}' holds {card['model']} with {card.get('model_kwargs', {})}; "
                             f"name {card['model']} and no constructor kwargs for it (got {model}, "
                             f"{({**(model_kwargs or {}), **kwargs})})")
        folder, extra = weights, {"weights": str(weights)}
    else:
        net = create_backbone(model, pretrained=weights, **(model_kwargs or {}), **kwargs).freeze()
        return net, {"model": model, "weights": weights, "classes": None}  # no class order to check
    net, card = load_run(folder, classes)
    return net, {**{k: v for k, v in card.items() if k != "history"}, **extra}


@torch.no_grad()
def calibrate_bn(net: Backbone, dataset, batches: int, batch_size: int, image_size: tuple[int, int],
                 device: torch.device, seed: int) -> Backbone:
    """Re-estimate every BN layer's running mean and variance from ``batches`` random batches of real images
    (cumulative averages, centre-cropped decode): what a random-initialised teacher needs before BN-statistics
    matching means anything. An explicit option for benchmarks (``method.teacher_calibration``), never a default:
    a trained teacher's statistics are part of what it learned."""
    from fastdistill.data.loaders import TorchLoader

    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError(f"method.teacher_calibration: {net.spec.name} has no BN layers to calibrate")
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
        m.train()
    loader = TorchLoader(dataset, batch_size, shuffle=True, seed=seed)
    for _, (x, _) in zip(range(batches), loader.epoch(0)):
        net(to_input(x.to(device), image_size))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        m.eval()
    return net
