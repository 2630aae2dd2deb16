"""Render docs/published_settings.md from docs/published_settings.yaml (the table is the source; never edit the .md).

    python docs/published_settings.py           # rewrite the .md
    python docs/published_settings.py --check   # exit 1 if the .md is out of date (tests/test_published_settings.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TABLE, PAGE = HERE / "published_settings.yaml", HERE / "published_settings.md"
STATUSES = ("same", "differs", "not yet matched", "own", "unverified")

HEADER = """# Published settings: every value of `preset=paper`, traced

Generated from `docs/published_settings.yaml` by `python docs/published_settings.py`; do not edit by hand.
`tests/test_published_settings.py` composes every paper preset and checks each value against that table, and that
the table covers every key, so a new or changed key cannot go untraced.

For each method: each key of the composed `preset=paper` config under `method` (and `eval`), `precision` and the
other top-level keys the preset sets; constructor kwargs (`*_kwargs`) are one value. Sources are file:line in the
official code named under the method (a row naming another repository points there), or a paper section. Status:

- **same**: the published value.
- **differs**: a deliberate difference; the note says why.
- **not yet matched**: a difference still to remove; the note says what is published and whether a config change
  (`config:`) or a code change (`code:`) removes it.
- **own**: a fastdistill knob with no published counterpart (logging, memory, caching, baselines).
- **unverified**: no official code to check against; the value follows the preset's reading of the paper.

"Pipeline details without a key" lists published behaviour that no config key holds.
"""


def _cell(value) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
    else:
        text = str(value)
    return text.replace("|", "\\|")


def render(table: dict) -> str:
    """The markdown page for the table (a dict method -> {published, code, keys, unkeyed})."""
    out = [HEADER]
    out.append("| method | keys | same | differs | not yet matched | own | unverified |")
    out.append("|---|---|---|---|---|---|---|")
    for method, entry in table.items():
        counts = [sum(row["status"] == s for row in entry["keys"].values()) for s in STATUSES]
        out.append(f"| {method} | {len(entry['keys'])} | " + " | ".join(map(str, counts)) + " |")
    out.append("\nThe work list: every row not yet matched, keyed or not.\n")
    for method, entry in table.items():
        rows = [(f"`{k}`", r) for k, r in entry["keys"].items()] + [(r["what"], r) for r in entry.get("unkeyed", [])]
        for what, row in rows:
            if row["status"] == "not yet matched":
                out.append(f"- {method}, {what}: {row['note']} ({row.get('source') or 'no source'})")
    for method, entry in table.items():
        out.append(f"\n## {method}\n")
        out.append(f"Published: {entry['published']}. Code: `{entry['code']}`.\n")
        out.append("| key | value | status | source | note |")
        out.append("|---|---|---|---|---|")
        for key, row in entry["keys"].items():
            out.append(f"| `{key}` | `{_cell(row['value'])}` | {row['status']} | {_cell(row.get('source', ''))} | "
                       f"{_cell(row.get('note', ''))} |")
        if entry.get("unkeyed"):
            out.append("\nPipeline details without a key:\n")
            out.append("| what | status | source | note |")
            out.append("|---|---|---|---|")
            for row in entry["unkeyed"]:
                out.append(f"| {_cell(row['what'])} | {row['status']} | {_cell(row['source'])} | {_cell(row['note'])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render(yaml.safe_load(TABLE.read_text()))
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date; run: python docs/published_settings.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
