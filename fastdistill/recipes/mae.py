"""Masked-autoencoder pre-training of a ViT, the masked-image-modelling teacher (``+method=mae``; He et al., CVPR 2022).

Each image loses a random ``mask_ratio`` (0.75) of its patches; the ViT encoder sees only the visible ones (no mask
tokens in the encoder), a light decoder fills in a shared mask token at every masked position and predicts the
pixels of every patch. Loss (``losses/mae.py``): mean squared error on the masked patches against per-patch
normalised pixels,

    L = sum_{n,l} m_nl mean_j (pred_nlj - (x_nlj - mu_nl) / sigma_nl)^2 / sum_{n,l} m_nl

with AdamW (betas 0.9, 0.95), linear warm-up then cosine, random-resized-crop (+ flip where the data allows it).
The encoder is the result: ``model.safetensors`` (a plain timm state dict) + ``teacher.json``, its probe accuracy
next to a random-init ViT of the same shape, and the attention overlays and distances of ``eval/attention.py``.

Keys that matter: ``model``, ``method.model_kwargs``, ``method.mask_ratio``, ``method.decoder``, ``method.epochs``,
``method.optimizer.lr``, ``method.norm_pix``.
"""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fastdistill.artifacts import RunDir
from fastdistill.data import build_dataset, build_loader
from fastdistill.data.dataset import TrainCrop
from fastdistill.data.transforms import INTERPOLATIONS, check_crop_scale, to_input, train_augment
from fastdistill.engine import distributed as dist
from fastdistill.engine import Precision, maybe_compile, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import Position, run_epochs
from fastdistill.engine.optim import param_groups
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.knn import check_probe
from fastdistill.eval.ssl_run import finish_ssl_run, knn_curve_point
from fastdistill.losses.mae import mae_loss
from fastdistill.models import create_backbone
from fastdistill.models.ssl import MAEDecoder, MAEModel, check_vit, patchify, random_masking
from fastdistill.profiling import Profiler
from fastdistill.teachers import config_hash


class MAERecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        for key in ("epochs", "batch_size"):
            if m[key] < 1:
                raise ValueError(f"method.{key} must be >= 1, got {m[key]!r}")
        if not 0 <= m.mask_ratio < 1:
            raise ValueError(f"method.mask_ratio must be in [0, 1), got {m.mask_ratio!r}")
        check_crop_scale(m.crop_scale, "method.crop_scale")
        if m.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown method.interpolation {m.interpolation!r}; expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        check_probe(m.probe)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)
        self.hash = config_hash(cfg)

    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        # data: uint8 batches, augmented on the device
        self.splits = build_dataset(cfg.data)
        self.train_set, self.test_set = self.splits["train"], self.splits["test"]
        # files streamed by the torch loader are cropped as they are decoded (on the whole image), as the teacher's
        crop = TrainCrop(scale=tuple(m.crop_scale), hflip=bool(cfg.data.get("hflip", True)),
                         interpolation=m.interpolation)
        train = self.train_set.train_view(crop) if cfg.loader == "torch" else self.train_set
        self.crop_on_device = train.train_crop is None
        self.loader = build_loader(cfg.loader, train, m.batch_size, shuffle=True, drop_last=True,
                                   seed=cfg.seed, num_workers=cfg.num_workers, rank=dist.rank(),
                                   world_size=dist.world_size())
        if len(self.loader) == 0:
            raise ValueError(f"method.batch_size {m.batch_size} is larger than the {len(self.train_set)} training images")
        # networks: right after seeding, so the random-init baseline of evaluate() is the encoder's initial draw
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            backbone = create_backbone(cfg.model, pretrained="none", **m.model_kwargs)
        vit = check_vit(backbone, "+method=mae")
        self.image_size = tuple(backbone.spec.input_size)
        self.patch_size = backbone.spec.patch_size
        self.num_patches = (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)
        self.channels = self.train_set.channels  # the target is the data's own pixels (1 channel for digits)
        decoder = MAEDecoder(backbone.spec.feature_dim, self.num_patches, self.patch_size ** 2 * self.channels,
                             vit.num_prefix_tokens, int(m.decoder.dim), int(m.decoder.depth), int(m.decoder.num_heads))
        self.model = MAEModel(backbone, decoder, m.get("pos_embed", "learned")).to(self.device)
        # under torchrun a DDP replica; the other ranks draw other crops and masks, rank 0 the one-process ones
        self.forward = maybe_compile(dist.wrap_ddp(self.model, self.device), cfg.compile, self.device)
        if dist.rank():
            seed_everything(cfg.seed + dist.rank())
        # optimiser and per-step schedules; the lr is given for 256 images and scaled to the batch (published rule)
        self.optimizer = instantiate(m.optimizer)(param_groups(self.model))
        self.steps_per_epoch = len(self.loader)
        total = m.epochs * self.steps_per_epoch
        self.lr = cosine_schedule(m.optimizer.lr * m.batch_size / 256, m.min_lr, total,
                                  m.warmup_epochs * self.steps_per_epoch)
        self.position, self.history = Position(), []
        self.profiler = Profiler(self.device)
        if cfg.resume:
            self.load_checkpoint()

    def train(self) -> None:
        # labels are never used
        run_epochs(self.position, self.loader, self.cfg.method.epochs, lambda x, y, epoch: self.train_step(x),
                   lr=self.lr, save=self.save_checkpoint, out=self.out, profiler=self.profiler, history=self.history,
                   label=f"mae {self.cfg.model}", progress=self.cfg.progress,
                   checkpoint_every=self.cfg.checkpoint_every,
                   log=lambda epoch: {"lr": float(self.lr[self.position.step - 1]),
                                      **knn_curve_point(self, self.model.backbone, epoch)})

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.position.step])
        if self.crop_on_device:
            x = to_input(x.to(self.device, non_blocking=True), channels=x.shape[1])
            x = train_augment(x, self.image_size, m.crop_scale, self.cfg.data.get("hflip", True), mode=m.interpolation)
        else:  # cropped and flipped by the loader at the data's size
            x = to_input(x.to(self.device, non_blocking=True), self.image_size, x.shape[1])
        ids_keep, mask, ids_restore = random_masking(x.shape[0], self.num_patches, m.mask_ratio, self.device)
        with self.precision.autocast():
            pred = self.forward(x, ids_keep, ids_restore)
        loss = mae_loss(pred, patchify(x, self.patch_size), mask, m.norm_pix)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer, m.clip_grad, self.model.parameters())
        return loss

    def save_checkpoint(self) -> None:
        save_checkpoint(self.out.path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "position": self.position.state_dict(),
            "history": self.history, "config": self.hash})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, self.hash)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.position, self.history = Position.from_state(state["position"], self.device), state["history"]


def main(cfg: DictConfig) -> dict:
    recipe = MAERecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    recipe.train()
    return finish_ssl_run(recipe, "mae", recipe.model.backbone, "MAE")
