"""
AMP over a child process's standard I/O, with Twisted on the other side.

``twisted_stdio_peer.py child`` speaks AMP on its stdin and stdout with Twisted's
``StandardIO``; we call it through ``connect_pipes`` and it calls us back.
``twisted_stdio_peer.py parent`` spawns our ``serve_stdio`` child the way
ampoule does (``reactor.spawnProcess``) and calls it.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
from typing import Any

import asyncio_amp as amp
from helpers import LONG
from process_helpers import child_process, exited

HERE = pathlib.Path(__file__).parent
TWISTED = HERE / "twisted_stdio_peer.py"
OUR_CHILD = HERE.parent / "stdio_child.py"


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("data", amp.Bytes())]


class CallBack(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Hello(amp.Command):
    arguments = [("name", amp.String())]
    response = [("greeting", amp.String())]


class Notify(amp.Command):
    arguments = [("message", amp.String())]
    requires_answer = False


class Quit(amp.Command):
    pass


class Parent(amp.AMPProtocol):
    """Our side: answers the Twisted child's Sum, Hello and Notify."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: list[tuple[int, int]] = []
        self.notified: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        self.sums.append((a, b))
        return {"total": a + b}

    @Hello.responder
    def hello(self, name: str) -> dict[str, str]:
        return {"greeting": f"hello {name}"}

    @Notify.responder
    def notify(self, message: str) -> None:
        self.notified.set_result(message)


async def test_a_twisted_child_on_its_stdio_both_ways(tmp_path: pathlib.Path) -> None:
    argv = [sys.executable, str(TWISTED), "child", "--greet"]
    async with child_process(argv, tmp_path / "stderr") as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into, protocol_factory=Parent)
            assert isinstance(proto, Parent)
            # It calls us as soon as it starts, and sends our answer back.
            assert await proto.notified == "hello twisted child"
            # We call it.
            assert await proto.call_remote(Sum, a=13, b=81) == {"total": 94}
            # It calls us back while answering us.
            assert await proto.call_remote(CallBack, a=2, b=3) == {"total": 5}
            assert proto.sums == [(2, 3)]
            # Many large values at once: both pipes fill and drain.
            data = [bytes([i]) * 60_000 for i in range(40)]
            answers = await asyncio.gather(*(proto.call_remote(Echo, data=d) for d in data))
            assert answers == [{"data": d} for d in data]
        proto.close()  # the child sees EOF on its stdin, and exits
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        assert await exited(process) == 0, (tmp_path / "stderr").read_text()


async def test_a_twisted_child_that_closes_the_connection(tmp_path: pathlib.Path) -> None:
    argv = [sys.executable, str(TWISTED), "child"]
    async with child_process(argv, tmp_path / "stderr") as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into, protocol_factory=Parent)
            assert await proto.call_remote(Quit) == {}
            await proto.wait_closed()  # EOF on its stdout
        assert await exited(process) == 0, (tmp_path / "stderr").read_text()


async def test_a_twisted_parent_calls_our_serve_stdio_child(tmp_path: pathlib.Path) -> None:
    stderr = tmp_path / "stderr"
    argv = [sys.executable, str(TWISTED), "parent", sys.executable, str(OUR_CHILD)]
    # The Twisted parent prints its results on its stdout; that pipe is all we read.
    async with child_process(argv, stderr) as (process, out, into):
        into.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(LONG):
            # Read in a thread: the parent's output is one line, then EOF.
            output = await loop.run_in_executor(None, out.read)
        assert await exited(process) == 0, stderr.read_text()
    result: dict[str, Any] = json.loads(output)
    assert result == {
        "sum": {"total": 94},
        "call_back": {"total": 5},
        "stray": {},
        "sum_after": {"total": 2},
        "exit": 0,
    }, stderr.read_text()
    # What our child printed went to its stderr (which Twisted passed on), not into AMP.
    errors = stderr.read_text()
    assert "print: from twisted" in errors
    assert "os.write: from twisted" in errors
    assert "served: closed=True" in errors
