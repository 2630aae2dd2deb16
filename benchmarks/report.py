"""Markdown tables for the README, generated from ``benchmarks/results/*.json`` (never typed by hand).

    python benchmarks/report.py            # every result file
    python benchmarks/report.py bn_stats   # one benchmark
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ["shape", "layout", "mode", "dtype", "provider"]  # identify a row, when present
NUMBERS = ["ms_p50", "ms_p20", "ms_p80", "speedup", "images_per_s", "peak_mib", "saved_mib", "memory_ratio",
           "saved_ratio"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def table(record: dict) -> str:
    rows = record["rows"]
    cols = [k for k in KEYS if any(k in r for r in rows)] + [k for k in NUMBERS if any(k in r for r in rows)]
    lines = [f"`{record['benchmark']}` on {record['device']}, torch {record['torch']}, git {record['git_sha']}, "
             f"{record['date']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(names: list[str]) -> None:
    files = sorted(RESULTS.glob("*.json"))
    for f in files:
        record = json.loads(f.read_text())
        if not names or record["benchmark"] in names:
            print(table(record), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
