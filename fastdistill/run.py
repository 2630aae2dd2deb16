"""The one entry point: ``python -m fastdistill.run +method=NAME key=value ...`` (Hydra).

Common overrides, the same for every method: ``data=NAME data.root=PATH ipc=N seed=N device=auto|cpu|cuda
precision=fp32|bf16|fp16 out=PATH preset=smoke|default|paper resume=true``. The preset's values
(``configs/presets/<method>/<preset>.yaml``) override the method's defaults; command-line keys override both.
"""
from __future__ import annotations

import os
import sys
from importlib import resources

import hydra
from omegaconf import DictConfig, OmegaConf

from fastdistill.console import fail
from fastdistill.engine import distributed
from fastdistill.engine.device import resolve_device
from fastdistill.recipes import RECIPES, get_recipe

CONFIG_MODULE = "fastdistill.configs"
PRESETS = ("smoke", "default", "paper")
# errors a user can cause and fix: one line and exit code 2; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError)


def _choice(overrides: list[str], key: str) -> str | None:
    value = None
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            value = v
    return value


def _options(group: str) -> list[str]:
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def with_preset(overrides: list[str]) -> list[str]:
    """Check the method, data and preset choices, and append the chosen method's preset values.

    Appended after ``+method``, the preset config merges over the method's defaults; Hydra applies
    ``key=value`` overrides after every config, so the command line still wins.
    """
    method = _choice(overrides, "method")
    if method is None:
        raise ValueError(f"no method given; add +method=NAME with NAME one of {', '.join(sorted(RECIPES))}")
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(sorted(RECIPES))}")
    data = _choice(overrides, "data")
    if data is not None and data not in _options("data"):
        raise ValueError(f"unknown dataset {data!r}; expected one of {', '.join(_options('data'))}")
    preset = _choice(overrides, "preset") or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if (resources.files(CONFIG_MODULE) / "presets" / method / f"{preset}.yaml").is_file():
        overrides = [*overrides, f"+presets@_global_={method}/{preset}"]
    return overrides


def compose(overrides: list[str]) -> DictConfig:
    """The run config for these overrides, as the command line composes it (for tests and notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = with_preset(list(overrides))
    if GlobalHydra.instance().is_initialized():  # inside a running app (a recipe composing a teacher's config)
        return hydra_compose("config", overrides=overrides)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def check_common(cfg: DictConfig) -> None:
    """The keys every method shares, checked before any work."""
    from fastdistill.data import LOADERS
    from fastdistill.engine.precision import PRECISIONS

    if not isinstance(cfg.ipc, int) or cfg.ipc < 1:
        raise ValueError(f"ipc must be an integer >= 1 (images per class), got {cfg.ipc!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; expected one of {', '.join(PRECISIONS)}")
    if cfg.loader not in LOADERS:
        raise ValueError(f"unknown loader {cfg.loader!r}; expected one of {', '.join(LOADERS)}")
    resolve_device(cfg.device)


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


@hydra.main(version_base="1.3", config_path="pkg://fastdistill.configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as e:
        if os.environ.get("FASTDISTILL_DEBUG"):
            raise
        fail(e)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: resume=true out={cfg.get('out')}", file=sys.stderr)
        raise SystemExit(130)


_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's own flags (with their values) apart from the config overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def main() -> None:
    flags, overrides = _split_flags(sys.argv[1:])
    if not any(f in ("--help", "-h", "--hydra-help", "--info", "-i") for f in flags):
        try:
            overrides = with_preset(overrides)
        except USER_ERRORS as e:
            fail(e)
    sys.argv = [sys.argv[0], *flags, *overrides]
    _hydra_main()


if __name__ == "__main__":
    main()
