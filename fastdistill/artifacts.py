"""The output folder of a run (DESIGN.md "Output of a run"); every write is atomic (temp file + rename).

``outputs/<method>/<date-time>/``: config.yaml, manifest.json, metrics.json, profile.json, checkpoint.pt,
and for the distillation methods distilled/<class>/*.png, labels.safetensors and preview.png.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastdistill.data.dataset import ImageDataset
from fastdistill.engine import distributed as dist
from fastdistill.engine.metric_log import MetricLog


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def git_revision() -> str | None:
    """The git sha of the fastdistill source tree, '+dirty' when it has local changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import fastdistill

    out = {"fastdistill": fastdistill.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("torchvision", "timm", "open_clip", "triton", "hydra"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            pass
    return out


def main_rank_only(write):
    """Under torchrun only rank 0 writes the run's artifacts; the others write nothing and get None."""

    @functools.wraps(write)
    def wrapper(self, *args, **kwargs):
        return write(self, *args, **kwargs) if dist.is_main() else None

    return wrapper


class RunDir:
    """The output folder of one run. Its writes happen on rank 0 only (a per-rank file goes through ``/``).

    It also keeps the run's metric history (``engine/metric_log.py``): opened by :meth:`write_config` with the
    run's ``logger`` and ``resume``, fed by :meth:`log`, and closed with the final metrics when ``metrics.json``
    is written, so ``metrics.jsonl`` always ends with what ``metrics.json`` holds.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        self.history: MetricLog | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @main_rank_only
    def write_json(self, name: str, obj) -> Path:
        path = write_json(self.path / name, obj)
        if name == "metrics.json" and self.history is not None:
            self.history.final(obj)
        return path

    @main_rank_only
    def write_config(self, cfg: DictConfig) -> Path:
        with atomic_path(self.path / "config.yaml") as tmp:
            tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if self.history is None:
            self.history = MetricLog(self.path, cfg.get("logger", "jsonl"), resume=bool(cfg.get("resume", False)),
                                     config=OmegaConf.to_container(cfg, resolve=True))
        return self.path / "config.yaml"

    @main_rank_only
    def log(self, phase: str, step: int, **values) -> None:
        """One record of the metric history (nothing before :meth:`write_config`, e.g. in a bare test recipe)."""
        if self.history is not None:
            self.history.log(phase, step, **values)

    @main_rank_only
    def rewind(self, phase: str, step: int) -> None:
        """On resume: drop the history after ``step`` of ``phase`` (:meth:`MetricLog.rewind`)."""
        if self.history is not None:
            self.history.rewind(phase, step)

    @main_rank_only
    def write_manifest(self, cfg: DictConfig, device: torch.device, **extra) -> Path:
        """versions, seed, device, git revision and the resolved config, plus method-specific ``extra``."""
        manifest = {
            "method": cfg.method.name,
            "seed": cfg.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "git": git_revision(),
            "versions": versions(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "config": OmegaConf.to_container(cfg, resolve=True),
            **extra,
        }
        return self.write_json("manifest.json", manifest)

    @main_rank_only
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        with atomic_path(self.path / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        return self.path / name

    @main_rank_only
    def save_images(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                    folder: str = "distilled") -> Path:
        """[0, 1] images (N, C, H, W) as ImageFolder PNGs ``folder/<class>/<index>.png``, numbered per class in
        order."""
        counts: dict[int, int] = {}
        numbers = []
        for y in labels.tolist():
            numbers.append(counts.get(y, 0))
            counts[y] = numbers[-1] + 1
        return self.write_images(images, labels, numbers, classes, folder)

    def write_images(self, images: torch.Tensor, labels: torch.Tensor, numbers: list[int], classes: list[str],
                     folder: str = "distilled") -> Path:
        """[0, 1] images (N, C, H, W) as ``folder/<class>/<number>.png``, each file atomic (rounded, not truncated,
        to uint8: the published FADRM code truncates). Any rank may call it for the images it owns."""
        from PIL import Image

        root = self.path / folder
        pixels = to_uint8(images)
        for img, y, k in zip(pixels, labels.tolist(), numbers):
            arr = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            with atomic_path(root / _safe(classes[y]) / f"{k:05d}.png") as tmp:
                pil.save(tmp, format="PNG")
        return root

    @main_rank_only
    def save_preview(self, images: torch.Tensor, nrow: int, name: str = "preview.png") -> Path:
        """A grid of [0, 1] images (N, C, H, W) that a person looks at."""
        from torchvision.utils import save_image

        with atomic_path(self.path / name) as tmp:
            save_image(images.detach().float().clamp(0, 1).cpu(), str(tmp), nrow=nrow, padding=2, format="png")
        return self.path / name


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 on the CPU, rounded: the pixels a saved set holds."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def read_distilled(path: str | Path, classes: list[str], channels: int) -> ImageDataset:
    """A saved distilled set (a run folder or its ``distilled/``: ``<class>/<number>.png``) as a dataset read from
    disk on access, class-major; its images are used as stored (no resize, no crop)."""
    root = Path(path).expanduser()
    if (root / "distilled").is_dir():
        root = root / "distilled"
    if not root.is_dir():
        raise FileNotFoundError(f"distilled '{path}' is not a folder; pass a run folder holding distilled/<class>/*.png")
    folders = {p.name: p for p in root.iterdir() if p.is_dir()}
    index = {_safe(c): i for i, c in enumerate(classes)}
    unknown = sorted(set(folders) - set(index))
    if unknown:
        raise ValueError(f"distilled '{root}' has class folders {unknown[:5]} that the dataset does not have "
                         f"(classes {list(classes)[:5]}...); evaluate with the data= the set was distilled from")
    files = sorted((index[name], f) for name, folder in folders.items() for f in folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"distilled '{root}' holds no <class>/*.png images")
    from PIL import Image

    with Image.open(files[0][1]) as first:
        size = (first.height, first.width)
    labels = torch.tensor([c for c, _ in files], dtype=torch.int64)
    counts = torch.bincount(labels, minlength=len(classes))
    if int(counts.min()) == 0:
        missing = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
        raise ValueError(f"distilled '{root}' has no images for classes {missing[:5]}; every class needs at least one")
    return ImageDataset(labels=labels, classes=list(classes), paths=[f for _, f in files], image_size=size,
                        channels=channels, name="distilled")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"
