"""Every shipped config composes with every preset, and every ``_target_`` binds to its component
(torchtune's config validation: checked without building anything)."""
import importlib
import inspect

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from fastdistill.recipes import RECIPES
from fastdistill.config import PRESETS, compose


def _targets(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for k in node:
            yield from _targets(node[k], f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _bind(path, node):
    module, _, name = node._target_.rpartition(".")
    target = getattr(importlib.import_module(module), name)
    kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
    sig = inspect.signature(target)
    params = sig.parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = set(kwargs) - set(params)
        assert not unknown, f"{path}: {node._target_} takes no {sorted(unknown)}"


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("preset", PRESETS)
def test_method_config_composes_and_binds(method, preset):
    cfg = compose([f"+method={method}", f"preset={preset}"])
    assert cfg.method.name == method and cfg.preset == preset
    OmegaConf.resolve(cfg)
    for path, node in _targets(cfg):
        _bind(path, node)


def test_preset_values_reach_the_method():
    smoke = compose(["+method=teacher", "preset=smoke"])
    paper = compose(["+method=teacher", "preset=paper"])
    assert smoke.method.epochs < paper.method.epochs
    assert compose(["+method=teacher", "preset=paper", "method.epochs=2"]).method.epochs == 2


def test_config_methods_are_the_registered_recipes():
    # config.py reads method names from configs/method/*.yaml so that it imports no recipe: the two lists must agree
    from fastdistill.config import options
    from fastdistill.recipes import RECIPES

    assert options("method") == sorted(RECIPES)
