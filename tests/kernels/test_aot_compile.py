"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 on CPU within the target's resources.

``benchmarks/kernels_aot.py`` runs the project's launch paths (the public functions with ``backend="triton"`` and
their autograd backward) on uninitialised CPU tensors, intercepts each ``kernel[grid](...)`` and compiles it with
``triton.compile`` for a GPUTarget (ptxas ships with triton). Checked per target: no compile error, shared memory
per block within the opt-in maximum, spill bytes per thread within ``kernels_aot.SPILL_BYTES_MAX`` (its reason is
stated there). Here it compiles ``CI_SIZES``; ``python benchmarks/kernels_aot.py`` compiles every published size.

It runs in a subprocess without TRITON_INTERPRET: conftest.py sets it before triton is imported, and the
interpreter replaces every @triton.jit function, triton.language's own included, with one that cannot be compiled.

Runtime (198 configurations, 2 forked compile processes): about 150 s of CPU time with an empty cache, mostly
ptxas on the float32 (tf32x3) dot kernels, so about 80 s on 2 idle cores (estimated; measured 2.4-4.2 min on 2
cores that another test run shared); 8 s when ``${TMPDIR:-/tmp}/fastdistill-aot`` holds the results (keyed by
kernel source, configuration, target and triton version: CI can keep that folder between runs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import kernels_aot as aot  # noqa: E402

_MISSING = aot.toolchain_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no ahead-of-time compile: {_MISSING}")
# the script's exit status when configurations fail a check (the tests below say which)
_CHECKS_FAILED = 1


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels_aot") / "kernels_aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_aot.py"), "--sizes", "ci",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    if proc.returncode not in (0, _CHECKS_FAILED) or not out.exists():
        pytest.fail(f"benchmarks/kernels_aot.py --sizes ci exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _rows(record, target):
    rows = [r for r in record["rows"] if r["target"] == target]
    assert rows, f"no configuration was captured for {target}"
    return rows


def _report(lines: list[str], what: str) -> str:
    # configurations that differ only in argument alignment give the same line
    lines = list(dict.fromkeys(lines))
    return f"{len(lines)} configurations {what}:\n" + "\n".join(lines)


def test_every_kernel_is_launched(record):
    assert not record["uncovered"], (
        f"@triton.jit kernels that no workload of benchmarks/kernels_aot.py launches: {record['uncovered']}; "
        f"call their launch path in the workload of their kernel file")


@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_compiles(record, target):
    lines = [aot.describe(r, r["error"]) for r in _rows(record, target) if "error" in r]
    assert not lines, _report(lines, f"fail to compile for {target}")


@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_shared_memory_within_target_limit(record, target):
    limit = aot.TARGETS[target].shared_limit
    lines = [aot.describe(r, f"{r['shared']} B shared memory > {limit} B (sizes: {'; '.join(r['sizes'])})")
             for r in _rows(record, target) if "error" not in r and r["shared"] > limit]
    assert not lines, _report(lines, f"exceed the {limit} B of shared memory per block of {target}")


@pytest.mark.parametrize("target", list(aot.TARGETS))
def test_spills_within_threshold(record, target):
    lines = [aot.describe(r, f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread "
                             f"(sizes: {'; '.join(r['sizes'])})")
             for r in _rows(record, target)
             if "error" not in r and max(r["spill_stores"], r["spill_loads"]) > aot.SPILL_BYTES_MAX]
    assert not lines, _report(lines, f"spill more than {aot.SPILL_BYTES_MAX} B per thread on {target}")
