"""FADRM and FADRM+ (``+method=fadrm``): Fast and Accurate Data Residual Matching (Cui et al. 2025,
arXiv 2506.24125), with SRe2L and RDED-style baselines from the same code (``method.variant``).

Synthetic images are recovered from a frozen BN teacher, batch by batch (``method.batch_size`` classes of one
ipc index: published 100 at ImageNet-1k, all classes of a 10-class subset), minimising

    L = CE(teacher(A(x)), y) + r_bn * sum_l m_l (||var_l(A(x)) - running_var_l||_2 + ||mean_l - running_mean_l||_2)

with Adam(betas 0.5, 0.9) on the pixels, one cosine lr schedule over all stages, one random-resized-crop and
flip per iteration for the whole batch plus a random roll, pixels clipped after every step.
- MRO: the budget is split into stages of alternating resolution (``stage_sizes``).
- ARC: after every stage but the last, ``x <- a x + (1 - a) Resample(P_s, next size)`` with P_s the real
  patches the images started from; the last stage recovers without the residual.
- MPT (``method.mpt``): the recovery's forward under fp16 autocast with a GradScaler (CUDA; bf16 or fp32 on CPU,
  ``engine.precision.mpt_precision``); the CE, the BN statistics and their norms, the pixels and Adam's state stay
  fp32. Selection, relabelling and students keep ``precision`` (fp32 as published).
- FADRM+: several teachers, one per iteration in round-robin; relabelling averages their logits.
The set lives on disk, never whole in memory: every finished batch is written into ``distilled/<class>/<k>.png``
(each file atomic; with ``relabel=store`` its soft labels into ``labels/<batch>.safetensors``), and a batch's
starting patches are rebuilt from the few real images they were cropped from (the selection keeps only source
indices and crop windows). The set is judged by training students from scratch on it, read back from disk
through the data loader, with the teachers' soft labels, next to the same number of random real images per class
(``eval/student.py``).

Under torchrun the batches are divided among the ranks; every batch is seeded by its index alone, so K ranks
recover the same set as one process. ``method.parallel_batches`` recovers that many batches side by side in one
forward, each with its own statistics, CE and augmentation stream: the same set, a fuller GPU. Each rank writes and
checkpoints its own batches; when all are done the students train as DDP replicas on the set read back from disk,
and rank 0 writes the other artifacts.

Keys that matter: ``ipc``, ``method.batch_size``, ``method.teachers``, ``method.variant``, ``method.stage_sizes``,
``method.stage_iterations``, ``method.residual_alpha``, ``method.lr``, ``method.r_bn``.
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir, _safe, read_distilled, to_uint8
from fastdistill.data import build_dataset
from fastdistill.data.transforms import apply_windows, crop_windows, to_input
from fastdistill.engine import Precision, resolve_device, save_checkpoint, seed_everything
from fastdistill.engine.precision import channels_last_pays, mpt_precision
from fastdistill.engine import distributed as dist
from fastdistill.engine.checkpoint import load_checkpoint, load_shards
from fastdistill.engine.metric_log import MetricLog
from fastdistill.engine.schedules import cosine_schedule
from fastdistill.data.soft_labels import parse_format
from fastdistill.eval.ddranking import check_ddranking_config, ddranking_eval, print_result
from fastdistill.eval.student import (StudentConfig, check_student_config, store_soft_labels, teacher_logits,
                                      train_student)
from fastdistill.kernels.bn_stats import arc_update
from fastdistill.losses.bn_stats import recovery_loss
from fastdistill.models import Backbone
from fastdistill.models.taps import BNStatsTap
from fastdistill.models.timm_source import cifar_stem_kwargs
from fastdistill.profiling import Profiler
from fastdistill.recipes import get_recipe
from fastdistill.teachers import calibrate_bn, frozen_backbone

VARIANTS = ("fadrm", "sre2l", "rded")
DONE = "students_done.json"  # every finished student's test accuracy, by "student/set/seed"
DIFFICULTIES = ("easy", "medium")
STITCHINGS = ("consecutive", "strided")
SCORINGS = ("image", "patch")


def rank_candidates(ce: torch.Tensor, need: int, difficulty: str) -> torch.Tensor:
    """The ``need`` kept candidates of a class, in rank order, from their best crop's cross-entropy ``ce`` (n,).

    ``easy``: the lowest cross-entropy first (RDED, LINs-lab/RDED ``synthesize/utils.py`` ``selector``). ``medium``:
    the candidates around the median score, alternately one above and one below it, starting at index ceil(n / 2) of
    the candidates sorted hardest first (the 'medium' selection of VILA-Lab/DELT ``data_selection.py``, which FADRM's
    scripts name with ``--patch-diff medium``; the code that makes FADRM's patch files is not published)."""
    if difficulty == "easy":
        return ce.argsort(stable=True)[:need]
    hardest_first = ce.argsort(descending=True, stable=True)
    mid, picked, step = math.ceil(len(ce) / 2), [], 0
    while len(picked) < min(need, len(ce)):
        offset = (step + 1) // 2 * (1 if step % 2 else -1)  # 0, +1, -1, +2, -2, ...
        if 0 <= mid + offset < len(ce):
            picked.append(mid + offset)
        step += 1
    return hardest_first[torch.tensor(picked, dtype=torch.long)]


def patch_ranks(k: int, factor: int, ipc: int, stitching: str) -> list[int]:
    """The ranks of the ``factor x factor`` patches of a class's image ``k``, in row-major grid order: ``consecutive``
    ranks k f^2 .. k f^2 + f^2 - 1 (the best patches share the first image); ``strided`` rank r into image r mod ipc
    at grid cell r // ipc, as RDED's ``mix_images`` stitches (LINs-lab/RDED ``synthesize/utils.py``)."""
    if stitching == "strided":
        return [j * ipc + k for j in range(factor * factor)]
    return [k * factor * factor + j for j in range(factor * factor)]


def stage_size(size, image_size: tuple[int, int]) -> tuple[int, int]:
    """One MRO stage's (H, W): ``null`` the full ``image_size``; a float in (0, 1] that fraction of it (so a preset
    tuned at one resolution keeps its stage ratios at another); an int > 1 that many px, square (as published)."""
    if size is None:
        return tuple(image_size)
    if isinstance(size, float) and 0 < size <= 1:
        return tuple(max(1, round(size * n)) for n in image_size)
    if isinstance(size, int) and not isinstance(size, bool) and size > 1:
        return size, size
    raise ValueError(f"method.stage_sizes entry {size!r} must be null, a fraction of data.image_size in (0, 1] "
                     f"(a float: 1.0 is the full size) or a size in px > 1 (an int)")


def roll_size(roll, image_size: tuple[int, int]) -> int:
    """The recovery's largest random roll in px (both axes): an int >= 0 as is (published: 4 at 32 and 64 px, 32 at
    224 px); a float in (0, 1) that fraction of the image's shorter side (32 / 224 = 0.143 is 4 px at 28 px)."""
    if isinstance(roll, int) and not isinstance(roll, bool) and roll >= 0:
        return roll
    if isinstance(roll, float) and 0 < roll < 1:
        return round(roll * min(image_size))
    raise ValueError(f"method.roll must be a size in px >= 0 (an int) or a fraction of data.image_size's shorter "
                     f"side in (0, 1) (a float), got {roll!r}")


class FADRMRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        if m.variant not in VARIANTS:
            raise ValueError(f"unknown method.variant {m.variant!r}; expected one of {', '.join(VARIANTS)}")
        for key, choices in (("patch_difficulty", DIFFICULTIES), ("stitching", STITCHINGS),
                             ("candidate_scoring", SCORINGS)):
            if m[key] not in choices:
                raise ValueError(f"method.{key} must be one of {', '.join(choices)}, got {m[key]!r}")
        if m.init not in ("patches", "noise"):
            raise ValueError(f"method.init must be patches or noise, got {m.init!r}")
        if m.relabel not in ("online", "store"):
            raise ValueError(f"method.relabel must be online or store, got {m.relabel!r}")
        parse_format(m.get("label_format", "fp16"))
        self.ddranking = cfg.get("eval") is not None and cfg.eval.get("name") == "ddranking"
        if self.ddranking:
            check_ddranking_config(cfg.eval)
        if m.cifar_stem not in (True, False, "auto"):
            raise ValueError(f"method.cifar_stem must be auto, true or false, got {m.cifar_stem!r}")
        if not m.teachers:
            raise ValueError("method.teachers is empty; name at least one BN teacher, e.g. [timm:resnet18]")
        if isinstance(m.teacher_calibration, bool) or not isinstance(m.teacher_calibration, int) \
                or m.teacher_calibration < 0:
            raise ValueError(f"method.teacher_calibration must be an integer >= 0 (batches), got "
                             f"{m.teacher_calibration!r}")
        if not m.stage_sizes:
            raise ValueError("method.stage_sizes needs at least one stage")
        for size in m.stage_sizes:
            stage_size(size, (64, 64))  # one line for a stage that is neither px, a fraction nor null
        roll_size(m.roll, (64, 64))
        if not 0.0 <= m.residual_alpha <= 1.0:
            raise ValueError(f"method.residual_alpha must be in [0, 1], got {m.residual_alpha!r}")
        if m.patches_per_side < 1 or m.stage_iterations < 0:
            raise ValueError("method.patches_per_side must be >= 1 and method.stage_iterations >= 0")
        if not isinstance(m.log_every, int) or m.log_every < 1:
            raise ValueError(f"method.log_every must be an integer >= 1, got {m.log_every!r}")
        if isinstance(m.batch_size, bool) or not isinstance(m.batch_size, int) or m.batch_size < 1:
            raise ValueError(f"method.batch_size must be an integer >= 1 (images per recovery batch, published 100), "
                             f"got {m.batch_size!r}")
        if isinstance(m.parallel_batches, bool) or not isinstance(m.parallel_batches, int) or m.parallel_batches < 1:
            raise ValueError(f"method.parallel_batches must be an integer >= 1 (recovery batches side by side), got "
                             f"{m.parallel_batches!r}")
        weights = m.teacher_weights
        if not isinstance(weights, str) and len(weights) != len(m.teachers):
            raise ValueError(f"method.teacher_weights has {len(weights)} entries for {len(m.teachers)} teachers")
        self.cfg = cfg
        # the baselines are this method with parts switched off (one switch for the user)
        self.init = "noise" if m.variant == "sre2l" else m.init
        self.residual = m.variant == "fadrm"
        self.optimize = m.variant != "rded"
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        # MPT: the recovery's own precision (students, selection and relabelling keep cfg.precision, as published)
        self.mpt = mpt_precision(self.device) if m.mpt else self.precision.name
        if m.mpt and self.mpt != "fp16" and dist.is_main():
            console.note(f"method.mpt on {self.device.type}: fp16 autocast is published for CUDA and runs through slow "
                         f"kernels here; the recovery runs under {self.mpt} instead")
        check_student_config(self.student_config())  # before any recovery
        students = list(m.eval.students)
        if twice := sorted({s for s in students if students.count(s) > 1}):
            raise ValueError(f"method.eval.students names {', '.join(twice)} more than once; more runs of one student "
                             "are method.eval.seeds")
        self.out = RunDir(cfg.out)
        self.label_stats, self.ddranking_result, self.student_seeds = {}, None, {}  # filled by evaluate

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.profiler = Profiler(self.device)
        splits = build_dataset(cfg.data)
        self.train_set, self.test_set = splits["train"], splits["test"]
        self.classes = self.train_set.classes
        self.num_classes = len(self.classes)
        with self.profiler.phase("teachers"):
            teachers, self.teacher_cards = self._load_teachers()
        self.prepare_recovery(teachers, tuple(self.train_set.image_size), self.train_set.channels, self.num_classes)
        if self.init == "patches":
            self.check_candidates()
        if dist.is_main():
            console.note(f"{cfg.method.variant}: {self.n_images} images in {len(self.batches)} batches of up to "
                         f"{cfg.method.batch_size}, written to {self.out.path / 'distilled'}")
        if cfg.resume:
            self.load_checkpoint()
        else:
            with self.profiler.phase("init", images=self.n_images):
                self.selection = self.select_patches() if self.init == "patches" else None

    def prepare_recovery(self, teachers: list[Backbone], image_size: tuple[int, int], channels: int,
                         num_classes: int) -> None:
        """Teachers, BN taps, stage sizes and the (empty) synthetic set: all that :meth:`recover_batches` needs.
        ``setup`` calls it with the run's data; ``benchmarks/bench_fadrm.py`` with random-init teachers."""
        cfg, m = self.cfg, self.cfg.method
        self.image_size, self.channels, self.num_classes = tuple(image_size), channels, num_classes
        self.teachers = [t.to(self.device) for t in teachers]
        if channels_last_pays(self.device, Precision(self.mpt, self.device)):
            self.teachers = [t.to(memory_format=torch.channels_last) for t in self.teachers]
        self.taps = [BNStatsTap(t, m.first_bn_multiplier, backend=cfg.kernels) for t in self.teachers]
        # the pixels are optimised in the first teacher's normalised space, where lr 0.25 was published
        spec = self.teachers[0].spec
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        if channels == 1:
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
        self.mean = mean.view(1, -1, 1, 1).to(self.device)
        self.std = std.view(1, -1, 1, 1).to(self.device)
        self.lo, self.hi = (-self.mean / self.std).flatten(), ((1 - self.mean) / self.std).flatten()
        self.sizes = [stage_size(s, self.image_size) for s in m.stage_sizes]
        self.roll = roll_size(m.roll, self.image_size)
        if m.variant == "sre2l":  # SRe2L: one resolution
            self.sizes = [self.image_size] * len(self.sizes)
        self.n_images = num_classes * cfg.ipc
        self.labels = torch.arange(num_classes).repeat_interleave(cfg.ipc)  # of the class-major set
        # a batch is (ipc index k, a run of at most batch_size classes); ipc-index-major as published
        per = min(m.batch_size, num_classes)
        self.batches = [(k, range(c, min(c + per, num_classes))) for k in range(cfg.ipc)
                        for c in range(0, num_classes, per)]
        self.selection = None  # per class: the source images and crop windows of its patches
        self.done: set[int] = set()  # recovered batches (of any rank, after a resume)
        self.history = {}  # batch -> recovery loss at its start and end
        # the recovery's wall time spent by the processes before a resume, and when this process's began
        self.recover_before, self.recover_start = 0.0, None
        self.inner = None  # state of the batch in progress (for mid-batch resume)

    def _load_teachers(self) -> tuple[list[Backbone], list[dict]]:
        """Frozen teachers: trained on this data by the teacher recipe (cached), from the hub, or files.
        The teacher's class order must be the dataset's: mismatched indices are the most reported reason
        published numbers fail to reproduce."""
        m = self.cfg.method
        weights = [m.teacher_weights] * len(m.teachers) if isinstance(m.teacher_weights, str) else list(m.teacher_weights)
        size = tuple(self.train_set.image_size)
        loaded = [frozen_backbone(name, w, self.cfg, m.teacher_preset, self.classes, train=get_recipe("teacher").main,
                                  model_kwargs=self.stem_kwargs(name, size, w), num_classes=self.num_classes)
                  for name, w in zip(m.teachers, weights)]
        if m.teacher_calibration:  # benchmarks: random weights, BN statistics measured on real batches
            for k, (net, card) in enumerate(loaded):
                calibrate_bn(net.to(self.device), self.train_set, int(m.teacher_calibration),
                             min(64, len(self.train_set)), tuple(self.train_set.image_size), self.device,
                             self.cfg.seed + k)
                card["bn_calibration_batches"] = int(m.teacher_calibration)
        return [net for net, _ in loaded], [card for _, card in loaded]

    def stem_kwargs(self, arch: str, image_size: tuple[int, int], weights: str = "none") -> dict:
        """The small-image kwargs of ``arch`` (:func:`~fastdistill.models.timm_source.cifar_stem_kwargs`) where
        ``method.cifar_stem`` gives it the CIFAR stem, else ``{}``. ``auto``:
        ResNets and RegNets at images of at most 64 px, as the published pipelines pick their ResNets
        (Jiacheng8/FADRM ``validate/train_fkd.py``), except teachers with hub weights (ImageNet stems); ``true``:
        every ResNet and RegNet; other families keep their stems."""
        mode = self.cfg.method.cifar_stem
        on = mode is True or (mode == "auto" and max(image_size) <= 64 and weights in ("trained", "none"))
        return cifar_stem_kwargs(arch) if on else {}

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def batch_patches(self, b: int) -> torch.Tensor:
        """P_s of batch ``b``: its selected real patches (rebuilt from their source images), or Gaussian noise
        for SRe2L (N(0, 1) in normalised space, one generator per image); pixels (n, C, H, W) on the device."""
        k, classes = self.batches[b]
        if self.init == "noise":
            z = torch.stack([torch.randn(self.channels, *self.image_size, generator=torch.Generator().manual_seed(
                self.cfg.seed * 1_000_003 + 104_729 * (c * self.cfg.ipc + k + 1))) for c in classes])
            return (z.to(self.device) * self.std + self.mean).clamp(0, 1)
        return torch.cat([self.class_patches(c, [k]) for c in classes])

    def class_patches(self, c: int, ks: list[int]) -> torch.Tensor:
        """The patches of class ``c`` for ipc indices ``ks`` from their recorded sources and crop windows, stitched
        ``factor x factor`` per image in the order of ``method.stitching`` (:func:`patch_ranks`)."""
        m, f = self.cfg.method, self.cfg.method.patches_per_side
        h, w = self.image_size
        rows = torch.tensor([r for k in ks for r in patch_ranks(k, f, self.cfg.ipc, m.stitching)])
        sel = self.selection[c]
        real = to_input(self.train_set.take(sel["sources"][rows]).to(self.device), self.image_size, self.channels)
        best = self.patch_pixels(real, sel["theta"][rows])
        if f > 1:
            ph, pw = best.shape[-2:]
            n = len(ks)
            best = best.view(n, f, f, self.channels, ph, pw).permute(0, 3, 1, 4, 2, 5)  # row-major grid
            best = F.interpolate(best.reshape(n, self.channels, f * ph, f * pw), size=(h, w),
                                 mode="bilinear", align_corners=False)
        return best

    def patch_pixels(self, real: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The windows ``theta`` of the [0, 1] images ``real`` as patches: at the full size, then (factor > 1)
        downsampled with antialiasing to the patch size (image // factor), as RDED's crop resizes straight to it."""
        f, (h, w) = self.cfg.method.patches_per_side, self.image_size
        crops = apply_windows(real, theta, (h, w))
        if f == 1:
            return crops
        return F.interpolate(crops, size=(h // f, w // f), mode="bilinear", antialias=True, align_corners=False)

    def scored_pixels(self, real: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """What the teachers score for each candidate crop: the crop at the full size (``candidate_scoring:
        image``), or its patch (:meth:`patch_pixels`) centred on the full size with the normalisation mean around
        it (``patch``: RDED pads the normalised patch with zeros, LINs-lab/RDED ``synthesize/utils.py``)."""
        if self.cfg.method.candidate_scoring == "image":
            return apply_windows(real, theta, self.image_size)
        patch = self.patch_pixels(real, theta)
        (h, w), (ph, pw) = self.image_size, patch.shape[-2:]
        top, left = (h - ph) // 2, (w - pw) // 2
        return F.pad(patch - self.mean, (left, w - pw - left, top, h - ph - top)) + self.mean

    def check_candidates(self) -> None:
        """One line, before any work, when a class has fewer candidate images than its patches need."""
        m = self.cfg.method
        need = self.cfg.ipc * m.patches_per_side ** 2
        counts = torch.bincount(self.train_set.labels, minlength=self.num_classes).clamp(max=m.candidates_per_class)
        if int(counts.min()) < need:
            c = int(counts.argmin())
            raise ValueError(f"class {self.classes[c]!r}: {int(counts[c])} candidate images for {need} patches "
                             f"(ipc x patches_per_side^2); raise method.candidates_per_class or lower ipc")

    @torch.no_grad()
    def select_patches(self) -> list[dict]:
        """RDED-style selection (Sun et al. 2024): for every class, ``crops_per_image`` random-resized crops of
        each of ``candidates_per_class`` real images are scored by the teachers' cross-entropy
        (``candidate_scoring``: the crop at full size, or as RDED, resized to its patch size and padded); each image
        keeps its best crop (lowest CE), ``ipc * factor^2`` images are kept by ``patch_difficulty`` (the easiest,
        or those around the median) and stitched ``factor x factor`` per synthetic image in the order of
        ``stitching``. One crop per source image keeps the set diverse: ranking all crops together fills it with
        near-copies of the few easiest images. The published FADRM ships these images pre-made (``--patch-diff
        medium``); this selection follows RDED's code with DELT's 'medium' ranking.

        Only the candidates of one class are decoded at a time, and a class's result is kept as source indices
        and crop windows (a few numbers per patch), from which :meth:`class_patches` rebuilds the pixels batch by
        batch. The draws come from one generator walked through the classes in order; every class's starting
        state is found first by replaying the draws alone (no decoding), so the classes can be scored in any
        order and split among ranks. Returns one ``{"sources": int64 (n,), "theta": (n, 2, 3)}`` per class."""
        m, ipc = self.cfg.method, self.cfg.ipc
        need = ipc * m.patches_per_side ** 2
        g = torch.Generator().manual_seed(self.cfg.seed)
        plan = []  # per class: (candidate indices, generator state before its crops)
        for c in range(self.num_classes):
            idx = self.train_set.class_index(c)
            idx = idx[torch.randperm(idx.numel(), generator=g)[:m.candidates_per_class]]
            plan.append((idx, g.get_state()))
            for _ in range(m.crops_per_image):
                crop_windows(idx.numel(), self.image_size, tuple(m.candidate_scale), tuple(m.candidate_ratio), g)
        mine = {}
        with console.progress(self.cfg.progress) as bar:
            todo = list(dist.shard(self.num_classes))
            task = bar.add_task("select patches", total=len(todo), info="")
            for c in todo:
                mine[c] = self.select_class(c, *plan[c], need)
                bar.update(task, advance=1)
        if dist.world_size() > 1:
            for part in dist.all_gather_object(mine):
                mine.update(part)
        return [mine[c] for c in range(self.num_classes)]

    def select_class(self, c: int, idx: torch.Tensor, state: torch.Tensor, need: int) -> dict:
        m = self.cfg.method
        g = torch.Generator().manual_seed(0)
        g.set_state(state)
        real = to_input(self.train_set.take(idx).to(self.device), self.image_size, self.channels)
        thetas = torch.stack([crop_windows(idx.numel(), self.image_size, tuple(m.candidate_scale),
                                           tuple(m.candidate_ratio), g)
                              for _ in range(m.crops_per_image)], 1)  # (images, crops, 2, 3)
        n, per = idx.numel(), m.crops_per_image
        flat = thetas.flatten(0, 1)  # row i * per + j: crop j of candidate i
        ce = []
        for start in range(0, n * per, 256):  # 256 crops alive at a time, not all of the class's
            rows = torch.arange(start, min(start + 256, n * per))
            crops = self.scored_pixels(real[rows // per], flat[rows])
            logits = teacher_logits(self.teachers, crops, self.precision)
            ce.append(F.cross_entropy(logits, torch.full((len(rows),), c, device=self.device), reduction="none"))
        ce, best_crop = torch.cat(ce).view(n, per).min(1)
        keep = rank_candidates(ce.cpu(), need, m.patch_difficulty)
        return {"sources": idx[keep], "theta": thetas[keep, best_crop.cpu()[keep]]}

    # ------------------------------------------------------------------ recovery
    def batch_index(self, b: int) -> torch.Tensor:
        """Positions of batch ``b``'s images in the class-major set (class c, ipc index k: c * ipc + k)."""
        k, classes = self.batches[b]
        return torch.tensor([c * self.cfg.ipc + k for c in classes])

    def train(self) -> None:
        m = self.cfg.method
        mine = list(dist.shard(len(self.batches)))
        per_batch = len(self.sizes) * m.stage_iterations if self.optimize else 1
        phase = "recover" if self.optimize else "write"
        # batches recovered before the kill stay logged, the rest is redone; with all done, the students' records
        # after them stay too
        if self.optimize and self.cfg.resume and set(mine) - self.done:
            finished = [b for b in mine if b in self.done]
            self.out.rewind("recover", (max(finished) + 1) * per_batch if finished else 0)
        self.recover_start = time.perf_counter()
        with console.progress(self.cfg.progress) as bar, self.profiler.phase(phase, images=self.n_images):
            task = bar.add_task(f"{m.variant} ipc {self.cfg.ipc}", total=len(mine) * per_batch,
                                completed=len(self.done.intersection(mine)) * per_batch, info="")
            for group in self.recovery_groups(mine):
                patches, generators = [], []
                for b in group:
                    # seeded by the batch alone: the set does not depend on the number of ranks, the order or the
                    # grouping (the noise init of SRe2L draws from the global stream, the recovery from the batch's)
                    seed_everything(self.batch_seed(b))
                    patches.append(self.batch_patches(b))
                    generators.append(torch.Generator().manual_seed(self.batch_seed(b)))
                if self.optimize:
                    images = self.recover_batches(group, torch.cat(patches), generators, bar, task)
                else:
                    images = torch.cat(patches).cpu()
                    bar.update(task, advance=len(group))
                for b, part in zip(group, images.split([len(p) for p in patches])):
                    self.write_batch(b, part)
                    self.done.add(b)
                self.inner = None
                self.save_checkpoint()
        dist.barrier()  # every rank's batches are on disk before anyone reads the set
        if dist.world_size() > 1:
            for h in dist.all_gather_object(self.history):
                self.history.update(h)

    def batch_seed(self, b: int) -> int:
        return self.cfg.seed * 1_000_003 + 7919 * (b + 1)

    def recovery_groups(self, mine: list[int]) -> list[list[int]]:
        """This rank's unfinished batches in groups of up to ``method.parallel_batches`` consecutive batches of one
        size (recovered side by side in one forward); a group cut off mid-recovery first, as it was."""
        todo, groups, size = [b for b in mine if b not in self.done], [], lambda b: len(self.batches[b][1])
        if self.inner is not None:
            groups.append(list(self.inner["batches"]))
            todo = [b for b in todo if b not in groups[0]]
        fresh = len(groups)  # groups from here on may grow
        for b in todo:
            if len(groups) > fresh and len(groups[-1]) < self.cfg.method.parallel_batches and \
                    size(groups[-1][-1]) == size(b):
                groups[-1].append(b)
            else:
                groups.append([b])
        return groups

    def write_batch(self, b: int, images: torch.Tensor) -> None:
        """Batch ``b``'s [0, 1] images as ``distilled/<class>/<k>.png`` and, with ``relabel=store``, the teachers'
        fp16 logits on the saved pixels as ``labels/<b>.safetensors``. Written by the rank that owns the batch."""
        k, classes = self.batches[b]
        labels = torch.tensor(list(classes))
        self.out.write_images(images, labels, [k] * len(labels), self.classes)
        if self.cfg.method.relabel == "store":
            from safetensors.torch import save_file

            from fastdistill.artifacts import atomic_path

            x = to_uint8(images).float().div(255).to(self.device)
            logits = teacher_logits(self.teachers, x, self.precision)
            with atomic_path(self.out / "labels" / f"{b:05d}.safetensors") as tmp:
                save_file({"logits": logits.half().cpu().contiguous(), "labels": labels,
                           "index": self.batch_index(b)}, str(tmp), metadata={"classes": json.dumps(self.classes)})

    def recover_batches(self, group: list[int], patches: torch.Tensor, generators: list[torch.Generator], bar,
                        task) -> torch.Tensor:
        """Recover the batches of ``group`` side by side from their starting patches ([0, 1] (n, C, H, W), the
        batches' images one after another, all of one size) through every stage; returns pixels at full size on the
        CPU. Each batch keeps its BN statistics, CE mean, augmentation draws (from its ``generators`` entry) and loss
        curve, and Adam is elementwise: the images are those of the batches recovered one at a time. The one thing
        they share is the GradScaler of fp16 MPT (a step skipped on an overflow is skipped for the group)."""
        m = self.cfg.method
        iters = m.stage_iterations
        lr = cosine_schedule(m.lr, 0.0, len(self.sizes) * iters)  # one schedule over all stages, no warm-up
        y = torch.cat([self.labels[self.batch_index(b)] for b in group]).to(self.device)
        patches = patches.to(self.device)
        patches_norm = (patches - self.mean) / self.std
        if self.inner is not None:  # resumed mid-batch
            stage0, it0 = self.inner["stage"], self.inner["iteration"]
            x = self.inner["x"].to(self.device)
            done_losses = self.inner["losses"]
            for g, state in zip(generators, self.inner["generators"]):
                g.set_state(state)
        else:
            stage0, it0 = 0, 0
            x = F.interpolate(patches_norm, size=self.sizes[0], mode="bilinear", align_corners=False)
            done_losses = torch.empty(0, len(group))
        every = self.cfg.checkpoint_every
        # a GradScaler per group (fp16 MPT): its scale, like the batch's seed, depends on the group alone
        precision = Precision(self.mpt, self.device)
        if self.inner is not None:
            precision.load_state_dict(self.inner.get("scaler"))
        losses = []  # (G,) per iteration, kept on the device; read once per group (and at a mid-batch checkpoint)
        for s in range(stage0, len(self.sizes)):
            x = x.detach().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=m.lr, betas=tuple(m.betas))  # re-created at every stage (published)
            if self.inner is not None and s == stage0:
                opt.load_state_dict(self.inner["optimizer"])
                self.inner = None
            for it in range(it0 if s == stage0 else 0, iters):
                step = s * iters + it
                for param_group in opt.param_groups:
                    param_group["lr"] = float(lr[step])
                loss = self.recovery_loss(x, y, step, precision, generators)
                opt.zero_grad(set_to_none=True)
                precision.backward(loss.sum())  # the batches' losses: each image's gradient is its batch's
                precision.step(opt)
                losses.append(loss.detach())
                with torch.no_grad():  # pixels stay in the valid range
                    x.data = torch.maximum(torch.minimum(x, self.hi.view(1, -1, 1, 1)), self.lo.view(1, -1, 1, 1))
                bar.update(task, advance=len(group))
                if every and (step + 1) % every == 0 and it + 1 < iters:
                    self.inner = {"batches": list(group), "stage": s, "iteration": it + 1, "x": x.detach().cpu(),
                                  "optimizer": opt.state_dict(), "scaler": precision.state_dict(),
                                  "losses": torch.cat([done_losses, torch.stack(losses).cpu()]),
                                  "generators": [g.get_state() for g in generators]}
                    self.save_checkpoint()
                    self.inner = None
            if s == len(self.sizes) - 1:
                break
            nxt = self.sizes[s + 1]
            with torch.no_grad():
                x = F.interpolate(x.detach(), size=nxt, mode="bilinear", align_corners=False) \
                    if tuple(x.shape[-2:]) != nxt else x.detach()
                if self.residual:  # ARC, fused with the clip to the valid range
                    p = F.interpolate(patches_norm, size=nxt, mode="bilinear", align_corners=False)
                    x = arc_update(x.contiguous(), p.contiguous(), m.residual_alpha, self.lo, self.hi,
                                   backend=self.cfg.kernels)
        if losses:
            curves = torch.cat([done_losses, torch.stack(losses).cpu()])  # (iterations, G)
            k = max(1, min(5, len(curves) // 4))
            for b, curve in zip(group, curves.unbind(1)):
                self.history[b] = {"batch": b, "loss_first": curve[:k].mean().item(),
                                   "loss_last": curve[-k:].mean().item()}
                self.log_curve(b, curve)
        with torch.no_grad():
            x = x.detach()
            if tuple(x.shape[-2:]) != tuple(self.image_size):
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
            return (x * self.std + self.mean).clamp(0, 1).cpu()

    def log_curve(self, b: int, curve: torch.Tensor) -> None:
        """Batch ``b``'s recovery loss into the metric history: the mean of every ``log_every`` iterations, at the
        run's iteration count (batch ``b`` covers iterations ``b * n + 1`` to ``(b + 1) * n``)."""
        every, n = self.cfg.method.log_every, len(curve)
        for start in range(0, n, every):
            window = curve[start:start + every]
            self.out.log("recover", b * n + start + len(window), loss=window.mean().item(), batch=b,
                         resolution=self.sizes[min((start + len(window) - 1) // self.cfg.method.stage_iterations,
                                                   len(self.sizes) - 1)][0])

    def recovery_loss(self, x: torch.Tensor, y: torch.Tensor, step: int, precision: Precision,
                      generators: list[torch.Generator]) -> torch.Tensor:
        """CE + r_bn * BN-statistics loss of one teacher (round-robin) on one augmentation of each batch of the
        group (one ``generators`` entry per batch, equal consecutive slices of ``x``), a (G,) tensor; the forward
        under ``precision``'s autocast (MPT: fp16), CE and statistics in fp32."""
        m = self.cfg.method
        k = step % len(self.teachers)
        n, size = x.shape[0] // len(generators), tuple(x.shape[-2:])
        # one crop window, flip and roll per batch, drawn in the published order from the batch's own stream
        theta = torch.cat([crop_windows(1, size, tuple(m.crop_scale), generator=g).expand(n, 2, 3)
                           for g in generators])
        parts = apply_windows(x, theta, size).split(n)
        augmented = []
        for a, g in zip(parts, generators):
            if self.cfg.data.get("hflip", True) and torch.rand((), generator=g) < 0.5:
                a = a.flip(-1)
            if self.roll:
                dx, dy = torch.randint(0, self.roll + 1, (2,), generator=g).tolist()
                a = torch.roll(a, shifts=(dx, dy), dims=(2, 3))
            augmented.append(a)
        pixels = torch.cat(augmented) * self.std + self.mean
        with precision.autocast(), self.taps[k].collect(len(generators)):
            logits = self.teachers[k](pixels)
        bn = self.taps[k].loss()
        loss = recovery_loss(logits, y, bn, m.r_bn, groups=len(generators)).reshape(len(generators))
        if not torch.isfinite(loss).all():  # a sync, but recovery with a NaN is wasted work
            raise FloatingPointError(f"non-finite recovery loss at step {step}: ce {(loss - m.r_bn * bn).tolist()}, "
                                     f"bn {bn.reshape(-1).tolist()}")
        return loss

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        cfg, e = self.cfg, self.cfg.method.eval
        self.label_stats, self.ddranking_result, self.student_seeds = {}, None, {}
        if self.ddranking:  # eval=ddranking replaces the students table
            distilled = read_distilled(self.out.path, self.classes, self.channels)
            with self.profiler.phase("evaluate"):
                self.ddranking_result = ddranking_eval(
                    distilled, self.train_set, self.test_set, self.teachers, self.image_size, cfg.eval, cfg.seed,
                    bool(cfg.data.get("hflip", True)), self.device, self.precision, cfg.num_workers, cfg.progress)
            return {}
        scfg = self.student_config()
        # the set as saved, read back from disk through the loader (what +method=evaluate and users see)
        synthetic = read_distilled(self.out.path, self.classes, self.channels)
        # every training of the table in its order: (key, student, set, seed, images), the key "student/set/seed"
        # that students_done.json records; the same seed on both sets is the same initial student and crops
        trainings = []
        for i, arch in enumerate(e.students):
            for k in range(int(e.get("seeds", 1))):
                sets = {"synthetic": synthetic}
                if e.real_random:  # a new random draw per seed: its spread is part of the baseline's
                    g = torch.Generator().manual_seed(cfg.seed + k)
                    sets["real_random"] = self.train_set.subset(self.train_set.per_class(cfg.ipc, g))
                seed = cfg.seed + 1000 * i + k
                trainings += [(f"{arch}/{name}/{seed}", arch, name, seed, images) for name, images in sets.items()]
        # every finished student's accuracy, written as it ends: a resumed run trains only the ones still missing
        # (rank 0's reading, so that every rank agrees on them; a fresh run first drops an earlier run's)
        if not cfg.resume and dist.is_main():
            for f in (self.out.path / "ranks").glob(f"*/{DONE}"):
                f.unlink()
        finished = dist.all_gather_object(self.students_done() if cfg.resume else {})[0]
        with self.profiler.phase("evaluate"):
            if self.students_per_rank(scfg):
                self.train_students_per_rank(trainings, finished, scfg)
            else:  # one student at a time, every rank a DDP replica of it
                for key, *training in [t for t in trainings if t[0] not in finished]:
                    finished[key] = self.train_one(*training, scfg, self.out, cfg.progress)
                    self.out.write_json(DONE, finished)
        students = {}
        for arch in e.students:
            runs: dict[str, list[float]] = {}
            for key, a, name, _, _ in trainings:
                if a == arch:
                    runs.setdefault(name, []).append(finished[key])
            students[arch] = {name: statistics.mean(accs) for name, accs in runs.items()}
            self.student_seeds[arch] = {name: {"per_seed": accs, "std": statistics.pstdev(accs)}
                                        for name, accs in runs.items()}
        with contextlib.suppress(OSError):  # the students' checkpoint folders, each removed as its student ended
            (self.out.path / "students").rmdir()
        return students

    def students_per_rank(self, scfg: StudentConfig) -> bool:
        """Whole students per rank, side by side, instead of each student a DDP replica over all ranks: where the
        ranks outnumber the micro-batches of the published batch (16 as 2 x 8), DDP would give BatchNorm fewer
        images than the published training; one student per rank trains exactly as one process does. Stored labels
        keep DDP: rank 0 writes one student's labels for all ranks."""
        return dist.world_size() > scfg.accumulation_steps and self.cfg.method.relabel == "online"

    def train_one(self, arch: str, name: str, seed: int, images, scfg: StudentConfig, out: RunDir,
                  progress: bool) -> float:
        """One student trained on ``images`` (its checkpoints in its own folder); its test accuracy."""
        cfg = self.cfg
        stored = self.store_labels(arch, name, images, scfg, seed) if cfg.method.relabel == "store" else None
        r = train_student(arch, images, self.teachers, self.test_set, self.image_size, scfg, self.device,
                          self.precision, seed=seed, model_kwargs=self.stem_kwargs(arch, self.image_size),
                          num_workers=cfg.num_workers, progress=progress, description=f"student {arch} on {name}",
                          stored_labels=stored, out=out, phase=f"student/{arch}/{name}/{seed}",
                          checkpoint=self.out.path / "students" / f"{_safe(arch)}_{name}_{seed}",
                          checkpoint_every=cfg.checkpoint_every, resume=cfg.resume)
        return r["test_acc"]

    def students_done(self) -> dict[str, float]:
        """The finished students of earlier attempts: rank 0's file and those of the ranks that trained students
        of their own (``ranks/<rank>/``)."""
        done = {}
        for f in [self.out.path / DONE, *sorted((self.out.path / "ranks").glob(f"*/{DONE}"))]:
            if f.is_file():
                done.update(json.loads(f.read_text()))
        return done

    def train_students_per_rank(self, trainings: list, finished: dict[str, float], scfg: StudentConfig) -> None:
        """Rank r trains training k for every k = r mod world not yet ``finished`` (so a resume with as many ranks
        continues each student on the rank that began it), each student alone as one process would; rank 0 logs
        into the run's history, rank r > 0 into ``ranks/<r>/metrics.jsonl``. Each rank records its finished
        students as they end (a killed run loses none); a rank done early waits for the others' records on disk,
        not in a collective, which would time out while another rank trains a student for hours."""
        r, world = dist.rank(), dist.world_size()
        keys = [t[0] for t in trainings]
        here = [t for k, t in enumerate(trainings) if k % world == r and t[0] not in finished]
        if dist.is_main():
            console.note(f"{sum(k not in finished for k in keys)} students over {world} processes, each trained whole "
                         f"by one of them (DDP over {world} would give BatchNorm micro-batches below the published "
                         f"{scfg.batch_size} / {scfg.accumulation_steps})")
        mine = dict(finished)
        with dist.alone(speaks=r == 0):
            out = self.out
            if r and here:
                out = RunDir(self.out.path / "ranks" / str(r))
                out.history = MetricLog(out.path, resume=bool(self.cfg.resume))
            for key, *training in here:
                mine[key] = self.train_one(*training, scfg, out, self.cfg.progress and r == 0)
                out.write_json(DONE, mine)
            if out is not self.out:
                out.history.close()
        finished.update(self.students_done())
        while any(k not in finished for k in keys):
            time.sleep(5)
            finished.update(self.students_done())
        self.out.write_json(DONE, finished)
        dist.barrier()  # every rank has read every record before rank 0's file is the only one a resume needs

    def student_config(self) -> StudentConfig:
        """The students' training (``method.eval``) as :func:`~fastdistill.eval.student.train_student` takes it."""
        return StudentConfig.from_eval(self.cfg.method.eval, hflip=bool(self.cfg.data.get("hflip", True)))

    def store_labels(self, arch: str, name: str, images, scfg: StudentConfig, seed: int):
        """relabel=store: the teachers' labels of every crop the student will see, in ``method.label_format``,
        under ``soft_labels/<student>/<set>/`` (written by rank 0); returns the folder."""
        fmt = self.cfg.method.get("label_format", "fp16")
        folder = self.out / "soft_labels" / _safe(arch) / name
        if dist.is_main():
            with self.profiler.phase("relabel"):
                stats = store_soft_labels(folder, images, self.teachers, self.image_size, scfg, self.device,
                                          self.precision, seed, fmt, num_workers=self.cfg.num_workers,
                                          reuse=self.cfg.resume)
            self.label_stats.setdefault(arch, {})[name] = stats
        dist.barrier()
        return folder

    # ------------------------------------------------------------------ checkpoint and artifacts
    def save_checkpoint(self) -> None:
        """This rank's file: its finished batches (their pixels are on disk), the batch in progress and the patch
        selection (source indices and crop windows: a few numbers per patch)."""
        spent = self.recover_before + (time.perf_counter() - self.recover_start if self.recover_start else 0.0)
        save_checkpoint(self.out.path, {"selection": self.selection, "done": sorted(self.done), "inner": self.inner,
                                        "history": self.history, "recover_seconds": spent,
                                        "config": OmegaConf.to_container(self.cfg.method, resolve=True)}, sharded=True)

    def load_checkpoint(self) -> None:
        """Every rank's file, written by any number of processes: their finished batches are kept (on disk); this
        rank continues its batch in progress (with its RNG state) when that batch is still its own."""
        config = OmegaConf.to_container(self.cfg.method, resolve=True)
        shards = load_shards(self.out.path)
        if not shards:
            raise FileNotFoundError(f"resume=true but '{self.out.path}' has no checkpoint.pt; pass the out= of the run")
        if any(state.get("config") != config for state in shards):
            raise ValueError(f"the checkpoint in '{self.out.path}' was made with another config; resume with the "
                             "same overrides")
        self.selection = shards[0]["selection"]
        for state in shards:
            self.done.update(state["done"])
            self.history.update(state["history"])
        self.recover_before = max(state.get("recover_seconds", 0.0) for state in shards)  # the ranks ran side by side
        own = load_checkpoint(self.out.path, sharded=True)  # restores this rank's RNG
        inner = own["inner"] if own else None
        mine = dist.shard(len(self.batches))
        if inner is not None and all(b in mine and b not in self.done for b in inner["batches"]):
            self.inner = inner

    def save(self, students: dict) -> dict:
        cfg = self.cfg
        if dist.is_main():  # the preview: at most 100 classes x 10 images, read back from disk
            distilled = read_distilled(self.out.path, self.classes, self.channels)
            show = torch.cat([distilled.class_index(c)[:10] for c in range(min(self.num_classes, 100))])
            self.out.save_preview(distilled.take(show).float().div(255),
                                  nrow=min(cfg.ipc, 10) if cfg.ipc > 1 else min(self.num_classes, 100))
        recover_s = self.profiler.seconds.get("recover", 0.0) + self.recover_before  # a resumed run: all of it
        metrics = {"students": students, "ipc": cfg.ipc, "variant": cfg.method.variant,
                   "teachers": list(cfg.method.teachers),
                   "recovery": [self.history[b] for b in sorted(self.history)],
                   "seconds_per_image": recover_s / self.n_images if recover_s else 0.0}
        # stored soft labels: bytes per distilled image (all crops of all epochs), first student's synthetic set
        synthetic = [r["synthetic"] for r in self.label_stats.values() if "synthetic" in r]
        metrics["label_format"] = cfg.method.get("label_format", "fp16") if cfg.method.relabel == "store" else "online"
        metrics["label_bytes_per_image"] = synthetic[0]["bytes_per_image"] if synthetic else 0.0
        if self.label_stats:
            metrics["stored_labels"] = self.label_stats
        if any(len(r["per_seed"]) > 1 for runs in self.student_seeds.values() for r in runs.values()):
            metrics["student_seeds"] = self.student_seeds  # students: the means; here every seed and the std
        if self.ddranking_result is not None:
            metrics["ddranking"] = self.ddranking_result
        self.out.write_json("metrics.json", metrics)
        split = {"validation_split": self.ddranking_result["validation"]} if self.ddranking_result else {}
        self.out.write_manifest(cfg, self.device, teachers=self.teacher_cards, classes=self.classes,
                                variant=cfg.method.variant, precision=self.precision.name, **split)
        self.out.write_json("profile.json", self.profiler.report())
        return metrics

    def cleanup(self) -> None:
        for tap in self.taps:
            tap.remove()


def main(cfg: DictConfig) -> dict:
    recipe = FADRMRecipe(cfg)
    recipe.out.write_config(cfg)
    recipe.setup()
    recipe.train()
    students = recipe.evaluate()
    metrics = recipe.save(students)
    recipe.cleanup()
    if recipe.ddranking_result is not None:
        print_result(recipe.ddranking_result, f"{cfg.method.variant} ipc {cfg.ipc} on {cfg.data.name}", recipe.out.path)
        return metrics
    spread = metrics.get("student_seeds", {})

    def cell(arch, name):
        if name not in students[arch]:
            return float("nan")
        return f"{students[arch][name]:.4f} ± {spread[arch][name]['std']:.4f}" if spread else students[arch][name]
    rows = [[arch, cell(arch, "synthetic"), cell(arch, "real_random")] for arch in students]
    console.print_results(f"{cfg.method.variant} ipc {cfg.ipc} on {cfg.data.name}: student test accuracy",
                          ["student", cfg.method.variant, "random real"], rows, recipe.out.path)
    return metrics
