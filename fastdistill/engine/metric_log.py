"""Experiment tracking: every logged step as one JSON line in the run folder, plus TensorBoard or W&B when chosen.

``logger: jsonl`` (default) writes ``metrics.jsonl`` only; ``tensorboard`` and ``wandb`` add their sink (optional
extras). Each record is ``{"phase", "step", "time", <values>}``, appended and flushed at once, so a killed run keeps
its history; a resumed run first drops what it will redo (:meth:`MetricLog.rewind`), so the history stays one
continuous curve. The last line holds the run's final metrics, equal to ``metrics.json`` (:meth:`MetricLog.final`),
and ``curves.png`` plots every logged series at the end, since people would rather look than read.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

LOGGERS = ("jsonl", "tensorboard", "wandb")
_EXTRAS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_logger(kind: str) -> None:
    """An unknown logger, or a sink whose package is missing, as one clear error before any work."""
    if kind not in LOGGERS:
        raise ValueError(f"unknown logger {kind!r}; expected one of {', '.join(LOGGERS)}")
    if kind in _EXTRAS:
        module, extra = _EXTRAS[kind]
        try:
            __import__(module)
        except ImportError:
            raise ModuleNotFoundError(f"logger={kind} needs the {extra} extra: pip install 'fastdistill[{extra}]'")


def _number(value):
    """Tensors and numpy scalars as Python numbers (JSON, TensorBoard), anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class MetricLog:
    """The metric history of one run folder; rank 0 only (the caller constructs it on the main rank)."""

    def __init__(self, folder: str | Path, kind: str = "jsonl", resume: bool = False, config: dict | None = None):
        check_logger(kind)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()  # a fresh run in a reused folder starts a fresh history
        self._file = open(self.path, "a")
        self._tb = self._wandb = None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
        elif kind == "wandb":
            import wandb

            # offline unless the user set WANDB_MODE: runs must work without network; `wandb sync` uploads later
            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(dir=str(self.folder), config=config, name=self.folder.name,
                                     id=self._wandb_id(resume), resume="allow")

    def _wandb_id(self, resume: bool) -> str:
        """One W&B run per run folder, kept across resumes."""
        path = self.folder / ".wandb_id"
        if resume and path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id)
        return run_id

    def log(self, phase: str, step: int, **values) -> None:
        """One record: ``phase`` (recover, distill, train, student/resnet18...), its step, and scalar values."""
        values = {k: _number(v) for k, v in values.items()}
        record = {"phase": phase, "step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{phase}/{key}", value, int(step))
        if self._wandb is not None:
            self._wandb.log({f"{phase}/{key}": value for key, value in numeric.items()} | {f"{phase}/step": step})

    def rewind(self, phase: str, step: int) -> None:
        """On resume at ``step`` of ``phase``: drop every record after that phase's last one at or before ``step``
        (the resumed run logs those steps again), so the file reads as one unbroken run."""
        self._file.close()
        records = read_history(self.path)
        first = last = None
        for i, r in enumerate(records):
            if r.get("phase") == phase:
                first = i if first is None else first
                if r.get("step") is not None and r["step"] <= step:
                    last = i
        keep = last + 1 if last is not None else (first if first is not None else len(records))
        text = "".join(json.dumps(r) + "\n" for r in records[:keep])
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def final(self, metrics: dict) -> None:
        """The run's final metrics as the last line (the content of ``metrics.json``), then ``curves.png``."""
        self._file.write(json.dumps({"phase": "final", "step": None, "time": round(time.time(), 3),
                                     "metrics": metrics}, default=str) + "\n")
        self._file.flush()
        plot_curves(self.path, self.folder / "curves.png")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_history(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(jsonl: str | Path, png: str | Path, max_panels: int = 12) -> Path | None:
    """One panel per (phase, value) series of a ``metrics.jsonl`` against its steps; None if nothing to plot."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in read_history(jsonl):
        if r.get("phase") == "final" or r.get("step") is None:
            continue
        for key, value in r.items():
            if key in ("phase", "step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            series.setdefault((r["phase"], key), []).append((r["step"], value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(series.items())[:max_panels]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, ((phase, key), points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(f"{phase}: {key}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
