"""benchmarks/gpu_suite.sh end to end in its dry mode (tiny sizes, Triton through the interpreter on CPU), so the one
GPU call is known to run before a GPU is available."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["tests", *(f"{k}_{d}" for d in ("float32", "bfloat16") for k in ("grad_cosine", "bn_stats", "attention_kl")),
         "fadrm", "parallel_batches", "lgm_in1k"]


def test_dry_run_writes_every_step_and_its_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SUITE), "--dry"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"gpu_suite.sh --dry exited {done.returncode}:\n{done.stdout[-3000:]}"
    steps = dict(line.split() for line in (tmp_path / "steps.txt").read_text().splitlines())
    assert list(steps) == STEPS, f"steps run: {list(steps)}"
    assert all(rc == "0" for rc in steps.values()), f"failed steps: {steps}"
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    names = sorted(r["benchmark"] for r in records)
    assert names == sorted(["attention_kl", "attention_kl", "bn_stats", "bn_stats", "fadrm", "grad_cosine",
                            "grad_cosine", "lgm_step_single", "parallel_batches"]), f"results: {names}"
    for r in records:
        assert r["device"] and r["git_sha"] and r["torch"] and r["rows"], f"{r['benchmark']}: incomplete record"
    with tarfile.open(tmp_path / "results.tgz") as archive:
        packed = [n for n in archive.getnames() if n.endswith(".json")]
    assert len(packed) == len(records), f"results.tgz holds {len(packed)} of {len(records)} result files"


def test_unknown_mode_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", str(SUITE), "--fast"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_suite.sh: unknown mode '--fast'; expected --prepare, --dry, --tables or none"
