"""benchmarks/accuracy_tables.py without running a method: the run list, the reading of a run's metrics.json and the
README table, on hand-made run folders."""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy_tables as tables  # noqa: E402


def test_runs_first_train_each_teacher_once_and_cover_the_table():
    jobs = tables.jobs([1, 10, 50], seeds=3, dry=False)
    names = [tables.name(j) for j in jobs]
    # the teachers' run, a FADRM run per (ipc, variant), LGM at ipc 1 and 10 only
    assert len(names) == len(set(names)) == 1 + 3 * 3 + 2
    warm = [j for j in jobs if j["warm"]]
    assert jobs[:2] == warm and [tables.name(j) for j in warm] == ["fadrm_teachers", "lgm_ipc1"]
    teachers, fadrm = warm[0], [j for j in jobs if j["method"] == "fadrm" and not j.get("role")]
    # the cells' teacher settings (the published overrides) with no recovery and no student: the same cached teacher
    assert teachers["args"][:len(tables.FADRM_PUBLISHED) + 1] == fadrm[0]["args"][:len(tables.FADRM_PUBLISHED) + 1]
    assert {"method.variant=rded", "method.eval.students=[]"} <= set(teachers["args"])
    # one recovery per cell, both students on it; random real once per ipc: in the RDED-style run
    assert all(f"method.eval.students=[{','.join(tables.STUDENTS)}]" in j["args"] for j in fadrm)
    assert sum("method.eval.real_random=true" in j["args"] for j in fadrm) == 3
    assert all("method.eval.seeds=3" in j["args"] and "method.eval.cutmix=1.0" in j["args"] for j in fadrm)
    default = tables.jobs([10], 3, False, lgm_ipcs=(), pipeline="default")
    assert not (set(tables.FADRM_PUBLISHED) - {"method.lr=0.25"}) & {a for j in default for a in j["args"]}, \
        "the preset as it ships"
    assert [j.get("variant") for j in default if "method.lr=0.25" in j["args"]] == ["sre2l"]
    assert all(tables.name(j).startswith("fadrm_default_") for j in default), "its own folders in a shared out-dir"


class FakeRuns:
    """``subprocess.Popen`` for run(): each run ends at its second poll, writing a cell's metrics.json; a run named
    in ``fail`` fails; a teachers run caches a teacher whose weights are ``teacher``."""

    def __init__(self):
        self.launched, self.alive, self.fail, self.teacher = [], [], set(), torch.zeros(3)
        self.threads = set()  # each run's OMP_NUM_THREADS
        runs = self

        class Proc:
            def __init__(self, cmd, env=None, **_):
                folder = Path(next(a for a in cmd if a.startswith("out="))[4:])
                runs.launched.append((folder.name, [p.name for p in runs.alive]))
                runs.threads.add(env["OMP_NUM_THREADS"])
                self.name, self.returncode, self.polls = folder.name, None, 0
                self.code = 1 if folder.name in runs.fail else 0
                runs.alive.append(self)
                if self.code:
                    return
                folder.mkdir(parents=True, exist_ok=True)
                cell = {"students": {"timm:resnet18": {"synthetic": 0.5}}, "seconds_per_image": 1.0, "recovery": []}
                (folder / "metrics.json").write_text(json.dumps({} if "teachers" in folder.name else cell))
                if "teachers" in folder.name:
                    cached = Path(env["FASTDISTILL_CACHE"]) / "teachers" / "teacher" / "h"
                    cached.mkdir(parents=True, exist_ok=True)
                    torch.save({"model": {"w": runs.teacher.clone()}}, cached / "checkpoint.pt")

            def poll(self):
                self.polls += 1
                if self.polls >= 2 and self.returncode is None:
                    self.returncode = self.code
                    runs.alive.remove(self)
                return self.returncode

            def kill(self):
                pass

        self.Popen = Proc


def test_run_trains_the_teachers_first_and_once(tmp_path, monkeypatch):
    fake = FakeRuns()
    launched, fail = fake.launched, fake.fail
    fail.add("fadrm_teachers")
    monkeypatch.setattr(tables, "subprocess", SimpleNamespace(Popen=fake.Popen, STDOUT=subprocess.STDOUT))
    args = argparse.Namespace(out_dir=str(tmp_path), ipc=[10], seeds=1, dry=True, lgm_ipc=[],
                              variants=list(tables.VARIANTS), parallel_batches=1, pipeline="published", budget=1e9,
                              jobs=3, threads=2, resume_from=None)
    cells = sorted(f"fadrm_ipc10_{v}" for v in tables.VARIANTS)
    tables.run(args)
    assert launched == [("fadrm_teachers", [])], "a failed teachers run: no cell trains a teacher of its own"
    assert fake.threads == {"2"}, "each run gets --threads"
    fail.clear()
    launched.clear()
    tables.run(args)
    assert launched[0] == ("fadrm_teachers", []) and sorted(n for n, _ in launched[1:]) == cells
    assert all("fadrm_teachers" not in running for _, running in launched[1:]), "the cells wait for the teachers"
    assert [n for n, running in launched[1:] if running] != [], "then the cells run side by side"
    launched.clear()
    tables.run(args)
    assert launched == [], "finished runs are read back, the teachers run is not repeated"
    (tmp_path / "runs" / "fadrm_ipc10_sre2l" / "metrics.json").unlink()
    tables.run(args)
    assert launched == [("fadrm_ipc10_sre2l", [])], "the teachers' run finished in an earlier call"


def test_collect_and_report_read_seeds_and_spread(tmp_path, capsys):
    job = next(j for j in tables.jobs([1], 3, False) if j["method"] == "fadrm" and j.get("variant") == "rded")
    per_seed = {"synthetic": [0.5, 0.6, 0.7], "real_random": [0.8, 0.8, 0.9]}
    other = {"synthetic": [0.2, 0.2, 0.2], "real_random": [0.3, 0.3, 0.3]}
    a, b = tables.STUDENTS
    (tmp_path / "metrics.json").write_text(json.dumps({
        "students": {s: {k: statistics.fmean(v) for k, v in d.items()} for s, d in ((a, per_seed), (b, other))},
        "student_seeds": {s: {k: {"per_seed": v} for k, v in d.items()} for s, d in ((a, per_seed), (b, other))},
        "seconds_per_image": 0.0, "recovery": []}))
    rows = tables.collect(job, tmp_path)
    assert [r["student"] for r in rows] == [a, b]
    assert rows[0]["synthetic"]["per_seed"] == per_seed["synthetic"]
    assert abs(rows[0]["synthetic"]["std"] - statistics.pstdev(per_seed["synthetic"])) < 1e-12
    assert tables.collect(job, tmp_path / "missing") is None
    result = tmp_path / "accuracy_tables.json"
    result.write_text(json.dumps({"device": "cpu", "git_sha": "x", "seeds": 3, "missing": ["lgm_ipc1"],
                                  "rows": [{"name": tables.name(job), **r} for r in rows]}))
    tables.report([str(result)])
    out = capsys.readouterr().out
    assert f"| 1 | {a} | - | - | 0.600 ± 0.082 | 0.833 ± 0.047 |" in out
    assert f"| 1 | {b} | - | - | 0.200 ± 0.000 | 0.300 ± 0.000 |" in out
    assert "not finished: lgm_ipc1" in out
    # a second file (another call, another ipc) adds its rows, and what it finished is no longer missing
    later = tmp_path / "later.json"
    ipc10 = [{**r, "name": "fadrm_ipc10_rded", "ipc": 10} for r in rows] + [
        {"name": "lgm_ipc1", "method": "lgm", "ipc": 1, "synthetic": rows[0]["synthetic"]}]
    later.write_text(json.dumps({"device": "gpu", "git_sha": "y", "seeds": 3, "missing": [], "rows": ipc10}))
    tables.report([str(result), str(later)])
    out = capsys.readouterr().out
    assert f"| 10 | {a} | - | - | 0.600 ± 0.082 | 0.833 ± 0.047 |" in out and f"| 1 | {b} |" in out
    assert "cpu, git x" in out and "gpu, git y" in out and "not finished" not in out
    # FADRM's cell of the same student, paired seed by seed with the RDED-style run's sets
    ours = {**rows[0], "name": "fadrm_ipc10_fadrm", "ipc": 10, "variant": "fadrm",
            "synthetic": {"mean": 0.7, "std": 0.0, "per_seed": [0.6, 0.7, 0.8]}}
    later.write_text(json.dumps({"device": "gpu", "git_sha": "y", "seeds": 3, "missing": [], "rows": [*ipc10, ours]}))
    tables.report([str(later)])
    out = capsys.readouterr().out
    # vs RDED-style: 0.6-0.5, 0.7-0.6, 0.8-0.7; vs random real: 0.6-0.8, 0.7-0.8, 0.8-0.9
    assert f"| 10 | {a} | - | +0.100 [+0.100, +0.100], 3 of 3 | -0.133 [-0.200, -0.100], 0 of 3 |" in out
    assert f"| 10 | {b} | - | - | - |" in out


def test_resume_reads_finished_runs_and_continues_cut_off_ones(tmp_path):
    todo = [j for j in tables.jobs([10], 3, False, lgm_ipcs=()) if not j.get("role")]
    assert [j["method"] for j in todo] == ["fadrm"] * 3, "no LGM row when none is asked for"
    by_name = {tables.name(j): j for j in todo}
    finished, cut, fresh = (tmp_path / "runs" / n for n in ("fadrm_ipc10_sre2l", "fadrm_ipc10_fadrm",
                                                              "fadrm_ipc10_rded"))
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({
        "students": {"timm:resnet18": {"synthetic": 0.5}}, "seconds_per_image": 1.0, "recovery": []}))
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes(b"")
    rows, rest = tables.resume(todo, tmp_path)
    assert [r["name"] for r in rows] == ["fadrm_ipc10_sre2l"] and rows[0]["synthetic"]["mean"] == 0.5
    rest = {tables.name(j): j for j in rest}
    assert sorted(rest) == ["fadrm_ipc10_fadrm", "fadrm_ipc10_rded"]
    assert rest["fadrm_ipc10_fadrm"]["args"] == [*by_name["fadrm_ipc10_fadrm"]["args"], "resume=true"]
    assert rest["fadrm_ipc10_rded"]["args"] == by_name["fadrm_ipc10_rded"]["args"] and fresh.name in rest


def test_a_snapshot_continues_elsewhere_without_student_checkpoints(tmp_path, monkeypatch):
    fake = FakeRuns()
    monkeypatch.setattr(tables, "subprocess", SimpleNamespace(Popen=fake.Popen, STDOUT=subprocess.STDOUT))
    here, snap, there = tmp_path / "here", tmp_path / "snap", tmp_path / "there"
    args = argparse.Namespace(out_dir=str(here), ipc=[10], seeds=1, dry=True, lgm_ipc=[], variants=["fadrm"],
                              parallel_batches=1, pipeline="published", budget=1e9, jobs=2, threads=1,
                              resume_from=None)
    tables.run(args)
    cut = here / "runs" / "fadrm_ipc10_fadrm"
    (cut / "metrics.json").unlink()  # a run cut off: recovered batches, a finished student, one mid-training
    (cut / "checkpoint.pt").write_bytes(b"state")
    (cut / "students_done.json").write_text('{"timm:resnet18/synthetic/0": 0.5}')
    (cut / "distilled" / "0").mkdir(parents=True)
    (cut / "distilled" / "0" / "0.png").write_bytes(b"png")
    for big in ("students/timm_resnet18_synthetic_1/checkpoint.pt", "soft_labels/r18/synthetic/0.safetensors"):
        (cut / big).parent.mkdir(parents=True)
        (cut / big).write_bytes(b"weights")
    tables.snapshot(here, snap)
    kept = {str(f.relative_to(snap)) for f in snap.rglob("*") if f.is_file()}
    assert "runs/fadrm_ipc10_fadrm/distilled/0/0.png" in kept and "runs/fadrm_ipc10_fadrm/checkpoint.pt" in kept
    assert not any("students/" in k or "soft_labels" in k or "cache" in k or "_teachers" in k for k in kept), kept
    assert json.loads((snap / "teachers.json").read_text()) == tables.teacher_digests(here) != {}
    # another machine: the teachers run again (their weights are not in the snapshot), then the cut-off run resumes
    fake.launched.clear()
    fake.teacher = torch.ones(3)  # retrained there with other weights
    tables.run(argparse.Namespace(**{**vars(args), "out_dir": str(there), "resume_from": str(snap)}))
    assert [n for n, _ in fake.launched] == ["fadrm_teachers", "fadrm_ipc10_fadrm"]
    assert (there / "runs" / "fadrm_ipc10_fadrm" / "students_done.json").read_text().startswith('{"timm')
    result = json.loads((there / "accuracy_tables.json").read_text())
    assert result["teachers_note"] == {"teachers/teacher/h": "retrained, other weights than the snapshot's"}
    assert tables.teacher_digests(there) != tables.teacher_digests(here)
