"""Progress where nobody watches a terminal: one line per phase when it ends (count, time, rate, last info), none
for an interrupted phase, the same calls as the live bar."""
import re

import pytest

from fastdistill import console


def test_a_log_gets_one_line_per_phase(capsys, monkeypatch):
    monkeypatch.setattr(console.PhaseLines, "min_seconds", 0.0)
    with console.progress(False) as bar:
        task = bar.add_task("teacher timm:resnet18", total=40, completed=10, info="")
        for _ in range(30):
            bar.update(task, advance=1)
        bar.update(task, info="loss 0.123")
        other = bar.add_task("evaluate", total=5, info="")
        bar.update(other, completed=5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"teacher timm:resnet18: 40/40 in \d+\.\d s, [\d.e+]+/s, loss 0\.123", lines[0]), lines[0]
    assert lines[1].startswith("evaluate: 5/5 in ")


def test_phases_of_a_moment_print_nothing(capsys):
    with console.progress(False) as bar:
        task = bar.add_task("test accuracy", total=1, info="")
        bar.update(task, advance=1)
    assert capsys.readouterr().err == ""


def test_an_interrupted_phase_prints_no_summary(capsys, monkeypatch):
    monkeypatch.setattr(console.PhaseLines, "min_seconds", 0.0)
    with pytest.raises(KeyboardInterrupt):
        with console.progress(False) as bar:
            bar.add_task("recover", total=10, info="")
            raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_stderr_that_is_not_a_terminal_gets_lines_not_a_bar():
    # pytest captures stderr: not a terminal, as in CI or a log file
    assert isinstance(console.progress(True), console.PhaseLines)
