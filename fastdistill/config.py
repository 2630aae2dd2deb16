"""Compose a run config (method, preset, overrides) and check the keys every method shares.

The command line (``run.py``), the Python API (``api.py``) and recipes that build a teacher's config all compose
through :func:`compose`, so a key means the same everywhere. The preset's values
(``configs/presets/<method>/<preset>.yaml``) override the method's defaults; command-line keys override both.
Method names come from ``configs/method/*.yaml``: this module imports no recipe.
"""
from __future__ import annotations

import numbers
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_MODULE = "fastdistill.configs"
PRESETS = ("smoke", "default", "paper")

# Typed keys wherever they appear in a config (top level or under method/eval/data): (kind, lowest value).
# None means "unset, use the default" for every key but the two that have no default to fall back on.
TYPED_KEYS = {
    "seed": ("integer", 0), "ipc": ("integer", 1), "checkpoint_every": ("integer", 0),
    "epochs": ("integer", 0), "warmup_epochs": ("integer", 0), "iterations": ("integer", 0),
    "batch_size": ("integer", 1), "eval_batch_size": ("integer", 1), "image_size": ("integer", 1),
    "lr": ("number", 0.0), "min_lr": ("number", 0.0), "weight_decay": ("number", 0.0),
}
REQUIRED = ("seed", "ipc")
STRICTLY_POSITIVE = ("lr",)


def options(group: str) -> list[str]:
    """The config names of a group (``method``, ``data``, ...), from the installed YAML files."""
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _choice(overrides: list[str], key: str) -> str | None:
    value = None
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            value = v
    return value


def with_preset(overrides: list[str]) -> list[str]:
    """Check the method, data and preset choices, and append the chosen method's preset values.

    Appended after ``+method``, the preset config merges over the method's defaults; Hydra applies
    ``key=value`` overrides after every config, so the command line still wins.
    """
    methods = options("method")
    method = _choice(overrides, "method")
    if method is None:
        raise ValueError(f"no method given; add +method=NAME with NAME one of {', '.join(methods)}")
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(methods)}")
    data = _choice(overrides, "data")
    if data is not None and data not in options("data"):
        raise ValueError(f"unknown dataset {data!r}; expected one of {', '.join(options('data'))}")
    preset = _choice(overrides, "preset") or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if (resources.files(CONFIG_MODULE) / "presets" / method / f"{preset}.yaml").is_file():
        overrides = [*overrides, f"+presets@_global_={method}/{preset}"]
    return overrides


def compose(overrides: list[str]) -> DictConfig:
    """The run config for these overrides, exactly as the command line composes it."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = with_preset(list(overrides))
    if GlobalHydra.instance().is_initialized():  # inside a running app (a recipe composing a teacher's config)
        return hydra_compose("config", overrides=overrides)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def _typed_keys(node, path: str = ""):
    """(dotted path, key, value) of every typed key in the config tree."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            value, child = node[key], f"{path}.{key}" if path else str(key)
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _typed_keys(value, child)
            elif key in TYPED_KEYS:
                yield child, key, value
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, (DictConfig, ListConfig)):
                yield from _typed_keys(item, f"{path}[{i}]")


def check_types(cfg: DictConfig) -> None:
    """Every typed key (seed, ipc, lr, epochs, batch sizes, image sizes...) has the type and range it needs."""
    for path, key, value in _typed_keys(cfg):
        kind, low = TYPED_KEYS[key]
        if value is None and key not in REQUIRED:
            continue
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        ok = is_number and (kind == "number" or isinstance(value, numbers.Integral))
        if ok and (value < low or (key in STRICTLY_POSITIVE and value <= low)):
            ok = False
        if not ok:
            bound = f"> {low}" if key in STRICTLY_POSITIVE else f">= {low}"
            article = "an" if kind == "integer" else "a"
            raise ValueError(f"{path} must be {article} {kind} {bound}, got {value!r}")


def check_out(cfg: DictConfig) -> None:
    """The run folder must not lie inside the dataset folder: its images would become training data."""
    root = cfg.data.get("root")
    if not root:
        return
    data, out = Path(str(root)).expanduser().resolve(), Path(str(cfg.out)).expanduser().resolve()
    if out == data or data in out.parents:
        raise ValueError(f"out {str(cfg.out)!r} lies inside data.root {str(root)!r}, where the run's images would be "
                         f"read as data; choose an out outside the dataset")


def check_common(cfg: DictConfig) -> None:
    """The keys every method shares, checked before any work."""
    from fastdistill.data import LOADERS
    from fastdistill.engine.device import resolve_device
    from fastdistill.engine.metric_log import check_logger
    from fastdistill.engine.precision import CHOICES

    check_types(cfg)
    check_logger(cfg.get("logger", "jsonl"))
    if cfg.precision not in CHOICES:
        raise ValueError(f"unknown precision {cfg.precision!r}; expected one of {', '.join(CHOICES)}")
    if cfg.loader not in LOADERS:
        raise ValueError(f"unknown loader {cfg.loader!r}; expected one of {', '.join(LOADERS)}")
    check_out(cfg)
    resolve_device(cfg.device)
