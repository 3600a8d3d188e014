"""
The README's benchmark tables, made from a run's JSON.

    python benchmarks/readme_table.py [results/latest.json]

prints the table of the main workloads (the figures of Twisted, the raw floor
and asyncio-amp with and without its compiled accelerator, and the ratios to
Twisted on both loops) and the table of the targets, in the markdown the README
holds between its ``benchmark-table`` markers. The README is pasted from this
output, and the docs' test checks that it still matches the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TIMES = "\u00d7"
DIVIDE = "\u00f7"

# (JSON row, label, unit of the first figure)
ROWS = [
    ("seq", "seq (one call at a time)", "calls/s"),
    ("pipelined", "pipelined (100 in flight)", "calls/s"),
    ("conns", f"conns (16 {TIMES} 10 in flight)", "calls/s"),
    ("echo64k", "echo64k (60 kB values)", "MB/s"),
    ("codec", "codec (encode_box + BoxDecoder)", "µs"),
    ("codec (parse_boxes)", "codec (encode_box + parse_boxes)", "µs"),
    ("inproc (per call)", "inproc (both sides in memory)", "µs/call"),
    ("big", "big (10 MB BigBytes)", "MB/s"),
    ("idle", "idle memory per connection", "B"),
]
# The figures' columns, then the ratio columns (JSON ratio keys).
FIGURES = [("twisted", "Twisted"), ("raw", "raw floor"), ("amp", "asyncio-amp"),
           ("amp-pure", "pure Python")]  # fmt: skip
RATIOS = [
    ("amp/twisted", f"asyncio-amp {DIVIDE} Twisted"),
    ("amp-pure/twisted", f"pure Python {DIVIDE} Twisted"),
    ("amp-uvloop/twisted", f"on uvloop {DIVIDE} Twisted"),
    ("amp-uvloop-pure/twisted", f"uvloop, pure {DIVIDE} Twisted"),
]
VARIANTS = [("amp", "asyncio"), ("amp-pure", "asyncio, pure"), ("amp-uvloop", "uvloop"),
            ("amp-uvloop-pure", "uvloop, pure")]  # fmt: skip


def figure(value: float | None, unit: str, first: bool) -> str:
    """A median as the table shows it: 3 significant figures, the unit in the first column."""
    if value is None:
        return ""
    if value >= 1000:
        text = f"{round(value, -len(str(int(value))) + 3):,.0f}"
    elif value >= 100:
        text = f"{value:.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}" if first else text


def ratio(value: float | None) -> str:
    """A ratio as the table shows it."""
    if value is None:
        return ""
    return f"{value:.2f}{TIMES}" if value < 10 else f"{value:.1f}{TIMES}"


def tables(results: dict[str, Any]) -> str:
    """The two tables, in markdown."""
    medians, ratios = results["medians"], results["ratios"]
    header = ["workload", *(name for _, name in FIGURES), *(name for _, name in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row, label, unit in ROWS:
        if row not in medians:
            continue
        cells = [label]
        for i, (impl, _) in enumerate(FIGURES):
            entry = medians[row].get(impl)
            cells.append(figure(entry["median"] if entry else None, unit, i == 0))
        cells += [ratio(ratios.get(row, {}).get(key)) for key, _ in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target | " + " | ".join(name for _, name in VARIANTS) + " |"]
    lines.append("| --- |" + " ---: |" * len(VARIANTS))
    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in results["targets"]:
        by_target.setdefault(entry["target"], {})[entry["impl"]] = entry
    for target, entries in by_target.items():
        cells = [target]
        for impl, _ in VARIANTS:
            entry = entries.get(impl)
            if entry is None or entry["ratio"] is None:
                cells.append("")
            elif entry["required"]:
                mark = "met" if entry["met"] else "**not met**"
                cells.append(f"{entry['ratio']:.2f}{TIMES} {mark}")
            else:
                cells.append("")  # not a target for this column
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "latest.json"
    print(tables(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
