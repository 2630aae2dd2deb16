"""``data=imagefolder data.root=DIR``: torchvision-style class folders under ``DIR/train`` and ``DIR/test``.

Without ``DIR/test`` (or with class folders directly under ``DIR``) a seeded, stratified split holds out
``data.test_fraction`` of every class. Files are decoded as ``data/dataset.py`` says: shorter side to
``image_size / crop_pct`` and a centre crop (evaluation), a random-resized-crop on the whole image (training).

``data.cache``: ``true`` decodes both splits into memory at start (fast epochs; a corrupt file fails at once),
``false`` streams every split from disk, ``auto`` decodes only when both decoded splits fit in a quarter of the
host's available memory (``MemAvailable``) and streams otherwise: ImageNet-1k at 224 px would be about 193 GB.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.registry import register_dataset
from fastdistill.engine.memory import available_mib

CACHE = (True, False, "auto")
CACHE_FRACTION = 0.25  # of MemAvailable: the rest is for models, activations, loader workers and the page cache
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[Path], torch.Tensor, list[str]]:
    """Image paths and labels of ``root/<class>/*``; ``classes`` fixes the label order (default: sorted)."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    missing = set(found) - set(classes)
    if missing:
        raise ValueError(f"'{root}' has class folders {sorted(missing)} that the train split does not have")
    paths, labels = [], []
    for c, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in EXTENSIONS:
                paths.append(p)
                labels.append(c)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) in class folders under '{root}'")
    return paths, torch.tensor(labels, dtype=torch.long), classes


@register_dataset("imagefolder")
def build_imagefolder(cfg: DictConfig) -> dict[str, ImageDataset]:
    if not cfg.get("root"):
        raise ValueError("data=imagefolder needs data.root=DIR (class folders under DIR/train and DIR/test)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' is not a directory")
    cache = cfg.get("cache", "auto")
    if cache not in CACHE:
        raise ValueError(f"data.cache must be true, false or auto, got {cache!r}")
    size = (int(cfg.image_size), int(cfg.image_size))
    common = {"image_size": size, "channels": int(cfg.get("channels", 3)), "crop_pct": float(cfg.get("crop_pct", 1.0))}
    train_dir = root / "train" if (root / "train").is_dir() else root
    paths, labels, classes = scan_folder(train_dir)
    if len(classes) < 2:
        # every method trains or probes a classifier on the labels: one class makes its loss 0 from the start
        raise ValueError(f"data.root '{root}' has {len(classes)} class folder ({classes[0]!r}); a classifier needs "
                         f"at least 2 classes, one folder each")
    train = ImageDataset(labels=labels, classes=classes, paths=paths, **common)
    if (root / "test").is_dir():
        tpaths, tlabels, _ = scan_folder(root / "test", classes)
        test = ImageDataset(labels=tlabels, classes=classes, paths=tpaths, **common)
    else:
        train, test = stratified_split(train, float(cfg.test_fraction), int(cfg.split_seed))
    if should_cache(cache, train.decoded_bytes() + test.decoded_bytes()):
        train.load_all()  # decode once: every later epoch reads memory, and a corrupt file fails now
        test.load_all()
    return {"train": train, "test": test}


def should_cache(cache, decoded_bytes: int) -> bool:
    """``data.cache`` resolved: auto decodes when the decoded splits fit CACHE_FRACTION of the available memory."""
    if cache == "auto":
        return decoded_bytes / 2**20 <= CACHE_FRACTION * available_mib()
    return bool(cache)


def stratified_split(ds: ImageDataset, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``test_fraction`` of every class (at least one image) with a fixed seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(ds.num_classes):
        idx = (ds.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = max(1, round(test_fraction * idx.numel())) if idx.numel() > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return ds.subset(torch.cat(train).sort().values), ds.subset(torch.cat(test).sort().values)
