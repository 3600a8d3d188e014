"""Running the asyncio-amp command as a subprocess, for the command-line tests."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from helpers import HOST, LONG

TESTS = pathlib.Path(__file__).parent
CLI = [sys.executable, "-m", "asyncio_amp"]


@dataclass
class Result:
    status: int
    out: str
    err: str


async def run_cli(
    *args: str, stdin: bytes | None = None, cwd: pathlib.Path = TESTS, command: list[str] = CLI
) -> Result:
    """Run the command to its end (bounded by LONG) and return what it printed."""
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(LONG):
            out, err = await process.communicate(stdin)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class Background:
    """A long-running subcommand (serve, proxy): its output lines, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = asyncio.Event()
        assert process.stderr is not None
        self._readers = [asyncio.ensure_future(self._read(process.stderr, self.err))]
        if process.stdout is not None:  # None: the test gave the process a pipe of its own
            self._readers.append(asyncio.ensure_future(self._read(process.stdout, self.out)))

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode().rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def line(self, pattern: str, *, stream: str = "err") -> re.Match[str]:
        """Wait (bounded) for a line matching ``pattern`` on stderr or stdout."""
        lines = self.err if stream == "err" else self.out
        seen = 0
        async with asyncio.timeout(LONG):
            while True:
                for text in lines[seen:]:
                    found = re.search(pattern, text)
                    if found:
                        return found
                seen = len(lines)
                if self.process.returncode is not None and all(r.done() for r in self._readers):
                    raise AssertionError(
                        f"exited {self.process.returncode} without printing {pattern!r}: {self.err}"
                    )
                self._changed.clear()
                await self._changed.wait()

    async def stop(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum`` and wait (bounded) for the process to end; return its status."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        try:
            async with asyncio.timeout(LONG):
                status = await self.process.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise
        return status


@contextlib.asynccontextmanager
async def background(
    *args: str, cwd: pathlib.Path = TESTS, stdout: int = subprocess.PIPE
) -> AsyncIterator[Background]:
    """Start a long-running subcommand; ``stdout`` may be a pipe's write end of the test's."""
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )
    running = Background(process)
    try:
        yield running
    finally:
        if process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await running.stop()
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def served(
    *extra: str, app: str = "cli_app:Calculator", cwd: pathlib.Path = TESTS
) -> AsyncIterator[tuple[Background, int]]:
    """``asyncio-amp serve`` on 127.0.0.1 and a free port: the process and the port."""
    async with background("serve", app, "--port", "0", *extra, cwd=cwd) as server:
        found = await server.line(r"serving \S+ on 127\.0\.0\.1:(\d+)")
        yield server, int(found.group(1))


def free_port() -> int:
    """A port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def proxied(
    target: int, *extra: str, stdout: int = subprocess.PIPE
) -> AsyncIterator[tuple[Background, int]]:
    async with background("proxy", f"{HOST}:0", f"{HOST}:{target}", *extra, stdout=stdout) as proxy:
        found = await proxy.line(r"listening on 127\.0\.0\.1:(\d+), forwarding to")
        yield proxy, int(found.group(1))
