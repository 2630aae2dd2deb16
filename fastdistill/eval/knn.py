"""How a self-supervised teacher is judged without labels in training: a k-NN or linear probe on its frozen
features, next to a randomly initialised network of the same shape (``+method=dino``, ``+method=mae``).

k-NN as in DINO's ``eval_knn`` (Wu et al. 2018): cosine similarity of L2-normalised features, the k nearest
training images vote for their class with weight ``exp(sim / T)``. The linear probe is
:func:`fastdistill.eval.linear_probe.train_probe` on all training images. Features of a ViT are its class token
(``cls``: DINO's k-NN, MAE's linear probe) or its patch tokens averaged after the final norm (``mean``: DINO's
``eval_linear --avgpool_patchtokens``, MAE's global pool).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine.precision import Precision
from fastdistill.eval.linear_probe import ProbeConfig, embed_all, train_probe
from fastdistill.models import Backbone

PROBES = ("knn", "linear")
POOLS = ("cls", "mean")


@contextlib.contextmanager
def pooled(backbone: Backbone, pool: str):
    """``backbone.embed`` returns the ``pool`` features inside the block (timm's own pooling switch, restored)."""
    if pool == "cls":
        yield backbone
        return
    vit = backbone.model
    if not isinstance(getattr(vit, "global_pool", None), str) or getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"probe pool {pool!r} needs a timm ViT, got {backbone.spec.name}")
    before = vit.global_pool
    vit.global_pool = "avg"  # the patch tokens' mean, without the prefix tokens
    try:
        yield backbone
    finally:
        vit.global_pool = before


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN class predictions int64 (N_test,) from features (N, D) (normalised here)."""
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    out = []
    for i in range(0, test_feats.shape[0], chunk):
        sim, idx = (F.normalize(test_feats[i:i + chunk].float(), dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def probe_names(p: DictConfig) -> list[str]:
    """``kind/pool`` of every probe a run reports, the headline (``p.kind``, ``p.pool``) first."""
    names = [f"{p.kind}/{p.get('pool', 'cls')}"]
    return names + [n for n in p.get("also", []) if n not in names]


def check_probe(p: DictConfig) -> None:
    if p.kind not in PROBES:
        raise ValueError(f"unknown probe {p.kind!r}; expected one of {', '.join(PROBES)}")
    for name in probe_names(p):
        kind, _, pool = name.partition("/")
        if kind not in PROBES or pool not in POOLS:
            raise ValueError(f"unknown probe {name!r}; expected kind/pool with kind one of {', '.join(PROBES)} "
                             f"and pool one of {', '.join(POOLS)}")
    if p.get("curve_every", 0) < 0:
        raise ValueError(f"probe.curve_every must be >= 0 (0: off), got {p.curve_every!r}")
    if p.k < 1 or not p.temperature > 0 or p.epochs < 1:
        raise ValueError(f"probe.k and probe.epochs must be >= 1 and probe.temperature > 0, got {p.k!r}, "
                         f"{p.epochs!r}, {p.temperature!r}")


def probe_accuracy(backbone: Backbone, train_set: ImageDataset, test_set: ImageDataset, p: DictConfig,
                   image_size: tuple[int, int], device: torch.device, precision: Precision, seed: int,
                   progress: bool = False, log=None, phase: str = "probe", kind: str | None = None,
                   pool: str = "cls") -> float:
    """Test accuracy in [0, 1] of the ``kind`` probe (default ``p.kind``) on ``backbone``'s frozen ``pool``
    features (``log``, ``phase``: the run's metric history, as :func:`train_probe` takes them)."""
    was_training = backbone.training
    backbone.eval()
    with pooled(backbone, pool):
        acc = _probe(backbone, train_set, test_set, p, kind or p.kind, image_size, device, precision, seed,
                     progress, log, phase)
    backbone.train(was_training)
    return acc


def _probe(backbone, train_set, test_set, p, kind, image_size, device, precision, seed, progress, log, phase):
    test_feats = embed_all(backbone, test_set, image_size, device, precision, progress=progress)
    if kind == "knn":
        train_feats = embed_all(backbone, train_set, image_size, device, precision, progress=progress)
        pred = knn_predict(train_feats, train_set.labels, test_feats, train_set.num_classes, p.k, p.temperature)
        acc = (pred.cpu() == test_set.labels).float().mean().item()
        if log:
            log(phase, 0, test_acc=acc)
    else:
        cfg = ProbeConfig(epochs=int(p.epochs), lr=float(p.lr), max_batch_size=int(p.batch_size),
                          crop_scale=tuple(p.crop_scale), hflip=bool(p.hflip), image_size=tuple(image_size),
                          feature_bn=bool(p.get("feature_bn", False)))
        acc = train_probe(backbone, train_set, test_feats, test_set.labels, train_set.num_classes, cfg, cfg.epochs,
                          seed, device, precision, progress=progress, description=f"{phase} (linear)", log=log,
                          phase=phase)
    return acc
