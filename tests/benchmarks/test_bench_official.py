"""benchmarks/bench_official.py at tiny sizes against the official code, so the comparison is known to run.

The official repositories are never part of this project: the test takes them from ``FADRM_REPO`` and ``LGM_REPO``
(a checkout, or a git directory of which the needed paths are checked out into a temporary folder) and skips
without them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_official.py"
# the paths the benchmark imports, relative to each repository's root
NEEDED = {"FADRM_REPO": ["recover", "models"],
          "LGM_REPO": ["src/augmentation", "src/synsets", "src/distillation", "src/models/linear_classifier.py",
                       "src/data/dataloaders/base.py"]}


def _checkout(var: str, tmp: Path) -> Path:
    location = os.environ.get(var)
    if not location:
        pytest.skip(f"{var} is not set: give a checkout (or git directory) of the official repository to compare with")
    path = Path(location)
    if all((path / p).exists() for p in NEEDED[var]):
        return path
    if not (path / "HEAD").is_file():
        pytest.skip(f"{var}={location!r} is neither a checkout holding {NEEDED[var]} nor a git directory")
    out = tmp / var.lower()
    out.mkdir()
    archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD", *NEEDED[var]], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "x", "-C", str(out)], input=archive, check=True)
    return out


@pytest.fixture
def official(tmp_path):
    pytest.importorskip("cv2", reason="the official FADRM utilities import OpenCV: pip install opencv-python-headless")
    pytest.importorskip("einops", reason="the official LGM pyramid imports einops: pip install einops")
    return _checkout("FADRM_REPO", tmp_path), _checkout("LGM_REPO", tmp_path)


def test_both_official_steps_run_beside_fastdistill_and_write_ratios(tmp_path, official):
    fadrm, lgm = official
    cmd = [sys.executable, str(SCRIPT), "--fadrm-repo", str(fadrm), "--lgm-repo", str(lgm), "--resolutions", "32",
           "--classes", "2", "--iterations", "1", "--rounds", "1", "--precisions", "fp32", "--lgm-size", "32",
           "--lgm-classes", "2", "--lgm-augs", "1", "--lgm-chunk", "1", "--lgm-backbones", "timm:resnet18",
           "--out-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"bench_official.py exited {done.returncode}:\n{done.stderr[-3000:]}"
    record = json.loads((tmp_path / "out" / "official_cpu.json").read_text())
    providers = {(r["benchmark"], r["provider"]) for r in record["rows"]}
    assert providers == {("fadrm_vs_official", "official"), ("fadrm_vs_official", "fastdistill_fp32"),
                         ("lgm_vs_official", "official"), ("lgm_vs_official", "one_pass_fp32"),
                         ("lgm_vs_official", "two_pass_auto_fp32"), ("lgm_vs_official", "two_pass_1_fp32")}, \
        f"rows: {sorted(providers)}"
    for r in record["rows"]:
        assert r["ms_p50"] > 0 and r["speedup"] > 0, f"{r['benchmark']} {r['provider']}: {r}"
    assert record["cpu"].get("model") is not None, "the CPU model and flags are recorded"


def test_without_a_repository_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("nothing to compare: give --fadrm-repo and/or --lgm-repo")
