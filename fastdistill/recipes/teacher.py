"""Supervised teacher training (``+method=teacher``): any timm backbone on any registered dataset.

The BN teachers that FADRM recovers images from and the evaluators that LGM probes with come from here.
Loss: cross-entropy (optional label smoothing) with SGD/AdamW, linear warm-up then cosine, random-resized-crop
(+ flip where the data allows it): on the device for decoded data, at decode time on the whole image for files. A finished teacher is cached under a hash of the
config that made it, so a later run or recipe that asks for the same teacher reuses it.

Under torchrun the model is a DistributedDataParallel replica and each rank trains on its slice of every global
batch (``method.batch_size`` and the learning rate are the global ones).

Keys that matter: ``model``, ``method.epochs``, ``method.batch_size``, ``method.optimizer.lr``,
``method.image_size``, ``data``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir
from fastdistill.data import build_dataset, build_loader
from fastdistill.data.dataset import TrainCrop
from fastdistill.data.transforms import random_hflip, random_resized_crop, to_input
from fastdistill.engine import distributed as dist
from fastdistill.engine import Precision, maybe_compile, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import train_epochs
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.classify import accuracy
from fastdistill.models import Backbone, create_backbone
from fastdistill.profiling import Profiler

WEIGHTS = "model.safetensors"
CARD = "teacher.json"


def cache_root() -> Path:
    return Path(os.environ.get("FASTDISTILL_CACHE", Path.home() / ".cache" / "fastdistill"))


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines the trained weights (not where they are written)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method.pop("cache", None)
    key = {"model": cfg.model, "method": method, "data": OmegaConf.to_container(cfg.data, resolve=True),
           "seed": cfg.seed, "precision": cfg.precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_trained_teacher(model: str, cfg: DictConfig, preset: str) -> Path:
    """The cache folder of ``model`` trained on ``cfg.data`` by this recipe with ``preset``, training it if needed."""
    from fastdistill.config import compose

    tcfg = compose(["+method=teacher", f"preset={preset}", f"model={model}", f"seed={cfg.seed}",
                    f"device={cfg.device}", f"precision={cfg.precision}", f"progress={cfg.progress}",
                    f"loader={cfg.loader}"])
    tcfg.data = cfg.data
    tcfg.out = str(cache_root() / "runs" / config_hash(tcfg))
    folder = cache_root() / "teachers" / config_hash(tcfg)
    if not (folder / CARD).is_file():
        main(tcfg)
    return folder


def trained_teacher(model: str, cfg: DictConfig, preset: str, classes: list[str]) -> tuple[Backbone, dict]:
    """``model`` trained on the run's data (cached) and its card without the history. Its class order must be the
    dataset's: mismatched indices are the most reported reason published numbers fail to reproduce."""
    net, card = load_teacher(ensure_trained_teacher(model, cfg, preset))
    if card["classes"] != list(classes):
        raise ValueError(f"{model} was trained with classes {card['classes'][:5]}... but the dataset has "
                         f"{list(classes)[:5]}...: class indices would not match")
    return net, {k: v for k, v in card.items() if k != "history"}


def frozen_backbone(model: str, weights: str, cfg: DictConfig, preset: str, classes: list[str],
                    **kwargs) -> tuple[Backbone, dict]:
    """A frozen backbone for another recipe (teacher, LGM backbone, probe evaluator) and its card:
    ``weights=trained`` trains ``model`` on the run's data with this recipe's ``preset`` (cached, class order
    checked); anything else is the factory's ``pretrained`` (none | hub | a weights file), built with ``kwargs``."""
    if weights == "trained":
        return trained_teacher(model, cfg, preset, classes)
    net = create_backbone(model, pretrained=weights, **kwargs).freeze()
    return net, {"model": model, "weights": weights, "classes": None}  # no class order to check


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


def load_teacher(folder: str | Path) -> tuple[Backbone, dict]:
    """A trained teacher from its folder (``model.safetensors`` + ``teacher.json``), frozen, on CPU."""
    folder = Path(folder)
    card_path = folder / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"teacher folder '{folder}' has no {CARD}; train one with +method=teacher")
    card = json.loads(card_path.read_text())
    model = create_backbone(card["model"], pretrained=str(folder / WEIGHTS), num_classes=len(card["classes"]),
                            **card["model_kwargs"])
    return model.freeze(), card


class TeacherRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        if m.epochs < 1:
            raise ValueError(f"method.epochs must be >= 1, got {m.epochs!r}")
        if m.batch_size < 1:
            raise ValueError(f"method.batch_size must be >= 1, got {m.batch_size!r}")
        lo, hi = m.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < min <= max <= 1, got {list(m.crop_scale)}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)
        self.hash = config_hash(cfg)
        self.cache_dir = cache_root() / "teachers" / self.hash

    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        # data: uint8 batches. Files streamed by the torch loader are cropped as they are decoded (random-resized-crop
        # on the whole image, timm/torchvision style); decoded splits and the ffcv/dali loaders crop on the device
        self.splits = build_dataset(cfg.data)
        self.train_set, self.test_set = self.splits["train"], self.splits["test"]
        crop = TrainCrop(scale=tuple(m.crop_scale), hflip=bool(cfg.data.get("hflip", True)))
        train = self.train_set.train_view(crop) if cfg.loader == "torch" else self.train_set
        self.crop_on_device = train.train_crop is None
        self.loader = build_loader(cfg.loader, train, m.batch_size, shuffle=True, drop_last=False,
                                   seed=cfg.seed, num_workers=cfg.num_workers, rank=dist.rank(),
                                   world_size=dist.world_size())
        # network: DDP gives every rank rank 0's initial weights
        self.model = create_backbone(cfg.model, pretrained=m.pretrained, num_classes=self.train_set.num_classes,
                                     **m.model_kwargs).to(self.device)
        console.note(f"teacher: training {cfg.model} on {cfg.data.name} ({len(self.train_set)} images); writing to "
                     f"{self.out.path}")
        if dist.rank():  # the other ranks draw other augmentations; rank 0 keeps the one-process stream
            seed_everything(cfg.seed + dist.rank())
        spec = self.model.spec
        self.image_size = tuple(spec.input_size) if spec.fixed_size else \
            (m.image_size, m.image_size) if m.image_size else tuple(self.train_set.image_size)
        self.forward = maybe_compile(dist.wrap_ddp(self.model, self.device), cfg.compile, self.device)
        # optimiser and per-step schedule
        self.optimizer = instantiate(m.optimizer)(self.model.parameters())
        self.steps_per_epoch = len(self.loader)
        total = m.epochs * self.steps_per_epoch
        self.lr = cosine_schedule(m.optimizer.lr, 0.0, total, m.warmup_epochs * self.steps_per_epoch)
        self.epoch, self.step, self.history = 0, 0, []
        self.loss_sum = torch.zeros((), device=self.device)  # of the epoch in progress
        self.profiler = Profiler(self.device)
        if cfg.resume:
            self.load_checkpoint()

    def train(self) -> None:
        train_epochs(self, "teacher", lambda x, y, epoch: self.train_step(x, y), "cross-entropy")

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.step])
        if self.crop_on_device:
            x = to_input(x.to(self.device, non_blocking=True))
            x = random_resized_crop(x, self.image_size, scale=tuple(m.crop_scale))
            if self.cfg.data.get("hflip", True):
                x = random_hflip(x)
        else:  # cropped and flipped by the loader at the data's size
            x = to_input(x.to(self.device, non_blocking=True), self.image_size)
        y = y.to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=m.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer, m.clip_grad, self.model.parameters())
        return loss

    def evaluate(self) -> dict:
        with self.profiler.phase("evaluate", images=len(self.test_set)):
            acc = accuracy(self.model, self.test_set, self.device, self.image_size, self.precision,
                           self.cfg.method.eval_batch_size)
        return {"test_acc": acc}

    def save_checkpoint(self, epoch: int) -> None:
        """``epoch``: the next epoch to run, or the one in progress for a mid-epoch checkpoint."""
        save_checkpoint(self.out.path, {
            "model": self.model.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "epoch": epoch, "step": self.step, "history": self.history,
            "loss_sum": self.loss_sum, "config": self.hash})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, self.hash)
        self.model.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.loss_sum = state["loss_sum"].to(self.device)

    def save(self, metrics: dict) -> Path:
        """Weights and card in the run folder, and a copy in the teacher cache."""
        from safetensors.torch import save_model

        card = {"model": self.cfg.model, "model_kwargs": OmegaConf.to_container(self.cfg.method.model_kwargs),
                "classes": self.train_set.classes, "dataset": self.cfg.data.name,
                "image_size": list(self.image_size), "hash": self.hash, **metrics}
        if not dist.is_main():
            return self.out / WEIGHTS
        save_model(self.model.model, str(self.out / WEIGHTS))
        self.out.write_json(CARD, card)
        if self.cfg.method.cache:
            tmp = self.cache_dir.with_name(self.cache_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy2(self.out / WEIGHTS, tmp / WEIGHTS)
            shutil.copy2(self.out / CARD, tmp / CARD)
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            tmp.rename(self.cache_dir)
        return self.out / WEIGHTS


def main(cfg: DictConfig) -> dict:
    recipe = TeacherRecipe(cfg)
    recipe.out.write_config(cfg)
    cached = recipe.cache_dir / CARD
    if cfg.method.cache and not cfg.resume and cached.is_file():
        card = json.loads(cached.read_text())
        for name in (WEIGHTS, CARD):
            shutil.copy2(recipe.cache_dir / name, recipe.out / name)
        metrics = {"test_acc": card["test_acc"], "cached": str(recipe.cache_dir), "history": card.get("history", [])}
        recipe.out.write_json("metrics.json", metrics)
        recipe.out.write_manifest(cfg, recipe.device, teacher_hash=recipe.hash, cached=True)
        recipe.out.write_json("profile.json", Profiler(recipe.device).report())
    else:
        recipe.setup()
        recipe.train()
        metrics = {**recipe.evaluate(), "history": recipe.history}
        recipe.save(metrics)
        recipe.out.write_json("metrics.json", metrics)
        recipe.out.write_manifest(cfg, recipe.device, teacher_hash=recipe.hash, cached=False,
                                  backbone=recipe.model.spec.to_dict(), classes=recipe.train_set.classes)
        recipe.out.write_json("profile.json", recipe.profiler.report())
        dist.barrier()  # the other ranks read the cached teacher next: rank 0 has written it
    console.print_results(f"teacher {cfg.model} on {cfg.data.name}", ["model", "dataset", "test acc", "epochs"],
                          [[cfg.model, cfg.data.name, metrics["test_acc"], cfg.method.epochs]], recipe.out.path)
    return metrics
