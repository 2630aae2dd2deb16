"""Terminal output of a run: one progress bar on stderr, a results table and the output path at the end.
Under torchrun rank 0 alone prints them."""
from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastdistill.engine import distributed as dist

_err = Console(stderr=True)
_out = Console(soft_wrap=True)


def progress(enabled: bool = True) -> Progress:
    """A progress bar on stderr (hidden when disabled or when stderr is not a terminal and CI logs it)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=_err, disable=not enabled or not dist.is_main(), transient=False)


def note(message: str) -> None:
    """One line on stderr from rank 0: where a run writes, before its long work starts."""
    if dist.is_main():
        _err.print(message, highlight=False, soft_wrap=True)


def print_results(title: str, columns: list[str], rows: list[list], out_dir) -> None:
    """The short results table every run ends with, then the path of its output folder."""
    if not dist.is_main():
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
