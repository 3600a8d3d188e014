"""Every example program runs, and every Python block of the README compiles or runs."""

from __future__ import annotations

import ast
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from helpers import LONG

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)

EXPECTED_OUTPUT = {
    "demo.py": ["client: got {'total': 94}", "Hello, demo client!", "server: closed"],
    "repeat.py": ["Hello worldHello worldHello worldHello world"],
    "bidirectional.py": ["stopped by the client after 3 of 5 steps"],
    "calculator.py": ["{'total': 94}", "{'count': 3, 'mean': 3.0, 'median': 2.0}"],
}


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=LONG * 3,
        cwd=ROOT,
        check=False,
    )


def test_every_example_is_checked() -> None:
    assert sorted(EXPECTED_OUTPUT) == sorted(path.name for path in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: pathlib.Path) -> None:
    result = run(["-W", "error", "-X", "dev", str(path)])
    assert result.returncode == 0, result.stderr
    for line in EXPECTED_OUTPUT[path.name]:
        assert line in result.stdout


def test_readme_has_python_blocks() -> None:
    assert len(README_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_block_compiles(index: int) -> None:
    source = README_BLOCKS[index]
    # Blocks are fragments of async code: top-level await is allowed.
    compile(source, f"README block {index}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize(
    "index", [i for i, block in enumerate(README_BLOCKS) if "asyncio.run(" in block]
)
def test_readme_program_runs(index: int) -> None:
    source = README_BLOCKS[index].replace("8000", str(free_port()))
    source = source.replace('"localhost"', '"127.0.0.1"')
    result = run(["-W", "error", "-c", source])
    assert result.returncode == 0, result.stderr
    assert "Hello worldHello worldHello worldHello world" in result.stdout
