"""MkDocs hooks: publish the benchmark chart straight from benchmarks/results/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

CHART = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "latest.png"


def on_files(files: Files, config: Any) -> Files:
    """Add the chart of the last benchmark run as benchmarks/latest.png."""
    files.append(File.generated(config, "benchmarks/latest.png", abs_src_path=str(CHART)))
    return files
