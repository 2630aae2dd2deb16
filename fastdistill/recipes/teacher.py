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

import json
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
from fastdistill.data.transforms import check_crop_scale, to_input, train_augment
from fastdistill.engine import distributed as dist
from fastdistill.engine import Precision, maybe_compile, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import Position, run_epochs
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.classify import accuracy
from fastdistill.models import create_backbone
from fastdistill.profiling import Profiler
from fastdistill.teachers import CARD, WEIGHTS, cache_folder, config_hash

class TeacherRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        if m.epochs < 1:
            raise ValueError(f"method.epochs must be >= 1, got {m.epochs!r}")
        if m.batch_size < 1:
            raise ValueError(f"method.batch_size must be >= 1, got {m.batch_size!r}")
        check_crop_scale(m.crop_scale, "method.crop_scale")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)
        self.hash = config_hash(cfg)
        self.cache_dir = cache_folder(cfg)

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
        self.position, self.history = Position(), []
        self.profiler = Profiler(self.device)
        if cfg.resume:
            self.load_checkpoint()

    def train(self) -> None:
        run_epochs(self.position, self.loader, self.cfg.method.epochs, lambda x, y, epoch: self.train_step(x, y),
                   lr=self.lr, save=self.save_checkpoint, out=self.out, profiler=self.profiler, history=self.history,
                   label=f"teacher {self.cfg.model}", progress=self.cfg.progress,
                   checkpoint_every=self.cfg.checkpoint_every)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.position.step])
        if self.crop_on_device:
            x = to_input(x.to(self.device, non_blocking=True))
            x = train_augment(x, self.image_size, m.crop_scale, self.cfg.data.get("hflip", True))
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

    def save_checkpoint(self) -> None:
        save_checkpoint(self.out.path, {
            "model": self.model.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "position": self.position.state_dict(), "history": self.history,
            "config": self.hash})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, self.hash)
        self.model.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.position, self.history = Position.from_state(state["position"], self.device), state["history"]

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
