"""DINO self-distillation of a ViT without labels (``+method=dino``; Caron et al., ICCV 2021).

A student ViT + projection head sees all crops of a multi-crop view set (2 global, N local); a teacher of the same
shape, an exponential moving average of the student, sees the 2 global crops. The loss (``losses/dino.py``) is the
cross-entropy between the centred, sharpened teacher distribution and the student's, over all pairs of different
views:

    L = mean_{g, v != g} H(softmax((t_g - c) / tau_t), softmax(s_v / tau_s)),   c <- m c + (1 - m) mean(t)
    theta_t <- lambda theta_t + (1 - lambda) theta_s,   lambda: cosine from momentum_teacher to 1

with AdamW, linear warm-up then cosine learning rate, cosine weight decay, gradient clipping and the last head layer
frozen in the first epoch(s). The teacher's backbone is the result: ``model.safetensors`` (a plain timm state dict,
``create_backbone(model, pretrained=PATH, **model_kwargs)``) + ``teacher.json``, with its k-NN (or linear) probe
accuracy on the test split next to a randomly initialised ViT of the same shape, and the CLS-attention overlays
and attention-distance plot of ``eval/attention.py``.

Keys that matter: ``model``, ``method.model_kwargs``, ``method.epochs``, ``method.batch_size``,
``method.optimizer.lr``, ``method.momentum_teacher``, ``method.head.out_dim``, ``method.loss.teacher_temp``,
``method.crops``.
"""
from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate
from timm.layers import DropPath
from omegaconf import DictConfig

from fastdistill.artifacts import RunDir
from fastdistill.data import build_dataset, build_loader
from fastdistill.data.multicrop import MultiCrop
from fastdistill.data.transforms import to_input
from fastdistill.engine import distributed as dist
from fastdistill.engine import Precision, maybe_compile, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import Position, run_epochs
from fastdistill.engine.optim import param_groups
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.knn import check_probe
from fastdistill.eval.ssl_run import finish_ssl_run, knn_curve_point
from fastdistill.losses.dino import DINOLoss
from fastdistill.models import create_backbone
from fastdistill.models.ssl import POS_EMBEDS, DINOHead, MultiCropModel, check_vit, set_pos_embed
from fastdistill.profiling import Profiler
from fastdistill.teachers import config_hash


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter (same module structure on both sides)."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError(f"ema_update: teacher has {len(t)} parameters, student {len(s)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def build_multicrop(c: DictConfig, global_size: int, hflip: bool) -> MultiCrop:
    return MultiCrop(global_size=global_size, local_size=int(c.local_size), num_local=int(c.num_local),
                     global_scale=tuple(c.global_scale), local_scale=tuple(c.local_scale), hflip=hflip,
                     jitter_p=float(c.jitter_p), brightness=float(c.brightness), contrast=float(c.contrast),
                     saturation=float(c.saturation), hue=float(c.get("hue", 0.0)),
                     jitter_random_order=bool(c.get("jitter_random_order", False)), grayscale_p=float(c.grayscale_p),
                     blur_sigma=tuple(c.blur_sigma), solarize_p=float(c.solarize_p),
                     interpolation=str(c.interpolation))


class DINORecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        for key in ("epochs", "batch_size"):
            if m[key] < 1:
                raise ValueError(f"method.{key} must be >= 1, got {m[key]!r}")
        if not 0 <= m.momentum_teacher <= 1:
            raise ValueError(f"method.momentum_teacher must be in [0, 1], got {m.momentum_teacher!r}")
        if m.head.out_dim < 2:
            raise ValueError(f"method.head.out_dim must be >= 2, got {m.head.out_dim!r}")
        if not (m.loss.student_temp > 0 and m.loss.teacher_temp > 0 and m.loss.warmup_teacher_temp > 0):
            raise ValueError("method.loss temperatures must be > 0")
        if m.pos_embed not in POS_EMBEDS:
            raise ValueError(f"unknown method.pos_embed {m.pos_embed!r}; expected one of {', '.join(POS_EMBEDS)}")
        check_probe(m.probe)
        build_multicrop(m.crops, 1, False)  # scales and counts checked before any work
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)
        self.hash = config_hash(cfg)

    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        # networks first, right after seeding: the random-init baseline of evaluate() is this same draw
        backbone = create_backbone(cfg.model, pretrained="none", **m.model_kwargs)
        set_pos_embed(check_vit(backbone, "+method=dino"), m.pos_embed)
        head = DINOHead(backbone.spec.feature_dim, int(m.head.out_dim), int(m.head.hidden_dim),
                        int(m.head.bottleneck_dim), int(m.head.num_layers), bool(m.head.norm_last_layer),
                        bool(m.head.use_bn))
        self.student = MultiCropModel(backbone, head).to(self.device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for layer in self.teacher.modules():  # stochastic depth regularises the student only (Caron et al. 2021)
            if isinstance(layer, DropPath):
                layer.drop_prob = 0.0
        # under torchrun the student is a DDP replica (DDP starts every rank from rank 0's weights); the EMA teacher
        # follows identical students, so it stays identical too
        self.forward_student = maybe_compile(dist.wrap_ddp(self.student, self.device), cfg.compile, self.device)
        if dist.rank():  # the other ranks draw other crops; rank 0 keeps the one-process stream
            seed_everything(cfg.seed + dist.rank())
        self.forward_teacher = maybe_compile(self.teacher, cfg.compile, self.device)
        spec = backbone.spec
        self.image_size = tuple(spec.input_size)
        if spec.fixed_size and m.crops.num_local > 0 and m.crops.local_size != spec.input_size[0]:
            raise ValueError(f"local crops of {m.crops.local_size} px need a ViT that takes any resolution: add "
                             f"dynamic_img_size: true to method.model_kwargs")
        # data: uint8 batches. Files streamed by the torch loader get their views as they are decoded (each a
        # random-resized crop of the whole file, bicubic as published, seeded per sample); decoded splits and the
        # ffcv/dali loaders are cropped on the device. The colour, blur and solarisation ops run on the device
        self.splits = build_dataset(cfg.data)
        self.train_set, self.test_set = self.splits["train"], self.splits["test"]
        self.multicrop = build_multicrop(m.crops, self.image_size[0], bool(cfg.data.get("hflip", True)))
        train = self.train_set.train_view(self.multicrop.decode_crops()) if cfg.loader == "torch" else self.train_set
        self.crop_on_device = train.train_crop is None
        self.loader = build_loader(cfg.loader, train, m.batch_size, shuffle=True, drop_last=True,
                                   seed=cfg.seed, num_workers=cfg.num_workers, rank=dist.rank(),
                                   world_size=dist.world_size())
        if len(self.loader) == 0:
            raise ValueError(f"method.batch_size {m.batch_size} is larger than the {len(self.train_set)} training images")
        # loss (owns the centre) and optimiser
        self.loss_fn = DINOLoss(int(m.head.out_dim), 2, m.loss.student_temp, m.loss.teacher_temp,
                                m.loss.warmup_teacher_temp, int(m.loss.warmup_teacher_temp_epochs),
                                m.loss.center_momentum).to(self.device)
        self.optimizer = instantiate(m.optimizer)(param_groups(self.student))
        # per-step schedules (DINO's cosine_scheduler); the lr is given for 256 images and scaled to the batch
        self.steps_per_epoch = len(self.loader)
        total = m.epochs * self.steps_per_epoch
        self.lr = cosine_schedule(m.optimizer.lr * m.batch_size / 256, m.min_lr, total,
                                  m.warmup_epochs * self.steps_per_epoch)
        self.wd = cosine_schedule(m.weight_decay, m.weight_decay_end, total)
        self.momentum = cosine_schedule(m.momentum_teacher, 1.0, total)
        self.position, self.history = Position(), []
        self.profiler = Profiler(self.device)
        if cfg.resume:
            self.load_checkpoint()

    def train(self) -> None:
        # labels are never used; the history also logs the schedules at the epoch's last step
        run_epochs(self.position, self.loader, self.cfg.method.epochs, lambda x, y, epoch: self.train_step(x, epoch),
                   lr=self.lr, save=self.save_checkpoint, out=self.out, profiler=self.profiler, history=self.history,
                   label=f"dino {self.cfg.model}", progress=self.cfg.progress,
                   checkpoint_every=self.cfg.checkpoint_every,
                   log=lambda epoch: {"teacher_temp": self.loss_fn.teacher_temp_at(epoch),
                                      "lr": float(self.lr[self.position.step - 1]),
                                      "momentum": float(self.momentum[self.position.step - 1]),
                                      **knn_curve_point(self, self.teacher.backbone, epoch)})

    def train_step(self, x: torch.Tensor, epoch: int) -> torch.Tensor:
        m = self.cfg.method
        regularized, _ = self.optimizer.param_groups
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.position.step])
        regularized["weight_decay"] = float(self.wd[self.position.step])
        if self.crop_on_device:
            x = to_input(x.to(self.device, non_blocking=True), channels=x.shape[1])
        else:  # the views, cropped and flipped by the loader
            x = [to_input(v.to(self.device, non_blocking=True), channels=v.shape[1]) for v in x]
        crops = self.multicrop(x)
        with torch.no_grad(), self.precision.autocast():
            teacher_out = self.forward_teacher(crops[:2])  # the teacher sees only the 2 global crops
        with self.precision.autocast():
            student_out = self.forward_student(crops)
        loss = self.loss_fn(student_out, teacher_out, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        if epoch < m.freeze_last_layer:  # the prototypes stay fixed while the rest settles (Caron et al.)
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        self.precision.step(self.optimizer, m.clip_grad, list(self.student.parameters()),
                            m.get("clip_grad_scope", "global"))
        ema_update(self.teacher, self.student, float(self.momentum[self.position.step]))
        return loss

    def save_checkpoint(self) -> None:
        save_checkpoint(self.out.path, {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "loss": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.state_dict(), "position": self.position.state_dict(),
            "history": self.history, "config": self.hash})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, self.hash)
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.position, self.history = Position.from_state(state["position"], self.device), state["history"]


def main(cfg: DictConfig) -> dict:
    recipe = DINORecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    recipe.train()
    return finish_ssl_run(recipe, "dino", recipe.teacher.backbone, "DINO")
