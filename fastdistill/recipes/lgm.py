"""Linear Gradient Matching (``+method=lgm``): dataset distillation for frozen pre-trained backbones
(Cazenavette et al., "Dataset Distillation for Pre-Trained Self-Supervised Vision Models", NeurIPS 2025: one
backbone per distillation), with the multi-backbone setting of a later study that builds on it (several frozen
backbones of different objectives matched at once; ``preset=paper`` is the single-backbone paper's setting).

Every step draws a fresh random linear head per backbone m (W ~ N(0, 0.01^2), b = 0) and compares the gradient
of its cross-entropy on a real batch with the one on the augmented synthetic set:

    G = (P - Y)^T F / N,  g_b = mean_n (P - Y),  P = softmax(F W^T + b)     (closed form, no double backward)
    L = sum_m w_m (1 - cos(vec(G_syn^m, g_b,syn^m), vec(G_real^m, g_b,real^m)))

backpropagated into the synthetic parameters only (backbones frozen, heads never trained), with Adam.
- Synthetic set: ``ipc`` images per class, parametrised as a ``pyramid`` (levels of doubling resolution from
  1x1, one added every ``pyramid_every`` steps, decoded as the sum of bilinear upsamples -> fixed colour
  decorrelation -> sigmoid(2 z); Adam's state is reset at every new level, as published) or plain ``pixels``
  (sigmoid(2 z) of a full-resolution tensor); initialised from noise or from random real images.
- Augmentation, drawn independently per sample and the same for both sides: random-resized-crop (affine_grid /
  grid_sample, differentiable), flip where the data allows it, additive Gaussian noise with probability p;
  ``augs_per_batch`` augmented copies of the synthetic set per step against ``ipc * augs * classes`` real images
  drawn without replacement (shuffled passes over the training set), whose forward runs without autograd.
- The loss is ``kernels/grad_cosine.py`` (Triton on CUDA, the closed-form PyTorch reference elsewhere), in both
  steps: the two-pass step's head sums and feature gradients run on the same kernels.
- Memory: the one-pass step keeps every synthetic view's activations for one backward (linear in augs_per_batch);
  with ``method.chunk_size`` the two-pass step computes features, loss and dL/dF chunk by chunk without a graph,
  then backpropagates chunk by chunk on the same views (stored draws): the same gradient, memory flat in augs.
- Under ``torchrun`` each rank takes its slice of the views and of the real batch; the head-gradient sums and
  dL/d(images) are all-reduced, so every rank takes the same step (replicas checked every replica_check_every).
The set is judged by a linear probe on an evaluator backbone NOT used here (``eval/linear_probe.py``).

Keys that matter: ``ipc``, ``method.backbones``, ``method.backbone_weights``, ``method.parametrization``,
``method.iterations``, ``method.lr``, ``method.augs_per_batch``, ``method.chunk_size``, ``eval.backbone``.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fastdistill import console
from fastdistill.artifacts import RunDir, to_uint8
from fastdistill.data import ImageDataset, build_dataset
from fastdistill.data import views
from fastdistill.data.dataset import TrainCrop
from fastdistill.data.loaders import crop_seeds, pass_batch
from fastdistill.data.transforms import check_crop_scale, to_input
from fastdistill.engine import Precision, resolve_device, resume_checkpoint, save_checkpoint, seed_everything
from fastdistill.engine import distributed as dist
from fastdistill.engine.compile import should_compile
from fastdistill.engine.memory import auto_chunk_size
from fastdistill.engine.precision import channels_last_pays
from fastdistill.eval.linear_probe import (check_probe_config, linear_probe_eval, load_evaluator, result_rows,
                                           same_architecture)
from fastdistill.kernels.grad_cosine import (grad_cosine_feature_grad, grad_cosine_loss, linear_head_grad,
                                             linear_head_grad_sums)
from fastdistill.losses.grad_cosine import grad_cosine_adjoint
from fastdistill.models import Backbone, parse_backbone_id
from fastdistill.models.pyramid import decode, encode, pyramid_sizes
from fastdistill.profiling import Profiler
from fastdistill.recipes import get_recipe
from fastdistill.teachers import frozen_backbone

PARAMETRIZATIONS = ("pyramid", "pixels")
INITS = ("noise", "real")
REAL_CROPS = ("center", "random")
HEAD_STD = 0.01  # W ~ N(0, 0.01^2), b = 0: a fresh random head every step (published)

def _as_list(value, n: int, key: str) -> list:
    if isinstance(value, (list, tuple, ListConfig)):
        if len(value) != n:
            raise ValueError(f"method.{key} has {len(value)} entries for {n} backbones; give one per backbone "
                             f"in method.backbones")
        return list(value)
    return [value] * n


class RealBatch:
    """A step's real images, decoded when a slice of them is used: the two-pass step holds one chunk at a time
    (ImageNet-1k at 10 augmentations draws 10,000 real images per step: 6 GB as fp32 at 224 px)."""

    def __init__(self, recipe: "LGMRecipe", index: torch.Tensor, seeds: torch.Tensor):
        self.recipe, self.index, self.seeds = recipe, index, seeds

    def __len__(self) -> int:
        return self.index.numel()

    def __getitem__(self, rows: slice) -> torch.Tensor:
        r = self.recipe
        x = r.real_set.take(self.index[rows], self.seeds[rows])  # image folders: only these files are decoded
        return to_input(x.to(r.device, non_blocking=True), r.image_size, r.channels)


class LGMRecipe:
    def __init__(self, cfg: DictConfig):
        m = cfg.method
        if m.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown method.parametrization {m.parametrization!r}; expected one of "
                             f"{', '.join(PARAMETRIZATIONS)}")
        if m.init not in INITS:
            raise ValueError(f"unknown method.init {m.init!r}; expected one of {', '.join(INITS)}")
        if not isinstance(cfg.ipc, int) or cfg.ipc < 1:
            raise ValueError(f"ipc must be an integer >= 1 (images per class), got {cfg.ipc!r}")
        if not m.backbones:
            raise ValueError("method.backbones is empty; name at least one frozen backbone, e.g. [timm:resnet18]")
        for name in m.backbones:
            parse_backbone_id(name)
        self.pretrained = _as_list(m.backbone_pretrained, len(m.backbones), "backbone_pretrained")
        kwargs = m.get("backbone_kwargs") or {}
        self.backbone_kwargs = [OmegaConf.to_container(k) if k else {} for k in
                                _as_list(kwargs if isinstance(kwargs, (list, ListConfig)) else {},
                                         len(m.backbones), "backbone_kwargs")]
        self.backbone_weights = [float(w) for w in _as_list(m.backbone_weights, len(m.backbones), "backbone_weights")]
        if any(w < 0 for w in self.backbone_weights) or sum(self.backbone_weights) <= 0:
            raise ValueError(f"method.backbone_weights must be >= 0 with a positive sum, got {self.backbone_weights}")
        if m.iterations < 1 or m.augs_per_batch < 1 or m.pyramid_every < 1 or m.log_every < 1:
            raise ValueError(f"method.iterations, augs_per_batch, pyramid_every and log_every must be >= 1, got "
                             f"{m.iterations!r}, {m.augs_per_batch!r}, {m.pyramid_every!r}, {m.log_every!r}")
        if not m.lr > 0:
            raise ValueError(f"method.lr must be > 0, got {m.lr!r}")
        check_crop_scale(m.crop_scale, "method.crop_scale")
        if not 0 <= m.noise_p <= 1 or m.noise_std < 0:
            raise ValueError(f"method.noise_p must be in [0, 1] and noise_std >= 0, got {m.noise_p!r}, {m.noise_std!r}")
        chunk = m.get("chunk_size", 0)
        if not (chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0)):
            raise ValueError(f"method.chunk_size must be an integer >= 0 (0 = one pass) or auto, got {chunk!r}")
        budget = m.get("memory_budget_mib")
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"method.memory_budget_mib must be a number of MiB > 0 or null, got {budget!r}")
        if m.get("real_crop", "center") not in REAL_CROPS:
            raise ValueError(f"unknown method.real_crop {m.real_crop!r}; expected one of {', '.join(REAL_CROPS)}")
        check = m.get("replica_check_every", 0)
        if not isinstance(check, int) or isinstance(check, bool) or check < 0:
            raise ValueError(f"method.replica_check_every must be an integer >= 0 (steps; 0 = only at the end), "
                             f"got {check!r}")
        check_probe_config(cfg.eval)
        seen = [b for b in m.backbones if same_architecture(b, cfg.eval.backbone)]
        if seen:
            raise ValueError(f"eval.backbone {cfg.eval.backbone!r} is among method.backbones ({seen[0]!r}); the probe "
                             f"must use an unseen backbone: pick another eval.backbone")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = Precision(cfg.precision, self.device)
        self.out = RunDir(cfg.out)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.profiler = Profiler(self.device)
        splits = build_dataset(cfg.data)
        self.train_set, self.test_set = splits["train"], splits["test"]
        self.classes = self.train_set.classes
        console.note(f"lgm: ipc {cfg.ipc} x {len(self.classes)} classes, {cfg.method.iterations} iterations; writing "
                     f"to {self.out.path}")
        with self.profiler.phase("backbones"):
            backbones, self.backbone_cards = self._load_backbones()
        self.prepare(backbones, tuple(self.train_set.image_size), self.train_set.channels, len(self.classes))
        # real images stay uint8 on the host until a batch is drawn (decoded datasets: one tensor); image folders
        # decode the centre square, or (real_crop random, published) a square at a new position at every draw
        self.real_set = self.train_set
        if cfg.method.get("real_crop", "center") == "random":
            self.real_set = self.train_set.train_view(TrainCrop(window="random", hflip=False))
        self.real_labels = self.train_set.labels
        if cfg.resume:
            self.load_checkpoint()
        else:
            with self.profiler.phase("init", images=self.n_images):
                self.init_synthetic()

    def prepare(self, backbones: list[Backbone], image_size: tuple[int, int], channels: int, num_classes: int) -> None:
        """Backbones, sizes and the empty synthetic set: what :meth:`distill_step` needs besides real data.
        ``setup`` calls it with the run's data; ``benchmarks/bench_lgm.py`` with random-init backbones."""
        cfg, m = self.cfg, self.cfg.method
        self.image_size, self.channels, self.num_classes = tuple(image_size), channels, num_classes
        self.view_size = (int(m.image_size), int(m.image_size)) if m.image_size else self.image_size
        self.backbones = [b.to(self.device).freeze() for b in backbones]
        if channels_last_pays(self.device, self.precision):
            self.backbones = [b.to(memory_format=torch.channels_last) for b in self.backbones]
        for b in self.backbones:
            if b.spec.fixed_size and tuple(b.spec.input_size) != self.view_size:
                raise ValueError(f"{b.spec.name} takes {b.spec.input_size[0]} px views but method.image_size gives "
                                 f"{self.view_size[0]}; set method.image_size={b.spec.input_size[0]}")
        compile_ = should_compile(cfg.compile, self.device)
        self.embeds = [torch.compile(b.embed) if compile_ else b.embed for b in self.backbones]
        self.n_images = num_classes * cfg.ipc
        self.chunk_size = m.get("chunk_size", 0)
        if self.chunk_size == "auto":
            self.chunk_size = auto_chunk_size(self.backbones, self.view_size, self.precision,
                                              m.get("memory_budget_mib"))
            if self.chunk_size >= m.augs_per_batch * self.n_images:
                # every view fits the budget at once: keep pass 1's graph (the one-pass step, no second forward)
                self.chunk_size = 0
        self.labels = torch.arange(num_classes).repeat_interleave(cfg.ipc)  # class-major
        self.sizes = pyramid_sizes(*self.image_size) if m.parametrization == "pyramid" else [self.image_size]
        self.hflip = bool(cfg.data.get("hflip", True))
        self.matching_loss = grad_cosine_loss  # benchmarks swap in the published double-backward formulation
        self.step, self.history = 0, []
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0  # since the last log step
        self.levels: list[torch.Tensor] = []
        self.base = torch.zeros(self.n_images, channels, *self.image_size, device=self.device)

    def _load_backbones(self) -> tuple[list[Backbone], list[dict]]:
        """Frozen backbones: trained on this data by the teacher recipe (cached), packaged, hub or file weights."""
        backbones, cards = [], []
        for name, w, kwargs in zip(self.cfg.method.backbones, self.pretrained, self.backbone_kwargs):
            model, card = frozen_backbone(name, w, self.cfg, self.cfg.method.teacher_preset, self.classes,
                                          train=get_recipe("teacher").main, **kwargs)
            backbones.append(model)
            cards.append({**card, "feature_dim": model.spec.feature_dim})
        return backbones, cards

    # ------------------------------------------------------------------ synthetic set
    @torch.no_grad()
    def init_synthetic(self, real: torch.Tensor | None = None) -> None:
        """Noise: the first level ~ N(0, 1) (pyramid: 1x1). Real: ``real`` (or ipc random real images per class)
        as the fixed base of the decode, levels starting at zero, so decode() returns the real images at step 0."""
        m = self.cfg.method
        if m.init == "real":
            if real is None:
                idx = self.train_set.per_class(self.cfg.ipc, torch.Generator().manual_seed(self.cfg.seed))
                real = to_input(self.train_set.take(idx), self.image_size, self.channels)
            self.base = encode(real.to(self.device))
        self.levels = [self._new_level(self.sizes[0], count=1)]
        self._reset_optimizer()

    def _new_level(self, size: tuple[int, int], count: int) -> torch.Tensor:
        shape = (self.n_images, self.channels, *size)
        if self.cfg.method.init == "real":
            level = torch.zeros(shape)
        else:
            level = torch.randn(shape) / count  # ~ N(0, 1) / L (published)
        return level.to(self.device).requires_grad_()

    def extend_pyramid(self) -> None:
        """Add the next level (twice the resolution): old levels scaled by L_old / L_new, the new one ~ N(0, 1) / L_new,
        and a fresh Adam (published: state reset at every level)."""
        old, new = len(self.levels), len(self.levels) + 1
        with torch.no_grad():
            self.levels = [(lv * (old / new)).requires_grad_() for lv in self.levels]
        self.levels.append(self._new_level(self.sizes[old], count=new))
        self._reset_optimizer()

    def _reset_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(self.levels, lr=self.cfg.method.lr)

    def images(self) -> torch.Tensor:
        """The current synthetic set, [0, 1] (N, ch, H, W), class-major, with its graph to the parameters."""
        return decode(self.levels, self.base)

    # ------------------------------------------------------------------ distillation
    def real_batch(self, n: int, rows: slice = slice(None)) -> tuple["RealBatch", torch.Tensor]:
        """``n`` real training images of step ``self.step``, [0, 1] at the synthetic size: drawn without replacement
        from shuffled passes over the training set (not class-balanced), as the published shuffled loader with
        drop_last; every rank computes all n indices (a function of seed and step) and keeps ``rows`` of them. The
        images are decoded when a chunk of them is used (:class:`RealBatch`)."""
        idx = pass_batch(len(self.real_labels), n, self.cfg.seed, self.step)[rows]
        seeds = crop_seeds(self.cfg.seed, self.step, torch.arange(n)[rows])  # method.real_crop random: per draw
        return RealBatch(self, idx, seeds), self.real_labels[idx].to(self.device)

    def draw_views(self, n: int) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        noise = m.noise_p > 0 and m.noise_std + abs(m.noise_mean) > 0
        return views.draw(n, m.crop_scale, self.hflip, m.noise_p, noise=noise)

    def apply_views(self, x: torch.Tensor, drawn: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.cfg.method
        return views.apply(x, drawn, self.view_size, m.noise_mean, m.noise_std)

    def distill_step(self, real: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One LGM step on all backbones; returns the loss (detached, on the device; no sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_gradients(real)
        self.precision.step(self.optimizer)
        return loss.detach()

    def compute_gradients(self, real: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Draw the step's views, real batch and heads, and leave dL/d(synthetic parameters) in their ``.grad``
        (times the fp16 loss scale); returns the loss. ``real`` (all ``augs * n_images`` of them) replaces the draw
        of a real batch (tests, benchmarks)."""
        n = self.cfg.method.augs_per_batch * self.n_images
        # every draw of the step comes from the global generators in this order, whatever the chunk size or rank count
        # (under torchrun every rank draws all of them, then takes its slice: dist.shard)
        syn_views = self.draw_views(n)
        mine = dist.shard(n)
        rows = slice(mine.start, mine.stop)
        real_x, real_y = self.real_batch(n, rows) if real is None else (real[0][rows], real[1][rows])
        real_views = self.draw_views(n)
        heads = [(HEAD_STD * torch.randn(self.num_classes, b.spec.feature_dim, device=self.device),
                  torch.zeros(self.num_classes, device=self.device)) for b in self.backbones]
        if self.chunk_size == 0 and dist.world_size() == 1:
            return self._one_pass(syn_views, real_x, real_y, real_views, heads)
        return self._two_pass(syn_views, real_x, real_y, real_views, heads, mine)

    def _one_pass(self, syn_views, real_x, real_y, real_views, heads) -> torch.Tensor:
        """The step of the LGM issue: every synthetic view's activations are kept for one backward through the
        fused loss, so memory grows linearly with augs_per_batch (about 114 MiB per ViT-B/16 view, METHODS.md)."""
        cfg, augs = self.cfg, self.cfg.method.augs_per_batch
        syn_labels = self.labels.to(self.device).repeat(augs)
        syn_x = self.apply_views(self.images().repeat(augs, 1, 1, 1), syn_views)
        with torch.no_grad():  # the real side never needs a graph (the published code records one, unused)
            real_x = self.apply_views(real_x[:], real_views)
        feats, real_grads = [], []
        for embed, (w, b) in zip(self.embeds, heads):
            with torch.no_grad(), self.precision.autocast():
                real_feats = embed(real_x)
            real_grads.append(linear_head_grad(real_feats, real_y, w, b, backend=cfg.kernels))
            with self.precision.autocast():
                feats.append(embed(syn_x))
        loss = self.matching_loss(feats, syn_labels, [h[0] for h in heads], [h[1] for h in heads], real_grads,
                                  self.backbone_weights, backend=cfg.kernels)
        self.precision.backward(loss)
        return loss

    def _chunks(self, rows: range):
        size = self.chunk_size or max(len(rows), 1)
        for start in range(rows.start, rows.stop, size):
            yield range(start, min(start + size, rows.stop))

    def _two_pass(self, syn_views, real_x, real_y, real_views, heads, mine: range) -> torch.Tensor:
        """The memory-bounded step: the same function as :meth:`_one_pass`, with at most ``chunk_size`` views'
        activations of one backbone alive at a time.

        Pass 1 (no autograd), chunk by chunk: features of the real and synthetic views and the head gradients'
        partial sums; then the loss and dL/dF of every synthetic view in closed form (kernels/grad_cosine.py).
        Pass 2, chunk by chunk: the same views again (stored draws), the backbone with autograd, and
        ``F_chunk.backward(dL/dF_chunk)`` into the synthetic images; one backward through the decode at the end.

        Data-parallel under torchrun: this rank runs both passes on its slice ``mine`` of the synthetic views and of
        the real batch; the partial head-gradient sums (C x D + C per backbone and side) and dL/d(images) are
        all-reduced, so every rank takes the same optimiser step. ``chunk_size: 0`` under torchrun keeps the slice's
        graph from pass 1 (one chunk, no second forward).
        """
        augs, n_img = self.cfg.method.augs_per_batch, self.n_images
        n = augs * n_img
        syn_rows = real_rows = mine
        keep_graph = self.chunk_size == 0
        syn_labels = self.labels.to(self.device).repeat(augs)
        images = self.images()
        pixels = images.detach().requires_grad_()  # pass 2 accumulates dL/d(images) here
        dtype = torch.promote_types(pixels.dtype, torch.float32)

        def syn_chunk(rows: range) -> torch.Tensor:  # view i is synthetic image i mod n_images
            return self.apply_views(pixels[torch.arange(rows.start, rows.stop) % n_img], views.take(syn_views, rows))

        # pass 1: features and partial head-gradient sums, no graph
        # sums[side][m] = [E^T F (C, D), sum_n E (C,)] of this rank's views, side 0 real, 1 synthetic
        sums = [[[torch.zeros(self.num_classes, w.shape[1], dtype=dtype, device=self.device),
                  torch.zeros(self.num_classes, dtype=dtype, device=self.device)] for w, _ in heads] for _ in range(2)]
        feats = [[] for _ in self.backbones]

        def add_sums(side: int, m: int, f: torch.Tensor, labels: torch.Tensor) -> None:
            for k, t in enumerate(linear_head_grad_sums(f.detach(), labels, *heads[m], backend=self.cfg.kernels)):
                sums[side][m][k] += t

        with torch.no_grad():
            for rows in self._chunks(real_rows):
                local = slice(rows.start - real_rows.start, rows.stop - real_rows.start)
                x = self.apply_views(real_x[local], views.take(real_views, rows))
                for m, embed in enumerate(self.embeds):
                    with self.precision.autocast():
                        f = embed(x)
                    add_sums(0, m, f, real_y[local])  # outside autocast: the head statistics stay fp32
        with torch.set_grad_enabled(keep_graph):
            for rows in self._chunks(syn_rows):
                x = syn_chunk(rows)
                for m, embed in enumerate(self.embeds):
                    with self.precision.autocast():
                        f = embed(x)
                    feats[m].append(f)
                    add_sums(1, m, f, syn_labels[rows.start:rows.stop])
        # the only communication of pass 1: one all-reduce of the small head-gradient sums
        parts = [t for side in sums for pair in side for t in pair]
        flat = dist.all_reduce(torch.cat([t.flatten() for t in parts]))
        for t, reduced in zip(parts, flat.split([t.numel() for t in parts])):
            t.copy_(reduced.view_as(t))
        real_grads = [(s / n, s_b / n) for s, s_b in sums[0]]
        loss, adjoints = grad_cosine_adjoint([(s / n, s_b / n) for s, s_b in sums[1]], real_grads,
                                             self.backbone_weights)
        mine_labels = syn_labels[syn_rows.start:syn_rows.stop]
        # fp16: the loss scale enters here (a rank with no views, when there are more ranks than views, has none)
        feat_grads = [self.precision.scaler.scale(grad_cosine_feature_grad(torch.cat(f).detach(), mine_labels, *head,
                                                                           adjoint, n, backend=self.cfg.kernels))
                      for f, head, adjoint in zip(feats, heads, adjoints) if f]

        # pass 2: the same views with autograd, one backbone at a time
        if keep_graph:
            if feat_grads:
                torch.autograd.backward([torch.cat(f) for f in feats],
                                        [g.to(f[0].dtype) for f, g in zip(feats, feat_grads)])
        else:
            del feats
            for rows in self._chunks(syn_rows):
                x = syn_chunk(rows)
                x_leaf = x.detach().requires_grad_()
                local = slice(rows.start - syn_rows.start, rows.stop - syn_rows.start)
                for embed, grad in zip(self.embeds, feat_grads):
                    with self.precision.autocast():
                        f = embed(x_leaf)
                    f.backward(grad[local].to(f.dtype))
                x.backward(x_leaf.grad)
        grad = pixels.grad if pixels.grad is not None else torch.zeros_like(pixels)
        # the pyramid levels' gradients are linear in the images': one all-reduce of dL/d(images) gives each rank
        # the same level gradients, hence the same Adam step
        images.backward(dist.all_reduce(grad))
        return loss


    def train(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        every = cfg.checkpoint_every
        with console.progress(cfg.progress) as bar, self.profiler.phase("distill"):
            task = bar.add_task(f"lgm ipc {cfg.ipc} x {len(self.backbones)} backbones", total=m.iterations,
                                completed=self.step, info="")
            while self.step < m.iterations:
                if self.step > 0 and self.step % m.pyramid_every == 0 and len(self.levels) < len(self.sizes):
                    self.extend_pyramid()
                self.loss_sum += self.distill_step()
                self.loss_count += 1
                self.step += 1
                self.profiler.add_images("distill", len(dist.shard(m.augs_per_batch * self.n_images)) * 2
                                         * len(self.backbones))
                if m.get("replica_check_every") and self.step % m.replica_check_every == 0:
                    self.check_replicas()
                bar.update(task, advance=1)
                if self.step % m.log_every == 0 or self.step == m.iterations:
                    mean = self.loss_sum.item() / self.loss_count  # .item() syncs with the device: log steps only
                    if not torch.isfinite(torch.tensor(mean)):
                        raise FloatingPointError(f"non-finite LGM loss at step {self.step} (mean of the last "
                                                 f"{self.loss_count} steps)")
                    self.history.append({"step": self.step, "loss": mean, "levels": len(self.levels)})
                    self.out.log("distill", self.step, loss=mean, levels=len(self.levels),
                                 lr=self.optimizer.param_groups[0]["lr"])
                    bar.update(task, info=f"loss {mean:.4f}")
                    self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
                if every and self.step % every == 0 and self.step < m.iterations:
                    self.save_checkpoint()
        self.check_replicas()
        self.save_checkpoint()

    def check_replicas(self) -> None:
        """Under torchrun: stop with a RuntimeError when the ranks' synthetic parameters differ (they take the same
        all-reduced steps, so they stay bit-identical unless a rank went wrong). No-op in one process."""
        dist.check_replicas(torch.cat([lv.detach().flatten() for lv in self.levels]),
                            f"the LGM synthetic parameters at step {self.step}")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def final_images(self) -> torch.Tensor:
        """The synthetic set as saved: rounded to uint8 levels, so the probe here sees what ``+method=evaluate``
        reads back from the PNGs."""
        return (self.images().clamp(0, 1) * 255).round().div(255).cpu()

    def evaluate(self) -> dict:
        cfg = self.cfg
        with self.profiler.phase("evaluate"):
            evaluator, self.evaluator_card = load_evaluator(cfg, self.classes, get_recipe("teacher").main)
            synthetic = ImageDataset(labels=self.labels, classes=self.classes, images=to_uint8(self.final_images()),
                                     name="distilled")
            return linear_probe_eval(evaluator, synthetic, self.train_set, self.test_set, cfg.eval, cfg.seed,
                                     self.hflip, self.device, self.precision, cfg.num_workers, cfg.progress,
                                     log=self.out.log)

    # ------------------------------------------------------------------ checkpoint and artifacts
    def save_checkpoint(self) -> None:
        # under torchrun every rank calls it (the RNG states are gathered) and rank 0 writes the identical replicas
        save_checkpoint(self.out.path, {
            "levels": [lv.detach().cpu() for lv in self.levels], "base": self.base.cpu(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.precision.state_dict(), "step": self.step,
            "history": self.history, "loss_sum": self.loss_sum.cpu(), "loss_count": self.loss_count,
            "config": OmegaConf.to_container(self.cfg.method, resolve=True)})

    def load_checkpoint(self) -> None:
        state = resume_checkpoint(self.out.path, OmegaConf.to_container(self.cfg.method, resolve=True))
        self.levels = [lv.to(self.device).requires_grad_() for lv in state["levels"]]
        self.base = state["base"].to(self.device)
        self._reset_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        self.loss_sum, self.loss_count = state["loss_sum"].to(self.device), state["loss_count"]
        self.out.rewind("distill", self.step)  # the steps after the checkpoint are logged again

    def save(self, ev: dict) -> dict:
        cfg = self.cfg
        images = self.final_images()
        self.out.save_images(images, self.labels, self.classes)
        self.out.save_preview(images, nrow=cfg.ipc if cfg.ipc > 1 else self.num_classes)
        seconds = self.profiler.seconds.get("distill", 0.0)
        metrics = {"eval": ev, "ipc": cfg.ipc, "backbones": list(cfg.method.backbones),
                   "backbone_weights": self.backbone_weights, "parametrization": cfg.method.parametrization,
                   "history": self.history, "iterations": self.step,
                   "iterations_per_s": self.step / seconds if seconds else None}
        self.out.write_json("metrics.json", metrics)
        self.out.write_manifest(cfg, self.device, backbones=self.backbone_cards, classes=self.classes,
                                evaluator=getattr(self, "evaluator_card", None), precision=self.precision.name)
        self.out.write_json("profile.json", self.profiler.report())
        return metrics


def main(cfg: DictConfig) -> dict:
    recipe = LGMRecipe(cfg)
    recipe.out.write_config(cfg)  # artifacts: rank 0 writes them under torchrun
    recipe.setup()
    recipe.train()
    ev = recipe.evaluate()  # the probe trains as DDP replicas on every rank
    metrics = recipe.save(ev)
    console.print_results(f"lgm ipc {cfg.ipc} on {cfg.data.name}: linear probe on {ev['backbone']} (unseen)",
                          ["training set", "test acc mean", "std", "runs"], result_rows(ev), recipe.out.path)
    return metrics
