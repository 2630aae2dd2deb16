"""Markdown tables for the README, generated from ``benchmarks/results/*.json`` (never typed by hand).

    python benchmarks/report.py                              # every result file
    python benchmarks/report.py bn_stats                     # one benchmark
    python benchmarks/report.py --dir benchmarks/results/X   # the files of one run (e.g. a GPU suite's)
    python benchmarks/report.py --dir ... --fast triton      # one line per shape: the fast path against eager
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ["shape", "layout", "mode", "dtype", "provider"]  # identify a row, when present
NUMBERS = ["ms_p50", "ms_p20", "ms_p80", "speedup", "speedup_min", "speedup_max", "images_per_s", "peak_mib", "saved_mib", "memory_ratio",
           "saved_ratio"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def table(record: dict) -> str:
    rows = record["rows"]
    cols = [k for k in KEYS if any(k in r for r in rows)] + [k for k in NUMBERS if any(k in r for r in rows)]
    cpu = record.get("cpu") or {}
    machine = f" ({cpu['model']}; {', '.join(cpu['flags'])})" if cpu.get("model") else ""
    lines = [f"`{record['benchmark']}` on {record['device']}{machine}, torch {record['torch']}, git "
             f"{record['git_sha']}, {record['date']}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def fast_rows(record: dict, provider: str) -> list[str]:
    """Markdown rows ``benchmark | shape | dtype | eager ms | fast ms | speedup | peak-memory ratio``."""
    rows = record["rows"]
    eager = {(r.get("shape"), r.get("layout"), r.get("dtype")): r for r in rows if r.get("provider") == "eager"}
    out = []
    for r in rows:
        base = eager.get((r.get("shape"), r.get("layout"), r.get("dtype")))
        if r.get("provider") != provider or base is None:
            continue
        shape = r["shape"] + (f" {r['layout']}" if r.get("layout") else "")
        out.append(f"| {record['benchmark']} | {shape} | {r.get('dtype', '')} | {_fmt(base['ms_p50'])} | "
                   f"{_fmt(r['ms_p50'])} | {_fmt(r['speedup'])} | {_fmt(r['memory_ratio'])} |")
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to print (default: all)")
    parser.add_argument("--dir", type=Path, default=RESULTS, help="folder of result files")
    parser.add_argument("--fast", help="one summary table of this provider against eager instead of full tables")
    args = parser.parse_args(argv)
    records = [json.loads(f.read_text()) for f in sorted(args.dir.glob("*.json"))]
    records = [r for r in records if "rows" in r and (not args.names or r["benchmark"] in args.names)]
    if args.fast:
        print(f"| benchmark | shape | dtype | eager ms | {args.fast} ms | speedup | peak memory ratio |")
        print("|---|---|---|---|---|---|---|")
        for record in records:
            print("\n".join(fast_rows(record, args.fast)))
        print(f"\n{records[0]['device']}, torch {records[0]['torch']}, git {records[0]['git_sha']}" if records else "")
        return
    for record in records:
        print(table(record), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
