"""Taps: forward hooks that read what a frozen backbone computes inside (BN inputs, attention rows)."""
from __future__ import annotations

import contextlib

import torch

from fastdistill.kernels.bn_stats import bn_eval_with_stats_loss, bn_stats_loss
from fastdistill.losses.bn_stats import grouped_bn_stats_loss
from fastdistill.models.backbone import Backbone
from fastdistill.models.timm_source import queries_keys


class BNStatsTap:
    """BN-statistics matching on every BN layer of a frozen teacher (SRe2L / FADRM recovery loss).

    Inside ``with tap.collect():`` every forward pass records its BN terms; ``loss()`` then returns ``sum_l m_l (||var_l - running_var_l||_2 + ||mean_l - running_mean_l||_2)``
    with ``m_l = first_multiplier`` for the first BN layer (the stem) and 1 elsewhere (Cui et al. 2025,
    ``recover/utils_recover.py``). Each term is the fused ``bn_stats`` kernel: fp32 statistics in one pass,
    only the BN input saved for the backward (the published hook's ``.contiguous()`` keeps a second copy).
    """

    def __init__(self, backbone: Backbone, first_multiplier: float = 10.0, backend: str = "auto"):
        self.layers = backbone.bn_layers()
        if not self.layers:
            raise ValueError(f"{backbone.spec.name} has no batch-norm layers: BN-statistics matching needs a BN "
                             f"teacher (ResNet, MobileNet, EfficientNet, ...)")
        self.multipliers = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.backend = backend
        self.terms: list[torch.Tensor] = []
        self.active = False  # other forwards of the teacher (scoring, relabelling) record nothing
        self.groups = 1
        self.handles = [bn.register_forward_hook(self._hook) for _, bn in self.layers]

    @contextlib.contextmanager
    def collect(self, groups: int = 1):
        """Record the BN terms of the forwards inside; ``groups > 1``: the batch is that many recovery batches side by
        side and each term a (groups,) tensor of their own statistics' distances."""
        self.active, self.terms, self.groups = True, [], groups
        try:
            yield self
        finally:
            self.active = False

    def _hook(self, module, inputs, output):
        if not self.active:
            return None
        x = inputs[0]
        if self.groups > 1:
            self.terms.append(grouped_bn_stats_loss(x, module.running_mean, module.running_var, self.groups))
            return None
        if not module.training and (self.backend == "torch" or (self.backend == "auto" and x.device.type != "cuda")) \
                and module.weight is not None and not module.weight.requires_grad:
            # the torch path: the layer and its term as one node, whose backward writes one gradient where autograd
            # would write three (the layer's, the term's, their sum); the layer's own output is recomputed (cheap)
            y, term = bn_eval_with_stats_loss(x, module, output.dtype)
            self.terms.append(term)
            return y
        self.terms.append(bn_stats_loss(x, module.running_mean, module.running_var, backend=self.backend))
        return None

    def loss(self) -> torch.Tensor:
        """The weighted sum over the last forward pass (fp32 scalar, or (groups,)); clears the collected terms."""
        if len(self.terms) != len(self.layers):
            raise RuntimeError(f"BNStatsTap saw {len(self.terms)} BN inputs for {len(self.layers)} layers: "
                               f"call loss() once after each forward")
        total = sum(m * t for m, t in zip(self.multipliers, self.terms))
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.terms = []


class QKTap:
    """Queries and keys (B, H, L, D) of one block of a timm ViT, read from the output of its qkv projection (the
    fused attention path never returns them); they keep their graph when the block is trained."""

    def __init__(self, backbone: Backbone, layer: int):
        blocks = getattr(backbone.model, "blocks", None)
        if blocks is None or not hasattr(blocks[0], "attn") or not hasattr(blocks[0].attn, "qkv"):
            raise ValueError(f"{backbone.spec.name} is not a ViT with qkv attention: attention transfer needs ViT "
                             f"teachers and student")
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"attention_layer {layer} is outside the {len(blocks)} blocks of {backbone.spec.name}")
        self.attn = blocks[layer].attn
        self.q = self.k = None
        self.handle = self.attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        self.q, self.k = queries_keys(self.attn, out)

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, self.q, self.k = self.q, self.k, None, None
        return q, k
