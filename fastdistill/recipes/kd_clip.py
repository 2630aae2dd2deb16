"""CLIP -> ResNet knowledge distillation with generated images (``+method=kd_clip``).

A frozen teacher (an open_clip model by name, or any factory backbone as a feature teacher) teaches a small timm
ResNet on the real training images plus, optionally, generated ones (``method.gen.mode=none|cls2img|img2img|folder``,
``fastdistill/data/generated.py``); then the student is fine-tuned on the real images with cross-entropy. Stage 1
optimises one objective (``method.kd.objective``), no labels:

    FD   L = d(P s(x), t(x))                   P a linear projection, d = 1 - cos or MSE (``method.kd.feature_loss``)
    LD   L = T^2 KL(softmax(z_t(x) / T) || softmax(z_s(x) / T))
         z_t = logit_scale * norm(t(x)) @ norm(E_text)^T for a CLIP teacher (zero-shot logits from the prompts
         ``method.prompts.templates``); a teacher with its own classifier (``teacher_weights=trained``) gives
         its own logits instead
    CP   L = d(P s(x_gen), t(x_src))             a generated image predicts the teacher embedding of the real image
         it was made from (img2img, or a folder with ``real:<id>`` sources); the teacher embeds the real images
         once and never sees a generated one; a real image is its own source

Stage 2: cross-entropy on the real images only. SUP, the baseline, is the same student (same initial weights)
trained with cross-entropy on the same real images for ``method.baseline.epochs`` (default: the KD stage's plus
the fine-tuning's). ``method.real_per_class`` limits the real images, so that what the teacher knows can help.
Teacher targets are computed ``online`` on the student's augmented view, or ``cached``: one per image, without
augmentation, computed once before training (the fast path; CP targets are always cached).

Images on disk stream: the real files and the generated ones are read batch by batch (targets, the head
initialisation, every stage), and the torch loader draws each training view's random-resized crop from the whole
file as it decodes it; decoded data (the embedded digits, with its generated set) is indexed and cropped on the
device.

Keys that matter: ``method.teacher``, ``method.kd.objective``, ``method.gen.mode``, ``method.real_per_class``,
``method.kd.epochs``, ``method.kd.teacher_targets``, ``method.student``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir, write_json
from fastdistill.data import ImageDataset, build_dataset, build_loader
from fastdistill.data.dataset import TrainCrop
from fastdistill.data.generated import GEN_MODES, build_generated, build_prompts
from fastdistill.data.transforms import check_crop_scale, to_input, train_augment
from fastdistill.engine import Precision, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import Position, run_epochs
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.eval.classify import accuracy
from fastdistill.losses.kd import (FEATURE_LOSSES, condition_prediction, feature_distillation, logit_distillation,
                                   zero_shot_logits)
from fastdistill.models import Backbone, create_backbone, parse_backbone_id
from fastdistill.profiling import Profiler
from fastdistill.recipes import get_recipe
from fastdistill.teachers import cache_root, frozen_backbone

OBJECTIVES = ("fd", "ld", "cp")
TARGETS = ("online", "cached")
STAGES = ("kd", "finetune", "baseline")


class KDClipRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        if m.kd.objective not in OBJECTIVES:
            raise ValueError(f"unknown method.kd.objective {m.kd.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if m.kd.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"unknown method.kd.feature_loss {m.kd.feature_loss!r}; expected one of "
                             f"{', '.join(FEATURE_LOSSES)}")
        if m.finetune.head_init not in ("teacher", "random"):
            raise ValueError(f"method.finetune.head_init must be teacher or random, got {m.finetune.head_init!r}")
        if m.kd.teacher_targets not in TARGETS:
            raise ValueError(f"unknown method.kd.teacher_targets {m.kd.teacher_targets!r}; expected one of "
                             f"{', '.join(TARGETS)}")
        if m.gen.mode not in GEN_MODES:
            raise ValueError(f"unknown method.gen.mode {m.gen.mode!r}; expected one of {', '.join(GEN_MODES)}")
        if m.kd.objective == "cp" and m.gen.mode == "cls2img":
            raise ValueError("method.kd.objective=cp predicts the source real image of each generated image; "
                             "gen=cls2img images come from prompts: use gen=img2img, folder or none")
        if m.gen.mode in ("cls2img", "img2img") and not m.gen.pipeline:
            raise ValueError(f"gen={m.gen.mode} needs method.gen.pipeline=/path/to/a/diffusers/pipeline/folder")
        if m.gen.mode == "folder" and not m.gen.folder:
            raise ValueError("gen=folder needs method.gen.folder=DIR (images with an index.json of sources)")
        if not str(m.student).startswith("timm:"):
            raise ValueError(f"method.student must be a timm backbone (timm:<arch>), got {m.student!r}")
        parse_backbone_id(m.teacher)
        if m.real_per_class is not None and m.real_per_class < 1:
            raise ValueError(f"method.real_per_class must be >= 1 or null (all), got {m.real_per_class!r}")
        for stage in ("kd", "finetune", "baseline"):
            epochs = m[stage].epochs
            if epochs is not None and epochs < (1 if stage == "kd" else 0):
                raise ValueError(f"method.{stage}.epochs must be >= {1 if stage == 'kd' else 0}, got {epochs!r}")
        if m.kd.temperature <= 0:
            raise ValueError(f"method.kd.temperature must be > 0, got {m.kd.temperature!r}")
        check_crop_scale(m.crop_scale, "method.crop_scale")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        self.profiler = Profiler(self.device)
        # data: the real images the student may use, then the generated ones
        splits = build_dataset(cfg.data)
        self.train_set, self.test_set = splits["train"], splits["test"]
        self.classes = self.train_set.classes
        self.image_size = (m.image_size, m.image_size) if m.image_size else tuple(self.train_set.image_size)
        self.real_ids = self.train_set.real_subset(m.real_per_class, cfg.seed)
        self.prompts = build_prompts(self.classes, list(m.prompts.templates), m.prompts.class_names)
        with self.profiler.phase("generate"):
            self.generated = build_generated(m.gen, self.train_set, self.real_ids, self.prompts, cfg.seed,
                                             self.device, cache_root() / "generated")
        self.real_set = self.train_set.subset(self.real_ids)
        self.kd_set, self.kd_source = self.kd_images()
        self.crop_at_decode = cfg.loader == "torch" and not self.train_set.in_memory
        # the teacher, its classifier for LD, and the cached targets
        with self.profiler.phase("teacher"):
            self.teacher, self.teacher_card = self.load_teacher()
            self.teacher_size = tuple(self.teacher.spec.input_size) if self.teacher.spec.fixed_size else \
                tuple(self.teacher_card.get("image_size") or self.image_size)
            self.text_embedding, self.logit_scale = self.text_classifier()
        with self.profiler.phase("teacher_targets", images=len(self.kd_set)):
            self.cached = self.cache_targets()
        # students: one initial state for the KD student and the SUP baseline
        torch.manual_seed(cfg.seed)
        self.student = create_backbone(m.student, num_classes=len(self.classes), **m.student_kwargs).to(self.device)
        self.baseline = copy.deepcopy(self.student)
        dim = self.teacher.spec.feature_dim
        self.projection = nn.Linear(self.student.spec.feature_dim, dim).to(self.device)  # FD / CP only
        self.stage, self.position, self.history, self.results = "kd", Position(), [], {}
        self.optimizer, self.optimizer_stage = None, None
        if cfg.resume:
            self.load_checkpoint()

    def kd_images(self) -> tuple[ImageDataset, torch.Tensor]:
        """The KD stage's images (real + generated) and, per image, the row of its real source in ``real_ids``
        (-1 for images made from prompts; CP drops those). Files stay files: the generated ones are read beside the
        real ones and decoded as they are (the dataset's crop_pct); decoded real data takes the generated set
        decoded too (at most ``gen.multiplier`` times the real images the student may use)."""
        kd, source = replace(self.real_set, name="kd"), torch.arange(self.real_ids.numel())
        if self.generated is not None:
            gen = self.generated
            row_of = {int(i): r for r, i in enumerate(self.real_ids.tolist())}
            source = torch.cat([source, torch.tensor([row_of.get(int(i), -1) for i in gen.source_ids()],
                                                     dtype=torch.long)])
            labels = torch.cat([kd.labels, gen.labels])
            if kd.in_memory:
                kd = ImageDataset(labels=labels, classes=self.classes, images=torch.cat([kd.images, gen.load()]),
                                  name="kd")
            else:
                kd = replace(kd, labels=labels, paths=kd.paths + gen.paths)
        if self.cfg.method.kd.objective == "cp":
            keep = (source >= 0).nonzero().flatten()
            kd, source = kd.subset(keep), source[keep]
        return kd, source

    def batches(self, images: ImageDataset) -> Iterator[torch.Tensor]:
        """The images in order, [0, 1] batches at the student's size on the device (no augmentation), read through
        the loader a batch at a time."""
        loader = build_loader("torch", images, self.cfg.method.eval_batch_size, shuffle=False,
                              num_workers=self.cfg.num_workers)
        for x, _ in loader.epoch(0):
            yield to_input(x.to(self.device, non_blocking=True), self.image_size)

    def load_teacher(self) -> tuple[Backbone, dict]:
        m = self.cfg.method
        net, card = frozen_backbone(m.teacher, m.teacher_weights, self.cfg, m.teacher_preset, self.classes,
                                    train=get_recipe("teacher").main, **m.teacher_kwargs)
        return net.to(self.device), card

    def text_classifier(self) -> tuple[torch.Tensor | None, float]:
        """For LD from a CLIP teacher: zero-shot class embeddings from the prompts. A teacher with a classifier for
        these classes gives its own logits instead; a feature teacher without one cannot do LD."""
        m = self.cfg.method
        head_init = m.kd.objective != "ld" and m.finetune.head_init == "teacher"
        if m.kd.objective != "ld" and not (head_init and self.teacher.spec.source == "open_clip"):
            return None, 1.0
        if self.teacher.spec.source == "open_clip":
            from fastdistill.models.clip_text import build_clip, text_classifier

            clip = build_clip(m.teacher, m.teacher_weights, **m.teacher_kwargs).to(self.device)
            emb, scale = text_classifier(clip, self.teacher.spec.arch, self.prompts, self.device)
            del clip
            return emb, scale
        if self.teacher.spec.num_classes != len(self.classes):
            raise ValueError(f"method.kd.objective=ld needs class logits: an open_clip teacher (zero-shot from prompts) "
                             f"or a teacher with a {len(self.classes)}-class classifier (teacher_weights=trained); "
                             f"{m.teacher} has {self.teacher.spec.num_classes}")
        return None, 1.0

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's target for [0, 1] images at the student's size: its embedding (FD, CP) or its class
        logits (LD: zero-shot from the text prompts, or its own classifier), fp32."""
        x = to_input(x, self.teacher_size, 3)
        with self.precision.autocast():
            if self.cfg.method.kd.objective != "ld":
                return self.teacher.embed(x).float()
            if self.text_embedding is not None:
                return zero_shot_logits(self.teacher.embed(x).float(), self.text_embedding, self.logit_scale)
            return self.teacher(x).float()

    @torch.no_grad()
    def cache_targets(self) -> torch.Tensor | None:
        """Targets computed once, without augmentation: per KD image (``teacher_targets=cached``), or per real image
        for CP (the teacher embeds the real set and never a generated image). None for online targets."""
        m = self.cfg.method
        if m.kd.objective == "cp":
            images = self.real_set
        elif m.kd.teacher_targets == "cached":
            images = self.kd_set
        else:
            return None
        return torch.cat([self.teacher_outputs(x) for x in self.batches(images)])

    # ------------------------------------------------------------------ training
    def stage_plan(self, stage: str) -> tuple[ImageDataset, int, float, int]:
        """(images, epochs, lr, batch size) of a stage. The KD set's labels are replaced by row ids, so that a
        batch carries what its images need (source row, cached target, true label) through any loader."""
        m = self.cfg.method
        if stage == "kd":
            ids = replace(self.kd_set, labels=torch.arange(len(self.kd_set)))
            return ids, m.kd.epochs, m.kd.lr, m.kd.batch_size
        epochs = m[stage].epochs
        if stage == "baseline" and epochs is None:
            epochs = m.kd.epochs + m.finetune.epochs
        return self.real_set, epochs, m[stage].lr, m[stage].batch_size

    def begin_stage(self, stage: str) -> None:
        cfg = self.cfg
        images, epochs, lr, batch_size = self.stage_plan(stage)
        # files streamed by the torch loader are cropped as they are decoded (on the whole image), as the teacher's
        if self.crop_at_decode:
            images = images.train_view(TrainCrop(scale=tuple(cfg.method.crop_scale),
                                                 hflip=bool(cfg.data.get("hflip", True))))
        self.loader = build_loader(cfg.loader, images, batch_size, shuffle=True, drop_last=False,
                                   seed=cfg.seed + STAGES.index(stage), num_workers=cfg.num_workers)
        self.steps_per_epoch = len(self.loader)
        self.epochs = epochs
        params = self.stage_params(stage)
        if self.optimizer is None or self.optimizer_stage != stage:
            self.optimizer = instantiate(cfg.method.optimizer)(params, lr=lr)
            self.optimizer_stage = stage
        total = max(1, epochs * self.steps_per_epoch)
        self.lr = cosine_schedule(lr, 0.0, total, min(cfg.method.warmup_epochs * self.steps_per_epoch, total // 2))

    def stage_params(self, stage: str) -> list[nn.Parameter]:
        if stage == "baseline":
            return list(self.baseline.parameters())
        if stage == "kd" and self.cfg.method.kd.objective != "ld":
            return [*self.student.parameters(), *self.projection.parameters()]
        return list(self.student.parameters())

    def train(self) -> None:
        for stage in STAGES[STAGES.index(self.stage):]:
            if self.stage != stage:  # a new stage starts at its first step
                self.stage, self.position = stage, Position()
            if stage == "finetune" and self.position.step == 0:
                self.init_head_from_teacher()
            if stage == "baseline" and self.position.step == 0 and self.cached_baseline() is not None:
                self.results["baseline"] = self.cached_baseline()
                self.stage = "done"
                self.save_checkpoint()
                break
            self.begin_stage(stage)
            run_epochs(self.position, self.loader, self.epochs,
                       lambda x, target, epoch: {"loss": self.train_step(stage, x, target.view(-1).long())},
                       lr=self.lr, save=self.save_checkpoint, out=self.out, profiler=self.profiler,
                       history=self.history, label=f"{stage} {self.cfg.method.student}", progress=self.cfg.progress,
                       checkpoint_every=self.cfg.checkpoint_every, phase=stage, log=lambda epoch: {"stage": stage})
            if stage != "kd":
                with self.profiler.phase("evaluate", images=len(self.test_set)):
                    model = self.student if stage == "finetune" else self.baseline
                    self.results[stage] = accuracy(model, self.test_set, self.device, self.image_size,
                                                   self.precision, self.cfg.method.eval_batch_size)
                self.out.log(stage, self.epochs, test_acc=self.results[stage])
                if stage == "baseline":
                    self.store_baseline(self.results[stage])
            # the next stage begins; a checkpoint here resumes into it
            self.stage = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else "done"
            self.position, self.optimizer = Position(), None
            self.save_checkpoint()

    @torch.no_grad()
    def init_head_from_teacher(self) -> None:
        """After FD / CP the projected student embedding P s(x) stands for the teacher's t(x); the teacher's own
        classifier (or CLIP's zero-shot one) applied to it is a linear map of s(x), folded into the student's head,
        so fine-tuning starts from a classifier instead of a random one (``method.finetune.head_init=teacher``):

            W_t (r P s + b_P) + b_t                   r = mean ||t|| / mean ||P s|| on the real images (cosine FD
                                                      matches directions, not norms)
            scale * text_emb @ (P s + b_P) / mean ||P s||     for a CLIP teacher
        """
        m = self.cfg.method
        if m.kd.objective == "ld" or m.finetune.head_init != "teacher":
            return
        head = self.student.model.get_classifier()
        own_head = self.teacher.spec.source != "open_clip" and self.teacher.spec.num_classes == len(self.classes)
        self.student.eval()
        ps, t = [], []
        for x in self.batches(self.real_set):
            ps.append(self.projection(self.student.embed(x)))
            if own_head:
                t.append(self.teacher.embed(to_input(x, self.teacher_size, 3)).float())
        self.student.train()
        ps = torch.cat(ps)
        w_p, b_p = self.projection.weight / ps.norm(dim=1).mean(), self.projection.bias / ps.norm(dim=1).mean()
        if self.teacher.spec.source == "open_clip":
            emb, scale = self.text_embedding, self.logit_scale
            head.weight.copy_(scale * emb @ w_p)
            head.bias.copy_(scale * emb @ b_p)
        elif own_head:
            w_t, b_t = self.teacher.model.get_classifier().weight, self.teacher.model.get_classifier().bias
            r = torch.cat(t).norm(dim=1).mean()
            head.weight.copy_(w_t @ (r * w_p))
            head.bias.copy_(w_t @ (r * b_p) + b_t)

    def baseline_path(self):
        """SUP depends on the student, its real images and its own schedule only, not on the teacher or the
        objective: one run of it serves every objective (cached by a hash of those keys)."""
        from fastdistill.data.generated import generation_key

        cfg, m = self.cfg, self.cfg.method
        key = generation_key(student=m.student, student_kwargs=OmegaConf.to_container(m.student_kwargs),
                             real_ids=self.real_ids.tolist(), plan=self.stage_plan("baseline")[1:],
                             optimizer=OmegaConf.to_container(m.optimizer), warmup=m.warmup_epochs,
                             crop=list(m.crop_scale), size=self.image_size, seed=cfg.seed, precision=cfg.precision,
                             loader=cfg.loader, data=OmegaConf.to_container(cfg.data, resolve=True),
                             **({"crop_at": "decode"} if self.crop_at_decode else {}))
        return cache_root() / "kd_clip_baseline" / f"{key}.json"

    def cached_baseline(self) -> float | None:
        path = self.baseline_path()
        if not self.cfg.method.baseline.cache or not path.is_file():
            return None
        return json.loads(path.read_text())["test_acc"]

    def store_baseline(self, acc: float) -> None:
        if self.cfg.method.baseline.cache:
            write_json(self.baseline_path(), {"test_acc": acc, "student": self.cfg.method.student})

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        x = to_input(x.to(self.device, non_blocking=True), self.image_size)
        if self.crop_at_decode:  # cropped and flipped by the loader
            return x
        return train_augment(x, self.image_size, self.cfg.method.crop_scale, self.cfg.data.get("hflip", True))

    def train_step(self, stage: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One step; ``target`` is the batch's KD-set rows in the KD stage, its labels in the others."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.position.step])
        x = self.augment(x)
        if stage == "kd":
            loss = self.kd_loss(x, target)
        else:
            model = self.student if stage == "finetune" else self.baseline
            with self.precision.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), target.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer, self.cfg.method.clip_grad, self.stage_params(stage))
        return loss

    def kd_loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The stage-1 objective on augmented images ``x`` (rows ``ids`` of the KD set)."""
        kd = self.cfg.method.kd
        with self.precision.autocast():
            feats = self.student.embed(x)
            if kd.objective == "ld":
                out = self.student.model.get_classifier()(feats)
            else:
                out = self.projection(feats)
        if kd.objective == "cp":
            return condition_prediction(out, self.cached, self.kd_source[ids].to(self.device), kd.feature_loss)
        target = self.cached[ids.to(self.device)] if self.cached is not None else self.teacher_outputs(x)
        if kd.objective == "ld":
            return logit_distillation(out, target, kd.temperature)
        return feature_distillation(out, target, kd.feature_loss)

    # ------------------------------------------------------------------ checkpoint and artifacts
    def save_checkpoint(self) -> None:
        save_checkpoint(self.out.path, {
            "student": self.student.model.state_dict(), "projection": self.projection.state_dict(),
            "baseline": self.baseline.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scaler": self.precision.state_dict(), "stage": self.stage, "position": self.position.state_dict(),
            "history": self.history, "results": self.results,
            "config": OmegaConf.to_container(self.cfg.method, resolve=True)})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, OmegaConf.to_container(self.cfg.method, resolve=True))
        self.student.model.load_state_dict(state["student"])
        self.projection.load_state_dict(state["projection"])
        self.baseline.model.load_state_dict(state["baseline"])
        self.precision.load_state_dict(state["scaler"])
        self.stage, self.position = state["stage"], Position.from_state(state["position"], self.device)
        self.history, self.results = state["history"], state["results"]
        if state["optimizer"] is not None and self.stage != "done":
            self.begin_stage(self.stage)
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self) -> dict:
        cfg, m = self.cfg, self.cfg.method
        n_gen = 0 if self.generated is None else len(self.generated)
        metrics = {
            "student": {"kd": self.results["finetune"], "baseline": self.results["baseline"]},
            "objective": m.kd.objective, "gen": m.gen.mode, "teacher_targets": m.kd.teacher_targets,
            "teacher": {k: v for k, v in self.teacher_card.items() if k not in ("history",)},
            "images": {"real": int(self.real_ids.numel()), "generated": n_gen, "kd_stage": len(self.kd_set)},
            "history": self.history,
        }
        self.out.write_json("metrics.json", metrics)
        self.out.write_manifest(cfg, self.device, teacher=metrics["teacher"], classes=self.classes,
                                real_ids=self.real_ids.tolist(),
                                generated=str(self.generated.root) if self.generated is not None else None)
        self.out.write_json("profile.json", self.profiler.report())
        return metrics


def main(cfg: DictConfig) -> dict:
    recipe = KDClipRecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    if recipe.stage != "done":
        recipe.train()
    metrics = recipe.save()
    m = cfg.method
    console.print_results(
        f"kd_clip {m.kd.objective.upper()} ({m.teacher} -> {m.student}, gen={m.gen.mode}) on {cfg.data.name}: "
        f"student test accuracy", ["objective", "gen", "real images", "KD + fine-tune", "SUP"],
        [[m.kd.objective.upper(), m.gen.mode, metrics["images"]["real"], metrics["student"]["kd"],
          metrics["student"]["baseline"]]], recipe.out.path)
    return metrics
