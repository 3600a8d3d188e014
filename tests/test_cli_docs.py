"""
The terminal sessions shown in the README and the docs are real.

Every ```console block is a list of ``$ command`` lines, each followed by what
it prints (standard output, then standard error). The test serves
``examples/calculator.py`` with ``asyncio-amp serve`` on a free port, runs each
command with bash in ``examples/`` (the port 7000 of the text replaced by the
real one), and compares the output line for line.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import subprocess
import sys

import pytest

from cli_helpers import served
from helpers import LONG

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def console_blocks() -> list[tuple[str, int, list[tuple[str, list[str]]]]]:
    """(page, block number, [(command, expected lines)]) for every console block."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"```console\n(.*?)```", page.read_text(), re.DOTALL)
        for number, block in enumerate(blocks, 1):
            steps: list[tuple[str, list[str]]] = []
            for line in block.splitlines():
                if line.startswith("$ "):
                    steps.append((line[2:], []))
                else:
                    assert steps, f"{page.name} console block {number} starts without a command"
                    steps[-1][1].append(line)
            found.append((str(page.relative_to(ROOT)), number, steps))
    return found


BLOCKS = console_blocks()


def test_there_are_console_blocks() -> None:
    pages = {page for page, _, _ in BLOCKS}
    assert "README.md" in pages
    assert len(BLOCKS) >= 3


@pytest.mark.asyncio_loop_only
@pytest.mark.parametrize(
    ("page", "number", "steps"), BLOCKS, ids=[f"{p}-{n}" for p, n, _ in BLOCKS]
)
async def test_console_block(page: str, number: int, steps: list[tuple[str, list[str]]]) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    async with served(app="calculator:Calculator", cwd=ROOT / "examples") as (_, port):
        for command, expected in steps:
            real = command.replace("7000", str(port))
            # Standard error joins standard output, in the order a terminal shows them.
            process = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                f"({real}) 2>&1",
                stdout=subprocess.PIPE,
                cwd=ROOT / "examples",
                env=env,
            )
            async with asyncio.timeout(LONG):
                out, _ = await process.communicate()
            printed = out.decode().replace(str(port), "7000").splitlines()
            assert printed == expected, f"{page} block {number}: $ {command}"
