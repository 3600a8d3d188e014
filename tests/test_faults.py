"""
Faults, bad input and leaks, over real sockets on 127.0.0.1.

A peer killed mid-call, mid-box and mid-BigBytes (a subprocess, ``fault_peer.py``,
killed with SIGKILL); a reset; a half-close; a server closed with calls in flight;
a graceful shutdown; 10,000 connect/call/disconnect cycles counted for leaked
tasks, futures, transports and file descriptors; bad input next to a bystander
connection; nothing internal sent to a peer; the limits as seen from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import pathlib
import signal
import socket
import struct
import sys
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp import encode_box
from fault_peer import BIG_SIZE, big_box, big_data, sum_box, upload_box
from helpers import (
    HOST,
    LONG,
    SHORT,
    TIME,
    accepted,
    accepting_server,
    client,
    eventually,
    port_of,
    raw_connection,
    running_server,
)

PEER_PROGRAM = pathlib.Path(__file__).with_name("fault_peer.py")

#: How soon a pending call must fail once its connection is gone.
PROMPT = 2 * TIME

#: The text of the exception raised by the responders that fail.
SECRET = "hunter2 is the database password"


# Commands


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Greet(amp.Command):
    arguments = [("name", amp.String())]
    response = [("greeting", amp.String())]


class Hang(amp.Command):
    """Its responder never returns; it can only be cancelled."""


class Hold(amp.Command):
    """Its responder waits until the test releases it."""

    arguments = [("value", amp.Integer())]
    response = [("value", amp.Integer())]


class Slow(amp.Command):
    arguments = [("delay", amp.Float()), ("value", amp.Integer())]
    response = [("value", amp.Integer())]


class Upload(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("size", amp.Integer())]


class Download(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.BigBytes())]


class Big(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.Bytes())]


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("data", amp.Bytes())]


class Boom(amp.Command):
    """A plain responder that raises an exception the command does not map."""


class BoomLater(amp.Command):
    """A coroutine responder that raises an exception the command does not map."""


class Ping(amp.Command):
    """The server calls its peer with this; the raw peers never answer it."""

    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


# Protocols


class Probe:
    """What the responders of one test did, seen from the test."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.hung = 0
        self.cancelled = 0
        self.cancelled_event = asyncio.Event()
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0
        self.uploads: list[int] = []

    async def wait_cancellable(self, awaitable: Any) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancelled_event.set()
            raise


class FaultServer(amp.AMPProtocol):
    def __init__(self, probe: Probe | None = None, **limits: int) -> None:
        super().__init__(**limits)
        self.probe = probe if probe is not None else Probe()
        self.reads = 0

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        super().data_received(data)

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Greet.responder
    def greet(self, name: str) -> dict[str, str]:
        return {"greeting": f"hello {name}"}

    @Hang.responder
    async def hang(self) -> None:
        self.probe.hung += 1
        self.probe.started.set()
        await self.probe.wait_cancellable(asyncio.get_running_loop().create_future())

    @Hold.responder
    async def hold(self, value: int) -> dict[str, int]:
        self.probe.started.set()
        await self.probe.wait_cancellable(self.probe.release.wait())
        return {"value": value}

    @Slow.responder
    async def slow(self, delay: float, value: int) -> dict[str, int]:
        probe = self.probe
        probe.running += 1
        probe.most_running = max(probe.most_running, probe.running)
        try:
            await asyncio.sleep(delay)
        finally:
            probe.running -= 1
        return {"value": value}

    @Upload.responder
    def upload(self, data: bytes) -> dict[str, int]:
        self.probe.uploads.append(len(data))
        return {"size": len(data)}

    @Big.responder
    def big(self, size: int) -> dict[str, bytes]:
        return {"data": b"x" * size}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @Boom.responder
    def boom(self) -> None:
        raise RuntimeError(SECRET)

    @BoomLater.responder
    async def boom_later(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError(SECRET)


class HoldingClient(amp.AMPProtocol):
    """A client whose Ping responder waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    @Ping.responder
    async def ping(self, n: int) -> dict[str, int]:
        await self.release.wait()
        return {"n": n + 1}


# Helpers


async def nth_protocol(protocols: list[amp.AMPProtocol], n: int) -> FaultServer:
    """The server-side protocol of the n-th connection (from 1), once it is made."""
    await eventually(lambda: len(protocols) >= n, f"connection {n} is accepted")
    protocol = protocols[n - 1]
    assert isinstance(protocol, FaultServer)
    return protocol


async def assert_still_serving(port: int, bystander: amp.AMPProtocol) -> None:
    """The connection that was open all along and a new one are both answered."""
    async with asyncio.timeout(LONG):
        assert await bystander.call_remote(Sum, a=20, b=22) == {"total": 42}
    async with client(port) as newcomer, asyncio.timeout(LONG):
        assert await newcomer.call_remote(Sum, a=1, b=2) == {"total": 3}


def amp_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """The library's log records at exactly ``level``."""
    return [r for r in caplog.records if r.name == "asyncio_amp" and r.levelno == level]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record at ERROR or above, from any logger (asyncio's included)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def peer_name(writer: asyncio.StreamWriter) -> str:
    """How the server names the raw connection of ``writer`` in its log lines."""
    host, port = writer.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


def unknown_error(tag: bytes) -> dict[bytes, bytes]:
    return {b"_error": tag, b"_error_code": b"UNKNOWN", b"_error_description": b"Unknown Error"}


def sum_call(tag: bytes, a: int, b: int) -> bytes:
    return encode_box({b"_ask": tag, b"_command": b"Sum", b"a": b"%d" % a, b"b": b"%d" % b})


async def expect_lost(call: asyncio.Future[Any], match: str = "") -> amp.ConnectionLostError:
    """Wait (bounded) for ``call`` to fail with ConnectionLostError, and return the error."""
    with pytest.raises(amp.ConnectionLostError, match=match) as info:
        async with asyncio.timeout(LONG):
            await call
    return info.value


class StreamPeer:
    """A raw TCP peer on asyncio streams: read boxes, write bytes, reset."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = amp.BoxDecoder()
        self.received: list[amp.Box] = []

    async def receive(self, count: int) -> list[amp.Box]:
        """Read until ``count`` boxes in all have been received; return them all."""
        async with asyncio.timeout(LONG):
            while len(self.received) < count:
                data = await self.reader.read(65_536)
                assert data, f"closed after {len(self.received)} of {count} boxes"
                self.received += self.decoder.receive_data(data)
        return self.received

    async def quiet(self) -> bool:
        """Return ``True`` if nothing arrives for a short while."""
        try:
            async with asyncio.timeout(SHORT):
                data = await self.reader.read(65_536)
        except TimeoutError:
            return True
        self.received += self.decoder.receive_data(data)
        return False

    async def rest(self) -> bytes:
        """Read everything until the other side closes (bounded)."""
        async with asyncio.timeout(LONG):
            return await self.reader.read()

    def send(self, box: dict[bytes, bytes]) -> None:
        self.writer.write(encode_box(box))

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def stream_server() -> contextlib.AbstractAsyncContextManager[
    tuple[int, asyncio.Queue[StreamPeer]]
]:
    """A plain asyncio server on 127.0.0.1 whose connections are StreamPeer objects."""
    return accepting_server(StreamPeer)


@contextlib.asynccontextmanager
async def connected(port: int, **limits: int) -> AsyncIterator[amp.AMPProtocol]:
    """An AMPProtocol client with ``limits``, closed at the end."""
    async with asyncio.timeout(LONG):
        proto = await amp.connect(
            HOST, port, protocol_factory=functools.partial(amp.AMPProtocol, **limits)
        )
    try:
        yield proto
    finally:
        proto.close()
        async with asyncio.timeout(LONG):
            await proto.wait_closed()


@contextlib.asynccontextmanager
async def fault_peer(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``fault_peer.py`` with ``args``; it is killed at the end whatever happens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER_PROGRAM), *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        async with asyncio.timeout(LONG):
            await process.wait()


async def line_from(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(LONG):
        line = await process.stdout.readline()
    assert line, f"the fault peer exited early with status {await process.wait()}"
    return line.decode().strip()


async def kill(process: asyncio.subprocess.Process) -> float:
    """SIGKILL the process, wait for it to die, and return the time it was killed at."""
    killed_at = time.monotonic()
    process.kill()
    async with asyncio.timeout(LONG):
        assert await process.wait() == -signal.SIGKILL
    return killed_at


def flood(count: int = 400) -> bytes:
    """A Hang call, then ``count`` calls whose 60 kB answers a peer that never reads backs up."""
    return encode_box({b"_ask": b"hang", b"_command": b"Hang"}) + b"".join(
        encode_box({b"_ask": b"%d" % i, b"_command": b"Big", b"size": b"60000"})
        for i in range(count)
    )


async def backed_up(victim: FaultServer) -> None:
    """Wait until the answers for a peer that does not read fill the transport's buffer."""
    transport = victim.transport
    assert transport is not None
    async with asyncio.timeout(LONG):
        await victim.probe.started.wait()
    await eventually(lambda: transport.get_write_buffer_size() > 64 * 1024, "the answers back up")


# The peer killed: mid-call, mid-box, mid-BigBytes


async def test_fault_peer_payloads_are_valid_amp() -> None:
    """The whole boxes the fault peer cuts short are real calls and answers."""
    async with running_server(FaultServer) as (_, port, protocols), raw_connection(port) as conn:
        reader, writer = conn
        writer.write(upload_box() + sum_box())
        boxes = await StreamPeer(reader, writer).receive(2)
        assert boxes == [
            {b"_answer": b"1", b"size": b"%d" % BIG_SIZE},
            {b"_answer": b"1", b"total": b"3"},
        ]
        server = await nth_protocol(protocols, 1)
        assert server.probe.uploads == [BIG_SIZE]
    async with stream_server() as (port, peers), connected(port) as proto:
        call = proto.call_remote(Download, size=BIG_SIZE)
        peer = await accepted(peers)
        [box] = await peer.receive(1)
        peer.writer.write(big_box((b"_answer", box[b"_ask"])))
        async with asyncio.timeout(LONG):
            assert await call == {"data": big_data()}


@pytest.mark.parametrize("fault", ["call", "box", "bigbytes"])
async def test_client_killed_mid_fault(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    """
    A client process is killed after sending a whole call, half a box or most of
    a three-chunk BigBytes box: the server's calls to it fail with
    ConnectionLostError at once, its responders are cancelled, a cut box is
    logged at INFO, and the server goes on serving.
    """
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    probe = Probe()
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with fault_peer("connect", str(port), fault) as process:
            assert await line_from(process) == "ready"
            victim = await nth_protocol(protocols, 2)
            if fault == "call":
                async with asyncio.timeout(LONG):
                    await probe.started.wait()
            pending = victim.call_remote(Ping, n=1)
            # The peer has read our call, so it dies with nothing unread and its
            # kernel closes with a FIN after everything it wrote.
            assert await line_from(process) == "read"
            killed_at = await kill(process)
            error = await expect_lost(pending, "before Ping was answered")
            assert time.monotonic() - killed_at < PROMPT
            async with asyncio.timeout(LONG):
                await victim.wait_closed()
            assert victim.closed
            with pytest.raises(amp.ConnectionLostError, match="cannot call Ping"):
                victim.call_remote(Ping, n=2)
        if fault == "call":
            async with asyncio.timeout(LONG):
                await probe.cancelled_event.wait()
            assert (probe.hung, probe.cancelled) == (1, 1)
        else:
            assert isinstance(error.__cause__, amp.ProtocolError)
            assert "inside a box" in str(error.__cause__)
            [record] = amp_records(caplog, logging.INFO)
            assert "closed inside a box" in record.getMessage()
            assert victim.peer in record.getMessage()
        assert probe.uploads == []
        await assert_still_serving(port, bystander)
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("fault", ["call", "box", "bigbytes"])
async def test_server_killed_mid_fault(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    """
    A server process is killed after reading our calls and writing no answer,
    half an answer, or most of a three-chunk BigBytes answer: every pending call
    fails with ConnectionLostError at once, and a cut box is logged at INFO.
    """
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with fault_peer("serve", fault, "3") as process:
        word, port = (await line_from(process)).split()
        assert word == "port"
        async with connected(int(port)) as proto:
            calls = [
                proto.call_remote(Download, size=BIG_SIZE),
                proto.call_remote(Sum, a=1, b=2),
                proto.call_remote(Sum, a=3, b=4),
            ]
            assert await line_from(process) == "ready"
            assert not any(call.done() for call in calls)
            killed_at = await kill(process)
            errors = [await expect_lost(call, "closed before") for call in calls]
            assert time.monotonic() - killed_at < PROMPT
            assert proto.closed
            with pytest.raises(amp.ConnectionLostError, match="cannot call Sum"):
                proto.call_remote(Sum, a=1, b=1)
    infos = amp_records(caplog, logging.INFO)
    if fault == "call":
        assert all(error.__cause__ is None for error in errors)
        assert infos == []
    else:
        assert all(isinstance(error.__cause__, amp.ProtocolError) for error in errors)
        assert "inside a box" in str(errors[0].__cause__)
        [record] = infos
        assert f"{HOST}:{port}" in record.getMessage()
        assert "closed inside a box" in record.getMessage()
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


# A reset


async def test_reset_while_the_server_is_answering(caplog: pytest.LogCaptureFixture) -> None:
    """
    A client resets its connection while the server has megabytes of answers
    queued for it and a responder running: the responder is cancelled, the
    server's own call fails, nothing is logged as an error, and others are served.
    """
    caplog.set_level(logging.INFO)
    probe = Probe()
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            raw = StreamPeer(reader, writer)
            victim = await nth_protocol(protocols, 2)
            writer.write(flood())
            await backed_up(victim)  # we read nothing, so the answers back up
            pending = victim.call_remote(Ping, n=1)
            raw.reset()
            await expect_lost(pending, "before Ping was answered")
            async with asyncio.timeout(LONG):
                await victim.wait_closed()
                await probe.cancelled_event.wait()
        assert probe.cancelled == 1
        await assert_still_serving(port, bystander)
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


async def test_reset_while_our_client_has_calls_pending(caplog: pytest.LogCaptureFixture) -> None:
    """A server answers two of five calls and resets: the other three fail at once."""
    caplog.set_level(logging.INFO)
    async with stream_server() as (port, peers), connected(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=i) for i in range(5)]
        peer = await accepted(peers)
        boxes = await peer.receive(5)
        for box in boxes[:2]:
            peer.send({b"_answer": box[b"_ask"], b"total": b"%d" % (2 * int(box[b"a"]))})
        async with asyncio.timeout(LONG):
            assert await asyncio.gather(*calls[:2]) == [{"total": 0}, {"total": 2}]
        peer.reset()
        reset_at = time.monotonic()
        for call in calls[2:]:
            error = await expect_lost(call, "before Sum was answered")
            assert isinstance(error.__cause__, ConnectionResetError)
        assert time.monotonic() - reset_at < PROMPT
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        with pytest.raises(amp.ConnectionLostError):
            proto.call_remote(Sum, a=1, b=1)
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


# A half-close


async def test_half_close_from_a_client(caplog: pytest.LogCaptureFixture) -> None:
    """
    A client sends three Sum calls and a Hang call, then half-closes (EOF).

    Defined behaviour: ``eof_received`` returns None, so the server closes the
    whole connection at once. Answers already written (the Sum responders are
    plain functions, answered in the read that brought the calls) are flushed
    before the close; the Hang responder is cancelled and never answers. Nothing
    hangs and nothing is logged at WARNING or above.
    """
    caplog.set_level(logging.INFO)
    probe = Probe()
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            writer.write(
                sum_call(b"1", 1, 1)
                + sum_call(b"2", 2, 2)
                + sum_call(b"3", 3, 3)
                + encode_box({b"_ask": b"4", b"_command": b"Hang"})
            )
            writer.write_eof()
            data = await StreamPeer(reader, writer).rest()
            assert amp.parse_boxes(data) == [
                {b"_answer": b"1", b"total": b"2"},
                {b"_answer": b"2", b"total": b"4"},
                {b"_answer": b"3", b"total": b"6"},
            ]
            victim = await nth_protocol(protocols, 2)
            async with asyncio.timeout(LONG):
                await victim.wait_closed()
            # The Hang responder may not have started before the close; if it did,
            # it was cancelled.
            assert probe.hung == probe.cancelled
        await assert_still_serving(port, bystander)
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


async def test_half_close_from_a_server_fails_pending_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server half-closes after reading our calls: they fail, and we close our side too."""
    caplog.set_level(logging.INFO)
    async with stream_server() as (port, peers), connected(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=1) for i in range(3)]
        peer = await accepted(peers)
        await peer.receive(3)
        peer.writer.write_eof()
        for call in calls:
            error = await expect_lost(call, "before Sum was answered")
            assert error.__cause__ is None
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        assert await peer.rest() == b""
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


# The server closed with calls in flight


async def test_server_closed_with_calls_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    probe = Probe()
    grace = 0.1 * TIME
    async with (
        running_server(functools.partial(FaultServer, probe)) as (
            server,
            port,
            protocols,
        ),
        connected(port) as first,
        connected(port) as second,
    ):
        calls = [first.call_remote(Hang), second.call_remote(Hang)]
        quick = first.call_remote(Sum, a=1, b=1)
        async with asyncio.timeout(LONG):
            assert await quick == {"total": 2}
        await eventually(lambda: probe.hung == 2, "both responders run")
        server.close()
        started = time.monotonic()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*(protocol.shutdown(grace=grace) for protocol in protocols))
            await server.wait_closed()
        assert time.monotonic() - started < grace + PROMPT
        for call in calls:
            await expect_lost(call, "before Hang was answered")
        assert probe.cancelled == 2
        assert all(protocol.closed for protocol in protocols)
        async with asyncio.timeout(LONG):
            await first.wait_closed()
            await second.wait_closed()
        with pytest.raises(OSError):
            async with asyncio.timeout(LONG):
                await amp.connect(HOST, port)
    assert errors_logged(caplog) == []


# A graceful shutdown


async def test_shutdown_lets_running_responders_finish(caplog: pytest.LogCaptureFixture) -> None:
    """
    ``shutdown(grace)`` on the server while a responder runs: a new call from
    the peer is answered SHUTDOWN, a local call is refused, our call already
    sent gets its answer, the running responder's answer reaches the client,
    and then the connection closes.
    """
    caplog.set_level(logging.INFO)
    probe = Probe()
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port, HoldingClient) as proto,
    ):
        assert isinstance(proto, HoldingClient)
        held = proto.call_remote(Hold, value=7)
        async with asyncio.timeout(LONG):
            await probe.started.wait()
        server_side = await nth_protocol(protocols, 1)
        ours = server_side.call_remote(Ping, n=1)
        shutdown = asyncio.create_task(server_side.shutdown(grace=LONG))
        await asyncio.sleep(0)  # shutdown() starts

        with pytest.raises(amp.ConnectionLostError, match="shutting down"):
            server_side.call_remote(Ping, n=2)
        with pytest.raises(amp.UnknownRemoteError) as info:
            async with asyncio.timeout(LONG):
                await proto.call_remote(Sum, a=1, b=1)
        assert info.value.error_code == "SHUTDOWN"
        assert not shutdown.done()
        assert not proto.closed

        proto.release.set()  # our call to the client is answered during the grace period
        async with asyncio.timeout(LONG):
            assert await ours == {"n": 2}
        assert not shutdown.done()
        probe.release.set()  # the responder finishes: its answer goes out, then the close
        async with asyncio.timeout(LONG):
            assert await held == {"value": 7}
            await shutdown
            await proto.wait_closed()
        assert server_side.closed
        assert probe.cancelled == 0
        with pytest.raises(amp.ConnectionLostError, match="closed"):
            server_side.call_remote(Ping, n=3)
    assert errors_logged(caplog) == []


async def test_shutdown_cancels_responders_slower_than_the_grace_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    probe = Probe()
    grace = 0.2 * TIME
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port) as proto,
    ):
        held = proto.call_remote(Hold, value=1)
        async with asyncio.timeout(LONG):
            await probe.started.wait()
        server_side = await nth_protocol(protocols, 1)
        started = time.monotonic()
        async with asyncio.timeout(LONG):
            await server_side.shutdown(grace=grace)
        elapsed = time.monotonic() - started
        assert grace * 0.9 <= elapsed < grace + PROMPT
        assert probe.cancelled == 1
        await expect_lost(held, "before Hold was answered")
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
    assert errors_logged(caplog) == []


async def test_shutdown_is_bounded_when_the_peer_does_not_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    The grace period bounds ``shutdown()`` even when the peer reads nothing, so
    that the answers queued for it can never be written: by the end of the grace
    period (plus a moment) the running responder is cancelled and the connection
    is closed; the server goes on serving others.
    """
    caplog.set_level(logging.INFO)
    probe = Probe()
    grace = 0.2 * TIME
    async with (
        running_server(functools.partial(FaultServer, probe)) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (_, writer):
            victim = await nth_protocol(protocols, 2)
            try:
                writer.write(flood())
                await backed_up(victim)
                started = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace + PROMPT):
                        await victim.shutdown(grace=grace)
                elapsed = time.monotonic() - started
                assert victim.closed, (
                    f"shutdown(grace={grace}) had not closed the connection after "
                    f"{elapsed:.1f} s; responders cancelled: {probe.cancelled} of 1"
                )
                assert probe.cancelled == 1
            finally:
                if victim.transport is not None and not victim.closed:
                    victim.transport.abort()  # so that the rest of the test can end
                async with asyncio.timeout(LONG):
                    await victim.wait_closed()
        await assert_still_serving(port, bystander)
    assert errors_logged(caplog) == []


# Leaks

#: Connect/call/disconnect cycles in the leak test: about 7 s on the asyncio loop
#: and 3 s on uvloop, so both loops run all of them.
CYCLES = 10_000
#: How many cycles run at the same time.
WORKERS = 10
#: Descriptors that may come and go on their own (none are expected).
FD_SLACK = 2


class Census:
    """Weak references to every protocol and transport of the leak test."""

    def __init__(self) -> None:
        self.protocols: weakref.WeakSet[amp.AMPProtocol] = weakref.WeakSet()
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self.made = 0
        self.open = 0

    def made_one(self, protocol: amp.AMPProtocol, transport: Any) -> None:
        self.protocols.add(protocol)
        self.transports.add(transport)
        self.made += 1
        self.open += 1


class CountedServer(FaultServer):
    census: Census

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.census.made_one(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.census.open -= 1


class CountedClient(amp.AMPProtocol):
    census: Census

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.census.made_one(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.census.open -= 1


def count_objects(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def count_answered_calls() -> int:
    """The futures of our calls still alive: done with an answer dict."""
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if type(obj) is asyncio.Future
        and obj.done()
        and not obj.cancelled()
        and obj.exception() is None
        and isinstance(obj.result(), dict)
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_connect_call_disconnect_cycles_leak_nothing() -> None:
    census = Census()
    server_class = type("Server", (CountedServer,), {"census": census})
    client_class = type("Client", (CountedClient,), {"census": census})
    server = await amp.serve(server_class, HOST, 0)
    port = port_of(server)

    async def cycles(first: int, count: int) -> None:
        for i in range(first, first + count):
            proto = await amp.connect(HOST, port, protocol_factory=client_class)
            assert await proto.call_remote(Sum, a=i, b=1) == {"total": i + 1}
            proto.close()
            await proto.wait_closed()

    def all_closed() -> bool:
        gc.collect()
        return census.open == 0 and not census.transports

    try:
        async with asyncio.timeout(LONG):
            await cycles(0, WORKERS)  # warm up: anything created once per loop exists now
        await eventually(all_closed, "the warm-up connections are closed and freed")
        tasks = len(asyncio.all_tasks())
        fds = open_fds()
        calls = count_answered_calls()
        protocols = count_objects(amp.AMPProtocol)

        # Debug mode extracts a stack trace for every callback and future, which
        # made the cycles five times slower (30 s on asyncio); leaks do not depend
        # on it, so it is off for the cycles only.
        loop = asyncio.get_running_loop()
        loop.set_debug(False)
        try:
            async with asyncio.timeout(45 * TIME):
                per_worker = CYCLES // WORKERS
                await asyncio.gather(*(cycles(w * per_worker, per_worker) for w in range(WORKERS)))
        finally:
            loop.set_debug(True)
        assert census.made == 2 * (WORKERS + CYCLES)
        await eventually(all_closed, "every connection is closed and its transport freed")
        await eventually(lambda: open_fds() <= fds + FD_SLACK, "the descriptors are closed")

        assert len(asyncio.all_tasks()) == tasks
        assert not census.protocols
        assert not census.transports
        assert count_answered_calls() == calls
        assert count_objects(amp.AMPProtocol) == protocols
        assert open_fds() <= fds + FD_SLACK
    finally:
        server.close()
        await server.wait_closed()


# Bad input, next to a bystander connection

BAD_INPUT: dict[str, tuple[bytes, list[str]]] = {
    "garbage": (b"\xde\xad\xbe\xef" * 16, ["key length 57005", "over the AMP limit"]),
    "http-request": (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        ["key length 18245", "not AMP"],
    ),
    "key-length-65535": (b"\xff\xff" + b"k" * 32, ["key length 65535"]),
    "empty-box": (b"\x00\x00", ["empty box"]),
    "unknown-answer-tag": (
        encode_box({b"_answer": b"999", b"total": b"1"}),
        ["answer for tag b'999'"],
    ),
    "unknown-error-tag": (
        encode_box({b"_error": b"999", b"_error_code": b"X", b"_error_description": b"d"}),
        ["answer for tag b'999'"],
    ),
    # Tag 1 is the server's pending Ping: in Twisted, that call would never fire.
    "error-without-code": (
        encode_box({b"_error": b"1", b"_error_description": b"oops"}),
        ["has no _error_code key"],
    ),
    "error-without-description": (
        encode_box({b"_error": b"1", b"_error_code": b"OOPS"}),
        ["has no _error_description key"],
    ),
    "no-kind": (encode_box({b"hello": b"world"}), ["none of _command, _answer or _error"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
async def test_bad_input_closes_that_connection_only(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """
    Bad bytes from a raw client: the server logs one WARNING naming the peer and
    the reason and closes that connection; its own pending call to that peer
    fails; a bystander and a new client are still answered.
    """
    data, reasons = BAD_INPUT[name]
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with (
        running_server(FaultServer) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            raw = StreamPeer(reader, writer)
            victim = await nth_protocol(protocols, 2)
            assert victim.peer == peer_name(writer)
            pending = victim.call_remote(Ping, n=1)
            [ping] = await raw.receive(1)
            assert ping[b"_ask"] == b"1"
            writer.write(data)
            assert await raw.rest() == b""  # closed by the server, with nothing more sent
            error = await expect_lost(pending, "before Ping was answered")
            assert isinstance(error.__cause__, amp.ProtocolError)
            for reason in reasons:
                assert reason in str(error.__cause__)
            async with asyncio.timeout(LONG):
                await victim.wait_closed()
        await assert_still_serving(port, bystander)
    [warning] = amp_records(caplog, logging.WARNING)
    message = warning.getMessage()
    assert f"closing the connection with {peer_name(writer)}" in message
    for reason in reasons:
        assert reason in message
    assert errors_logged(caplog) == []


async def test_bad_input_from_a_peer_that_does_not_read_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """
    A peer that reads nothing (its answers fill the server's buffers) sends an
    empty box. The server logs it and fails its own pending call at once, and
    the connection must then really close, as promptly (PROMPT) as the call
    failed: its responder is cancelled, and it is not kept open waiting to flush
    answers to a peer that broke the protocol and may never read them.
    """
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    probe = Probe()
    # The server keeps reading while its answers are held: a call of its own waits
    # for its answer (and the peer never answers it).
    factory = functools.partial(FaultServer, probe, max_responders=1000)
    async with (
        running_server(factory) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (_, writer):
            victim = await nth_protocol(protocols, 2)
            try:
                pending = victim.call_remote(Ping, n=1)
                writer.write(flood())
                await backed_up(victim)
                writer.write(b"\x00\x00")
                await expect_lost(pending, "before Ping was answered")
                [warning] = amp_records(caplog, logging.WARNING)
                assert "empty box" in warning.getMessage()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PROMPT):
                        await victim.wait_closed()
                assert victim.closed, (
                    f"the connection was still open {PROMPT} s after the bad input; "
                    f"responders cancelled: {probe.cancelled} of 1"
                )
                assert probe.cancelled == 1
            finally:
                if victim.transport is not None and not victim.closed:
                    victim.transport.abort()  # so that the rest of the test can end
                async with asyncio.timeout(LONG):
                    await victim.wait_closed()
        await assert_still_serving(port, bystander)


async def test_bad_input_fails_calls_that_wait_to_be_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Calls held back by max_pending_calls fail with the ones on the wire: none is orphaned."""
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with stream_server() as (port, peers), connected(port, max_pending_calls=2) as proto:
        calls = [proto.call_remote(Sum, a=i, b=i) for i in range(6)]
        peer = await accepted(peers)
        await peer.receive(2)
        assert await peer.quiet()
        peer.writer.write(b"\xde\xad\xbe\xef")
        for call in calls:
            error = await expect_lost(call, "Sum")
            assert isinstance(error.__cause__, amp.ProtocolError)
        assert await peer.rest() == b""
        assert len(peer.received) == 2
    [warning] = amp_records(caplog, logging.WARNING)
    assert "key length 57005" in warning.getMessage()


async def test_truncated_box_then_close_is_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with (
        running_server(FaultServer) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            raw = StreamPeer(reader, writer)
            peer = peer_name(writer)
            victim = await nth_protocol(protocols, 2)
            pending = victim.call_remote(Ping, n=1)
            await raw.receive(1)  # read it, so that our close is a FIN, not a RST
            writer.write(sum_call(b"1", 1, 2)[:-3])
            await writer.drain()
        error = await expect_lost(pending, "before Ping was answered")
        assert isinstance(error.__cause__, amp.ProtocolError)
        assert "inside a box" in str(error.__cause__)
        async with asyncio.timeout(LONG):
            await victim.wait_closed()
        await assert_still_serving(port, bystander)
    [info] = amp_records(caplog, logging.INFO)
    assert f"connection with {peer} closed inside a box" in info.getMessage()
    assert amp_records(caplog, logging.WARNING) == []
    assert errors_logged(caplog) == []


async def test_undecodable_arguments_are_answered_unknown_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Arguments that do not decode get UNKNOWN; the connection stays up; the reason is logged."""
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with (
        running_server(FaultServer) as (_, port, _),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            peer = peer_name(writer)
            writer.write(
                encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"one", b"b": b"2"})
                + encode_box({b"_ask": b"2", b"_command": b"Greet", b"name": b"\xff\xfe"})
                + sum_call(b"3", 1, 2)
            )
            raw = StreamPeer(reader, writer)
            assert await raw.receive(3) == [
                unknown_error(b"1"),
                unknown_error(b"2"),
                {b"_answer": b"3", b"total": b"3"},
            ]
            assert await raw.quiet()
        await assert_still_serving(port, bystander)
    # Bad arguments are the peer's fault: a WARNING each, naming the peer and the
    # command, without a traceback (no responder ran).
    warnings = amp_records(caplog, logging.WARNING)
    assert len(warnings) == 2
    for record, command in zip(warnings, ["Sum", "Greet"], strict=True):
        assert command in record.getMessage()
        assert peer in record.getMessage()
        assert "do not decode" in record.getMessage()
        assert record.exc_info is None
    assert amp_records(caplog, logging.ERROR) == []


async def test_a_box_sent_one_byte_at_a_time_is_answered() -> None:
    async with (
        running_server(FaultServer) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            victim = await nth_protocol(protocols, 2)
            box = sum_call(b"7", 12, 30)
            async with asyncio.timeout(LONG):
                for byte in box:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.001)
            assert await StreamPeer(reader, writer).receive(1) == [
                {b"_answer": b"7", b"total": b"42"}
            ]
            assert victim.reads >= len(box) // 4  # it did arrive in pieces
        await assert_still_serving(port, bystander)


async def test_a_hundred_boxes_in_one_write_get_a_hundred_answers_in_order() -> None:
    async with (
        running_server(FaultServer) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            writer.write(b"".join(sum_call(b"%x" % i, i, 1) for i in range(1, 101)))
            victim = await nth_protocol(protocols, 2)
            raw = StreamPeer(reader, writer)
            assert await raw.receive(100) == [
                {b"_answer": b"%x" % i, b"total": b"%d" % (i + 1)} for i in range(1, 101)
            ]
            assert await raw.quiet()
            assert not victim.closed
        await assert_still_serving(port, bystander)


# Nothing internal reaches the peer


@pytest.mark.parametrize("command", [b"Boom", b"BoomLater"])
async def test_unknown_error_carries_nothing_internal(
    command: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """
    A responder raises an exception with a secret in it: the peer gets exactly
    the UNKNOWN box with ``Unknown Error``, the connection stays up, and the
    traceback with the secret is in the local log only.
    """
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with running_server(FaultServer) as (_, port, _), raw_connection(port) as conn:
        reader, writer = conn
        writer.write(encode_box({b"_ask": b"1", b"_command": command}))
        expected = encode_box(unknown_error(b"1"))
        async with asyncio.timeout(LONG):
            data = await reader.readexactly(len(expected))
        assert data == expected
        assert b"hunter2" not in data
        writer.write(sum_call(b"2", 1, 2))
        raw = StreamPeer(reader, writer)
        assert await raw.receive(1) == [{b"_answer": b"2", b"total": b"3"}]
        assert await raw.quiet()  # and nothing more
    [record] = amp_records(caplog, logging.ERROR)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert command.decode() in record.getMessage()
    assert "Traceback" in caplog.text
    assert SECRET in caplog.text


# Limits, as seen from outside


async def test_max_responders_bounds_the_responders_running_at_once() -> None:
    probe = Probe()
    factory = functools.partial(FaultServer, probe, max_responders=2)
    async with running_server(factory) as (_, port, _), client(port) as proto:
        calls = [proto.call_remote(Slow, delay=0.02 * TIME, value=i) for i in range(10)]
        async with asyncio.timeout(LONG):
            results = await asyncio.gather(*calls)
        assert results == [{"value": i} for i in range(10)]
        assert probe.most_running == 2
        assert probe.running == 0


async def test_max_pending_calls_bounds_the_calls_on_the_wire() -> None:
    async with stream_server() as (port, peers), connected(port, max_pending_calls=3) as proto:
        calls = [proto.call_remote(Sum, a=i, b=0) for i in range(10)]
        finished: list[int] = []
        for i, call in enumerate(calls):
            call.add_done_callback(lambda _, i=i: finished.append(i))
        peer = await accepted(peers)
        for i in range(10):
            on_the_wire = min(i + 3, 10)
            received = await peer.receive(on_the_wire)
            if on_the_wire < 10:
                assert await peer.quiet(), "a fourth call was sent"
            assert len(received) == on_the_wire
            box = received[i]
            assert box[b"a"] == b"%d" % i
            peer.send({b"_answer": box[b"_ask"], b"total": box[b"a"]})
            async with asyncio.timeout(LONG):
                assert await calls[i] == {"total": i}
        assert finished == list(range(10))
        assert [box[b"_ask"] for box in peer.received] == [b"%x" % n for n in range(1, 11)]


@pytest.mark.parametrize(
    ("limits", "fits", "too_big", "reason"),
    [
        (
            {"max_box_size": 300},
            encode_box({b"_ask": b"1", b"_command": b"Echo", b"data": b"x" * 200}),
            encode_box({b"_ask": b"2", b"_command": b"Echo", b"data": b"x" * 300}),
            "over the limit of 300 bytes",
        ),
        (
            {"max_keys": 4},
            sum_call(b"1", 1, 2),
            encode_box({b"_ask": b"2", b"_command": b"Sum", b"a": b"1", b"b": b"2", b"c": b"3"}),
            "has more than 4 keys",
        ),
    ],
    ids=["max_box_size", "max_keys"],
)
async def test_box_over_a_receive_limit_closes_the_connection(
    limits: dict[str, int],
    fits: bytes,
    too_big: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    factory = functools.partial(FaultServer, **limits)
    async with (
        running_server(factory) as (_, port, protocols),
        client(port) as bystander,
    ):
        async with raw_connection(port) as (reader, writer):
            raw = StreamPeer(reader, writer)
            victim = await nth_protocol(protocols, 2)
            writer.write(fits)
            [answer] = await raw.receive(1)
            assert answer[b"_answer"] == b"1"
            writer.write(too_big)
            assert await raw.rest() == b""
            async with asyncio.timeout(LONG):
                await victim.wait_closed()
        await assert_still_serving(port, bystander)
    [warning] = amp_records(caplog, logging.WARNING)
    assert f"closing the connection with {peer_name(writer)}" in warning.getMessage()
    assert reason in warning.getMessage()


class Upload(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("size", amp.Integer())]


class GoesAway(amp.AMPProtocol):
    """Its peer closes just as writing resumes: between the drain and our next write."""

    def __init__(self, peer: socket.socket) -> None:
        super().__init__()
        self.raw_peer: socket.socket | None = peer
        self.lost: list[Exception | None] = []

    def resume_writing(self) -> None:
        if self.raw_peer is not None:
            self.raw_peer.close()
            self.raw_peer = None
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        super().connection_lost(exc)


async def test_a_peer_gone_as_writing_resumes_loses_the_connection_once() -> None:
    # Writing from resume_writing() while the transport is still in its drain
    # made asyncio's selector transport (before gh-156512) call connection_lost
    # twice when that write failed; the second call raised in the loop.
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    try:
        _, proto = await loop.create_connection(lambda: GoesAway(theirs), sock=ours)
        assert proto.transport is not None
        proto.transport.set_write_buffer_limits(high=0)
        first = proto.call_remote(Upload, data=b"x" * 2_000_000)
        assert proto._writing_paused
        second = proto.call_remote(Upload, data=b"y")  # waits for writing to resume
        # A heartbeat: its answer waits in our queue for writing to resume.
        theirs.send(encode_box({b"_ask": b"1", b"_command": b"asyncio-amp:heartbeat"}))
        await eventually(lambda: proto._conn.queued > 0, "the heartbeat's answer waits")
        async with asyncio.timeout(LONG):
            while proto.raw_peer is not None:
                with contextlib.suppress(BlockingIOError):
                    theirs.recv(1 << 20)
                await asyncio.sleep(0)
            for call in (first, second):
                with pytest.raises(amp.ConnectionLostError):
                    await call
            await proto.wait_closed()
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        theirs.close()
    assert len(proto.lost) == 1
    assert errors == []
