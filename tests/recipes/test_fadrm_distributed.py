"""FADRM sharded over 2 gloo processes under torchrun: the same set as one process, and after a killed run."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

ARGS = ["+method=fadrm", "preset=smoke", "ipc=4", "method.stage_sizes=[24,28]",
        "method.stage_iterations=6", "method.candidates_per_class=6", "method.eval.epochs=1",
        "method.eval.real_random=false", "progress=false", "device=cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # one teacher cache for the module: the one-process run trains the teacher, the ranks load it (ranks that
    # found no cached teacher would train their own under DDP, a different one); a module fixture runs before
    # the per-test cache of conftest.py is set, so it is named here
    return tmp_path_factory.mktemp("teacher-cache")


def _run(run_python, cache, out, *extra, ranks=1):
    run_python("-m", "fastdistill.run", *ARGS, f"out={out}", *extra, ranks=ranks, env={"FASTDISTILL_CACHE": str(cache)})


def _images(out):
    paths = sorted((out / "distilled").glob("*/*.png"))
    assert len(paths) == 40
    return np.stack([np.asarray(Image.open(p)) for p in paths])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache, run_python):
    out = tmp_path_factory.mktemp("fadrm") / "one"
    _run(run_python, cache, out)  # also trains and caches the smoke teacher the ranks then share
    return _images(out)


def test_two_ranks_recover_the_one_process_set(tmp_path, cache, one_process, run_python):
    _run(run_python, cache, tmp_path / "two", "checkpoint_every=0", ranks=2)
    assert (tmp_path / "two" / "checkpoint.rank1.pt").is_file(), "each rank checkpoints its own batches"
    np.testing.assert_array_equal(_images(tmp_path / "two"), one_process)


def test_killed_ranks_resume_to_the_same_set(tmp_path, cache, one_process, run_python):
    out = tmp_path / "killed"
    cmd = [*run_python.command(2), "-m", "fastdistill.run", *ARGS, f"out={out}", "checkpoint_every=3"]
    proc = subprocess.Popen(cmd, env=run_python.env(FASTDISTILL_CACHE=str(cache)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint.rank1.pt").is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "distilled").exists(), "killed before the end"
    _run(run_python, cache, out, "resume=true", "checkpoint_every=3", ranks=2)
    np.testing.assert_array_equal(_images(out), one_process)


def test_ranks_train_whole_students_side_by_side_as_one_process_does(tmp_path, cache, run_python):
    # more ranks than micro-batches (the default: a batch of 32 as one): each rank trains whole students, so every
    # seed's accuracy is the one-process run's to the bit, instead of DDP replicas whose BatchNorm sees half a batch
    evals = ["method.eval.seeds=2", "method.eval.real_random=true"]
    results = {}
    stale = tmp_path / "2" / "ranks" / "3" / "students_done.json"  # of an earlier run with more ranks: a fresh run
    stale.parent.mkdir(parents=True)                               # drops it, or a resume would read it
    stale.write_text(json.dumps({"timm:resnet18/synthetic/0": 0.0}))
    for ranks in (1, 2):
        out = tmp_path / str(ranks)
        _run(run_python, cache, out, *evals, ranks=ranks)
        results[ranks] = json.loads((out / "metrics.json").read_text())["student_seeds"]
    assert results[2] == results[1]
    done = json.loads((tmp_path / "2" / "students_done.json").read_text())
    assert len(done) == 4, "rank 0's file gathers every rank's students"
    # rank 1 trained the 2nd and 4th of the four (the real-random ones) and logged them in its own history
    logged = {json.loads(line)["phase"] for line in (tmp_path / "2" / "ranks" / "1" / "metrics.jsonl").open()}
    assert logged == {"student/timm:resnet18/real_random/0", "student/timm:resnet18/real_random/1"}, logged
    assert json.loads((tmp_path / "2" / "ranks" / "1" / "students_done.json").read_text()).keys() == \
        {"timm:resnet18/real_random/0", "timm:resnet18/real_random/1"}
    assert not stale.exists()
    # killed after each rank recorded its students, before rank 0 gathered them: the resume reads every rank's file
    # and trains none again
    two = tmp_path / "2"
    (two / "metrics.json").unlink()
    (two / "students_done.json").write_text(json.dumps({k: v for k, v in done.items() if "synthetic" in k}))
    before = (two / "ranks" / "1" / "metrics.jsonl").read_text()
    _run(run_python, cache, two, *evals, "resume=true", ranks=2)
    assert json.loads((two / "metrics.json").read_text())["student_seeds"] == results[1]
    assert json.loads((two / "students_done.json").read_text()) == done
    assert (two / "ranks" / "1" / "metrics.jsonl").read_text() == before, "no student trained again"
