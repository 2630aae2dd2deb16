"""One interface over every backbone source: ``embed``, ``attention``, ``bn_layers``, normalisation."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from fastdistill.models.spec import BackboneSpec


class _Relayout(torch.autograd.Function):
    """``x`` in ``forward_format``, its gradient returned in ``backward_format``: each side of a re-laid-out op keeps
    one layout (a channels_last gradient meeting an NCHW tensor takes torch's slow mixed-layout kernels)."""

    @staticmethod
    def forward(ctx, x, forward_format, backward_format):
        ctx.backward_format = backward_format
        return x.contiguous(memory_format=forward_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.backward_format), None, None


def _max_pool_channels_last(module: nn.Module, args: tuple):
    """Forward pre-hook: a CPU NCHW input is pooled as channels_last. torch's NCHW max-pool kernel on CPU is
    scalar: measured (1 thread, (100, 64, 32, 32) fp32) 114 ms against 10 ms for channels_last plus 15 ms for
    the copy; 9-12 % of a ResNet-18 step (FADRM recovery, LGM). Max-pooling is exact, so values and gradients
    are unchanged."""
    x = args[0]
    module._relaid = x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[1] > 1 \
        and not x.is_contiguous(memory_format=torch.channels_last)
    if module._relaid:
        return (_Relayout.apply(x, torch.channels_last, torch.contiguous_format),) + tuple(args[1:])
    return None


def _max_pool_back_to_nchw(module: nn.Module, args: tuple, output):
    if getattr(module, "_relaid", False) and isinstance(output, torch.Tensor):
        module._relaid = False
        return _Relayout.apply(output, torch.contiguous_format, torch.channels_last)
    return None


class Backbone(nn.Module):
    """A vision backbone behind one interface.

    Inputs are images in [0, 1], (N, 1 or 3, H, W): the backbone applies its own normalisation, so a CLIP
    model gets CLIP's mean and std, never ImageNet's (a defect of the published LGM code, METHODS.md).

    Args:
        model: the source module (timm model, open_clip visual tower).
        spec: its data contract.
        embed_fn: ``(model, x_normalised) -> (N, D)`` pooled features before any classifier.
        logits_fn: ``(model, x_normalised) -> (N, num_classes)``, or None without a classifier.
        attention_modules: per layer, the attention module and a function computing its probabilities
            ``(module, layer_input) -> (N, H, L, L)`` from the layer's input tokens.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, embed_fn: Callable, logits_fn: Callable | None = None,
                 attention_modules: list[tuple[nn.Module, Callable]] | None = None):
        super().__init__()
        self.model = model
        self.spec = spec
        self._embed_fn = embed_fn
        self._logits_fn = logits_fn
        self._attention = attention_modules or []
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        for m in model.modules():
            if isinstance(m, nn.MaxPool2d):
                m.register_forward_pre_hook(_max_pool_channels_last)
                m.register_forward_hook(_max_pool_back_to_nchw)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's input: 3 channels, its mean/std; checks the resolution."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.spec.name}: expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        if self.spec.fixed_size and size != tuple(self.spec.input_size):
            raise ValueError(f"{self.spec.name} takes {self.spec.input_size[0]}x{self.spec.input_size[1]} px input, "
                             f"got {size[0]}x{size[1]}; resize the images or create it with a matching img_size")
        if self.spec.patch_size and (size[0] % self.spec.patch_size or size[1] % self.spec.patch_size):
            raise ValueError(f"{self.spec.name}: resolution {size[0]}x{size[1]} is not a multiple of its patch size "
                             f"{self.spec.patch_size}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of [0, 1] images (N, C, H, W)."""
        return self._embed_fn(self.model, self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) when the backbone has a classifier, else ``embed``."""
        if self._logits_fn is None:
            return self.embed(x)
        return self._logits_fn(self.model, self.normalize(x))

    @property
    def num_layers(self) -> int:
        return len(self._attention)

    def attention(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Per-head attention probabilities {layer: (N, H, L, L)} of a ViT; rows sum to 1.

        ``layers`` index the transformer blocks (negative from the end; default: the last). L counts all
        tokens, prefix (CLS, registers) first. Runs one forward pass; raises for backbones without attention.
        """
        if not self._attention:
            raise ValueError(f"{self.spec.name} has no attention layers (family {self.spec.family!r})")
        n = len(self._attention)
        layers = [n - 1] if layers is None else [i % n for i in layers]
        out, handles = {}, []
        for i in layers:
            module, probs_fn = self._attention[i]

            def hook(mod, args, kwargs, i=i, probs_fn=probs_fn):
                tokens = args[0] if args else kwargs.get("x", kwargs.get("query"))
                out[i] = probs_fn(mod, tokens)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            self.embed(x)
        finally:
            for h in handles:
                h.remove()
        return out

    def bn_layers(self) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """(name, module) of every batch-norm layer in forward order (registration order)."""
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def freeze(self) -> "Backbone":
        """Eval mode and no parameter gradients: frozen backbones never accumulate weight gradients
        (the published LGM code only calls .eval(), costing 1.22-1.44x step time, METHODS.md)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
