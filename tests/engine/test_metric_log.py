"""The run's metric history: flushed JSON lines, a rewind on resume that leaves one continuous history, the final
metrics as the last line, the curves, and the optional TensorBoard / W&B sinks."""
import importlib.util
import json

import pytest
import torch

from fastdistill.engine.metric_log import MetricLog, check_logger, plot_curves, read_history


def _steps(path, phase):
    return [r["step"] for r in read_history(path) if r["phase"] == phase]


def test_records_are_flushed_as_they_are_logged(tmp_path):
    log = MetricLog(tmp_path)
    log.log("distill", 0, loss=torch.tensor(1.5), lr=0.1)
    # read before close: a killed run keeps what it logged
    (record,) = read_history(tmp_path / "metrics.jsonl")
    assert record["phase"] == "distill" and record["step"] == 0 and record["loss"] == 1.5 and record["lr"] == 0.1
    log.close()


def test_resume_rewinds_to_the_checkpoint_and_continues_one_history(tmp_path):
    log = MetricLog(tmp_path)
    for step in range(3):
        log.log("teacher", step, loss=1.0)
    for step in range(6):  # steps 4 and 5 happened after the last checkpoint (step 3) and are redone
        log.log("distill", step, loss=1.0 / (step + 1))
    log.close()
    resumed = MetricLog(tmp_path, resume=True)
    resumed.rewind("distill", 3)
    for step in range(4, 8):
        resumed.log("distill", step, loss=1.0 / (step + 1))
    resumed.final({"acc": 0.5})
    resumed.close()
    assert _steps(tmp_path / "metrics.jsonl", "teacher") == [0, 1, 2], "an earlier phase stays whole"
    assert _steps(tmp_path / "metrics.jsonl", "distill") == list(range(8)), "one continuous history"
    last = read_history(tmp_path / "metrics.jsonl")[-1]
    assert last["phase"] == "final" and last["metrics"] == {"acc": 0.5}
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_rewind_before_a_phase_logged_anything_drops_that_phase(tmp_path):
    log = MetricLog(tmp_path)
    log.log("teacher", 0, loss=1.0)
    log.log("distill", 5, loss=1.0)
    log.rewind("distill", 2)  # the checkpoint predates every distill record
    log.log("distill", 3, loss=1.0)
    log.close()
    assert [(r["phase"], r["step"]) for r in read_history(tmp_path / "metrics.jsonl")] == [("teacher", 0),
                                                                                          ("distill", 3)]


def test_a_fresh_run_in_a_reused_folder_starts_a_fresh_history(tmp_path):
    MetricLog(tmp_path).log("distill", 0, loss=1.0)
    MetricLog(tmp_path).log("distill", 0, loss=2.0)
    assert [r["loss"] for r in read_history(tmp_path / "metrics.jsonl")] == [2.0]


def test_curves_plot_every_series_and_skip_the_final_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"phase": "train", "step": 0, "loss": 2.0, "acc": 0.1}, {"phase": "train", "step": 1, "loss": 1.0, "acc": 0.4},
        {"phase": "final", "step": None, "metrics": {"acc": 0.4}}]))
    assert plot_curves(path, tmp_path / "curves.png") == tmp_path / "curves.png"
    path.write_text(json.dumps({"phase": "final", "step": None, "metrics": {}}) + "\n")
    assert plot_curves(path, tmp_path / "none.png") is None


def test_unknown_or_missing_logger_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; expected one of jsonl, tensorboard, wandb"):
        check_logger("mlflow")
    for kind, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(ModuleNotFoundError, match=rf"logger={kind} needs the {kind} extra: pip install"):
                check_logger(kind)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard not installed (the [tensorboard] extra)")
def test_tensorboard_writes_event_files(tmp_path):
    log = MetricLog(tmp_path, "tensorboard")
    log.log("train", 0, loss=1.0)
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (the [wandb] extra)")
def test_wandb_runs_offline_and_keeps_its_run_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricLog(tmp_path, "wandb", config={"seed": 0})
    log.log("train", 0, loss=1.0)
    log.close()
    run_id = (tmp_path / ".wandb_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "no offline W&B run folder"
    resumed = MetricLog(tmp_path, "wandb", resume=True)
    resumed.log("train", 1, loss=0.5)
    resumed.close()
    assert (tmp_path / ".wandb_id").read_text() == run_id
