"""connect_pipes() over real pipes, serve_stdio() in a real child process, and connect(sock=...)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp._wire import parse_boxes
from helpers import HOST, LONG, SHORT, eventually, port_of
from process_helpers import child_process, exited
from stdio_child import CallBack, Quit, Stray, Sum

CHILD = pathlib.Path(__file__).parent / "stdio_child.py"


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("data", amp.Bytes())]


class Hold(amp.Command):
    arguments = [("data", amp.Bytes())]
    response: list[tuple[str, amp.Argument[Any]]] = []


class Calc(amp.AMPProtocol):
    """Answers Sum, Echo and Hold (which waits for ``gate``); counts connection_lost calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lost: list[Exception | None] = []
        self.gate = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        super().connection_lost(exc)

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @Hold.responder
    async def hold(self, data: bytes) -> dict[str, Any]:
        await self.gate.wait()
        return {}


@contextlib.contextmanager
def two_pipes() -> Iterator[Pipes]:
    """Two pipes; at the end, the ends that no connection took are closed."""
    pipes = Pipes()
    try:
        yield pipes
    finally:
        for fd in pipes.ours:
            os.close(fd)


class Pipes:
    """Two pipes, (r1, w1) and (r2, w2), and the ends the test still owns."""

    def __init__(self) -> None:
        self.r1, self.w1 = os.pipe()
        self.r2, self.w2 = os.pipe()
        self.ours = {self.r1, self.w1, self.r2, self.w2}

    def give(self, *fds: int) -> tuple[int, ...]:
        """Hand ``fds`` over (to a connection, which closes them)."""
        self.ours.difference_update(fds)
        return fds


def file(fd: int, mode: str) -> Any:
    """A file object for the descriptor ``fd``, which it closes."""
    return open(fd, mode, buffering=0)


async def closed(*protocols: amp.AMPProtocol) -> None:
    async with asyncio.timeout(LONG):
        for protocol in protocols:
            await protocol.wait_closed()


async def test_calls_go_both_ways_over_two_pipes() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    async with asyncio.timeout(LONG):
        server = await amp.connect_pipes(r1, w2, protocol_factory=Calc)
        # File objects work as well as descriptors.
        client = await amp.connect_pipes(file(r2, "rb"), file(w1, "wb"), protocol_factory=Calc)
        assert await client.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert await server.call_remote(Sum, a=3, b=4) == {"total": 7}
        answers = await asyncio.gather(*(client.call_remote(Sum, a=i, b=i) for i in range(500)))
        assert answers == [{"total": 2 * i} for i in range(500)]
    assert server.peer == f"pipes (read {r1}, write {w2})"
    assert server.transport is not None
    assert server.transport.get_extra_info("read_pipe").fileno() == r1
    client.close()
    await closed(client, server)
    # The client closed: the server saw EOF and closed too, each once.
    assert client.lost == [None]
    assert server.lost == [None]
    for proto in (client, server):  # the connections closed their pipes
        assert proto.transport is not None
        assert proto.transport.get_extra_info("read_pipe").closed
        assert proto.transport.get_extra_info("write_pipe").closed


async def test_writing_pauses_while_the_peer_does_not_read() -> None:
    with two_pipes() as p:
        client = await amp.connect_pipes(*p.give(p.r1, p.w2), protocol_factory=Calc)
        assert client.transport is not None
        data = b"x" * 60_000
        calls = [client.call_remote(Echo, data=data) for _ in range(50)]  # 3 MB
        await eventually(lambda: client._writing_paused, "writing paused")
        await asyncio.sleep(SHORT)
        # Written into the pipe and the transport: at most the pipe's capacity plus
        # a few calls over the write buffer's high-water mark, not 3 MB.
        assert client.transport.get_write_buffer_size() < 300_000
        assert not any(call.done() for call in calls)
        # Now a peer reads: every call goes out and is answered.
        server = await amp.connect_pipes(*p.give(p.r2, p.w1), protocol_factory=Calc)
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(*calls)
        assert answers == [{"data": data}] * 50
        assert not client._writing_paused
        client.close()
        await closed(client, server)
        assert client.lost == [None]


async def test_pause_reading_pauses_the_read_pipe() -> None:
    with two_pipes() as p:
        server = await amp.connect_pipes(
            *p.give(p.r1, p.w2), protocol_factory=Calc, max_responders=1
        )
        client = await amp.connect_pipes(*p.give(p.r2, p.w1), protocol_factory=Calc)
        assert isinstance(server, Calc)
        assert server.transport is not None
        calls = [client.call_remote(Hold, data=b"y" * 60_000) for _ in range(50)]
        # One responder works and holds on; the server stops reading, the pipe
        # fills, and the client's writing pauses.
        await eventually(lambda: not server.transport.is_reading(), "reading paused")  # type: ignore[union-attr]
        await eventually(lambda: client._writing_paused, "the client's writing paused")
        assert not any(call.done() for call in calls)
        server.gate.set()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*calls)
        assert server.transport.is_reading()
        client.close()
        await closed(client, server)


async def test_eof_on_the_read_pipe_closes_the_connection() -> None:
    with two_pipes() as p:
        client = await amp.connect_pipes(*p.give(p.r1, p.w2), protocol_factory=Calc)
        assert isinstance(client, Calc)
        call = client.call_remote(Sum, a=1, b=2)
        os.close(*p.give(p.w1))  # the peer ends its output
        with pytest.raises(amp.ConnectionLostError):
            async with asyncio.timeout(LONG):
                await call
        await closed(client)
        assert client.lost == [None]


async def test_reading_goes_on_after_the_peer_stops_reading() -> None:
    # A child that answered and exited: its stdin is gone before its stdout is read.
    with two_pipes() as p:
        client = await amp.connect_pipes(
            *p.give(p.r1, p.w2), protocol_factory=Calc, close_timeout=SHORT * 4
        )
        assert isinstance(client, Calc)
        assert client.transport is not None
        call = client.call_remote(Sum, a=1, b=2)
        os.set_blocking(p.r2, False)
        sent = bytearray()

        def read_call() -> bool:
            with contextlib.suppress(BlockingIOError):
                sent.extend(os.read(p.r2, 65536))
            return sent.endswith(b"\x00\x00")

        await eventually(read_call, "the call written")
        (box,) = parse_boxes(bytes(sent))
        os.close(*p.give(p.r2))  # the peer stops reading for good
        await eventually(client.transport.is_closing, "the write pipe seen closed")
        os.write(p.w1, amp.encode_box({b"_answer": box[b"_ask"], b"total": b"3"}))
        async with asyncio.timeout(LONG):
            assert await call == {"total": 3}
        # No EOF comes: the connection ends after close_timeout.
        await closed(client)
        assert client.lost == [None]


async def test_abort_closes_both_pipes_at_once() -> None:
    with two_pipes() as p:
        client = await amp.connect_pipes(*p.give(p.r1, p.w2), protocol_factory=Calc)
        assert isinstance(client, Calc)
        assert client.transport is not None
        call = client.call_remote(Sum, a=1, b=2)
        client.transport.abort()
        with pytest.raises(amp.ConnectionLostError):
            async with asyncio.timeout(LONG):
                await call
        await closed(client)
        assert client.lost == [None]
        for fd in (p.r1, p.w2):
            with pytest.raises(OSError):
                os.fstat(fd)


async def test_a_box_over_max_box_size_closes_the_connection() -> None:
    with two_pipes() as p:
        server = await amp.connect_pipes(
            *p.give(p.r1, p.w2), protocol_factory=Calc, max_box_size=1000
        )
        client = await amp.connect_pipes(*p.give(p.r2, p.w1), protocol_factory=Calc)
        assert server.max_box_size == 1000
        with pytest.raises(amp.ConnectionLostError):
            async with asyncio.timeout(LONG):
                await client.call_remote(Echo, data=b"z" * 2000)
        await closed(client, server)


async def test_connect_pipes_checks_its_arguments() -> None:
    with two_pipes() as p:
        with pytest.raises(ValueError, match="two descriptors"):
            await amp.connect_pipes(p.r1, p.r1)
        with pytest.raises(TypeError, match="unexpected keyword"):
            await amp.connect_pipes(p.r1, p.w2, backlog=3)
        with pytest.raises(ValueError, match="max_responders"):
            await amp.connect_pipes(p.r1, p.w2, max_responders=0)
        # Nothing took the pipes: they are still open.
        for fd in (p.r1, p.w2):
            os.fstat(fd)


async def test_connect_pipes_refuses_a_regular_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    with two_pipes() as p:
        readable = file(os.open(path, os.O_RDONLY), "rb")
        with pytest.raises(ValueError):
            await amp.connect_pipes(readable, *p.give(p.w2))
        # Both pipes belonged to the connection that failed: both are closed.
        assert readable.closed
        with pytest.raises(OSError):
            os.fstat(p.w2)


# The child process: serve_stdio on its stdin and stdout.


class Parent(Calc):
    """The parent side: answers the child's Sum calls."""


async def test_serve_stdio_child_called_through_its_pipes(tmp_path: pathlib.Path) -> None:
    stderr = tmp_path / "stderr"
    async with child_process([sys.executable, str(CHILD)], stderr) as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into, protocol_factory=Parent)
            assert await proto.call_remote(Sum, a=13, b=81) == {"total": 94}
            # The child calls us back on the same connection.
            assert await proto.call_remote(CallBack, a=2, b=3) == {"total": 5}
            # Text the child writes to stdout goes to its stderr, not into the stream.
            assert await proto.call_remote(Stray, text="hello") == {}
            assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        proto.close()
        await closed(proto)
        assert await exited(process) == 0
    assert isinstance(proto, Calc)
    assert proto.lost == [None]
    assert stderr.read_text().splitlines() == [
        "print: hello",
        "os.write: hello",
        "served: closed=True",
        "stdout is stderr again: True",
    ]


async def test_serve_stdio_child_that_closes(tmp_path: pathlib.Path) -> None:
    stderr = tmp_path / "stderr"
    async with child_process([sys.executable, str(CHILD)], stderr) as (process, out, into):
        async with asyncio.timeout(LONG):
            proto = await amp.connect_pipes(out, into, protocol_factory=Parent)
            assert await proto.call_remote(Quit) == {}
        await closed(proto)  # the child closed: EOF on its stdout
        assert await exited(process) == 0
    assert "served: closed=True" in stderr.read_text()


async def test_close_timeout_holds_when_the_child_stops_reading(tmp_path: pathlib.Path) -> None:
    # A child that never reads its stdin.
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    async with child_process(sleeper, tmp_path / "stderr") as (process, out, into):
        proto = await amp.connect_pipes(out, into, protocol_factory=Parent, close_timeout=SHORT * 4)
        assert isinstance(proto, Parent)
        calls = [proto.call_remote(Echo, data=b"x" * 60_000) for _ in range(20)]
        await eventually(lambda: proto._writing_paused, "writing paused")
        started = time.monotonic()
        proto.close()
        await closed(proto)
        assert time.monotonic() - started >= SHORT * 4 * 0.9
        assert proto.lost == [None]
        for call in calls:
            with pytest.raises(amp.ConnectionLostError):
                await call
        os.kill(process.pid, signal.SIGKILL)
        assert await exited(process) == -signal.SIGKILL


# connect(sock=...): a socket already connected.


async def test_connect_takes_a_connected_tcp_socket() -> None:
    server = await amp.serve(Calc, HOST, 0)
    async with server:
        sock = socket.create_connection((HOST, port_of(server)))  # type: ignore[arg-type]
        async with asyncio.timeout(LONG):
            async with await amp.connect(sock=sock) as proto:
                assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert sock.fileno() == -1  # the connection closed it


async def test_connect_takes_one_end_of_a_unix_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    async with asyncio.timeout(LONG):
        one = await amp.connect(sock=left, protocol_factory=Calc)
        other = await amp.connect(sock=right, protocol_factory=Calc, max_pending_calls=5)
        assert other.max_pending_calls == 5
        assert await one.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert await other.call_remote(Sum, a=3, b=4) == {"total": 7}
    one.close()
    await closed(one, other)


async def test_connect_takes_sock_alone() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        with pytest.raises(TypeError, match="only one"):
            await amp.connect(HOST, 1, sock=left)
        with pytest.raises(TypeError, match="only one"):
            await amp.connect(path="/nonexistent", sock=left)
