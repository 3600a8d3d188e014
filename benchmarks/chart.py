"""
Draw the ratios of a benchmark run as a bar chart (PNG).

    python benchmarks/chart.py [JSON] [--output PNG]

Reads the JSON that ``run.py`` writes (default: results/latest.json) and saves
results/latest.png next to it. Each group of bars is one row of the table; each
bar is how many times better asyncio-amp is than Twisted or than the raw floor
(log scale, 1 = the same). A black tick marks the issue's target where there is
one. Needs matplotlib, which nothing else here uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent

# Ratio columns of run.py and how they are drawn.
SERIES = [
    ("amp/twisted", "asyncio-amp ÷ Twisted", "#1f77b4"),
    ("amp-uvloop/twisted", "asyncio-amp on uvloop ÷ Twisted", "#aec7e8"),
    ("amp/raw", "asyncio-amp ÷ raw floor", "#d62728"),
    ("amp-uvloop/raw-uvloop", "asyncio-amp on uvloop ÷ raw uvloop floor", "#ff9896"),
    ("amp-pure/twisted", "pure Python ÷ Twisted", "#2ca02c"),
    ("amp-uvloop-pure/twisted", "pure Python on uvloop ÷ Twisted", "#98df8a"),
]
# Rows that repeat another one in a different unit.
SKIPPED_ROWS = {"inproc (per call)", "pool-cpu (speed-up)", "pool-cpu (vs bare)", "pool-cpu (busy)"}


def draw(document: dict[str, Any], output: Path) -> None:
    """Draw the chart of ``document`` (run.py's JSON) into ``output``."""
    ratios: dict[str, dict[str, float | None]] = document["ratios"]
    rows = [row for row in ratios if row not in SKIPPED_ROWS]
    series = [s for s in SERIES if any(ratios[row].get(s[0]) for row in rows)]
    width = 0.8 / max(1, len(series))
    drawn: list[float] = []
    fig, ax = plt.subplots(figsize=(13, 6.5), dpi=110)
    for i, (key, label, color) in enumerate(series):
        xs, ys = [], []
        for x, row in enumerate(rows):
            value = ratios[row].get(key)
            if value:
                xs.append(x + (i - (len(series) - 1) / 2) * width)
                ys.append(value)
        drawn += ys
        bars = ax.bar(xs, ys, width=width * 0.95, label=label, color=color)
        for bar, value in zip(bars, ys, strict=True):
            ax.annotate(
                f"{value:.2g}" if value < 10 else f"{value:.0f}",
                (bar.get_x() + bar.get_width() / 2, value),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    # The targets that are a ratio column: a black tick over the bar they apply to.
    keys = [s[0] for s in series]
    marked = False
    for target in document.get("targets", []):
        key = f"{target['impl']}/{target['reference']}"
        if not target.get("required") or target["row"] not in rows or key not in keys:
            continue
        x = rows.index(target["row"]) + (keys.index(key) - (len(series) - 1) / 2) * width
        ax.hlines(
            target["threshold"],
            x - width / 2,
            x + width / 2,
            colors="black",
            linewidth=2.5,
            label=None if marked else "target",
        )
        marked = True
        drawn.append(target["threshold"])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    if drawn:
        # Room above the tallest bar or target for its label, and the legend.
        ax.set_ylim(min(drawn) / 1.5, max(drawn) * 2.5)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows)
    ax.set_ylabel("times better than the reference (log scale; > 1: asyncio-amp better)")
    machine = document.get("machine", {})
    ax.set_title(
        f"asyncio-amp {machine.get('asyncio_amp')} ({machine.get('git')}) vs Twisted "
        f"{machine.get('twisted')} and a raw asyncio floor: medians of "
        f"{document['settings']['repeat']} interleaved runs ({document.get('mode')})\n"
        f"{machine.get('cpu_model')}, {machine.get('cpu_count')} CPUs, Python "
        f"{machine.get('python')}, uvloop {machine.get('uvloop')}, {machine.get('date')}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", which="both", alpha=0.25)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument("--output", type=Path, help="the PNG (default: the JSON's name, .png)")
    args = parser.parse_args(argv)
    document = json.loads(args.json.read_text(encoding="utf-8"))
    output = args.output or args.json.with_suffix(".png")
    draw(document, output)
    print(f"chart: {os.path.relpath(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
