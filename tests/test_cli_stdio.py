"""``asyncio-amp serve --stdio``: one connection on the child's standard input and output."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal

import pytest

import asyncio_amp as amp
from cli_app import Sleep, Sum
from cli_helpers import CLI, TESTS, run_cli
from helpers import LONG
from process_helpers import child_process, exited

SERVE = [*CLI, "serve", "cli_app:Calculator", "--stdio"]


def in_tests(argv: list[str]) -> list[str]:
    """Run from the tests folder, where cli_app is importable."""
    return ["/bin/sh", "-c", f'cd "{TESTS}" && exec "$@"', "sh", *argv]


async def test_serve_stdio_answers_calls_on_its_standard_io(tmp_path: pathlib.Path) -> None:
    stderr = tmp_path / "stderr"
    async with child_process(in_tests([*SERVE, "-v"]), stderr) as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into)
            assert await proto.call_remote(Sum, a=2, b=3) == {"total": 5}
            answers = await asyncio.gather(*(proto.call_remote(Sum, a=i, b=i) for i in range(50)))
        assert [a["total"] for a in answers] == [2 * i for i in range(50)]
        proto.close()  # EOF on the child's stdin: the connection ends, and so does the child
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        assert await exited(process) == 0
    log = stderr.read_text()
    # The log goes to stderr, the boxes included (-v), never into the AMP stream.
    assert "serving cli_app:Calculator on standard input and output" in log
    assert "_command" in log


async def test_serve_stdio_shuts_down_with_grace_on_sigterm(tmp_path: pathlib.Path) -> None:
    stderr = tmp_path / "stderr"
    argv = in_tests([*SERVE, "--grace", "5"])
    async with child_process(argv, stderr) as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into)
            assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
            running = proto.call_remote(Sleep, seconds=0.3)
            await asyncio.sleep(0.1)
            os.kill(process.pid, signal.SIGTERM)
            # The running call finishes within the grace period; the connection ends.
            assert await running == {"slept": 0.3}
            await proto.wait_closed()
        assert await exited(process) == 0
    assert "shutting down" in stderr.read_text()


@pytest.mark.parametrize("extra", [["--unix", "x.sock"], ["--certfile", "cert.pem"]])
async def test_serve_stdio_refuses_other_places_and_tls(extra: list[str]) -> None:
    result = await run_cli("serve", "cli_app:Calculator", "--stdio", *extra)
    assert result.status == 2
    assert "--stdio" in result.err
    assert "Traceback" not in result.err
