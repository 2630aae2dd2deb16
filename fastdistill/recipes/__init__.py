"""The explicit recipe registry: ``+method=NAME`` runs ``RECIPES[NAME].main(cfg)``.

A recipe is one module read top to bottom (torchtune style): a docstring with the paper and the loss,
a class whose ``__init__`` validates, ``setup`` builds, ``train`` loops, then ``save_checkpoint``,
``load_checkpoint``, ``cleanup``; ``main(cfg)`` calls them.
"""
from __future__ import annotations

import importlib

RECIPES = {
    "attention": "fastdistill.recipes.attention",
    "dino": "fastdistill.recipes.dino",
    "evaluate": "fastdistill.recipes.evaluate",
    "fadrm": "fastdistill.recipes.fadrm",
    "kd_clip": "fastdistill.recipes.kd_clip",
    "kd_multi": "fastdistill.recipes.kd_multi",
    "lgm": "fastdistill.recipes.lgm",
    "mae": "fastdistill.recipes.mae",
    "teacher": "fastdistill.recipes.teacher",
}


def get_recipe(name: str):
    """The recipe module of ``name``; unknown names get the list of valid ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])
