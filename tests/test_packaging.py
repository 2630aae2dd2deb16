"""The torch pin admits the versions the project runs on and refuses the wheel that breaks torchvision."""
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pins() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def test_torch_pin_admits_the_gpu_image_and_this_install_but_not_the_local_cpu_wheel():
    spec = _pins()["torch"].specifier
    # 2.11: the GPU image's torch, where the kernel tests and the GPU suite ran (benchmarks/results/h200_*)
    for version in ("2.11.0+cu130", "2.14.1", torch.__version__):
        assert spec.contains(Version(version), prereleases=True), f"torch pin {spec} refuses {version}"
    assert not spec.contains(Version("2.13.0+cpu")), f"torch pin {spec} admits the 2.13.0+cpu wheel"


def test_torchvision_pin_covers_the_pairs_of_the_admitted_torch_releases():
    spec = _pins()["torchvision"].specifier
    # torchvision 0.(x + 15) pins torch 2.x exactly
    for torch_minor in (11, 12, 14):
        assert spec.contains(Version(f"0.{torch_minor + 15}.0")), f"torchvision pin {spec} leaves torch 2.{torch_minor}"
