"""The data contract of a backbone (timm's ``PretrainedCfg``): the only place normalisation comes from."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # the id it was created from, e.g. "timm:vit_small_patch16_224.dino"
    source: str  # "timm" | "open_clip"
    arch: str
    tag: str | None
    input_size: tuple[int, int]  # (H, W) the weights were trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    feature_dim: int  # D of embed()
    num_classes: int  # 0 when the backbone has no classifier
    family: str  # "vit" | "cnn" | other
    fixed_size: bool  # True when only input_size is accepted (ViT without dynamic_img_size)
    patch_size: int | None = None
    weights: str = "none"  # none | hub | a file path | a packaged weights name

    def to_dict(self) -> dict:
        return asdict(self)
