"""
The documentation site: every example runs and prints what the pages show.

Every code example of the docs is a file under docs/examples/, pulled into the
pages with snippet includes (``--8<-- "file.py"`` or ``--8<-- "file.py:section"``).
Each one is run here as a real program; its output must be exactly the ``.out``
file next to it, which the pages show as the program's output. No page may hold
a Python block that is not such an include, so no untested code reaches them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import asyncio_amp
from helpers import LONG, uvloop

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
EXAMPLES_DIR = DOCS / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
PAGES = sorted(DOCS.rglob("*.md"))

# A fenced block: its opening fence, info string, body and closing fence.
FENCE = re.compile(
    r"^(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)
# A snippet include line, with an optional :section or :line range.
INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[^"]+))?"\s*$')
PYTHON_INFOS = {"python", "py", "python3", "pycon", "pyi"}


def includes() -> list[tuple[pathlib.Path, str, str | None]]:
    """Every snippet include of every page: (page, path, section)."""
    found = []
    for page in PAGES:
        for line in page.read_text().splitlines():
            match = INCLUDE.match(line)
            if match:
                found.append((page, match["path"], match["section"]))
    return found


def test_there_are_examples_and_pages() -> None:
    assert len(EXAMPLES) >= 9
    assert len(PAGES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_prints_its_output(path: pathlib.Path) -> None:
    if path.name == "uvloop_run.py" and uvloop is None:
        pytest.skip("uvloop is not installed")
    expected = path.with_suffix(".out").read_text()
    result = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", str(path)],
        capture_output=True,
        text=True,
        timeout=LONG * 6,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected, result.stderr


def test_every_output_file_belongs_to_an_example() -> None:
    outputs = {path.stem for path in EXAMPLES_DIR.glob("*.out")}
    assert outputs == {path.stem for path in EXAMPLES}


def test_every_example_is_shown_in_a_page() -> None:
    shown = {path for _, path, _ in includes()}
    for example in EXAMPLES:
        assert example.name in shown, f"no page includes {example.name}"


def test_every_include_exists() -> None:
    for page, path, section in includes():
        target = EXAMPLES_DIR / path if (EXAMPLES_DIR / path).exists() else ROOT / path
        assert target.is_file(), f"{page.name} includes {path}, which does not exist"
        if section is not None and not section[0].isdigit():
            text = target.read_text()
            for marker in (f"--8<-- [start:{section}]", f"--8<-- [end:{section}]"):
                assert text.count(marker) == 1, f"{page.name}: {path} needs one {marker!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_are_includes(page: pathlib.Path) -> None:
    text = page.read_text()
    for block in FENCE.finditer(text):
        info = block["info"].split()[0].lower() if block["info"].strip() else ""
        if info.lstrip(".{").rstrip("}") not in PYTHON_INFOS:
            continue
        lines = [line for line in block["body"].splitlines() if line.strip()]
        assert len(lines) == 1 and INCLUDE.match(lines[0]), (
            f"{page.relative_to(DOCS)} has a Python block that is not a snippet include of "
            f"a tested example:\n{block.group(0)}"
        )


def test_the_reference_documents_every_public_name() -> None:
    reference = "\n".join(page.read_text() for page in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: asyncio_amp\.(\w+)\s*$", reference, re.M))
    assert documented == set(asyncio_amp.__all__)


# The README's benchmark tables (the first of which the benchmarks page includes)
# must be the last run of benchmarks/results/latest.json (which the page's chart
# draws), as benchmarks/readme_table.py prints them.


def test_the_benchmark_tables_are_the_last_run() -> None:
    spec = importlib.util.spec_from_file_location(
        "readme_table", ROOT / "benchmarks" / "readme_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    workloads, targets = module.tables(results).split("\n\n")
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("[start:benchmark-table] -->\n")[1].split("\n<!-- --8<-- [end:")[0]
    assert shown == workloads
    assert targets in readme
    # Every workload of the main table was measured, in both modes where it runs in both.
    for row in ("seq", "pipelined", "conns", "echo64k", "codec", "inproc", "big", "idle"):
        assert results["medians"][row]["amp"]["median"] > 0
    for row in ("seq", "pipelined", "conns", "codec", "inproc"):
        assert results["medians"][row]["amp-pure"]["median"] > 0
    assert results["machine"]["accelerated"] is True


def test_the_benchmarks_page_names_the_run() -> None:
    machine = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())["machine"]
    page = (DOCS / "benchmarks.md").read_text()
    assert f"Python {machine['python']}" in page
    assert f"Twisted {'.'.join(machine['twisted'].split('.')[:2])}" in page
    assert f"uvloop {'.'.join(machine['uvloop'].split('.')[:2])}" in page


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="needs the docs extra")
def test_the_site_builds_strictly(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=LONG * 12,
        cwd=ROOT,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "index.html").is_file()
