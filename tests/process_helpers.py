"""Child processes on real pipes, for the tests of AMP over pipes and standard I/O."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import signal
import subprocess
from collections.abc import AsyncIterator

from helpers import LONG, eventually

Pipes = tuple[subprocess.Popen[bytes], io.FileIO, io.FileIO]


def start(argv: list[str], stderr: pathlib.Path) -> Pipes:
    """Start ``argv`` on new pipes; return it, its stdout's read end and its stdin's write end."""
    to_child, to_parent = os.pipe(), os.pipe()
    with open(stderr, "wb") as errors:
        process = subprocess.Popen(argv, stdin=to_child[0], stdout=to_parent[1], stderr=errors)
    os.close(to_child[0])
    os.close(to_parent[1])
    return process, io.FileIO(to_parent[0], "rb"), io.FileIO(to_child[1], "wb")


@contextlib.asynccontextmanager
async def child_process(argv: list[str], stderr: pathlib.Path) -> AsyncIterator[Pipes]:
    """
    Start ``argv`` with pipes as its stdin and stdout; yield it, the read end of
    its stdout and the write end of its stdin (file objects, closed at the end
    unless a connection closed them already). It is killed by pid at the end if
    it is still running.
    """
    process, out, into = start(argv, stderr)
    try:
        yield process, out, into
    finally:
        out.close()
        into.close()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=LONG)


async def exited(process: subprocess.Popen[bytes]) -> int:
    """The exit status of ``process``, waited for within LONG."""
    await eventually(lambda: process.poll() is not None, f"process {process.pid} exited")
    assert process.returncode is not None
    return process.returncode
