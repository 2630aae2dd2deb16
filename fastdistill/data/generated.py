"""Generated training images for knowledge distillation (``method.gen.mode=none|cls2img|img2img|folder``).

- ``cls2img``: a text-to-image diffusion pipeline draws images from prompts built from the class names
  (``method.prompts.templates``, e.g. ``a photo of a {c}.``).
- ``img2img``: the pipeline redraws every real training image at ``strength`` (0 keeps it, 1 ignores it),
  prompted with its class; the generated image's *source* is that real image (condition prediction needs it).
- ``folder``: images made elsewhere, in the folder layout below.

Pipelines come from ``diffusers`` (the optional extra ``pip install 'fastdistill[gen]'``) and load from a local
Stable-Diffusion-style pipeline folder (``from_pretrained(path)``, nothing downloads) or, named by its Hugging Face
hub id (``stabilityai/stable-diffusion-2-1``), from the Hugging Face cache. Generated images are cached
on disk under a hash of everything that made them, in the same layout ``gen=folder`` reads, and are read back from
there like a dataset's files (:meth:`GeneratedSet.dataset`, decoded on access)::

    <root>/index.json           {"classes": [...], "images": [{"file": "3/00012.png", "label": 3,
                                  "source": "real:417" | "prompt:a photo of a 3."}, ...]}
    <root>/<class>/<k>.png

``real:<id>`` names a row of the dataset's train split (its index there), ``prompt:<text>`` a class prompt.
Run ``python -m fastdistill.make_augmented --help`` to write such a folder of augmented real images (a stand-in
where no diffusion weights are available).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdistill.data.dataset import ImageDataset
from fastdistill.data.transforms import to_input

GEN_MODES = ("none", "cls2img", "img2img", "folder")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face hub spells a repository
INDEX = "index.json"
REAL, PROMPT = "real:", "prompt:"


@dataclass
class GeneratedSet:
    """Generated images on disk, one file each, with the source each was made from.

    paths: the files; labels: int64 (N,); sources: ``real:<train id>`` or ``prompt:<text>`` per image; classes,
    image_size and channels: the dataset's, which the files are decoded to.
    """

    paths: list[Path]
    labels: torch.Tensor
    sources: list[str]
    classes: list[str]
    image_size: tuple[int, int]
    channels: int
    root: Path

    def __len__(self) -> int:
        return self.labels.numel()

    def source_ids(self) -> torch.Tensor:
        """int64 (N,): the train-split id of each image's real source, -1 for prompt-made images."""
        return torch.tensor([int(s[len(REAL):]) if s.startswith(REAL) else -1 for s in self.sources],
                            dtype=torch.long)

    def dataset(self) -> ImageDataset:
        """The files as a split read on access (shorter side to the dataset's size, centre crop)."""
        return ImageDataset(labels=self.labels, classes=list(self.classes), paths=list(self.paths),
                            image_size=tuple(self.image_size), channels=self.channels, name="generated")

    def load(self) -> torch.Tensor:
        """Every image decoded, uint8 (N, C, H, W): only for sets known to be small (beside decoded data)."""
        return self.dataset().take(torch.arange(len(self)))


# ------------------------------------------------------------------------------------------------ prompts
def build_prompts(classes: list[str], templates: list[str], class_names: list[str] | None = None) -> list[list[str]]:
    """Prompts (C lists of T strings): every template with ``{c}`` replaced by the class name.

    ``class_names`` replaces the dataset's class names (e.g. ``zero`` ... ``nine`` for digit folders);
    underscores become spaces (``golden_retriever`` -> ``golden retriever``).
    """
    if not templates:
        raise ValueError("method.prompts.templates is empty; give at least one template such as 'a photo of a {c}.'")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"prompt template {bad[0]!r} has no '{{c}}' placeholder for the class name")
    names = list(class_names) if class_names else list(classes)
    if len(names) != len(classes):
        raise ValueError(f"method.prompts.class_names has {len(names)} names for {len(classes)} classes")
    return [[t.replace("{c}", str(n).replace("_", " ")) for t in templates] for n in names]


# ------------------------------------------------------------------------------------------------ folders
def write_folder(root: str | Path, images: torch.Tensor, labels: torch.Tensor, sources: list[str],
                 classes: list[str], meta: dict | None = None) -> Path:
    """Write uint8 (N, C, H, W) or [0, 1] float images as ``<root>/<class>/<k>.png`` with ``index.json``.
    The folder appears whole or not at all (written beside it, then renamed)."""
    from PIL import Image

    root = Path(root)
    if len(sources) != len(labels) or images.shape[0] != len(labels):
        raise ValueError(f"write_folder: {images.shape[0]} images, {len(labels)} labels, {len(sources)} sources")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    entries, counts = [], {}
    for img, y, src in zip(images.cpu(), labels.tolist(), sources):
        k = counts.get(y, 0)
        counts[y] = k + 1
        rel = f"{y}/{k:05d}.png"
        (tmp / str(y)).mkdir(parents=True, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp / rel, format="PNG")
        entries.append({"file": rel, "label": int(y), "source": src})
    (tmp / INDEX).write_text(json.dumps({"classes": list(classes), **(meta or {}), "images": entries}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root


def read_folder(root: str | Path, classes: list[str], image_size: tuple[int, int], channels: int) -> GeneratedSet:
    """A folder of generated images (layout in the module docstring), checked entry by entry; its files are decoded
    to the dataset's size and channels when read (:meth:`GeneratedSet.dataset`), not here."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"generated-image folder '{root}' does not exist")
    index_path = root / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"generated-image folder '{root}' has no {INDEX} (entries file, label, source)")
    try:
        index = json.loads(index_path.read_text())
        entries = index["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"'{index_path}' is not a generated-image index ({type(e).__name__}: {e})") from None
    if index.get("classes") is not None and list(index["classes"]) != list(classes):
        raise ValueError(f"'{index_path}' was made for classes {list(index['classes'])[:5]}... but the dataset has "
                         f"{list(classes)[:5]}...: labels would not match")
    paths, labels, sources = [], [], []
    for i, e in enumerate(entries):
        label, src = e.get("label"), str(e.get("source", ""))
        if not isinstance(label, int) or not 0 <= label < len(classes):
            raise ValueError(f"'{index_path}' entry {i}: label {label!r} is not a class index in [0, {len(classes)})")
        if not (src.startswith(PROMPT) or (src.startswith(REAL) and src[len(REAL):].isdigit())):
            raise ValueError(f"'{index_path}' entry {i}: source {src!r} must be 'real:<train id>' or 'prompt:<text>'")
        path = root / e["file"]
        if not path.is_file():
            raise FileNotFoundError(f"'{index_path}' entry {i}: image '{path}' not found")
        paths.append(path)
        labels.append(label)
        sources.append(src)
    if not paths:
        raise ValueError(f"'{index_path}' lists no images")
    return GeneratedSet(paths, torch.tensor(labels, dtype=torch.long), sources, list(classes), tuple(image_size),
                        channels, root)


# ------------------------------------------------------------------------------------------------ diffusion
def load_pipeline(mode: str, path: str | None, device: torch.device):
    """A diffusers pipeline as a text-to-image (cls2img) or image-to-image (img2img) pipeline, from a local folder
    (``save_pretrained``'s layout, never downloads) or a Hugging Face hub id such as
    ``stabilityai/stable-diffusion-2-1`` (read from the Hugging Face cache, fetched into it when missing: asked
    for by name, as ``hub`` weights are)."""
    try:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image
    except ImportError:
        raise ModuleNotFoundError(f"gen={mode} needs diffusers: pip install 'fastdistill[gen]'") from None
    if not path:
        raise ValueError(f"gen={mode} needs method.gen.pipeline=/path/to/a/diffusers/pipeline/folder or a hub id")
    folder = Path(str(path)).expanduser()
    cls = AutoPipelineForText2Image if mode == "cls2img" else AutoPipelineForImage2Image
    if (folder / "model_index.json").is_file():
        pipe = cls.from_pretrained(str(folder), local_files_only=True)
    elif HUB_ID.fullmatch(str(path)) and not folder.exists():
        try:
            pipe = cls.from_pretrained(str(path))
        except (OSError, ValueError) as e:  # not in the cache and not reachable, or no such pipeline
            raise FileNotFoundError(f"diffusion pipeline {str(path)!r} could not be loaded from the Hugging Face "
                                    f"hub or its cache ({type(e).__name__}); give its id with network access "
                                    f"once, or a local folder with model_index.json") from None
    else:
        raise FileNotFoundError(f"diffusion pipeline '{folder}' not found (a folder with model_index.json, as "
                                f"save_pretrained writes it, or a hub id such as stabilityai/stable-diffusion-2-1)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_resolution(pipe, resolution: int | None) -> int:
    """The pixel size the pipeline draws at: ``resolution`` or its UNet's native size."""
    if resolution:
        return int(resolution)
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _to_dataset_images(x: torch.Tensor, image_size: tuple[int, int], channels: int) -> torch.Tensor:
    """Pipeline output ([0, 1] float (N, 3, h, w)) -> uint8 at the dataset's size and channels."""
    x = to_input(x.float().clamp(0, 1), tuple(image_size), channels)
    return (x * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def generate_cls2img(pipe, prompts: list[list[str]], per_class: int, image_size: tuple[int, int], channels: int,
                     steps: int, guidance: float, resolution: int, seed: int,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``per_class`` images of every class, cycling over its prompts; image i of class c has seed (seed, c, i).
    Returns uint8 images (N, C, H, W), labels and sources."""
    images, labels, sources = [], [], []
    todo = [(c, i, prompts[c][i % len(prompts[c])]) for c in range(len(prompts)) for i in range(per_class)]
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        gens = [torch.Generator().manual_seed(hash_seed(seed, c, i)) for c, i, _ in chunk]
        out = pipe(prompt=[p for _, _, p in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   height=resolution, width=resolution, generator=gens, output_type="pt").images
        images.append(_to_dataset_images(out, image_size, channels))
        labels += [c for c, _, _ in chunk]
        sources += [PROMPT + p for _, _, p in chunk]
    return torch.cat(images), torch.tensor(labels, dtype=torch.long), sources


@torch.no_grad()
def generate_img2img(pipe, real: ImageDataset, real_ids: torch.Tensor,
                     prompts: list[list[str]], per_image: int, strength: float, image_size: tuple[int, int],
                     channels: int, steps: int, guidance: float, resolution: int, seed: int,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``per_image`` redraws of every real image (``real``: the images of train ids ``real_ids``, decoded a batch at a
    time) at ``strength``, prompted with the image's class; each is recorded with its source ``real:<id>``.
    Returns uint8 images (N, C, H, W), labels and sources."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"method.gen.strength must be in (0, 1], got {strength!r}")
    labels = real.labels
    todo = [(r, k) for r in range(len(real)) for k in range(per_image)]
    images, out_labels, sources = [], [], []
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        rows = torch.tensor([r for r, _ in chunk])
        x = to_input(real.take(rows), (resolution, resolution), 3)
        ys = labels[rows].tolist()
        gens = [torch.Generator().manual_seed(hash_seed(seed, int(real_ids[r]), k)) for r, k in chunk]
        prompt = [prompts[y][k % len(prompts[y])] for y, (_, k) in zip(ys, chunk)]
        out = pipe(prompt=prompt, image=x, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="pt").images
        images.append(_to_dataset_images(out, image_size, channels))
        out_labels += ys
        sources += [f"{REAL}{int(real_ids[r])}" for r, _ in chunk]
    return torch.cat(images), torch.tensor(out_labels, dtype=torch.long), sources


def hash_seed(*parts) -> int:
    """A 63-bit seed from a tuple: the same image gets the same noise whatever the batch it falls in."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generation_key(**fields) -> str:
    """Hash of everything that determines a generated set (the cache folder's name)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_generated(gen, train, real_ids: torch.Tensor, prompts: list[list[str]], seed: int,
                    device: torch.device, cache_dir: Path) -> GeneratedSet | None:
    """The generated set a ``method.gen`` config asks for (None for ``none``), from the cache when it is there.

    ``train`` is the train split, ``real_ids`` the ids (rows of it) of the real images the student may use:
    img2img redraws these, and a folder may only name these as sources (more would leak real images).
    """
    mode = gen.mode
    if mode not in GEN_MODES:
        raise ValueError(f"unknown method.gen.mode {mode!r}; expected one of {', '.join(GEN_MODES)}")
    if mode == "none":
        return None
    size, channels = tuple(train.image_size), train.channels
    if mode == "folder":
        if not gen.folder:
            raise ValueError("gen=folder needs method.gen.folder=DIR (images with an index.json of sources)")
        out = read_folder(gen.folder, train.classes, size, channels)
        allowed = set(real_ids.tolist())
        ids = out.source_ids()
        outside = [int(i) for i in ids if i >= 0 and int(i) not in allowed]
        if outside:
            raise ValueError(f"'{gen.folder}' has images made from real:{outside[0]} (and {len(outside) - 1} more), "
                             f"which is not among the student's real images: it would leak real data")
        return out
    folder = Path(str(gen.pipeline)).expanduser() if gen.pipeline else None
    # a folder by its absolute path, a hub id as it is spelled (the same id from any working directory)
    name = None if folder is None else str(folder.resolve()) if folder.exists() else str(gen.pipeline)
    key = generation_key(mode=mode, pipeline=name, prompts=prompts, multiplier=gen.multiplier, strength=gen.strength,
                         steps=gen.steps, guidance=gen.guidance, resolution=gen.resolution, seed=seed,
                         real_ids=real_ids.tolist(), data=train.name, size=size, channels=channels)
    root = Path(cache_dir) / key
    if (root / INDEX).is_file():
        return read_folder(root, train.classes, size, channels)
    pipe = load_pipeline(mode, gen.pipeline, device)
    res = pipeline_resolution(pipe, gen.resolution)
    if mode == "cls2img":
        per_class = gen.multiplier * max(1, real_ids.numel() // len(train.classes))
        images, labels, sources = generate_cls2img(pipe, prompts, per_class, size, channels, gen.steps, gen.guidance,
                                                   res, seed, gen.batch_size)
    else:
        images, labels, sources = generate_img2img(pipe, train.subset(real_ids), real_ids, prompts, gen.multiplier,
                                                   gen.strength, size, channels, gen.steps, gen.guidance, res, seed,
                                                   gen.batch_size)
    write_folder(root, images, labels, sources, train.classes,
                 {"made_by": mode, "pipeline": str(gen.pipeline), "strength": gen.strength, "steps": gen.steps})
    return read_folder(root, train.classes, size, channels)


# ------------------------------------------------------------------------------------------------ stand-in
def augment_images(real: torch.Tensor, per_image: int, seed: int, degrees: float = 12.0,
                   translate: float = 0.1, scale: tuple[float, float] = (0.85, 1.1),
                   distortion: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` random affine + perspective variants of every uint8 image (R, C, H, W) -> uint8
    (R * per_image, C, H, W) and the row of the real image each came from. A stand-in for img2img where no
    diffusion weights are at hand: a transformed real image, not a new one."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    aug = v2.Compose([v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale),
                      v2.RandomPerspective(distortion_scale=distortion, p=0.5)])
    out, rows = [], []
    for r in range(real.shape[0]):
        for _ in range(per_image):
            out.append(aug(real[r]))
            rows.append(r)
    return torch.stack(out), torch.tensor(rows, dtype=torch.long)
