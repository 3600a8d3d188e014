"""
Keepalive: heartbeats after silence, a dropped connection when nothing follows,
and no false alarm on a busy connection. Peers that stop are real processes
stopped with SIGSTOP; every one is continued or killed by pid at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator

import pytest

import asyncio_amp as amp
from asyncio_amp._keepalive import (
    DEFAULT_KEEPALIVE_TIMEOUT,
    HEARTBEAT_NAME,
    MAX_HELD_ANSWERS,
    Heartbeat,
)
from asyncio_amp._wire import encode_box, parse_boxes
from cli_helpers import served
from helpers import HOST, LONG, SHORT, TIME, client, eventually, running_server

# Short keepalive settings, so that a dead peer is found quickly.
INTERVAL = 0.1 * TIME
TIMEOUT = 0.2 * TIME
# The most a silent peer may take to be dropped: two periods and the timeout,
# plus room for a loaded machine.
DROPPED_WITHIN = 2 * INTERVAL + TIMEOUT + 2 * TIME


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Block(amp.Command):
    response = [("done", amp.Boolean())]


class Nap(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("slept", amp.Float())]


class Blob(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.BigBytes())]


class Upload(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("size", amp.Integer())]


class Server(amp.AMPProtocol):
    release: asyncio.Event | None = None

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Block.responder
    async def block(self) -> dict[str, bool]:
        assert self.release is not None
        await self.release.wait()
        return {"done": True}

    @Nap.responder
    async def nap(self, seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @Blob.responder
    def blob(self, size: int) -> dict[str, bytes]:
        return {"data": b"x" * size}

    @Upload.responder
    def upload(self, data: bytes) -> dict[str, int]:
        return {"size": len(data)}


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block, and SIGCONT it at the end, however the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# The options


def test_options_are_checked_and_are_attributes() -> None:
    proto = amp.AMPProtocol()
    assert proto.keepalive is None
    assert proto.keepalive_timeout == DEFAULT_KEEPALIVE_TIMEOUT == 20.0
    proto = amp.AMPProtocol(keepalive=5, keepalive_timeout=1.5)
    assert (proto.keepalive, proto.keepalive_timeout) == (5.0, 1.5)
    proto.keepalive = None
    assert proto.keepalive is None
    for bad in (0, -1, True, "5", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="keepalive must be a number of seconds > 0"):
            amp.AMPProtocol(keepalive=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="keepalive_timeout must be"):
            proto.keepalive_timeout = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match="keepalive_timeout must be"):
        amp.AMPProtocol(keepalive_timeout=None)  # type: ignore[arg-type]


async def test_serve_and_connect_take_the_keywords() -> None:
    with pytest.raises(ValueError, match="keepalive must be"):
        await amp.serve(Server, HOST, 0, keepalive=-1)
    async with running_server(Server, keepalive=3.0, keepalive_timeout=4.0) as (_, port, protos):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, keepalive=1.0, keepalive_timeout=2.0)
        async with proto:
            assert (proto.keepalive, proto.keepalive_timeout) == (1.0, 2.0)
            await eventually(lambda: bool(protos), "the server has the connection")
            assert (protos[0].keepalive, protos[0].keepalive_timeout) == (3.0, 4.0)


# The heartbeat's answer


async def test_heartbeat_is_answered_without_a_responder_place() -> None:
    """
    At max_responders a heartbeat is answered at once. With a call waiting for a
    place too, reading stops; a side with keepalive of its own reads again for
    its own heartbeat's answer, and answers the peer's then.
    """
    release = asyncio.Event()

    def build() -> Server:
        server = Server(max_responders=1, keepalive=INTERVAL, keepalive_timeout=TIMEOUT)
        server.release = release
        return server

    async with running_server(build) as (_, port, protos), client(port) as proto:
        blocked = proto.call_remote(Block)
        await eventually(lambda: protos[0]._flow.working == 1, "the responder runs")
        async with asyncio.timeout(LONG):
            assert await proto.call_remote(Heartbeat) == {}
        waiting = proto.call_remote(Sum, a=1, b=2)
        await eventually(lambda: bool(protos[0]._flow.deferred), "the Sum waits for a place")
        await eventually(lambda: protos[0]._reading_paused, "the server stops reading")
        async with asyncio.timeout(LONG):
            assert await proto.call_remote(Heartbeat) == {}
        assert not waiting.done() and not blocked.done()
        release.set()
        async with asyncio.timeout(LONG):
            assert await blocked == {"done": True}
            assert await waiting == {"total": 3}


def _ask(tag: int, command: bytes, **values: bytes) -> bytes:
    return encode_box(
        {b"_ask": str(tag).encode(), b"_command": command}
        | {k.encode(): v for k, v in values.items()}
    )


@contextlib.asynccontextmanager
async def slow_reader(port: int) -> AsyncIterator[socket.socket]:
    """A raw client with a small receive buffer, which reads only when the test says so."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(LONG):
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        yield sock
    finally:
        sock.close()


async def _read_answers(sock: socket.socket, count: int) -> list[dict[bytes, bytes]]:
    """Read until ``count`` answers came (or the connection closed); return every box."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(LONG):
        while data.count(b"\x00\x07_answer") < count:
            chunk = await loop.sock_recv(sock, 1 << 20)
            if not chunk:
                break
            data += chunk
    return parse_boxes(bytes(data))


# The server has keepalive of its own: its heartbeat, sent while it reads
# nothing (writing is paused), has it read again, and answer the peer's.
READING_SERVER = {"keepalive": SHORT, "keepalive_timeout": LONG}


async def test_heartbeat_is_answered_while_writing_is_paused() -> None:
    async with (
        running_server(Server, **READING_SERVER) as (_, port, protos),
        slow_reader(port) as sock,
    ):
        loop = asyncio.get_running_loop()
        size = 4_000_000
        await loop.sock_sendall(sock, _ask(1, b"Blob", size=str(size).encode()))
        await eventually(lambda: protos and protos[0]._writing_paused, "writing pauses")
        # Sum must wait (no responder starts while writing is paused); heartbeats do not.
        heartbeats = [_ask(tag, HEARTBEAT_NAME) for tag in range(2, 12)]
        await loop.sock_sendall(sock, b"".join(heartbeats))
        await eventually(lambda: protos[0]._conn.queued >= 10, "the answers are queued")
        boxes = await _read_answers(sock, 11)
        answers = [box for box in boxes if b"_answer" in box]  # not the server's heartbeats
        assert len(answers[0][b"data"]) == 65_535  # the Blob's first chunk
        assert sorted(int(box[b"_answer"]) for box in answers) == list(range(1, 12))
        assert not protos[0].closed


async def test_a_peer_that_floods_heartbeats_without_reading_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        running_server(Server, **READING_SERVER) as (_, port, protos),
        slow_reader(port) as sock,
    ):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, _ask(1, b"Blob", size=b"4000000"))
        await eventually(lambda: protos and protos[0]._writing_paused, "writing pauses")
        flood = b"".join(_ask(tag, HEARTBEAT_NAME) for tag in range(2, MAX_HELD_ANSWERS + 3))
        await loop.sock_sendall(sock, flood)
        await eventually(lambda: protos[0].closed, "the flooding peer is dropped")
    assert f"more than {MAX_HELD_ANSWERS} heartbeats" in caplog.text


async def test_heartbeat_takes_no_place_under_max_pending_calls() -> None:
    release = asyncio.Event()

    def build() -> Server:
        server = Server()
        server.release = release
        return server

    async with running_server(build) as (_, port, _protos):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST, port, max_pending_calls=1, keepalive=INTERVAL, keepalive_timeout=TIMEOUT
            )
        async with proto:
            blocked = proto.call_remote(Block)  # takes the only place
            keepalive = proto._keepalive
            assert keepalive is not None
            await eventually(lambda: keepalive.heartbeat is not None, "a heartbeat goes out")
            assert len(proto._pending) == 2  # past the limit
            assert proto.max_pending_calls == 1
            held = proto.call_remote(Sum, a=1, b=1)  # still waits for the place
            assert len(proto._pending) == 2 and proto._waiting
            # Heartbeats are answered while the call blocks: no keepalive timeout.
            await asyncio.sleep(2 * INTERVAL + 2 * TIMEOUT)
            assert not proto.closed
            release.set()
            async with asyncio.timeout(LONG):
                assert await blocked == {"done": True}
                assert await held == {"total": 2}
            assert proto.max_pending_calls == 1


# Dead peers


async def test_a_stopped_server_process_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    async with served() as (server, port):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, keepalive=INTERVAL, keepalive_timeout=TIMEOUT)
        async with proto:
            assert await proto.call_remote_box("Sum", {"a": "1", "b": "2"}) == {b"total": b"3"}
            with stopped(server.process.pid):
                started = time.monotonic()
                call = proto.call_remote_box("Sum", {"a": "1", "b": "2"})
                with pytest.raises(amp.ConnectionLostError, match="keepalive timeout"):
                    async with asyncio.timeout(LONG):
                        await call
                elapsed = time.monotonic() - started
                async with asyncio.timeout(LONG):
                    await proto.wait_closed()
                assert elapsed < DROPPED_WITHIN
                with pytest.raises(amp.ConnectionLostError):
                    proto.call_remote_box("Sum", {"a": "1", "b": "2"})
    assert "keepalive timeout" in caplog.text


CLIENT_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import asyncio_amp as amp

    async def main():
        proto = await amp.connect("127.0.0.1", int(sys.argv[1]))
        print("connected", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_a_server_drops_a_stopped_client_and_frees_its_responders() -> None:
    async with running_server(Server, keepalive=INTERVAL, keepalive_timeout=TIMEOUT) as (
        server,
        port,
        protos,
    ):
        child = subprocess.Popen(  # noqa: ASYNC220 (started once, waited for with a bound)
            [sys.executable, "-c", CLIENT_CHILD, str(port)], stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), LONG)
            assert line == b"connected\n"
            await eventually(lambda: len(server.connections) == 1, "the client is connected")
            # The child is idle but alive: its loop answers our heartbeats.
            await asyncio.sleep(2 * INTERVAL + 2 * TIMEOUT)
            assert len(server.connections) == 1
            with stopped(child.pid):
                await eventually(lambda: not server.connections, "the stopped client is dropped")
                assert protos[0].closed
                assert protos[0]._keepalive is not None
                assert protos[0]._keepalive.handle is None
        finally:
            child.kill()
            child.wait(timeout=LONG)
            if child.stdout is not None:
                child.stdout.close()


# Busy but healthy


async def test_a_responder_longer_than_the_interval_is_no_false_alarm() -> None:
    kwargs = {"keepalive": INTERVAL, "keepalive_timeout": TIMEOUT}
    async with running_server(Server, **kwargs) as (_, port, protos):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, **kwargs)  # type: ignore[arg-type]
        async with proto:
            seconds = 4 * (INTERVAL + TIMEOUT)
            async with asyncio.timeout(LONG):
                assert await proto.call_remote(Nap, seconds=seconds) == {"slept": seconds}
            assert not proto.closed and not protos[0].closed


async def _throttle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int, period: float
) -> None:
    """Forward at most ``rate`` bytes every ``period`` seconds."""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(rate):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(period)
    writer.close()


@contextlib.asynccontextmanager
async def throttling_proxy(target: int, rate: int, period: float) -> AsyncIterator[int]:
    """A TCP proxy on 127.0.0.1 that forwards slowly toward ``target``."""
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        upstream.setblocking(False)
        await asyncio.get_running_loop().sock_connect(upstream, (HOST, target))
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        writers.extend((writer, up_writer))
        for pair in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(_throttle(*pair, rate, period))
            tasks.add(task)

    # A small receive buffer: what is in flight past the sender's own socket is
    # at most that, as on a path whose buffers are full. (Bytes that a peer's
    # kernel took but the peer has not read yet are not seen as progress:
    # keepalive_timeout must cover the time to read them.)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    listener.bind((HOST, 0))
    server = await asyncio.start_server(accept, sock=listener)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.mark.asyncio_loop_only
async def test_a_long_upload_is_no_false_alarm() -> None:
    """The uploader hears nothing until the upload is read, but sees its bytes leave."""
    kwargs = {"keepalive": INTERVAL / 4, "keepalive_timeout": TIMEOUT / 2}
    size = 3_000_000
    async with (
        running_server(Server, **kwargs) as (_, port, _protos),
        throttling_proxy(port, 32 * 1024, 0.01) as proxy,
    ):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, proxy, **kwargs)  # type: ignore[arg-type]
        async with proto:
            started = time.monotonic()
            async with asyncio.timeout(LONG):
                assert await proto.call_remote(Upload, data=b"u" * size) == {"size": size}
            # It took several keepalive periods and timeouts.
            assert time.monotonic() - started > 2 * (
                kwargs["keepalive"] + kwargs["keepalive_timeout"]
            )
            assert not proto.closed


@pytest.mark.asyncio_loop_only
async def test_a_long_download_is_no_false_alarm() -> None:
    kwargs = {"keepalive": INTERVAL / 4, "keepalive_timeout": TIMEOUT / 2}
    size = 3_000_000
    async with (
        running_server(Server, **kwargs) as (_, port, protos),
        throttling_proxy(port, 32 * 1024, 0.01) as proxy,
    ):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, proxy, **kwargs)  # type: ignore[arg-type]
        async with proto:
            async with asyncio.timeout(LONG):
                answer = await proto.call_remote(Blob, size=size)
            assert len(answer["data"]) == size
            assert not proto.closed and not protos[0].closed


# Ends and races


async def test_closing_cancels_the_timer() -> None:
    async with running_server(Server) as (_, port, _protos):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, keepalive=SHORT)
        keepalive = proto._keepalive
        assert keepalive is not None and keepalive.handle is not None
        await asyncio.sleep(3 * SHORT)  # a few periods, heartbeats answered
        proto.close()
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        assert keepalive.handle is None and keepalive.heartbeat is None
        assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_keepalive_can_be_turned_on_and_off_on_a_live_connection() -> None:
    async with running_server(Server) as (_, port, _protos), client(port) as proto:
        assert proto._keepalive is None
        proto.keepalive = SHORT
        keepalive = proto._keepalive
        assert keepalive is not None and keepalive.handle is not None
        # The heartbeat takes a tag.
        await eventually(lambda: proto._conn._tag_counter > 0, "a heartbeat goes out")
        proto.keepalive = None
        assert keepalive.handle is None
        await eventually(lambda: keepalive.heartbeat is None, "the heartbeat is answered")


async def test_shutdown_while_heartbeats_go() -> None:
    kwargs = {"keepalive": SHORT, "keepalive_timeout": TIMEOUT}
    async with running_server(Server, **kwargs) as (_, port, protos):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, **kwargs)  # type: ignore[arg-type]
        nap = proto.call_remote(Nap, seconds=10 * SHORT)
        await eventually(lambda: bool(protos) and protos[0]._flow.working == 1, "the nap runs")
        async with asyncio.timeout(LONG):
            await protos[0].shutdown(grace=LONG)
            assert await nap == {"slept": 10 * SHORT}
            await proto.wait_closed()
        assert proto._keepalive is not None and proto._keepalive.handle is None
