"""The Python API: the command line's runs from a notebook or a script, through the same configs and checks.

    import fastdistill
    result = fastdistill.distill("fadrm", preset="smoke", ipc=2, out="runs/fadrm")   # +method=fadrm preset=...
    result.metrics["students"], result.out                                          # metrics.json, the run folder
    fastdistill.evaluate(result.out, **{"eval.backbone": "timm:resnet18"})          # +method=evaluate distilled=...
    data = fastdistill.load_distilled(result.out)                                   # a Dataset for a DataLoader

Keyword options are config keys (dotted keys through ``**{"data.root": ...}``); Python values become Hydra
override values (True -> true, None -> null, lists -> [a,b]). Bad input raises the exception whose one line the
command line prints (ValueError, FileNotFoundError, ModuleNotFoundError, NotADirectoryError).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fastdistill.artifacts import read_distilled
from fastdistill.config import check_common, compose
from fastdistill.data import ImageDataset
from fastdistill.engine import distributed
from fastdistill.engine.device import resolve_device
from fastdistill.recipes import get_recipe


@dataclass
class RunResult:
    """What a run leaves: its folder and the ``metrics.json`` it wrote."""

    out: Path
    metrics: dict


def run(cfg: DictConfig):
    """Run the recipe ``cfg.method.name`` on a composed config; returns what the recipe returns."""
    OmegaConf.resolve(cfg)  # once: `out` holds a time stamp that must not change during the run
    check_common(cfg)
    device = distributed.init(resolve_device(cfg.device))  # joins torchrun's process group, if launched by it
    if distributed.world_size() > 1:
        cfg.out = distributed.all_gather_object(cfg.out)[0]  # rank 0's time stamp: one folder for all ranks
        cfg.device = str(device)
    try:
        return get_recipe(cfg.method.name).main(cfg)
    finally:
        distributed.cleanup()


def _override_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    # Hydra's override grammar splits on these; a quoted string keeps them
    if any(ch in text for ch in " ,[]{}()'\"=:\\$*?"):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def overrides_for(method: str, options: dict) -> list[str]:
    """The command-line overrides of ``distill(method, **options)``."""
    return [f"+method={method}", *(f"{key}={_override_value(value)}" for key, value in options.items())]


def distill(method: str, **options) -> RunResult:
    """Run ``method`` (any of ``python -m fastdistill.run +method=...``) with config keys as keyword options.

    Returns the run folder and its metrics. Raises what the command line reports as its one-line error.
    """
    cfg = compose(overrides_for(method, options))
    run(cfg)
    out = Path(cfg.out)
    return RunResult(out=out, metrics=json.loads((out / "metrics.json").read_text()))


def evaluate(distilled: str | Path, **options) -> RunResult:
    """Linear-probe a saved distilled set (``+method=evaluate distilled=PATH``); ``options`` as in :func:`distill`
    (``data`` must name the dataset the set was distilled from)."""
    return distill("evaluate", distilled=str(distilled), **options)


class DistilledSet(torch.utils.data.Dataset):
    """A saved distilled set, read from its PNGs on access: items are ``(image, label)`` or, where the run stored
    teacher logits (``method.relabel=store``), ``(image, label, soft_label)``; images (C, H, W) float in [0, 1],
    soft labels (classes,) float32 logits. ``labels`` (N,) and ``classes`` (the run's class order) are attributes.
    """

    def __init__(self, images: ImageDataset, soft_labels: torch.Tensor | None = None):
        self.images, self.soft_labels = images, soft_labels
        self.labels, self.classes = images.labels, images.classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, label = self.images[i]
        image = image.float() / 255
        return (image, label) if self.soft_labels is None else (image, label, self.soft_labels[i])


def load_distilled(path: str | Path) -> DistilledSet:
    """The distilled set of a run folder (``distilled/<class>/*.png``, ``manifest.json``, ``labels.safetensors``).

    Raises:
        FileNotFoundError: no run folder, no manifest or no images. ValueError: no class order in the manifest.
    """
    from PIL import Image

    root = Path(path).expanduser()
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"'{path}' has no manifest.json; pass the folder of a finished distillation run")
    classes = json.loads(manifest.read_text()).get("classes")
    if not classes:
        raise ValueError(f"'{path}' records no class order in manifest.json; it is not a distillation run")
    first = next((root / "distilled").glob("*/*.png"), None)
    if first is None:
        raise FileNotFoundError(f"'{path}' holds no distilled/<class>/*.png images")
    with Image.open(first) as image:
        channels = 1 if image.mode in ("L", "I;16") else 3
    images = read_distilled(root, classes, channels)
    soft = None
    if (root / "labels.safetensors").is_file():
        from safetensors.torch import load_file

        stored = load_file(str(root / "labels.safetensors"))
        # stored in the run's own order; the PNGs come back class-major, each class in its saved order
        order = torch.argsort(stored["labels"], stable=True)
        soft = stored["logits"][order].float()
    return DistilledSet(images, soft)
