"""Descriptor: file descriptors passed over UNIX socket connections (SCM_RIGHTS)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import pathlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp._arguments import MAX_UNCLAIMED_FDS, DescriptorExchange, descriptor_exchange
from helpers import HOST, LONG, SHORT, port_of


class WriteTo(amp.Command):
    arguments = [("fd", amp.Descriptor()), ("text", amp.Bytes())]
    response = [("written", amp.Integer())]


class WriteToMany(amp.Command):
    arguments = [("a", amp.Descriptor()), ("b", amp.Descriptor()), ("c", amp.Descriptor())]
    response = [("count", amp.Integer())]


class OpenPipe(amp.Command):
    """The responder returns the read end of a new pipe holding ``text``."""

    arguments = [("text", amp.Bytes())]
    response = [("fd", amp.Descriptor())]


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("size", amp.Integer())]


class Plain(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Server(amp.AMPProtocol):
    @WriteTo.responder
    def write_to(self, fd: int, text: bytes) -> dict[str, Any]:
        try:  # the received descriptor is ours to close
            return {"written": os.write(fd, text)}
        finally:
            os.close(fd)

    @WriteToMany.responder
    async def write_to_many(self, a: int, b: int, c: int) -> dict[str, Any]:
        for fd, text in ((a, b"a"), (b, b"b"), (c, b"c")):
            os.write(fd, text)
            os.close(fd)
        return {"count": 3}

    @OpenPipe.responder
    def open_pipe(self, text: bytes) -> dict[str, Any]:
        read_end, write_end = os.pipe()
        os.write(write_end, text)
        os.close(write_end)
        # The connection sends a duplicate; we keep and close our own copy. It
        # stays open until the responder returns, which is when it is encoded.
        asyncio.get_running_loop().call_soon(os.close, read_end)
        return {"fd": read_end}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, Any]:
        return {"size": len(data)}

    @Plain.responder
    def plain(self, n: int) -> dict[str, Any]:
        return {"n": n}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def unix_pair(tmp_path: pathlib.Path) -> AsyncIterator[tuple[amp.AMPProtocol, list[Server]]]:
    path = str(tmp_path / "amp.sock")
    servers: list[Server] = []

    def build() -> Server:
        servers.append(Server())
        return servers[-1]

    server = await amp.serve(build, path=path)
    try:
        client = await amp.connect(path=path)
        try:
            yield client, servers
        finally:
            client.close()
            await client.wait_closed()
            for protocol in servers:
                await asyncio.wait_for(protocol.wait_closed(), LONG)
    finally:
        server.close()
        await server.wait_closed()


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.asyncio_loop_only
async def test_pipe_write_end_to_server(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, _):
        read_end, write_end = os.pipe()
        try:
            future = client.call_remote(WriteTo, fd=write_end, text=b"hello")
            os.close(write_end)  # ours: the connection sent a duplicate
            write_end = -1
            assert await asyncio.wait_for(future, LONG) == {"written": 5}
            assert read_all(read_end) == b"hello"  # the server closed its copy too
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)


@pytest.mark.asyncio_loop_only
async def test_several_fds_in_one_box_and_many_calls(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, _):
        pipes = [os.pipe() for _ in range(3)]
        futures = [
            client.call_remote(WriteToMany, a=pipes[0][1], b=pipes[1][1], c=pipes[2][1])
            for _ in range(4)
        ]
        futures += [client.call_remote(WriteTo, fd=pipes[0][1], text=b"!") for _ in range(3)]
        for _, write_end in pipes:
            os.close(write_end)
        results = await asyncio.wait_for(asyncio.gather(*futures), LONG)
        assert results[:4] == [{"count": 3}] * 4
        texts = [read_all(r) for r, _ in pipes]
        assert sorted(texts[0]) == sorted(b"aaaa!!!")  # the responders run concurrently
        assert texts[1:] == [b"bbbb", b"cccc"]
        for read_end, _ in pipes:
            os.close(read_end)


@pytest.mark.asyncio_loop_only
async def test_fd_in_response(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, _):
        for i in range(3):
            result = await asyncio.wait_for(client.call_remote(OpenPipe, text=b"x%d" % i), LONG)
            fd = result["fd"]
            try:
                assert read_all(fd) == b"x%d" % i
            finally:
                os.close(fd)


async def test_ordinals_count_from_zero() -> None:
    exchange = DescriptorExchange()
    box: dict[bytes, bytes] = {}
    token = descriptor_exchange.set(exchange)
    try:
        for key in (b"a", b"b", b"c"):
            amp.Descriptor().to_box(key, 0, box)
    finally:
        descriptor_exchange.reset(token)
    assert box == {b"a": b"0", b"b": b"1", b"c": b"2"}
    receiver = DescriptorExchange()
    receiver.received(exchange.outgoing)
    exchange.outgoing = []
    token = descriptor_exchange.set(receiver)
    try:
        fds = [amp.Descriptor().from_box(key, box) for key in (b"c", b"a")]
        receiver.end_decode(True)
        with pytest.raises(ValueError, match="no file descriptor"):
            amp.Descriptor().from_box(b"x", {b"x": b"7"})
    finally:
        descriptor_exchange.reset(token)
    for fd in fds:
        assert fd is not None
        os.close(fd)
    receiver.close()  # closes the unclaimed one (ordinal 1)


async def test_tcp_connection_is_a_clear_error() -> None:
    server = await amp.serve(Server, HOST, 0)
    try:
        client = await amp.connect(HOST, port_of(server))
        read_end, write_end = os.pipe()
        before = open_fds()
        with pytest.raises(TypeError, match="UNIX socket"):
            client.call_remote(WriteTo, fd=write_end, text=b"x")
        assert open_fds() == before
        os.close(read_end)
        os.close(write_end)
        assert await asyncio.wait_for(client.call_remote(Plain, n=3), LONG) == {"n": 3}
        client.close()
        await client.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio_loop_only
async def test_failed_encoding_sends_no_fd(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, _):
        read_end, write_end = os.pipe()
        before = open_fds()
        with pytest.raises(TypeError):
            client.call_remote(WriteTo, fd=write_end, text="not bytes")
        assert open_fds() == before
        # The ordinal was not used up: the next call's descriptor is still number 0.
        assert await asyncio.wait_for(
            client.call_remote(WriteTo, fd=write_end, text=b"ok"), LONG
        ) == {"written": 2}
        os.close(write_end)
        assert read_all(read_end) == b"ok"
        os.close(read_end)


@pytest.mark.asyncio_loop_only
async def test_no_fd_leaks(tmp_path: pathlib.Path, amp_loop: str) -> None:
    before = open_fds()
    async with unix_pair(tmp_path) as (client, _):
        read_end, write_end = os.pipe()
        for i in range(100):
            await client.call_remote(WriteTo, fd=write_end, text=b"y")
            result = await client.call_remote(OpenPipe, text=b"%d" % i)
            os.close(result["fd"])
        futures = [client.call_remote(WriteTo, fd=write_end, text=b"z") for _ in range(100)]
        await asyncio.wait_for(asyncio.gather(*futures), LONG)
        os.close(write_end)
        assert read_all(read_end) == b"y" * 100 + b"z" * 100
        os.close(read_end)
    await asyncio.sleep(0)
    assert open_fds() == before


@pytest.mark.asyncio_loop_only
async def test_unclaimed_fds_closed_with_connection(tmp_path: pathlib.Path, amp_loop: str) -> None:

    class Unanswered(amp.Command):
        command_name = "Nobody"
        arguments = [("fd", amp.Descriptor())]

    before = open_fds()
    async with unix_pair(tmp_path) as (client, _):
        read_end, write_end = os.pipe()
        with pytest.raises(amp.UnhandledCommandError):
            await asyncio.wait_for(client.call_remote(Unanswered, fd=write_end), LONG)
        os.close(write_end)
    # The server never claimed the write end: closing the connection closed it.
    assert read_all(read_end) == b""
    os.close(read_end)
    assert open_fds() == before


async def test_descriptor_support_by_event_loop(tmp_path: pathlib.Path, amp_loop: str) -> None:
    """The asyncio loop passes descriptors; uvloop cannot, and says so clearly."""
    async with unix_pair(tmp_path) as (client, _):
        read_end, write_end = os.pipe()
        if amp_loop == "uvloop":
            with pytest.raises(TypeError, match="uvloop"):
                client.call_remote(WriteTo, fd=write_end, text=b"x")
        else:
            answer = await asyncio.wait_for(
                client.call_remote(WriteTo, fd=write_end, text=b"x"), LONG
            )
            assert answer == {"written": 1}
            assert os.read(read_end, 1) == b"x"
        os.close(read_end)
        os.close(write_end)
        assert await asyncio.wait_for(client.call_remote(Plain, n=3), LONG) == {"n": 3}


async def test_plain_calls_still_work_on_unix(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, _):
        results = await asyncio.wait_for(
            asyncio.gather(*(client.call_remote(Plain, n=i) for i in range(500))), LONG
        )
        assert [r["n"] for r in results] == list(range(500))
        if amp_loop == "uvloop":
            return
        # Descriptors sent while the transport's buffer holds megabytes: they wait
        # for it to drain, and every box still finds its descriptor.
        big = b"q" * 60_000
        read_end, write_end = os.pipe()
        futures: list[asyncio.Future[Any]] = []
        for i in range(5):
            futures += [client.call_remote(Echo, data=big) for _ in range(40)]
            futures.append(client.call_remote(WriteTo, fd=write_end, text=b"%d" % i))
            await asyncio.sleep(0)
        results = await asyncio.wait_for(asyncio.gather(*futures), LONG)
        assert results.count({"size": 60_000}) == 200
        os.close(write_end)
        assert read_all(read_end) == b"01234"
        os.close(read_end)


@pytest.mark.asyncio_loop_only
async def test_fds_wait_for_the_write_buffer(tmp_path: pathlib.Path, amp_loop: str) -> None:
    async with unix_pair(tmp_path) as (client, servers):
        await client.call_remote(Plain, n=0)
        servers[0]._pause_reading()  # the client's write buffer fills up...
        assert client.transport is not None
        client.transport.set_write_buffer_limits(high=2**30)  # ...without pausing writing
        big = b"q" * 60_000
        read_end, write_end = os.pipe()
        futures: list[asyncio.Future[Any]] = []
        for i in range(3):
            futures += [client.call_remote(Echo, data=big) for _ in range(30)]
            await asyncio.sleep(0)
            futures.append(client.call_remote(WriteTo, fd=write_end, text=b"%d" % i))
        await asyncio.sleep(SHORT)
        assert client.transport.get_write_buffer_size() > 0
        servers[0]._resume_reading()
        results = await asyncio.wait_for(asyncio.gather(*futures), LONG)
        assert results.count({"size": 60_000}) == 90
        os.close(write_end)
        assert read_all(read_end) == b"012"
        os.close(read_end)


def test_descriptor_cannot_go_in_lists() -> None:
    with pytest.raises(TypeError):
        amp.ListOf(amp.Descriptor())
    with pytest.raises(TypeError):
        amp.AmpList([("fd", amp.Descriptor())])


# Bounds on UNIX sockets: descriptors waiting to go out, and ones nobody claims.


class Fill(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.Bytes())]


class SlowPipe(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("fd", amp.Descriptor())]


class BoundedServer(Server):
    @Fill.responder
    def fill(self, size: int) -> dict[str, Any]:
        return {"data": b"f" * size}

    @SlowPipe.responder
    async def slow_pipe(self, seconds: float) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return self.open_pipe(b"late")


@contextlib.asynccontextmanager
async def bounded_server(
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[str, list[BoundedServer]]]:
    path = str(tmp_path / "bounded.sock")
    servers: list[BoundedServer] = []

    def build() -> BoundedServer:
        servers.append(BoundedServer())
        return servers[-1]

    server = await amp.serve(build, path=path)
    try:
        yield path, servers
    finally:
        server.close()
        for protocol in servers:
            protocol.close()
            await asyncio.wait_for(protocol.wait_closed(), LONG)
        await server.wait_closed()


def call_box(tag: int, command: bytes, **values: bytes) -> bytes:
    box = {b"_ask": b"%x" % tag, b"_command": command}
    box.update({key.encode(): value for key, value in values.items()})
    return amp.encode_box(box)


@pytest.mark.asyncio_loop_only
async def test_a_descriptor_waiting_to_go_out_pauses_writing(
    tmp_path: pathlib.Path, amp_loop: str
) -> None:
    # The peer does not read; one answer carries a descriptor, then 30 kB ones.
    loop = asyncio.get_running_loop()
    async with bounded_server(tmp_path) as (path, servers):
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(peer, path), LONG)
            calls = 2000
            data = call_box(1, b"OpenPipe", text=b"x") + b"".join(
                call_box(i, b"Fill", size=b"30000") for i in range(2, calls + 2)
            )
            sent = 0
            async with asyncio.timeout(LONG):
                while sent < len(data):  # the server reads until it holds back
                    try:
                        sent += peer.send(data[sent:])
                    except BlockingIOError:
                        if servers and servers[0]._reading_paused:
                            break
                        await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            server = servers[0]
            cpu, wall = time.process_time(), time.monotonic()
            await asyncio.sleep(0.5)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            assert server._writing_paused
            assert server._reading_paused
            assert server._conn.queued_bytes < 8 * 1024 * 1024
            assert cpu < 0.2 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s: polling"
            # Now the peer reads: every answer comes.
            decoder = amp.BoxDecoder()
            answers: list[amp.Box] = []
            async with asyncio.timeout(LONG):
                while len(answers) < calls + 1:
                    if sent < len(data):
                        with contextlib.suppress(BlockingIOError):
                            sent += peer.send(data[sent:])
                    chunk = await loop.sock_recv(peer, 1 << 20)
                    assert chunk, "the server closed the connection"
                    answers += decoder.receive_data(chunk)
            assert sorted(int(a[b"_answer"], 16) for a in answers) == list(range(1, calls + 2))
        finally:
            peer.close()


@pytest.mark.asyncio_loop_only
async def test_descriptors_that_no_box_claims_are_bounded(
    tmp_path: pathlib.Path, amp_loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    before = open_fds()
    async with bounded_server(tmp_path) as (path, _servers):
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(peer, path), LONG)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end] * 10))]
            decoder = amp.BoxDecoder()
            answers: list[amp.Box] = []
            async with asyncio.timeout(LONG):
                for i in range(200):
                    # A plain call that names no descriptor, carrying ten.
                    box = call_box(i + 1, b"Plain", n=b"%d" % i)
                    while True:
                        try:
                            assert peer.sendmsg([box], rights) == len(box)
                            break
                        except BlockingIOError:
                            await asyncio.sleep(0.01)
                while len(answers) < 200:
                    answers += decoder.receive_data(await loop.sock_recv(peer, 65536))
            assert len(answers) == 200
            held = open_fds() - before
            assert held <= MAX_UNCLAIMED_FDS + 16, f"{held} descriptors held"
            assert any("no box claims" in r.getMessage() for r in caplog.records)
        finally:
            peer.close()
    os.close(write_end)
    assert read_all(read_end) == b""  # every copy of the write end was closed
    os.close(read_end)


@pytest.mark.asyncio_loop_only
async def test_the_late_answer_to_a_cancelled_call_closes_its_descriptors(
    tmp_path: pathlib.Path, amp_loop: str
) -> None:
    before = open_fds()
    async with bounded_server(tmp_path) as (path, _servers):
        client = await asyncio.wait_for(amp.connect(path=path), LONG)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call_remote(SlowPipe, seconds=0.2), 0.01)
            await asyncio.sleep(0.4)  # the answer comes, with its descriptor
            # A call after it: its answer comes after the late one.
            assert await asyncio.wait_for(client.call_remote(Plain, n=1), LONG) == {"n": 1}
            assert client._fds is not None
            assert not client._fds.exchange._unclaimed
        finally:
            client.close()
            await asyncio.wait_for(client.wait_closed(), LONG)
    await asyncio.sleep(0)
    assert open_fds() == before


class Passes(amp.Middleware):
    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        return await call_next(call)


@pytest.mark.asyncio_loop_only
async def test_calls_through_middleware_are_checked_at_once(
    tmp_path: pathlib.Path, amp_loop: str
) -> None:
    # The check before the middleware duplicates no descriptor for good and takes
    # no ordinal: the one call that goes out sends descriptor number 0.
    path = str(tmp_path / "amp.sock")
    server = await amp.serve(Server, path=path)
    try:
        client = await amp.connect(path=path, middleware=[Passes()])
        read_end, write_end = os.pipe()
        before = open_fds()
        with pytest.raises(TypeError):
            client.call_remote(WriteTo, fd=write_end, text="not bytes")
        with pytest.raises(TypeError, match="file descriptor"):
            client.call_remote(WriteTo, fd=-1, text=b"")
        assert open_fds() == before
        assert await asyncio.wait_for(
            client.call_remote(WriteTo, fd=write_end, text=b"ok"), LONG
        ) == {"written": 2}
        assert client._fds is not None and client._fds.exchange._next_out == 1
        os.close(write_end)
        assert read_all(read_end) == b"ok"
        os.close(read_end)
        client.close()
        await asyncio.wait_for(client.wait_closed(), LONG)
    finally:
        server.close()
        await server.wait_closed()
