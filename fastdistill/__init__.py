"""fastdistill: dataset condensation and knowledge distillation with pre-trained vision foundation models.

``distill``, ``evaluate`` and ``load_distilled`` are the Python API (``fastdistill/api.py``); they load on first
use, so ``import fastdistill`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["distill", "evaluate", "load_distilled"]


def __getattr__(name: str):
    if name in __all__:
        from fastdistill import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdistill' has no attribute {name!r}")
