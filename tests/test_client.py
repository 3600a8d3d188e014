"""Client: endpoints, resolution, backoff, routing, retries and shutdown, against real servers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pathlib
import signal
import socket
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest

import asyncio_amp as amp
from asyncio_amp._client import _Endpoint
from cli_app import Calculator, Sum
from client_server import Named, Record, Where
from helpers import LONG, SHORT, TIME, eventually, port_of

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


@contextlib.asynccontextmanager
async def servers_on(
    hosts: Iterable[str], factory: Callable[[], amp.AMPProtocol] = Named
) -> AsyncIterator[tuple[int, dict[str, amp.Server[amp.AMPProtocol]]]]:
    """Serve ``factory`` on each of ``hosts``, all on one port; yield the port and servers."""
    servers: dict[str, amp.Server[amp.AMPProtocol]] = {}
    port = 0
    try:
        for host in hosts:
            server = await amp.serve(factory, host, port)
            port = server.sockets[0].getsockname()[1]
            servers[host] = server
        yield port, servers
    finally:
        for server in servers.values():
            server.close()
        async with asyncio.timeout(LONG):
            for server in servers.values():
                await server.wait_closed()


def fixed(*addresses: str) -> Callable[[str], asyncio.Future[list[str]]]:
    """A resolver that gives ``addresses`` for any name."""

    async def resolve(host: str) -> list[str]:
        return list(addresses)

    return resolve  # type: ignore[return-value]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def closed(client: amp.Client) -> None:
    async with asyncio.timeout(LONG):
        await client.close()


# Endpoints and arguments


@pytest.mark.parametrize(
    ("spec", "host", "port", "path"),
    [
        ("amp-a:7000", "amp-a", 7000, None),
        ("127.0.0.1:1", "127.0.0.1", 1, None),
        ("[::1]:7000", "::1", 7000, None),
        (("amp-b", 7001), "amp-b", 7001, None),
        (("::1", 7002), "::1", 7002, None),
        ("unix:/run/app.sock", None, 0, "/run/app.sock"),
    ],
)
def test_endpoint_forms(spec: str | tuple[str, int], host: str, port: int, path: str) -> None:
    endpoint = _Endpoint(spec)
    assert (endpoint.host, endpoint.port, endpoint.path) == (host, port, path)


@pytest.mark.parametrize(
    "spec",
    [
        *["amp-a", "amp-a:", ":7000", "amp-a:0", "amp-a:65536", "amp-a:x", "::1:7000", "[::1]"],
        *["[]:1", "unix:", ("amp-a",), ("amp-a", "x"), ("", 1), ("amp-a", True)],
    ],
)
def test_bad_endpoints(spec: object) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        _Endpoint(spec)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="endpoint"):
        amp.Client([7000])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one endpoint"):
        amp.Client([])
    for keyword, value in [
        ("connect_timeout", 0),
        ("backoff_initial", -1.0),
        ("backoff_max", 0),
        ("resolve_interval", 0),
        ("backoff_multiplier", 0.5),
        ("healthy_after", -1),
        ("grace", -1),
        ("connections_per_address", 0),
        ("connections_per_address", 1.5),
        ("max_retries", -1),
    ]:
        with pytest.raises(ValueError, match=keyword):
            amp.Client("amp-a:7000", **{keyword: value})


# Calls


async def test_calls_like_a_protocol() -> None:
    async with servers_on(["127.0.0.1"], Calculator) as (port, _):
        async with amp.Client(f"127.0.0.1:{port}") as client:
            assert await client.call_remote(Sum, a=1, b=2) == {"total": 3}
            assert await client.call_remote(Sum(a=2, b=3)) == {"total": 5}
            assert await client.call_remote_box("Sum", {"a": "4", "b": "5"}) == {b"total": b"9"}
            with pytest.raises(TypeError, match="not both"):
                client.call_remote(Sum(a=2, b=3), a=1)
            with pytest.raises(TypeError, match="expected an int"):
                client.call_remote(Sum, a="x", b=1)
            with pytest.raises(amp.TooLongError):
                client.call_remote_box("Sum", {"a": "x" * 70_000})
            with pytest.raises(TypeError, match="cannot send StartTLS"):
                client.call_remote(amp.StartTLS)
            assert len(client.connections) == 1
            stats = client.stats()
            assert (stats["connected"], stats["calls"], stats["pending"]) == (1, 3, 0)
            assert "open" in repr(client)
        with pytest.raises(amp.NoConnectionError, match="closed"):
            client.call_remote(Sum, a=1, b=2)
        assert client.stats()["connected"] == 0
        assert client.connections == ()
        await client.close()  # again: nothing to do


async def test_unix_and_ipv6_endpoints(tmp_path: object) -> None:
    path = f"{tmp_path}/amp.sock"
    unix = await amp.serve(Named, path=path)
    try:
        async with (
            servers_on(["::1"]) as (port, _),
            amp.Client([f"unix:{path}", f"[::1]:{port}"]) as client,
        ):
            await eventually(lambda: len(client.connections) == 2, "both connected")
            answers = await asyncio.gather(
                *(client.call_remote(Where, n=n, delay=0.01) for n in range(10))
            )
        assert {answer["server"] for answer in answers} == {f"[::1]:{port}", path}
    finally:
        unix.close()
        async with asyncio.timeout(LONG):
            await unix.wait_closed()


async def test_errors_in_arguments_are_raised_at_once_without_a_connection() -> None:
    client = amp.Client(f"127.0.0.1:{free_port()}", connect_timeout=0.2 * TIME)
    try:
        with pytest.raises(TypeError, match="expected an int"):
            client.call_remote(Sum, a="x", b=1)
        with pytest.raises(ValueError, match="reserved"):
            client.call_remote_box("Sum", {"_ask": "1"})
        with pytest.raises(amp.NoConnectionError, match="cannot connect") as failed:
            await client.call_remote(Sum, a=1, b=2)
        assert isinstance(failed.value, ConnectionError)
        assert not isinstance(failed.value, amp.ConnectionLostError)
        stats = client.stats()
        assert stats["failures"] >= 1
        assert (stats["calls"], stats["waiting"], stats["connected"]) == (1, 0, 0)
    finally:
        await closed(client)


async def test_calls_spread_over_every_address_a_resolver_gives() -> None:
    async with (
        servers_on(HOSTS) as (port, _),
        amp.Client(f"amp.test:{port}", resolver=fixed(*HOSTS)) as client,
    ):
        await eventually(lambda: len(client.connections) == 3, "three connections")
        one_by_one: collections.Counter[str] = collections.Counter()
        for n in range(30):
            one_by_one[(await client.call_remote(Where, n=n, delay=0))["server"]] += 1
        together = collections.Counter(
            answer["server"]
            for answer in await asyncio.gather(
                *(client.call_remote(Record, n=n, delay=0.05) for n in range(30))
            )
        )
    names = {f"{host}:{port}" for host in HOSTS}
    # Ties go round-robin, and concurrent calls to the least busy connection.
    assert one_by_one == {name: 10 for name in names}
    assert together == {name: 10 for name in names}


async def test_a_name_spreads_over_every_address_it_resolves_to() -> None:
    infos = await asyncio.get_running_loop().getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    async with servers_on(addresses) as (port, _), amp.Client(("localhost", port)) as client:
        await eventually(lambda: len(client.connections) == len(addresses), "connected")
        answers = await asyncio.gather(
            *(client.call_remote(Where, n=n, delay=0.02) for n in range(12 * len(addresses)))
        )
    served = collections.Counter(answer["server"] for answer in answers)
    assert served == {
        (f"[{address}]:{port}" if ":" in address else f"{address}:{port}"): 12
        for address in addresses
    }


async def test_connections_per_address() -> None:
    async with servers_on(HOSTS[:2]) as (port, servers):
        client = amp.Client(
            f"amp.test:{port}", resolver=fixed(*HOSTS[:2]), connections_per_address=3
        )
        async with client:
            await eventually(lambda: len(client.connections) == 6, "six connections")
            await eventually(
                lambda: [len(server.connections) for server in servers.values()] == [3, 3],
                "three connections to each server",
            )
            assert client.stats()["addresses"] == 2


# Resolution


async def test_addresses_that_leave_the_resolution_are_drained() -> None:
    addresses = HOSTS[:2]

    async def resolve(host: str) -> list[str]:
        return list(addresses)

    async with servers_on(HOSTS) as (port, servers):
        client = amp.Client(f"amp.test:{port}", resolver=resolve, resolve_interval=SHORT)
        async with client:
            await eventually(lambda: len(client.connections) == 2, "two connections")
            # A long call on each connection, then 127.0.0.1 leaves the resolution.
            slow = [client.call_remote(Record, n=n, delay=0.3) for n in range(2)]
            addresses = HOSTS[1:]
            await eventually(
                lambda: {p.peer for p in client.connections} == {f"{h}:{port}" for h in HOSTS[1:]},
                "127.0.0.3 connected, 127.0.0.1 gone",
            )
            # The call in flight on the drained connection still gets its answer.
            async with asyncio.timeout(LONG):
                answers = await asyncio.gather(*slow)
            assert {answer["server"] for answer in answers} == {f"{h}:{port}" for h in HOSTS[:2]}
            await eventually(lambda: not servers["127.0.0.1"].connections, "drained and closed")
            assert client.stats()["losses"] == 0  # drained on purpose, not lost


async def test_resolution_that_fails_or_finds_nothing() -> None:
    outcome: list[str] | Exception = OSError("no such name")

    async def resolve(host: str) -> list[str]:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async with servers_on(HOSTS[:1]) as (port, _):
        client = amp.Client(
            f"amp.test:{port}",
            resolver=resolve,
            resolve_interval=SHORT,
            backoff_initial=SHORT,
            backoff_max=SHORT,
            connect_timeout=0.3 * TIME,
        )
        async with client:
            with pytest.raises(amp.NoConnectionError, match=r"cannot resolve amp\.test.*no such"):
                await client.call_remote(Sum, a=1, b=2)
            outcome = []
            with pytest.raises(amp.NoConnectionError, match="resolved to no address"):
                await client.call_remote(Sum, a=1, b=2)
            outcome = HOSTS[:1]
            assert (await client.call_remote(Where, n=1, delay=0))["n"] == 1
            # Once connected, a failing or empty resolution keeps what the client has.
            failures: list[list[str] | Exception] = [OSError("gone"), [], ["not-an-address", 7]]  # type: ignore[list-item]
            for failure in failures:
                outcome = failure
                for _ in range(3):
                    await asyncio.sleep(2 * SHORT)
                    assert (await client.call_remote(Where, n=2, delay=0))["n"] == 2
                assert client.stats()["connected"] == 1


# Reconnection


async def test_a_server_that_closes_at_once_is_retried_with_backoff() -> None:
    accepted = 0

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = amp.Client(
            f"127.0.0.1:{port}", backoff_initial=0.02, backoff_max=0.3, healthy_after=1.0
        )
        async with client:
            await asyncio.sleep(1.0)
            stats = client.stats()
    finally:
        server.close()
        await server.wait_closed()
    # Without a backoff that grows, a loop would connect thousands of times a
    # second. With it: delays of at most 0.02, 0.04, ... 0.3 s, so about a dozen.
    assert 3 <= accepted <= 25
    assert stats["losses"] + stats["failures"] >= accepted - 1


async def test_a_healthy_connection_resets_the_backoff() -> None:
    made: list[float] = []
    lost: list[float] = []
    loop = asyncio.get_running_loop()

    class ClosesSoon(amp.AMPProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            made.append(loop.time())
            loop.call_later(0.1, self.close)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            lost.append(loop.time())

    async with servers_on(["127.0.0.1"], ClosesSoon) as (port, _):
        # Each connection lives 0.1 s, over healthy_after: the backoff never
        # grows past its first step, 0.05 s.
        client = amp.Client(
            f"127.0.0.1:{port}", backoff_initial=0.05, backoff_max=30.0, healthy_after=0.05
        )
        async with client:
            await eventually(lambda: len(made) >= 8, "eight connections")
    gaps = [later - earlier for earlier, later in zip(lost, made[1:], strict=False)]
    assert max(gaps) < 0.05 + 0.2 * TIME


async def test_the_client_reconnects_when_the_server_comes_back() -> None:
    async with servers_on(["127.0.0.1"]) as (port, servers):
        client = amp.Client(f"127.0.0.1:{port}", backoff_initial=0.02, backoff_max=0.2)
        async with client:
            await eventually(lambda: len(client.connections) == 1, "connected")
            servers["127.0.0.1"].close()
            async with asyncio.timeout(LONG):
                await servers["127.0.0.1"].wait_closed()
            await eventually(lambda: client.stats()["failures"] >= 2, "attempts refused")
            assert client.stats()["losses"] == 1
            again = await amp.serve(Named, "127.0.0.1", port)
            try:
                answer = await client.call_remote(Where, n=1, delay=0)
                assert answer["server"] == f"127.0.0.1:{port}"
            finally:
                again.close()
                async with asyncio.timeout(LONG):
                    await again.wait_closed()


async def test_with_keepalive_a_connection_takes_calls_once_its_server_answers() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing, keeps the socket open

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        async with servers_on(["127.0.0.2"]) as (port, _):
            client = amp.Client(
                [f"127.0.0.1:{port_of(mute)}", f"127.0.0.2:{port}"],
                keepalive=LONG,
                keepalive_timeout=0.2,
                backoff_initial=0.05,
                backoff_max=0.1,
            )
            async with client:
                await eventually(lambda: len(accepted) >= 2, "two attempts on the mute server")
                answers = await asyncio.gather(
                    *(client.call_remote(Record, n=n, delay=0) for n in range(10))
                )
                stats = client.stats()
    finally:
        for writer in accepted:
            writer.close()
        mute.close()
        await mute.wait_closed()
    assert {answer["server"] for answer in answers} == {f"127.0.0.2:{port}"}
    assert stats["connected"] == 1 and stats["failures"] >= 1 and stats["losses"] == 0


# Lost calls and retries


async def test_lost_calls_fail_unless_idempotent() -> None:
    async with servers_on(HOSTS[:2]) as (port, servers):
        client = amp.Client(
            f"amp.test:{port}", resolver=fixed(*HOSTS[:2]), backoff_initial=0.01, backoff_max=0.1
        )
        async with client:
            await eventually(lambda: len(client.connections) == 2, "two connections")
            where = [client.call_remote(Where, n=n, delay=0.3) for n in range(10)]
            record = [client.call_remote(Record, n=n, delay=0.3) for n in range(10)]
            await eventually(
                lambda: sum(len(p._pending) for p in client.connections) == 20, "all sent"
            )
            servers["127.0.0.1"].abort_clients()
            async with asyncio.timeout(LONG):
                wheres = await asyncio.gather(*where)
                records = await asyncio.gather(*record, return_exceptions=True)
            stats = client.stats()
    # Every idempotent call was answered; 5 of them by 127.0.0.2 after a retry.
    assert sorted(answer["n"] for answer in wheres) == list(range(10))
    assert stats["retries"] == 5
    # The other calls on the lost connection failed, and only those.
    failed = [result for result in records if isinstance(result, BaseException)]
    assert len(failed) == 5
    assert all(isinstance(error, amp.ConnectionLostError) for error in failed)
    assert all(f"127.0.0.1:{port}" in str(error) for error in failed)
    assert stats["losses"] == 1


async def test_every_connection_lost_at_once() -> None:
    async with servers_on(HOSTS) as (port, servers):
        client = amp.Client(
            f"amp.test:{port}", resolver=fixed(*HOSTS), backoff_initial=0.05, backoff_max=0.2
        )
        async with client:
            await eventually(lambda: len(client.connections) == 3, "three connections")
            calls = [client.call_remote(Where, n=n, delay=0.2) for n in range(30)]
            await eventually(
                lambda: sum(len(p._pending) for p in client.connections) == 30, "all sent"
            )
            for server in servers.values():
                server.abort_clients()
            # Each call is routed again while the client learns of the other
            # losses: none goes to a connection already lost.
            async with asyncio.timeout(LONG):
                answers = await asyncio.gather(*calls)
            stats = client.stats()
    assert sorted(answer["n"] for answer in answers) == list(range(30))
    assert stats["retries"] == 30
    assert stats["losses"] == 3


async def test_an_idempotent_call_fails_after_max_retries() -> None:
    class Aborts(Named):
        @Where.responder
        async def where(self, n: int, delay: float) -> dict[str, object]:
            assert self.transport is not None
            self.transport.abort()
            return {}

    async with servers_on(HOSTS[:2], Aborts) as (port, _):
        client = amp.Client(
            f"amp.test:{port}",
            resolver=fixed(*HOSTS[:2]),
            max_retries=4,
            backoff_initial=0.01,
            backoff_max=0.05,
        )
        async with client:
            with pytest.raises(amp.ConnectionLostError):
                async with asyncio.timeout(LONG):
                    await client.call_remote(Where, n=1, delay=0)
            stats = client.stats()
            assert stats["retries"] == 4
            assert stats["pending"] == 0
            # Raw calls retry when told to.
            with pytest.raises(amp.ConnectionLostError):
                async with asyncio.timeout(LONG):
                    await client.call_remote_box("Where", {"n": "1", "delay": "0"}, idempotent=True)
            assert client.stats()["retries"] == 8


# Middleware


class Counting(amp.Middleware):
    """Counts the calls going out, by the connection (its peer) they go on."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        self.calls[call.protocol.peer] += 1
        return await call_next(call)


class Refuses(amp.Middleware):
    """Refuses to send Record: the caller gets the error, and nothing is sent."""

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        if call.command is Record:
            raise PermissionError(f"{call.name} is not allowed from here")
        return await call_next(call)


class Served(amp.Middleware):
    """Counts the calls a server answers."""

    def __init__(self) -> None:
        self.count = 0

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        self.count += 1
        return await call_next(call)


async def test_middleware_runs_on_every_connection_of_the_client() -> None:
    counting, served = Counting(), Served()

    class Counted(Named):
        def __init__(self) -> None:
            super().__init__(middleware=[served])

    async with servers_on(HOSTS, Counted) as (port, _):
        client = amp.Client(
            f"amp.test:{port}", resolver=fixed(*HOSTS), middleware=iter([counting, Refuses()])
        )
        async with client:
            await eventually(lambda: len(client.connections) == 3, "three connections")
            answers = await asyncio.gather(
                *(client.call_remote(Where, n=n, delay=0.02) for n in range(30))
            )
            raw = await client.call_remote_box("Where", {"n": "1", "delay": "0"})
            with pytest.raises(PermissionError, match="Record is not allowed"):
                await client.call_remote(Record, n=1, delay=0)
            # Errors in the arguments still raise at once, before any middleware.
            with pytest.raises(TypeError, match="expected an int"):
                client.call_remote(Where, n="x", delay=0)
            stats = client.stats()
    assert {answer["server"] for answer in answers} == {f"{host}:{port}" for host in HOSTS}
    assert raw[b"n"] == b"1"
    # Each connection's calls went through the one middleware: 32 calls on 3 connections.
    assert sum(counting.calls.values()) == 32 and len(counting.calls) == 3
    # The refused call was never sent, nor sent again.
    assert served.count == 31
    assert (stats["calls"], stats["retries"]) == (32, 0)


class Spoils(amp.Middleware):
    """Makes the ``n`` of every Where call a str, which its encoding refuses."""

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        if call.command is Where:
            call.arguments["n"] = "x"
        return await call_next(call)


async def test_arguments_are_checked_before_the_middleware_and_again_when_encoded() -> None:
    # The same rule as AMPProtocol's: a bad call fails at once; a middleware's
    # bad change fails the call when it is encoded, and is not sent again.
    served = Served()

    class Counted(Named):
        def __init__(self) -> None:
            super().__init__(middleware=[served])

    async with servers_on(HOSTS[:1], Counted) as (port, _):
        client = amp.Client(f"127.0.0.1:{port}", middleware=[Spoils()])
        async with client:
            with pytest.raises(TypeError, match="expected an int"):
                client.call_remote(Where, n="x", delay=0)
            with pytest.raises(TypeError, match="expected an int"):
                await client.call_remote(Where, n=1, delay=0)
            answer = await client.call_remote(Record, n=1, delay=0)
            stats = client.stats()
    assert answer["n"] == 1
    assert served.count == 1
    assert stats["retries"] == 0


async def test_a_call_sent_again_goes_through_the_middleware_again() -> None:
    class Aborts(Named):
        @Where.responder
        async def where(self, n: int, delay: float) -> dict[str, object]:
            assert self.transport is not None
            self.transport.abort()
            return {}

    counting = Counting()
    async with servers_on(HOSTS[:2], Aborts) as (port, _):
        client = amp.Client(
            f"amp.test:{port}",
            resolver=fixed(*HOSTS[:2]),
            middleware=[counting],
            max_retries=2,
            backoff_initial=0.01,
            backoff_max=0.05,
        )
        async with client:
            with pytest.raises(amp.ConnectionLostError):
                async with asyncio.timeout(LONG):
                    await client.call_remote(Where, n=1, delay=0)
    assert sum(counting.calls.values()) == 3  # the call, and its two retries


def test_middleware_is_checked_when_the_client_is_made() -> None:
    with pytest.raises(TypeError, match="Middleware"):
        amp.Client("amp-a:7000", middleware=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="iterable of Middleware"):
        amp.Client("amp-a:7000", middleware=Counting())  # type: ignore[arg-type]


# Waiting, cancelling and closing


async def test_close_while_calls_wait_for_a_connection() -> None:
    client = amp.Client(f"127.0.0.1:{free_port()}", connect_timeout=LONG)
    async with client:
        waiting = [client.call_remote(Sum, a=n, b=1) for n in range(3)]
        await eventually(lambda: client.stats()["waiting"] == 3, "three calls waiting")
        async with asyncio.timeout(LONG):
            await client.close()
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, amp.NoConnectionError) for result in results)
    assert "closed" in str(results[0])
    assert client.stats()["waiting"] == 0


async def test_close_drains_the_calls_in_flight() -> None:
    async with servers_on(HOSTS[:2]) as (port, servers):
        client = amp.Client(f"amp.test:{port}", resolver=fixed(*HOSTS[:2]), grace=LONG)
        async with client:
            await eventually(lambda: len(client.connections) == 2, "two connections")
            calls = [client.call_remote(Record, n=n, delay=0.2) for n in range(4)]
            await asyncio.sleep(SHORT)
        # __aexit__ returned: every call was answered, every connection closed.
        assert [call.result()["n"] for call in calls] == list(range(4))
        await eventually(
            lambda: not any(server.connections for server in servers.values()), "closed"
        )


async def test_close_ends_the_calls_in_flight_after_grace() -> None:
    async with servers_on(HOSTS[:1]) as (port, _):
        client = amp.Client(f"127.0.0.1:{port}", grace=0.1)
        async with client:
            await eventually(lambda: len(client.connections) == 1, "connected")
            call = client.call_remote(Where, n=1, delay=LONG)
            await asyncio.sleep(SHORT)
            async with asyncio.timeout(LONG):
                await client.close()
        with pytest.raises(amp.ConnectionLostError):
            call.result()  # idempotent, but not sent again: the client closed
        assert client.stats()["retries"] == 0


async def test_close_cancelled_closes_the_connections_anyway() -> None:
    async with servers_on(HOSTS[:1]) as (port, servers):
        client = amp.Client(f"127.0.0.1:{port}", grace=LONG)
        await client.__aenter__()
        await eventually(lambda: len(client.connections) == 1, "connected")
        (protocol,) = client.connections
        call = client.call_remote(Record, n=1, delay=LONG)
        await eventually(lambda: client.stats()["pending"] == 1, "sent")
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(SHORT)
        closing.cancel()  # as a timeout around close() does
        with pytest.raises(asyncio.CancelledError):
            await closing
        # Called again, close() returns once the connection is closed: the
        # cancelled one aborted it rather than leaving it open for good.
        async with asyncio.timeout(LONG):
            await client.close()
        assert protocol.closed
        with pytest.raises(amp.ConnectionLostError):
            await call
        await eventually(lambda: not servers[HOSTS[0]].connections, "closed on the server")


async def test_cancelling_a_call() -> None:
    async with servers_on(HOSTS[:1]) as (port, servers):
        client = amp.Client([f"127.0.0.1:{free_port()}"], connect_timeout=LONG)
        async with client:
            waiting = client.call_remote(Sum, a=1, b=2)
            await eventually(lambda: client.stats()["waiting"] == 1, "waiting")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert client.stats()["waiting"] == 0
        client = amp.Client(f"127.0.0.1:{port}")
        async with client:
            await eventually(lambda: len(client.connections) == 1, "connected")
            for command in (Where, Record):
                sent = client.call_remote(command, n=1, delay=LONG)
                await eventually(lambda: client.stats()["pending"] == 1, "sent")
                await asyncio.sleep(SHORT)
                sent.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await sent
                # (counted down by the future's done callback, a step later)
                await eventually(lambda: client.stats()["pending"] == 0, "not pending")
                assert all(sent[1].cancelled() for sent in client.connections[0]._pending.values())
            # Cancelled before its task ever ran: the call is forgotten too.
            sent = client.call_remote(Where, n=1, delay=LONG)
            sent.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sent
            await asyncio.sleep(SHORT)
            assert all(sent[1].cancelled() for sent in client.connections[0]._pending.values())
            assert client.stats()["pending"] == 0
            assert (await client.call_remote(Where, n=2, delay=0))["n"] == 2
        assert [len(server.connections) for server in servers.values()] == [0]


# Real server processes, killed and stopped under load

SERVER = pathlib.Path(__file__).parent / "client_server.py"


class ServerProcess:
    """A client_server.py process, stopped by its pid."""

    def __init__(self, process: asyncio.subprocess.Process, host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.name = f"{host}:{port}"

    def signal(self, number: int) -> None:
        if self.process.returncode is None:
            os.kill(self.process.pid, number)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        async with asyncio.timeout(LONG):
            await self.process.wait()


@contextlib.asynccontextmanager
async def server_processes(
    tmp_path: pathlib.Path,
) -> AsyncIterator[Callable[[str, int], Awaitable[ServerProcess]]]:
    """Yield a function that starts a server process on (host, port); kill them all at the end."""
    started: list[ServerProcess] = []

    async def start(host: str, port: int) -> ServerProcess:
        # (a local file, opened at once)
        with open(tmp_path / f"server-{len(started)}.err", "wb") as errors:  # noqa: ASYNC230
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(SERVER), host, str(port), stdout=PIPE, stderr=errors
            )
        server = ServerProcess(process, host, port)
        started.append(server)
        assert process.stdout is not None
        async with asyncio.timeout(LONG):
            line = await process.stdout.readline()
        assert line.split()[0] == b"listening", line
        server.port = int(line.split()[2])
        server.name = f"{host}:{server.port}"
        return server

    try:
        yield start
    finally:
        for server in started:
            server.signal(signal.SIGCONT)
            await server.kill()


async def test_servers_killed_and_stopped_under_load(tmp_path: pathlib.Path) -> None:
    loop = asyncio.get_running_loop()
    backoff_max = 0.5
    # (command, when it ended, the server that answered or the exception)
    results: list[tuple[type[amp.Command], float, str | BaseException]] = []
    stop = asyncio.Event()

    async def load(client: amp.Client, command: type[amp.Command], delay: float) -> None:
        n = 0
        while not stop.is_set():
            try:
                answer = await client.call_remote(command, n=n, delay=delay)
            except Exception as error:
                results.append((command, loop.time(), error))
            else:
                assert answer["n"] == n
                results.append((command, loop.time(), answer["server"]))
            n += 1

    def answered_by(name: str, since: float) -> int:
        return sum(1 for _, when, outcome in results if outcome == name and when > since)

    async with server_processes(tmp_path) as start:
        a = await start(HOSTS[0], 0)
        b = await start(HOSTS[1], a.port)
        c = await start(HOSTS[2], a.port)
        client = amp.Client(
            f"amp.test:{a.port}",
            resolver=fixed(*HOSTS),
            backoff_initial=0.05,
            backoff_max=backoff_max,
            healthy_after=0.3,
            max_retries=10,
            connect_timeout=LONG,
            grace=2 * TIME,
        )
        async with client:
            await eventually(lambda: len(client.connections) == 3, "three connections")
            workers = [
                # Delays of 0.05 to 0.15 s: the calls of the workers never keep in step.
                asyncio.create_task(load(client, command, 0.05 + 0.1 * worker / 30))
                for command in (Where, Record)
                for worker in range(30)
            ]
            try:
                await asyncio.sleep(0.5)
                killed_at = loop.time()
                await a.kill()
                await asyncio.sleep(0.5)
                assert answered_by(b.name, killed_at + 0.1) and answered_by(c.name, killed_at + 0.1)
                a = await start(HOSTS[0], a.port)
                restarted_at = loop.time()
                await eventually(lambda: answered_by(a.name, restarted_at) > 0, "A answers again")
                back_at = min(
                    when
                    for _, when, outcome in results
                    if when > restarted_at and outcome == a.name
                )
                b.signal(signal.SIGSTOP)
                stopped_at = loop.time()
                await asyncio.sleep(0.5)
                during_stop = answered_by(a.name, stopped_at + 0.1) + answered_by(
                    c.name, stopped_at + 0.1
                )
                b.signal(signal.SIGCONT)
                continued_at = loop.time()
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                async with asyncio.timeout(LONG):
                    await asyncio.gather(*workers)
            stats = client.stats()

    wheres = [outcome for command, _, outcome in results if command is Where]
    records = [outcome for command, _, outcome in results if command is Record]
    failed = [outcome for outcome in records if isinstance(outcome, BaseException)]
    # Every idempotent call succeeded, some after a retry.
    assert all(isinstance(outcome, str) for outcome in wheres)
    assert stats["retries"] >= 1
    # Only calls of the other kind in flight on the killed server failed, each
    # with ConnectionLostError, when it was killed.
    assert failed
    assert all(isinstance(error, amp.ConnectionLostError) for error in failed)
    assert all(a.name in str(error) for error in failed)
    assert all(
        killed_at <= when < restarted_at
        for _, when, outcome in results
        if isinstance(outcome, BaseException)
    )
    assert len(failed) + stats["retries"] <= 30 + 30  # at most one call a worker was in flight
    # The restarted server took calls within one backoff of being back.
    assert back_at - restarted_at < backoff_max + 1.0 * TIME
    # While one server was stopped the others answered; its calls finished after it went on.
    assert during_stop > 0
    assert answered_by(b.name, continued_at) > 0
    # One connection was lost (the killed server's); the stopped one held.
    assert stats["losses"] == 1
    assert stats["calls"] == len(results)
    assert len(wheres) > 100 and len(records) > 100


async def test_calls_refused_by_a_server_shutting_down_go_elsewhere() -> None:
    async with servers_on(HOSTS[:2]) as (port, servers):
        client = amp.Client(f"amp.test:{port}", resolver=fixed(*HOSTS[:2]), backoff_initial=0.05)
        async with client:
            await eventually(lambda: len(client.connections) == 2, "two connections")
            slow = [client.call_remote(Record, n=n, delay=0.3) for n in range(4)]
            await asyncio.sleep(SHORT)
            # 127.0.0.1 shuts down gracefully: it answers new calls with SHUTDOWN.
            servers["127.0.0.1"].close(grace=LONG)
            answers = []
            for n in range(10):
                answers.append(await client.call_remote(Record, n=n, delay=0))
            async with asyncio.timeout(LONG):
                drained = await asyncio.gather(*slow)
            stats = client.stats()
    # Not idempotent, but refused without running: sent again, to 127.0.0.2.
    assert [answer["n"] for answer in answers] == list(range(10))
    assert {answer["server"] for answer in answers} == {f"127.0.0.2:{port}"}
    assert stats["retries"] == 1  # then the client used that connection no more
    # The calls in flight on the server shutting down were answered there.
    assert {answer["server"] for answer in drained} == {f"{host}:{port}" for host in HOSTS[:2]}


async def test_entering_waits_for_the_first_attempt_to_every_address() -> None:
    loop = asyncio.get_running_loop()
    async with servers_on(HOSTS[:2]) as (port, _):
        down = f"127.0.0.3:{free_port()}"
        # A backoff far longer than the test: one attempt to the down address,
        # however slowly a loaded machine makes the others.
        client = amp.Client(
            [f"amp.test:{port}", down], resolver=fixed(*HOSTS[:2]), backoff_initial=LONG
        )
        began = loop.time()
        async with client:
            # Up: connected. Down: refused once, without waiting connect_timeout.
            assert len(client.connections) == 2
            assert client.stats()["failures"] == 1
            assert loop.time() - began < 5 * TIME
            answers = await asyncio.gather(
                *(client.call_remote(Where, n=n, delay=0.05) for n in range(10))
            )
    assert collections.Counter(answer["server"] for answer in answers) == {
        f"{host}:{port}": 5 for host in HOSTS[:2]
    }


async def test_a_stopped_server_is_dropped_by_keepalive_and_taken_back(
    tmp_path: pathlib.Path,
) -> None:
    loop = asyncio.get_running_loop()
    # (a healthy server under load is never silent for keepalive + keepalive_timeout)
    keepalive, keepalive_timeout, backoff_max = 0.25 * TIME, 0.5 * TIME, 0.5
    # (command, when it was made, when it ended, the server that answered or the exception)
    results: list[tuple[type[amp.Command], float, float, str | BaseException]] = []
    stop = asyncio.Event()

    async def load(client: amp.Client, command: type[amp.Command], delay: float) -> None:
        n = 0
        while not stop.is_set():
            made = loop.time()
            try:
                answer = await client.call_remote(command, n=n, delay=delay)
            except Exception as error:
                results.append((command, made, loop.time(), error))
            else:
                assert answer["n"] == n
                results.append((command, made, loop.time(), answer["server"]))
            n += 1

    def answered_by(name: str, since: float, until: float = float("inf")) -> int:
        return sum(
            1 for _, _, when, outcome in results if outcome == name and since < when <= until
        )

    async with server_processes(tmp_path) as start:
        a = await start(HOSTS[0], 0)
        b = await start(HOSTS[1], a.port)
        c = await start(HOSTS[2], a.port)
        client = amp.Client(
            f"amp.test:{a.port}",
            resolver=fixed(*HOSTS),
            keepalive=keepalive,
            keepalive_timeout=keepalive_timeout,
            backoff_initial=0.05,
            backoff_max=backoff_max,
            healthy_after=0.3,
            max_retries=10,
            connect_timeout=LONG,
            grace=2 * TIME,
        )
        async with client:
            await eventually(lambda: len(client.connections) == 3, "three connections")
            workers = [
                asyncio.create_task(load(client, command, 0.05 + 0.1 * worker / 30))
                for command in (Where, Record)
                for worker in range(30)
            ]
            try:
                await asyncio.sleep(0.5)
                assert client.stats()["losses"] == 0
                b.signal(signal.SIGSTOP)
                stopped_at = loop.time()
                await eventually(lambda: client.stats()["losses"] >= 1, "B dropped")
                dropped_at = loop.time()
                # Long enough for a few attempts to reconnect to B, each refused
                # for want of an answer to its heartbeat.
                await asyncio.sleep(1.5 * TIME)
                while_stopped = client.stats()
                b.signal(signal.SIGCONT)
                continued_at = loop.time()
                await eventually(lambda: answered_by(b.name, continued_at) > 0, "B answers")
                back_at = min(
                    when
                    for _, _, when, outcome in results
                    if when > continued_at and outcome == b.name
                )
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                async with asyncio.timeout(LONG):
                    await asyncio.gather(*workers)
            stats = client.stats()

    wheres = [outcome for command, _, _, outcome in results if command is Where]
    failed = [
        (command, made, when, outcome)
        for command, made, when, outcome in results
        if isinstance(outcome, BaseException)
    ]
    # The keepalive dropped B within 2 x keepalive + keepalive_timeout of its last byte.
    assert dropped_at - stopped_at < 2 * keepalive + keepalive_timeout + 0.5 * TIME
    # Every idempotent call succeeded: those in flight on B were sent again.
    assert all(isinstance(outcome, str) for outcome in wheres)
    assert stats["retries"] >= 1
    # The other calls in flight on B failed with ConnectionLostError when it was
    # dropped, and only those: none made after the drop failed.
    assert failed
    for command, made, when, error in failed:
        assert command is Record
        assert isinstance(error, amp.ConnectionLostError)
        assert b.name in str(error) and "keepalive" in str(error)
        assert made < dropped_at and stopped_at < when < dropped_at + SHORT
    # Meanwhile the new calls went to A and C only. B's kernel still completed
    # connections, but without an answer to their heartbeat they took no call:
    # failed attempts, not connections lost.
    assert answered_by(a.name, dropped_at, continued_at) > 0
    assert answered_by(c.name, dropped_at, continued_at) > 0
    assert not any(
        outcome == b.name and dropped_at < made < continued_at for _, made, _, outcome in results
    )
    assert while_stopped["losses"] == 1 and while_stopped["failures"] >= 1
    assert while_stopped["connected"] == 2
    # After SIGCONT the client connected to B again within its backoff and sent it calls.
    assert back_at - continued_at < backoff_max + keepalive_timeout + 1.0 * TIME
    assert answered_by(b.name, continued_at) > 10
    assert stats["losses"] == 1
    assert stats["calls"] == len(results)
