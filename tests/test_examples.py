"""Every example program runs, and every Python block of the README compiles or runs."""

from __future__ import annotations

import ast
import asyncio
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest

import asyncio_amp as amp
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


# The port the README's programs use, and what each prints (found by a class it defines).
README_PORT = "8765"
README_PROGRAMS = {
    "class RepeatCommand(": "Hello worldHello worldHello worldHello world",
    "class Progress(": "teapot: stopped at step 5",
}


def readme_program(marker: str) -> str:
    (block,) = [block for block in README_BLOCKS if marker in block]
    return block


@pytest.mark.parametrize("marker", README_PROGRAMS)
def test_readme_program_runs(marker: str) -> None:
    source = readme_program(marker)
    assert "asyncio.run(main())" in source, "the README block is not a complete program"
    assert README_PORT in source
    source = source.replace(README_PORT, str(free_port()))
    source = source.replace('"localhost"', '"127.0.0.1"')
    result = run(["-W", "error", "-c", source])
    assert result.returncode == 0, result.stderr
    assert README_PROGRAMS[marker] in result.stdout


def test_every_readme_program_is_run() -> None:
    programs = [block for block in README_BLOCKS if "asyncio.run(" in block]
    assert len(programs) == len(README_PROGRAMS)
    assert all(any(marker in block for block in programs) for marker in README_PROGRAMS)


def test_readme_examples_leave_the_documentation_port_free() -> None:
    # The README serves the documentation on one port; its examples use another,
    # so both can run at once.
    readme = (ROOT / "README.md").read_text()
    (docs_port,) = set(re.findall(r"serve it locally at http://127\.0\.0\.1:(\d+)", readme))
    assert docs_port != README_PORT
    for block in README_BLOCKS:
        assert not re.search(rf"\b{docs_port}\b", block), block


def test_the_repeat_example_is_the_readmes() -> None:
    # examples/repeat.py is the README's example, made testable: the same command
    # and responder, and the same calls, on any free port rather than the README's.
    def statements(source: str) -> list[str]:
        return [
            ast.unparse(node) for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Await)
        ]

    readme = readme_program("class RepeatCommand(")
    example = (ROOT / "examples" / "repeat.py").read_text()
    assert readme.split("class RepeatCommand(")[1].split("async def main")[0] == (
        example.split("class RepeatCommand(")[1]
        .split("async def main")[0]
        .replace("self, text: str, times: int) -> dict[str, str]:", "self, text, times):")
    )
    readme_awaits = statements(readme)
    example_awaits = [
        line.replace("host, port", f"'localhost', {README_PORT}") for line in statements(example)
    ]
    assert readme_awaits == example_awaits


# The shell commands of the README, after its two set-up commands, run in the
# virtual environment those commands make.
SH_BLOCKS = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
ACTIVATE = ". .venv/bin/activate"


def test_readme_shell_blocks_activate_the_virtual_environment() -> None:
    setup, *others = SH_BLOCKS
    assert all(
        line.startswith("python3 -m venv .venv && .venv/bin/") for line in setup.splitlines()
    )
    assert others
    for block in others:
        assert block.startswith(ACTIVATE), block


def test_readme_says_to_activate_the_virtual_environment_first() -> None:
    readme = (ROOT / "README.md").read_text()
    first = readme.index("```sh")
    assert f"`{ACTIVATE}`" in readme[first : readme.index("\n## ", first)]
    # Installing extras goes through the checkout, not a package index.
    for command in re.findall(r"`(pip install [^`]*)`", readme):
        assert command.startswith("pip install -e '."), command


@pytest.mark.asyncio_loop_only
async def test_readme_server_command_runs_as_written() -> None:
    (block,) = [block for block in SH_BLOCKS if "asyncio-amp serve" in block]
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        # Not the README's layout: the same command in the environment that runs the tests.
        activate = pathlib.Path(sys.prefix) / "bin" / "activate"
        if not activate.is_file():
            pytest.skip("the tests do not run in a virtual environment")
        block = block.replace(ACTIVATE, f". {shlex.quote(str(activate))}")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        block.replace("7000", str(port)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: bash and the server it starts
    )
    try:
        async with asyncio.timeout(LONG * 3):
            while True:
                assert process.returncode is None, "the server command ended"
                try:
                    proto = await amp.connect("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                break
            async with proto:
                answer = await proto.call_remote_box("Sum", {"a": "13", "b": "81"})
        assert answer == {b"total": b"94"}
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGTERM)
        async with asyncio.timeout(LONG):
            await process.communicate()
