"""Server: what serve() returns; close() ends its connections, at once or gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

import asyncio_amp as amp
from helpers import HOST, LONG, SHORT, TIME, eventually, port_of


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Sleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("slept", amp.Float())]


class Worker(amp.AMPProtocol):
    """Answers Sum at once and Sleep after sleeping; counts its responders."""

    running = 0

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Sleep.responder
    async def sleep(self, seconds: float) -> dict[str, float]:
        Worker.running += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            Worker.running -= 1
        return {"slept": seconds}


class Sleeper(amp.AMPProtocol):
    """A client that answers Sleep too, so the server can have calls in flight."""

    @Sleep.responder
    async def sleep(self, seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}


@contextlib.asynccontextmanager
async def closing(server: amp.Server[Worker]) -> AsyncIterator[amp.Server[Worker]]:
    """Close the server at the end whatever happens, within a bound."""
    try:
        yield server
    finally:
        server.close()
        async with asyncio.timeout(LONG):
            await server.wait_closed()


async def connect(port: int) -> Sleeper:
    async with asyncio.timeout(LONG):
        return await amp.connect(HOST, port, protocol_factory=Sleeper)


async def the_connection(server: amp.Server[Worker]) -> Worker:
    """The server's one connection, once it is made."""
    await eventually(lambda: len(server.connections) == 1, "the server has its connection")
    (protocol,) = server.connections
    return protocol


async def started(client: amp.AMPProtocol) -> None:
    """Wait until the server has started the calls sent before (it answers in order)."""
    async with asyncio.timeout(LONG):
        assert await client.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_serve_returns_a_server() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        assert isinstance(server, amp.Server)
        assert server.is_serving()
        assert server.get_loop() is asyncio.get_running_loop()
        assert server.sockets[0].getsockname()[0] == HOST
        assert server.connections == frozenset()
        assert "serving" in repr(server)


async def test_idle_connections_hold_no_flow_control_or_decoder_of_their_own() -> None:
    # Idle connections are cheap: until data comes, each shares its flow control
    # and context with the others, and has no general decoder.
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        port = port_of(server)
        with contextlib.ExitStack() as stack:
            for _ in range(2):
                sock = stack.enter_context(socket.create_connection((HOST, port), timeout=LONG))
            await eventually(lambda: len(server.connections) == 2, "both connections are made")
            first, second = server.connections
            assert first._flow is second._flow and first._flow.shared
            assert first._context is second._context
            assert first._conn._decoder is None and second._conn._decoder is None
            # A call, and half a box after it: that connection takes its own.
            sock.sendall(
                amp.encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"2"})
            )
            sock.sendall(b"\x00\x04_a")
            await eventually(lambda: first._conn._decoder or second._conn._decoder, "data arrives")
            busy, idle = (first, second) if first._conn._decoder else (second, first)
            assert not busy._flow.shared and busy._flow.working == 0
            assert idle._flow.shared and idle._conn._decoder is None
            assert (idle._flow.working, idle._flow.deferred) == (0, ())
            sock.setblocking(False)
            answer = b""
            async with asyncio.timeout(LONG):
                while not answer.endswith(b"\x00\x00"):
                    answer += await asyncio.get_running_loop().sock_recv(sock, 4096)
            assert amp.parse_boxes(answer) == [{b"_answer": b"1", b"total": b"3"}]


async def test_close_ends_connections_with_calls_in_flight_both_ways() -> None:
    made: list[Worker] = []

    def worker() -> Worker:
        made.append(Worker())
        return made[-1]

    async with closing(await amp.serve(worker, HOST, 0)) as server:
        client = await connect(port_of(server))
        ours = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        (protocol,) = made
        theirs = asyncio.ensure_future(protocol.call_remote(Sleep, seconds=LONG * 10))
        await asyncio.sleep(SHORT)
        assert not ours.done() and not theirs.done()

        server.close()
        assert not server.is_serving()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await ours
            with pytest.raises(amp.ConnectionLostError):
                await theirs
            await client.wait_closed()
            await server.wait_closed()
        assert protocol.closed and client.closed
        assert server.connections == frozenset()
        assert "closed" in repr(server)


async def test_close_with_grace_lets_running_responders_answer() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        client = await connect(port_of(server))
        slow = asyncio.ensure_future(client.call_remote(Sleep, seconds=0.2 * TIME))
        await started(client)
        assert Worker.running == 1

        server.close(grace=LONG)
        assert not server.is_serving()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.UnknownRemoteError) as info:
                await client.call_remote(Sum, a=1, b=2)  # arrives during the shutdown
            assert info.value.error_code == "SHUTDOWN"
            assert await slow == {"slept": 0.2 * TIME}
            await server.wait_closed()
            await client.wait_closed()
        assert server.connections == frozenset()


async def test_close_with_grace_is_bounded() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        client = await connect(port_of(server))
        endless = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        server.close(grace=SHORT)
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await endless
            await server.wait_closed()
        assert loop.time() - begin < LONG / 2
        assert Worker.running == 0


async def test_close_without_grace_ends_a_graceful_shutdown_at_once() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        client = await connect(port_of(server))
        endless = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        server.close(grace=LONG * 10)
        server.close(grace=LONG * 10)  # no change: the shutdown goes on
        await asyncio.sleep(SHORT)
        assert not endless.done()
        server.close()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await endless
            await server.wait_closed()


async def test_new_connections_are_refused_after_close() -> None:
    server = await amp.serve(Worker, HOST, 0)
    port = port_of(server)
    server.close()
    assert server.sockets == ()
    async with asyncio.timeout(LONG):
        await server.wait_closed()
        with pytest.raises(OSError):
            await amp.connect(HOST, port)
    with pytest.raises(RuntimeError, match="closed"):
        await server.serve_forever()


async def test_async_with_closes_the_connections_and_waits() -> None:
    async with await amp.serve(Worker, HOST, 0) as server:
        client = await connect(port_of(server))
        pending = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        protocol = await the_connection(server)
    assert protocol.closed
    assert server.connections == frozenset()
    async with asyncio.timeout(LONG):
        with pytest.raises(amp.ConnectionLostError):
            await pending
        await client.wait_closed()


async def test_async_with_keeps_a_graceful_close_graceful() -> None:
    async with await amp.serve(Worker, HOST, 0) as server:
        client = await connect(port_of(server))
        slow = asyncio.ensure_future(client.call_remote(Sleep, seconds=0.2 * TIME))
        await started(client)
        server.close(grace=LONG)
    assert slow.done()
    assert slow.result() == {"slept": 0.2 * TIME}


async def test_wait_closed_waits_for_close() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(SHORT)
        assert not waiting.done()
        server.close()
        async with asyncio.timeout(LONG):
            await waiting


async def test_connections_are_forgotten_when_they_close() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        port = port_of(server)
        for _ in range(200):
            async with await connect(port) as client:
                assert await client.call_remote(Sum, a=1, b=2) == {"total": 3}
        await eventually(lambda: not server.connections, "every connection is forgotten")
        assert len(server._connections) == 0
        # Open ones are there, and each goes when it closes.
        clients = [await connect(port) for _ in range(5)]
        for client in clients:
            await started(client)
        assert len(server.connections) == 5
        for client in clients:
            client.close()
        await eventually(lambda: not server.connections, "the open ones are forgotten")


async def test_connections_is_a_snapshot() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        async with await connect(port_of(server)) as client:
            await started(client)
            snapshot = server.connections
            assert isinstance(snapshot, frozenset) and len(snapshot) == 1
        await eventually(lambda: not server.connections, "the connection is forgotten")
        assert len(snapshot) == 1


async def test_close_clients_and_abort_clients_keep_listening() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        port = port_of(server)
        first = await connect(port)
        pending = asyncio.ensure_future(first.call_remote(Sleep, seconds=LONG * 10))
        await started(first)
        server.close_clients()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await pending
            await first.wait_closed()
        assert server.is_serving()

        second = await connect(port)
        pending = asyncio.ensure_future(second.call_remote(Sleep, seconds=LONG * 10))
        await started(second)
        server.abort_clients()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await pending
            await second.wait_closed()
        assert server.is_serving()
        async with await connect(port) as third:
            await started(third)


async def test_serve_forever_closes_the_connections_when_cancelled() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        forever = asyncio.ensure_future(server.serve_forever())
        client = await connect(port_of(server))
        pending = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        with pytest.raises(RuntimeError, match="already"):
            await server.serve_forever()
        forever.cancel()
        async with asyncio.timeout(LONG):
            with pytest.raises(asyncio.CancelledError):
                await forever
            with pytest.raises(amp.ConnectionLostError):
                await pending
        assert server.connections == frozenset()
        assert not server.is_serving()


async def test_serve_forever_returns_cancelled_when_closed() -> None:
    async with closing(await amp.serve(Worker, HOST, 0)) as server:
        forever = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(SHORT)
        server.close()
        async with asyncio.timeout(LONG):
            with pytest.raises(asyncio.CancelledError):
                await forever


async def test_unix_socket_server_closes_its_connections(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    async with closing(await amp.serve(Worker, path=path)) as server:
        async with asyncio.timeout(LONG):
            client = await amp.connect(path=path, protocol_factory=Sleeper)
        pending = asyncio.ensure_future(client.call_remote(Sleep, seconds=LONG * 10))
        await started(client)
        server.close()
        async with asyncio.timeout(LONG):
            with pytest.raises(amp.ConnectionLostError):
                await pending
            await client.wait_closed()
            await server.wait_closed()
        assert not os.path.exists(path)  # noqa: ASYNC240  # removed by close()


async def test_unix_socket_server_closes_gracefully(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    async with closing(await amp.serve(Worker, path=path)) as server:
        async with asyncio.timeout(LONG):
            client = await amp.connect(path=path, protocol_factory=Sleeper)
        slow = asyncio.ensure_future(client.call_remote(Sleep, seconds=0.2 * TIME))
        await started(client)
        server.close(grace=LONG)
        async with asyncio.timeout(LONG):
            assert await slow == {"slept": 0.2 * TIME}
            await server.wait_closed()
            await client.wait_closed()
        with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
            probe.connect(path)


async def test_a_connection_made_after_close_is_closed_too() -> None:
    # Over TLS, a connection accepted before close() is made (handed to its
    # protocol) only after its handshake, which here completes after close().
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    made: list[Worker] = []

    def worker() -> Worker:
        made.append(Worker())
        return made[-1]

    server = await amp.serve(worker, HOST, 0, ssl=server_context)
    async with closing(server), asyncio.timeout(LONG):
        reader, writer = await asyncio.open_connection(HOST, port_of(server))
        await eventually(lambda: len(made) == 1, "the server accepted the connection")
        server.close()
        await writer.start_tls(client_context, server_hostname=HOST)
        assert await reader.read() == b""  # closed by the server, without an answer
        writer.close()
        await server.wait_closed()
        assert made[0].closed
        assert server.connections == frozenset()
