"""Test session set-up: Triton kernels run through the interpreter on CPU; no network; caches in tmp."""
import os

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
