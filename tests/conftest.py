"""Test session set-up: Triton kernels run through the interpreter on CPU; no network; caches in tmp."""
import os
import subprocess
import sys

import torch

# must precede the first `import triton` anywhere in the session (PLATFORM.md)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teacher cache and inductor cache per test session, never the user's home."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("FASTDISTILL_CACHE", str(root / "fastdistill-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor-cache"))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a result never depends on test order or luck."""
    import random

    random.seed(0)
    torch.manual_seed(0)


class PythonRunner:
    """``python ARGS`` in a child process, or with ``ranks`` > 1 the same under ``torchrun --standalone`` (gloo on
    CPU). Every process computes on one thread, as torchrun gives each rank, so one process and its ranks reduce
    in the same order."""

    @staticmethod
    def command(ranks: int = 1) -> list[str]:
        if ranks == 1:
            return [sys.executable]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]

    @staticmethod
    def env(**extra: str) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", **extra}

    def __call__(self, *args, ranks: int = 1, env: dict | None = None, timeout: float = 600):
        """Runs to the end and fails the test, with the output's tail, unless it exits 0."""
        r = subprocess.run([*self.command(ranks), *map(str, args)], env=self.env(**(env or {})),
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        return r


@pytest.fixture(scope="session")
def run_python():
    return PythonRunner()
