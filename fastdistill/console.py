"""Terminal output of a run: one progress bar on stderr, a results table and the output path at the end.
Under torchrun rank 0 alone prints them."""
from __future__ import annotations

import sys
import time
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastdistill.engine import distributed as dist

# errors a user can cause and fix: one line and exit code 2; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ModuleNotFoundError)

_err = Console(stderr=True)
_out = Console(soft_wrap=True)


class PhaseLines:
    """The form of a progress bar for logs: one line per task on stderr when its phase ends (its count, time, rate
    and last info), instead of a live bar. Same ``add_task`` / ``update`` calls as rich's ``Progress``. Tasks shorter
    than ``min_seconds`` (a one-batch accuracy check) print nothing, as a live bar would hardly show."""

    min_seconds = 2.0

    def __init__(self, enabled: bool = True):
        self.enabled, self.tasks = enabled, []

    def __enter__(self) -> "PhaseLines":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None or not self.enabled:
            return  # an interrupted phase has no summary; the error says what happened
        for t in self.tasks:
            seconds = time.perf_counter() - t["start"]
            if seconds < self.min_seconds:
                continue
            done = t["completed"] - t["resumed"]
            rate = f", {done / seconds:.3g}/s" if seconds > 0 and done else ""
            info = f", {t['info']}" if t["info"] else ""
            _err.print(f"{t['description']}: {t['completed']}/{t['total']} in {seconds:.1f} s{rate}{info}",
                       highlight=False, soft_wrap=True)

    def add_task(self, description: str, total=None, completed: int = 0, info: str = "", **fields) -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed, "resumed": completed,
                           "info": info, "start": time.perf_counter()})
        return len(self.tasks) - 1

    def update(self, task: int, advance: int | None = None, completed: int | None = None, info: str | None = None,
               **fields) -> None:
        t = self.tasks[task]
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        if info is not None:
            t["info"] = info


def progress(enabled: bool = True) -> Progress | PhaseLines:
    """A live progress bar on stderr; where stderr is not a terminal (a log file, CI) or ``progress=false``, one
    line per phase when it ends. Rank 0 only."""
    if not enabled or not _err.is_terminal:
        return PhaseLines(dist.speaks())
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=_err, disable=not dist.speaks(), transient=False)


def note(message: str) -> None:
    """One line on stderr from rank 0: where a run writes, before its long work starts."""
    if dist.speaks():
        _err.print(message, highlight=False, soft_wrap=True)


def print_results(title: str, columns: list[str], rows: list[list], out_dir) -> None:
    """The short results table every run ends with, then the path of its output folder."""
    if not dist.speaks():
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    _out.print(table)
    _out.print(f"outputs: {out_dir}")
    sys.stdout.flush()


def fail(error: BaseException) -> NoReturn:
    """One line on stderr naming the problem, exit code 2 (no traceback for user errors)."""
    msg = str(error).strip().splitlines()[0] if str(error).strip() else ""
    print(f"{type(error).__name__}: {msg}", file=sys.stderr)
    raise SystemExit(2)
