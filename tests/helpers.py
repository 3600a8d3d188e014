"""Shared helpers for the tests: time bounds, servers on 127.0.0.1, log capture."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import asyncio_amp as amp

#: Multiply every time bound by this (AMP_TEST_TIME_SCALE) on a slow machine.
TIME = float(os.environ.get("AMP_TEST_TIME_SCALE", "1"))
#: A short wait, for "nothing else happens" checks.
SHORT = 0.05 * TIME
#: The bound on any wait for something that must happen.
LONG = 10 * TIME

HOST = "127.0.0.1"


try:
    import uvloop
except ImportError:  # not installed, or not on this platform
    uvloop = None

#: The event loops the async tests run on.
LOOP_KINDS = ["asyncio"] if uvloop is None else ["asyncio", "uvloop"]


def loop_factory(kind: str = "asyncio") -> asyncio.AbstractEventLoop:
    """A new event loop of the given kind ("asyncio" or "uvloop")."""
    if kind == "uvloop":
        assert uvloop is not None
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def port_of(server: asyncio.Server) -> int:
    """The TCP port a server listens on."""
    port: int = server.sockets[0].getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def running_server(
    factory: Callable[[], amp.AMPProtocol], **kwargs: Any
) -> AsyncIterator[tuple[asyncio.Server, int, list[amp.AMPProtocol]]]:
    """Serve ``factory`` on 127.0.0.1 and a free port; yield the server, port and protocols."""
    protocols: list[amp.AMPProtocol] = []

    def build() -> amp.AMPProtocol:
        protocol = factory()
        protocols.append(protocol)
        return protocol

    server = await amp.serve(build, HOST, 0, **kwargs)
    try:
        yield server, port_of(server), protocols
    finally:
        server.close()
        for protocol in protocols:
            protocol.close()
        async with asyncio.timeout(LONG):
            await server.wait_closed()
            for protocol in protocols:
                await protocol.wait_closed()


@contextlib.asynccontextmanager
async def client(
    port: int, factory: Callable[[], amp.AMPProtocol] = amp.AMPProtocol
) -> AsyncIterator[amp.AMPProtocol]:
    """Connect ``factory`` to 127.0.0.1:port, and close it at the end."""
    async with asyncio.timeout(LONG):
        protocol = await amp.connect(HOST, port, protocol_factory=factory)
    try:
        yield protocol
    finally:
        protocol.close()
        async with asyncio.timeout(LONG):
            await protocol.wait_closed()


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to 127.0.0.1:port, for sending bytes by hand."""
    async with asyncio.timeout(LONG):
        reader, writer = await asyncio.open_connection(HOST, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class HasWriter(Protocol):
    """A peer object built on an accepted stream connection."""

    writer: asyncio.StreamWriter


PeerT = TypeVar("PeerT", bound=HasWriter)


@contextlib.asynccontextmanager
async def accepting_server(
    peer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], PeerT],
) -> AsyncIterator[tuple[int, asyncio.Queue[PeerT]]]:
    """
    A plain asyncio server on 127.0.0.1 that hands each accepted connection to the test.

    ``peer`` wraps each connection; the queue yields them in order of arrival, and
    every one is closed at the end.
    """
    peers: asyncio.Queue[PeerT] = asyncio.Queue()
    everyone: list[PeerT] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wrapped = peer(reader, writer)
        everyone.append(wrapped)
        await peers.put(wrapped)

    server = await asyncio.start_server(accept, HOST, 0)
    try:
        yield port_of(server), peers
    finally:
        server.close()
        for wrapped in everyone:
            wrapped.writer.close()
            with contextlib.suppress(ConnectionError):
                await wrapped.writer.wait_closed()
        await server.wait_closed()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait, bounded in time and count, until ``predicate()`` is true."""
    async with asyncio.timeout(LONG):
        for _ in range(10_000):
            if predicate():
                return
            await asyncio.sleep(0.002)
    raise AssertionError(f"this never happened: {what}")


async def accepted(peers: asyncio.Queue[PeerT]) -> PeerT:
    """The next connection the server accepted (bounded wait)."""
    async with asyncio.timeout(LONG):
        return await peers.get()
