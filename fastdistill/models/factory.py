"""``create_backbone("source:name", pretrained=...)``: the one constructor of every backbone.

Ids keep upstream names verbatim: ``timm:<arch>[.<tag>]`` and ``open_clip:<arch>/<pretrained tag>``.
Sources register themselves with :func:`register_source`.
"""
from __future__ import annotations

from typing import Callable

from fastdistill.models.backbone import Backbone

_SOURCES: dict[str, Callable[..., Backbone]] = {}


def register_source(name: str):
    """Register ``fn(name, pretrained, **kwargs) -> Backbone`` for ids ``<source>:<name>``."""
    def wrap(fn):
        _SOURCES[name] = fn
        return fn
    return wrap


def list_sources() -> list[str]:
    _import_builtin()
    return sorted(_SOURCES)


def parse_backbone_id(backbone_id: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ("timm", "resnet18"); a one-line error lists the valid sources."""
    _import_builtin()
    source, sep, name = str(backbone_id).partition(":")
    if not sep or not name:
        raise ValueError(f"backbone id {backbone_id!r} must be SOURCE:NAME with SOURCE one of "
                         f"{', '.join(sorted(_SOURCES))} (e.g. timm:resnet18, open_clip:ViT-B-32/openai)")
    if source not in _SOURCES:
        raise ValueError(f"unknown backbone source {source!r} in {backbone_id!r}; expected one of "
                         f"{', '.join(sorted(_SOURCES))}")
    return source, name


def create_backbone(backbone_id: str, pretrained: str | None = "none", **kwargs) -> Backbone:
    """Build a backbone by id.

    Args:
        backbone_id: ``timm:<arch>[.<tag>]`` or ``open_clip:<arch>/<tag>``.
        pretrained: ``none`` (random init), ``hub`` (download through the source library: needs network),
            a weights file (safetensors or torch), or a packaged weights name.
        **kwargs: passed to the source's constructor (``num_classes``, ``img_size``, ...); None values are
            dropped so the source's defaults hold.

    Raises:
        ValueError: unknown source or model name, weights that do not fit.
        FileNotFoundError: a weights path that does not exist.
    """
    source, name = parse_backbone_id(backbone_id)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _SOURCES[source](name, pretrained=pretrained, **kwargs)


def _import_builtin() -> None:
    from fastdistill.models import open_clip_source, timm_source  # noqa: F401  (registration side effect)
