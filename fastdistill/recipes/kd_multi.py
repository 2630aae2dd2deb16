"""Multi-SSL-teacher knowledge distillation into a ViT student with attention transfer (``+method=kd_multi``).

Two frozen-body teachers, a contrastive one (CL, e.g. DINO) and a masked-image-modelling one (MIM, e.g. MAE), each
get a classification head trained jointly with the student, in one stage (``adaptation``: ``linear`` = the head
only, ``partial1`` = the last transformer block, the final norm and the head, ``full`` = everything). The student
ViT learns from the labels, both teachers' class distributions and one attention head of each teacher:

    L = CE_S + CE_CL + CE_MIM + L_KD + L_Attn
    L_KD   = l1 T^2 KL(p_CL || p_S) + (1 - l1) T^2 KL(p_MIM || p_S)                      (p = softmax(z / T))
    L_Attn = l2 KL(A_CL^h* || A_S^S1) + (1 - l2) KL(A_MIM^h* || A_S^S2)     per attention row of ``attention_layer``

where each teacher's head h* has the highest Attention Confidence C_h = mean_q max_k A_h(q, k) on the batch, and
S1, S2 are fixed student heads (``student_heads``). Teacher signals are constants of the student's losses. A teacher
with another patch grid has its queries and keys resampled onto the student's grid. The attention KL runs fused
(``kernels/attention_kl.py``: Triton on CUDA, the blockwise torch form elsewhere; no L x L map is kept for the
backward) unless ``fused_attention_kl=false`` (the materialised reference).

Training follows DeiT's recipe (Touvron et al. 2021) as far as its switches are on (all off by default, on in
``preset=paper``): the lr given per ``lr_reference_batch`` images and scaled to the batch, cosine to ``min_lr``,
crops with ``interpolation``, RandAugment, random erasing and Mixup / CutMix through timm
(``data/deit_augment.py``; with mixing, every cross-entropy, the teachers' included, takes the mixed soft targets),
drop-path through ``model_kwargs``, fp16 with a loss scaler through ``precision``.

The same student is also trained alone (CE only, the same optimiser, schedule, augmentation and initial weights):
``metrics.json`` holds ``{"student": {"kd": acc, "baseline": acc}, "teachers": {...}}``. Teachers come from
``weights``: ``none`` / ``hub`` / a weights file / a run folder with ``teacher.json`` / ``trained`` (trained on the
run's data by the recipe named in ``recipe``, e.g. ``dino`` or ``mae``, and cached under a hash of its config).
The run ends with CLS-attention overlays (``attention_<model>.png``) and the attention-distance plot of the KD
student and both teachers (``eval/attention.py``).

Keys that matter: ``model`` (student), ``method.teachers``, ``method.adaptation``, ``method.lambda_output``,
``method.lambda_attention``, ``method.temperature``, ``method.train_per_class``, ``method.epochs``,
``method.augment``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from timm.data import IMAGENET_DEFAULT_MEAN
from omegaconf import DictConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir
from fastdistill.data import build_dataset, build_loader
from fastdistill.data.dataset import TrainCrop
from fastdistill.data.deit_augment import BatchAugment, RandAugment, check_augment, pil_each
from fastdistill.data.transforms import INTERPOLATIONS, to_input, train_augment
from fastdistill.engine import Precision, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine.epochs import Position, run_epochs
from fastdistill.engine.optim import param_groups
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.engine.seeding import rng_state, set_rng_state
from fastdistill.eval.attention import write_attention_report
from fastdistill.eval.classify import accuracy
from fastdistill.kernels import attention_kl as fused
from fastdistill.losses import attention_kl as reference
from fastdistill.losses.kd import (attention_confidence_qk, multi_teacher_attention_kd, multi_teacher_output_kd,
                                   resample_tokens)
from fastdistill.models import Backbone, create_backbone
from fastdistill.models.taps import QKTap
from fastdistill.profiling import Profiler
from fastdistill.recipes import RECIPES, get_recipe
from fastdistill.teachers import CARD, config_hash, ensure_trained, load_run, training_config

ROLES = ("cl", "mim")
ADAPTATIONS = ("linear", "partial1", "full")
WEIGHT_DECAY_FILTERS = ("none", "timm")  # timm: no decay on 1-D parameters and no_weight_decay() (DeiT)
STAGES = ("baseline", "kd")


def _grid(backbone: Backbone, size: tuple[int, int]) -> tuple[int, int]:
    p = backbone.spec.patch_size
    return size[0] // p, size[1] // p


class KDMultiRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        for key in ("epochs", "batch_size"):
            if not isinstance(m[key], int) or m[key] < 1:
                raise ValueError(f"method.{key} must be an integer >= 1, got {m[key]!r}")
        if m.adaptation not in ADAPTATIONS:
            raise ValueError(f"unknown method.adaptation {m.adaptation!r}; expected one of {', '.join(ADAPTATIONS)}")
        for key in ("lambda_output", "lambda_attention"):
            if not 0.0 <= float(m[key]) <= 1.0:
                raise ValueError(f"method.{key} must be in [0, 1], got {m[key]!r}")
        if not float(m.temperature) > 0:
            raise ValueError(f"method.temperature must be > 0, got {m.temperature!r}")
        if len(m.student_heads) != 2 or any(not isinstance(h, int) or h < 0 for h in m.student_heads):
            raise ValueError(f"method.student_heads must be two head indices [S1, S2], got {list(m.student_heads)}")
        if m.train_per_class is not None and (not isinstance(m.train_per_class, int) or m.train_per_class < 1):
            raise ValueError(f"method.train_per_class must be null or an integer >= 1, got {m.train_per_class!r}")
        ref = m.get("lr_reference_batch")
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or ref < 1):
            raise ValueError(f"method.lr_reference_batch must be an integer >= 1 or null, got {ref!r}")
        ra = m.repeated_augmentation
        if isinstance(ra, bool) or not isinstance(ra, int) or ra < 1:
            raise ValueError(f"method.repeated_augmentation must be an integer >= 1 (copies of each image; 1 = off), "
                             f"got {ra!r}")
        if m.weight_decay_filter not in WEIGHT_DECAY_FILTERS:
            raise ValueError(f"unknown method.weight_decay_filter {m.weight_decay_filter!r}; expected one of "
                             f"{', '.join(WEIGHT_DECAY_FILTERS)}")
        for key in ("interpolation", "test_interpolation"):
            if m[key] not in INTERPOLATIONS:
                raise ValueError(f"unknown method.{key} {m[key]!r}; expected one of {', '.join(INTERPOLATIONS)}")
        a = m.augment
        check_augment(a.randaugment, a.random_erasing, a.mixup, a.cutmix)
        if (a.mixup > 0 or a.cutmix > 0) and m.batch_size % 2:
            raise ValueError(f"method.batch_size {m.batch_size} must be even with Mixup / CutMix (timm pairs each "
                             f"image with the batch reversed)")
        if sorted(m.teachers) != sorted(ROLES):
            raise ValueError(f"method.teachers must name exactly {' and '.join(ROLES)}, got {sorted(m.teachers)}")
        for role in ROLES:
            t = m.teachers[role]
            weights = str(t.weights)
            if weights == "trained":
                if t.recipe not in RECIPES:
                    raise ValueError(f"method.teachers.{role}.recipe {t.recipe!r} is not a method; expected one of "
                                     f"{', '.join(sorted(RECIPES))}")
            elif weights not in ("none", "hub") and not os.path.exists(weights):
                raise FileNotFoundError(f"method.teachers.{role}.weights '{weights}' not found; use none, hub, "
                                        f"trained, a weights file or a run folder with {CARD}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)
        self.hash = config_hash(cfg)
        kl = functools.partial(fused.attention_kl, backend=cfg.kernels) if m.fused_attention_kl \
            else reference.attention_kl
        self.attention_kl = kl

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        # data: the student sees train_per_class labelled images per class (the teachers were trained on all)
        splits = build_dataset(cfg.data)
        self.full_train, self.test_set = splits["train"], splits["test"]
        if self.test_set.paths is not None and self.test_set.interpolation != m.test_interpolation:
            # decoded from the files again (cached pixels unused), as DeiT's Resize(bicubic) + CenterCrop
            self.test_set = replace(self.test_set, images=None, interpolation=m.test_interpolation)
        self.train_set = self.full_train
        if m.train_per_class is not None:
            index = self.full_train.per_class(m.train_per_class, torch.Generator().manual_seed(cfg.seed))
            self.train_set = self.full_train.subset(index)
        # files streamed by the torch loader are cropped as they are decoded (on the whole image), as the teacher's,
        # and RandAugmented there (in the loader's workers), as DeiT's dataset transform
        policy = m.augment.randaugment
        augment = RandAugment(policy, min(self.train_set.image_size), m.interpolation,
                              self._fill(self.train_set.channels)) if policy else None
        crop = TrainCrop(scale=tuple(m.crop_scale), hflip=bool(cfg.data.get("hflip", True)),
                         interpolation=m.interpolation, augment=augment)
        train = self.train_set.train_view(crop) if cfg.loader == "torch" else self.train_set
        self.crop_on_device = train.train_crop is None
        mixes = m.augment.mixup > 0 or m.augment.cutmix > 0
        # DeiT drops the last batch; Mixup / CutMix need it (an odd last batch cannot be paired)
        self.loader = build_loader(cfg.loader, train, m.batch_size, shuffle=True, drop_last=mixes,
                                   seed=cfg.seed, num_workers=cfg.num_workers, repeats=m.repeated_augmentation)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"method.batch_size {m.batch_size} is larger than the {len(self.train_set)} training "
                             f"images (the last batch is dropped with Mixup / CutMix)")
        self.classes = self.train_set.classes
        self.profiler = Profiler(self.device)
        # teachers: backbone + trainable head; the parts ``adaptation`` leaves frozen never get gradients
        self.teachers, self.teacher_info, self.teacher_taps, self.teacher_sizes = {}, {}, {}, {}
        for role in ROLES:
            self.teachers[role], self.teacher_info[role] = self.build_teacher(role, m.teachers[role])
        self.history = {stage: [] for stage in STAGES}
        self.results: dict = {}
        self.stage, self.position = STAGES[0], Position()
        if not cfg.resume:
            self.start_stage(self.stage)
            return
        state = resume_checkpoint(self.out.path, self.hash)
        rng = rng_state()  # the checkpoint's, restored by resume_checkpoint; start_stage re-seeds
        self.start_stage(state["stage"])
        self.load_checkpoint(state)
        set_rng_state(rng)

    def build_teacher(self, role: str, t: DictConfig) -> tuple[Backbone, dict]:
        m = self.cfg.method
        weights = str(t.weights)
        kwargs = OmegaConf.to_container(t.model_kwargs) if t.model_kwargs is not None else {}
        if weights == "trained":
            with self.profiler.phase(f"teacher_{role}"):
                tcfg = training_config(t.recipe, t.model, t.preset, self.cfg, list(t.overrides), t.model_kwargs)
                weights = str(ensure_trained(get_recipe(t.recipe).main, tcfg))
        if weights not in ("none", "hub") and Path(weights).is_dir():
            # a supervised teacher keeps its head (class order checked); a self-supervised one gets a new one
            net, card = load_run(weights, self.classes, num_classes=len(self.classes))
            model = card["model"]
        else:
            model, card = t.model, None
            net = create_backbone(model, pretrained=weights, num_classes=len(self.classes), **kwargs)
        net = net.to(self.device)
        net.eval()  # timm ViTs have no batch norm; eval keeps any dropout of a foreign config off
        self.teacher_taps[role] = QKTap(net, m.attention_layer)  # first: a non-ViT teacher fails here, in one line
        last = f"blocks.{len(net.model.blocks) - 1}."
        trainable = {"linear": ("head",), "partial1": ("head", "norm", "fc_norm", last),
                     "full": ("",)}[m.adaptation]
        for name, p in net.model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in trainable))
        spec = net.spec
        self.teacher_sizes[role] = tuple(spec.input_size) if spec.fixed_size else None
        info = {"model": model, "weights": str(t.weights), "recipe": t.recipe if str(t.weights) == "trained" else None,
                "source": weights, "pretrained_card_acc": (card or {}).get("test_acc")}
        return net, info

    def start_stage(self, stage: str) -> None:
        """A fresh student (the same initial weights for both stages), optimiser and schedule."""
        cfg, m = self.cfg, self.cfg.method
        seed_everything(cfg.seed)
        self.stage = stage
        self.student = create_backbone(cfg.model, pretrained="none", num_classes=len(self.classes),
                                       **m.model_kwargs).to(self.device).train()
        spec = self.student.spec
        self.image_size = tuple(spec.input_size) if spec.fixed_size else tuple(self.train_set.image_size)
        self.student_tap = QKTap(self.student, m.attention_layer)
        heads = self.student_tap.attn.num_heads
        if max(m.student_heads) >= heads:
            raise ValueError(f"method.student_heads {list(m.student_heads)} must index the student's {heads} heads")
        for role, net in self.teachers.items():
            if net.model.num_prefix_tokens != self.student.model.num_prefix_tokens:
                raise ValueError(f"teacher {role} has {net.model.num_prefix_tokens} prefix tokens, the student "
                                 f"{self.student.model.num_prefix_tokens}: their attention rows cannot be matched")
        nets = [self.student.model] + ([net.model for net in self.teachers.values()] if stage == "kd" else [])
        self.params = [p for net in nets for p in net.parameters() if p.requires_grad]
        if m.weight_decay_filter == "timm":  # DeiT's create_optimizer; the jointly trained teacher parts likewise
            groups = [g for net in nets for g in param_groups(net, getattr(net, "no_weight_decay", set)()) if g["params"]]
            self.optimizer = instantiate(m.optimizer)(groups)
        else:
            self.optimizer = instantiate(m.optimizer)(self.params)
        total = m.epochs * self.steps_per_epoch
        ref = m.get("lr_reference_batch")
        peak = m.optimizer.lr * m.batch_size / ref if ref else m.optimizer.lr  # DeiT: 5e-4 per 512 images
        self.lr = cosine_schedule(peak, m.min_lr, total, m.warmup_epochs * self.steps_per_epoch)
        a = m.augment
        self.randaugment = RandAugment(a.randaugment, min(self.image_size), m.interpolation, self._fill(3)) \
            if a.randaugment and self.crop_on_device else None  # batches cropped on the device: on the host
        self.batch_augment = BatchAugment(float(a.random_erasing), float(a.mixup), float(a.cutmix),
                                          float(m.label_smoothing), len(self.classes), spec.mean, spec.std,
                                          self.device)
        self.position = Position()
        self.head_counts = {role: torch.zeros(self.teacher_taps[role].attn.num_heads, dtype=torch.long,
                                              device=self.device) for role in ROLES}

    # ------------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        for stage in STAGES[STAGES.index(self.stage):]:
            if stage != self.stage:
                self.start_stage(stage)
                self.save_checkpoint()
            run_epochs(self.position, self.loader, self.cfg.method.epochs, lambda x, y, epoch: self.train_step(x, y),
                       lr=self.lr, save=self.save_checkpoint, out=self.out, profiler=self.profiler,
                       history=self.history[stage], label=f"{stage} {self.cfg.model}", progress=self.cfg.progress,
                       checkpoint_every=self.cfg.checkpoint_every, phase=stage)
            with self.profiler.phase("evaluate", images=len(self.test_set)):
                self.results[stage] = self.evaluate_student()
            self.out.log(stage, self.cfg.method.epochs, test_acc=self.results[stage])
            self.save_checkpoint()

    @staticmethod
    def _fill(channels: int) -> tuple[float, ...]:
        """RandAugment's fill colour, DeiT's (create_transform's default: the ImageNet mean), one per channel."""
        return IMAGENET_DEFAULT_MEAN if channels == 3 else (sum(IMAGENET_DEFAULT_MEAN) / 3,)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if not self.crop_on_device:  # cropped, flipped (and RandAugmented) by the loader at the data's size
            return to_input(x.to(self.device, non_blocking=True), self.image_size)
        m = self.cfg.method
        x = to_input(x.to(self.device, non_blocking=True))
        x = train_augment(x, self.image_size, m.crop_scale, self.cfg.data.get("hflip", True), mode=m.interpolation)
        return pil_each(x, self.randaugment) if self.randaugment else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[self.position.step])
        x = self._augment(x)
        x, y = self.batch_augment(x, y.to(self.device, non_blocking=True))  # y: soft targets where mixed
        with self.precision.autocast():
            logits = self.student(x)
        terms = {"ce_s": self.cross_entropy(logits.float(), y)}
        if self.stage == "kd":
            terms.update(self.kd_terms(x, y, logits))
        loss = sum(terms.values())
        self.student_tap.pop()
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer, m.clip_grad, self.params)
        return {"loss": loss, **terms}

    def kd_terms(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        t_logits, t_qk = {}, {}
        grid_s = _grid(self.student, self.image_size)
        for role in ROLES:
            net = self.teachers[role]
            size = self.teacher_sizes[role] or self.image_size
            with self.precision.autocast():
                t_logits[role] = net(x if size == self.image_size else to_input(x, size)).float()
            q, k = (t.detach() for t in self.teacher_taps[role].pop())
            # Attention Confidence on the teacher's own grid; the chosen head stays a device tensor (no host sync)
            head = attention_confidence_qk(q, k).argmax().reshape(1)
            self.head_counts[role][head] += 1
            q, k = (resample_tokens(t.index_select(1, head), _grid(net, size), grid_s, net.model.num_prefix_tokens)
                    for t in (q, k))
            t_qk[role] = (q, k)
        q_s, k_s = self.student_tap.q, self.student_tap.k
        s1, s2 = m.student_heads
        terms = {f"ce_{role}": self.cross_entropy(t_logits[role], y) for role in ROLES}
        terms["kd"] = multi_teacher_output_kd(student_logits, t_logits["cl"], t_logits["mim"], m.lambda_output,
                                              m.temperature)
        attn = multi_teacher_attention_kd(t_qk["cl"], t_qk["mim"], (q_s[:, s1:s1 + 1], k_s[:, s1:s1 + 1]),
                                          (q_s[:, s2:s2 + 1], k_s[:, s2:s2 + 1]), m.lambda_attention,
                                          kl=self.attention_kl)
        if attn is not None:
            terms["attn"] = attn
        return terms

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label-smoothed CE on int64 labels; on Mixup / CutMix soft targets (smoothing already in them) plain CE,
        timm's SoftTargetCrossEntropy."""
        smoothing = self.cfg.method.label_smoothing if y.dim() == 1 else 0.0
        return F.cross_entropy(logits, y, label_smoothing=smoothing)

    # ---------------------------------------------------------------------------------------------- evaluate
    def evaluate_student(self) -> float:
        return accuracy(self.student, self.test_set, self.device, self.image_size, self.precision,
                        self.cfg.method.eval_batch_size)

    def evaluate_teachers(self) -> dict:
        out = {}
        for role in ROLES:
            size = self.teacher_sizes[role] or self.image_size
            acc = accuracy(self.teachers[role], self.test_set, self.device, size, self.precision,
                           self.cfg.method.eval_batch_size)
            counts = self.head_counts[role].tolist()
            out[role] = {**self.teacher_info[role], "test_acc": acc, "chosen_heads": counts}
        return out

    # -------------------------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> None:
        save_checkpoint(self.out.path, {
            "stage": self.stage, "position": self.position.state_dict(), "student": self.student.model.state_dict(),
            "teachers": {r: net.model.state_dict() for r, net in self.teachers.items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.precision.state_dict(),
            "history": self.history, "results": self.results, "head_counts": self.head_counts,
            "config": self.hash})

    def load_checkpoint(self, state: dict) -> None:
        self.student.model.load_state_dict(state["student"])
        for role, sd in state["teachers"].items():
            self.teachers[role].model.load_state_dict(sd)
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.position, self.history = Position.from_state(state["position"], self.device), state["history"]
        self.results, self.head_counts = state["results"], state["head_counts"]


def main(cfg: DictConfig) -> dict:
    recipe = KDMultiRecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    recipe.train()
    with recipe.profiler.phase("evaluate", images=2 * len(recipe.test_set)):
        teachers = recipe.evaluate_teachers()
    with recipe.profiler.phase("attention"):
        models = {"student_kd": recipe.student, **{f"teacher_{r}": net for r, net in recipe.teachers.items()}}
        distance = write_attention_report(recipe.out, models, recipe.test_set, cfg.method.attention, recipe.device)
    metrics = {"student": {"kd": recipe.results["kd"], "baseline": recipe.results["baseline"]}, "teachers": teachers,
               "train_images": len(recipe.train_set), "attention_distance": distance, "history": recipe.history}
    recipe.out.write_json("metrics.json", metrics)
    recipe.out.write_manifest(cfg, recipe.device, config_hash=recipe.hash, student=recipe.student.spec.to_dict(),
                              teachers={r: net.spec.to_dict() for r, net in recipe.teachers.items()})
    recipe.out.write_json("profile.json", recipe.profiler.report())
    rows = [[f"student {cfg.model} (KD)", metrics["student"]["kd"]], [f"student {cfg.model} (alone)",
                                                                        metrics["student"]["baseline"]]]
    rows += [[f"teacher {role}: {t['model']} ({t['weights']})", t["test_acc"]] for role, t in teachers.items()]
    console.print_results(f"kd_multi on {cfg.data.name} ({len(recipe.train_set)} labelled training images)",
                          ["model", "test acc"], rows, recipe.out.path)
    return metrics
