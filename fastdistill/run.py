"""The command line: ``python -m fastdistill.run +method=NAME key=value ...`` (Hydra).

Common overrides, the same for every method: ``data=NAME data.root=PATH ipc=N seed=N device=auto|cpu|cuda
precision=fp32|bf16|fp16|auto out=PATH preset=smoke|default|paper resume=true``. Composition and checks live in
``config.py``, running a composed config in ``api.py``; this module only turns errors into one line and exit 2.
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from fastdistill.api import run
from fastdistill.config import compose, with_preset
from fastdistill.console import USER_ERRORS, fail


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
            compose(overrides)  # Hydra's own errors (an unknown key, a bad override) as one line, not its report
            overrides = with_preset(overrides)
        except USER_ERRORS as e:
            fail(e)
        except HydraException as e:
            fail(ValueError(" ".join(str(e).strip().splitlines()[:2])))
    sys.argv = [sys.argv[0], *flags, *overrides]
    _hydra_main()


if __name__ == "__main__":
    main()
