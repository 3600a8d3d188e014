"""
StartTLS inside a connection, between two of our peers on 127.0.0.1 and against a raw peer.

The caller of StartTLS is always the TLS client, whichever side accepted the
TCP connection; boxes sent after the call are held until TLS is up; a side
without a context answers TLS_ERROR; a certificate that does not verify
reaches the caller as ``ssl.SSLCertVerificationError``.
"""

from __future__ import annotations

import asyncio
import pathlib
import ssl

import pytest
import trustme

import asyncio_amp as amp
from asyncio_amp._wire import encode_box, parse_boxes
from helpers import (
    HOST,
    LONG,
    SHORT,
    accepted,
    accepting_server,
    client,
    eventually,
    port_of,
    running_server,
)


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Echo(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("data", amp.BigBytes())]


class Peer(amp.AMPProtocol):
    """Answers Sum and Echo, and StartTLS with ``context`` (if any)."""

    context: ssl.SSLContext | None = None

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Echo.responder
    async def echo(self, data: bytes) -> dict[str, bytes]:
        await asyncio.sleep(0)
        return {"data": data}

    def start_tls_context(self) -> ssl.SSLContext | None:
        return self.context


# Certificates


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def serving_tls(context: ssl.SSLContext | None) -> type[Peer]:
    return type("TLSPeer", (Peer,), {"context": context})


# The usual case


async def test_the_tcp_client_starts_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with (
        running_server(serving_tls(server_ctx)) as (_, port, servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert not proto.tls
        answer = await proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname="localhost")
        assert answer == {}
        assert proto.tls
        assert proto.transport is not None
        assert proto.transport.get_extra_info("peercert") is not None
        assert await proto.call_remote(Sum, a=40, b=2) == {"total": 42}
        await eventually(lambda: servers[0].tls, "the server sees TLS")
        # Both directions work over TLS.
        assert await servers[0].call_remote(Sum, a=5, b=6) == {"total": 11}
        data = bytes(range(256)) * 4096  # 1 MiB, in chunks, both ways
        assert await proto.call_remote(Echo, data=data) == {"data": data}


async def test_the_side_that_accepted_is_the_tls_client_when_it_calls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with (
        running_server(Peer) as (_, port, servers),
        client(port, serving_tls(server_ctx)) as proto,
        asyncio.timeout(LONG),
    ):
        await eventually(lambda: bool(servers), "the server accepted")
        server = servers[0]
        await server.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        assert server.tls
        await eventually(lambda: proto.tls, "the TCP client sees TLS")
        # The side that accepted the TCP connection is the TLS client.
        assert server.transport is not None and proto.transport is not None
        assert server.transport.get_extra_info("peercert") is not None
        assert await server.call_remote(Sum, a=2, b=3) == {"total": 5}
        assert await proto.call_remote(Sum, a=3, b=4) == {"total": 7}


async def test_calls_made_while_tls_starts_go_over_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with (
        running_server(serving_tls(server_ctx)) as (_, port, _servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        before = [proto.call_remote(Sum, a=i, b=1) for i in range(50)]
        starting = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        after = [proto.call_remote(Sum, a=i, b=2) for i in range(50)]
        results = await asyncio.gather(*before, starting, *after)
        assert results[:50] == [{"total": i + 1} for i in range(50)]
        assert results[50] == {}
        assert results[51:] == [{"total": i + 2} for i in range(50)]


# Refusals


async def test_a_side_without_a_context_answers_tls_error(client_ctx: ssl.SSLContext) -> None:
    async with (
        running_server(Peer) as (_, port, _servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        with pytest.raises(amp.UnknownRemoteError) as caught:
            await proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        assert caught.value.error_code == "TLS_ERROR"
        assert caught.value.description == "TLS not available"
        # The connection goes on in plaintext.
        assert not proto.tls
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_a_plain_amp_protocol_answers_tls_error(client_ctx: ssl.SSLContext) -> None:
    async with (
        running_server(amp.AMPProtocol) as (_, port, _servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        with pytest.raises(amp.UnknownRemoteError, match="TLS not available"):
            await proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)


async def test_a_second_starttls_is_a_clear_error(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    async with (
        running_server(serving_tls(server_ctx)) as (_, port, _servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        first = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        with pytest.raises(amp.AmpError, match="TLS is already starting"):
            proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        await first
        with pytest.raises(amp.AmpError, match="TLS is already on"):
            proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_starttls_needs_a_context() -> None:
    async with running_server(Peer) as (_, port, _servers), client(port, Peer) as proto:
        with pytest.raises(TypeError, match="needs ssl="):
            proto.call_remote(amp.StartTLS)
        with pytest.raises(TypeError, match="needs ssl="):
            proto.call_remote(amp.StartTLS, ssl="yes")
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


@pytest.mark.asyncio_loop_only
async def test_a_connection_that_passes_descriptors_refuses_starttls(
    tmp_path: pathlib.Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    path = str(tmp_path / "amp.sock")
    server = await amp.serve(serving_tls(server_ctx), path=path)
    try:
        async with asyncio.timeout(LONG):
            proto = await amp.connect(path=path, protocol_factory=serving_tls(server_ctx))
            with pytest.raises(amp.AmpError, match="file descriptors"):
                proto.call_remote(amp.StartTLS, ssl=client_ctx)
            # Sent by hand: the other side refuses too.
            with pytest.raises(amp.RemoteAmpError, match="file descriptors"):
                await proto.call_remote_box("StartTLS")
            assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
            proto.close()
            await proto.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


# Failures


async def test_a_certificate_that_does_not_verify(server_ctx: ssl.SSLContext) -> None:
    other = trustme.CA()
    untrusting = ssl.create_default_context()
    other.configure_trust(untrusting)

    class Slow(Peer):
        @Sum.responder
        async def sum(self, a: int, b: int) -> dict[str, int]:  # type: ignore[override]
            await asyncio.sleep(LONG)
            return {"total": a + b}

    async with (
        running_server(type("TLSSlow", (Slow,), {"context": server_ctx})) as (_, port, servers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        pending = proto.call_remote(Sum, a=1, b=2)
        with pytest.raises(ssl.SSLCertVerificationError):
            await proto.call_remote(amp.StartTLS, ssl=untrusting, server_hostname=HOST)
        with pytest.raises(amp.ConnectionLostError):
            await pending
        assert proto.closed
        with pytest.raises(amp.ConnectionLostError):
            proto.call_remote(Sum, a=1, b=2)
        await eventually(lambda: servers[0].closed, "the server side closed")


async def test_cancelling_starttls_closes_the_connection(client_ctx: ssl.SSLContext) -> None:
    """A peer that never answers: the caller gives up, and the connection closes."""
    async with (
        accepting_server(Silent) as (port, peers),
        client(port, Peer) as proto,
        asyncio.timeout(LONG),
    ):
        await accepted(peers)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(SHORT):
                await proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
        await proto.wait_closed()
        assert proto.closed


class Silent:
    """A TCP peer that reads nothing and says nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer


# Against a raw peer: the exact bytes, and what is held


def close_raw(raws: list[RawTLSServer]) -> None:
    """Drop the raw peers' TCP connections (and the TLS on them)."""
    for raw in raws:
        if raw.transport is not None:
            raw.transport.abort()


class RawTLSServer(asyncio.Protocol):
    """Answers StartTLS by hand, then speaks TLS with loop.start_tls as the server."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.received = bytearray()
        self.asked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if not self.asked.done():
            self.asked.set_result(None)


async def test_the_wire_bytes_and_the_boxes_held_until_tls_is_up(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    loop = asyncio.get_running_loop()
    raws: list[RawTLSServer] = []

    def build() -> RawTLSServer:
        raws.append(RawTLSServer(server_ctx))
        return raws[-1]

    server = await loop.create_server(build, HOST, 0)
    try:
        async with client(port_of(server), Peer) as proto, asyncio.timeout(LONG):
            starting = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
            later = proto.call_remote(Sum, a=1, b=2)
            raw = raws[0]
            await raw.asked
            await asyncio.sleep(SHORT)
            # Only the call went out: no ssl, no server_hostname, no Sum yet.
            assert bytes(raw.received) == encode_box({b"_ask": b"1", b"_command": b"StartTLS"})
            assert raw.transport is not None
            raw.transport.write(encode_box({b"_answer": b"1"}))
            tls = await loop.start_tls(raw.transport, raw, server_ctx, server_side=True)
            assert await starting == {}
            raw.received.clear()
            await eventually(lambda: len(raw.received) > 0, "the held Sum came over TLS")
            await eventually(
                lambda: bool(raw.received.endswith(b"\x00\x00")), "the whole Sum box came"
            )
            (box,) = parse_boxes(bytes(raw.received))
            assert box == {b"_ask": b"2", b"_command": b"Sum", b"a": b"1", b"b": b"2"}
            tls.write(encode_box({b"_answer": b"2", b"total": b"3"}))
            assert await later == {"total": 3}
    finally:
        close_raw(raws)
        server.close()
        await server.wait_closed()


async def test_plaintext_after_the_answer_is_a_protocol_error(
    client_ctx: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    raws: list[RawTLSServer] = []

    def build() -> RawTLSServer:
        raws.append(RawTLSServer(client_ctx))
        return raws[-1]

    server = await loop.create_server(build, HOST, 0)
    try:
        async with client(port_of(server), Peer) as proto, asyncio.timeout(LONG):
            starting = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
            await raws[0].asked
            assert raws[0].transport is not None
            raws[0].transport.write(
                encode_box({b"_answer": b"1"}) + encode_box({b"_ask": b"1", b"_command": b"X"})
            )
            with pytest.raises(amp.ConnectionLostError):
                await starting
            await proto.wait_closed()
        assert "in plaintext after its answer to StartTLS" in caplog.text
    finally:
        close_raw(raws)
        server.close()
        await server.wait_closed()


async def test_limits_and_backpressure_hold_over_tls(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """A raw TLS peer that stops reading: calls wait as their parts, the buffer stays bounded."""
    loop = asyncio.get_running_loop()
    raws: list[RawTLSServer] = []

    def build() -> RawTLSServer:
        raws.append(RawTLSServer(server_ctx))
        return raws[-1]

    server = await loop.create_server(build, HOST, 0)
    try:
        async with client(port_of(server), Peer) as proto, asyncio.timeout(LONG):
            assert proto.transport is not None
            proto.transport.set_write_buffer_limits(high=16384, low=4096)
            starting = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
            raw = raws[0]
            await raw.asked
            assert raw.transport is not None
            raw.transport.write(encode_box({b"_answer": b"1"}))
            tls = await loop.start_tls(raw.transport, raw, server_ctx, server_side=True)
            await starting
            assert proto.tls
            assert proto.transport.get_write_buffer_limits() == (4096, 16384)
            proto.close_timeout = SHORT  # the peer never reads what is left
            tls.pause_reading()  # the peer stops reading
            data = b"x" * 100_000
            calls = [proto.call_remote(Echo, data=data) for _ in range(200)]
            await eventually(lambda: proto._writing_paused, "writing paused over TLS")
            await asyncio.sleep(SHORT)
            # What is not written waits as the calls' parts, not in the transport.
            assert proto.transport.get_write_buffer_size() < 2_000_000
            assert len(proto._waiting) > 100
            for call in calls:
                call.cancel()
    finally:
        close_raw(raws)
        server.close()
        await server.wait_closed()


async def test_closing_while_tls_starts_drops_what_was_held(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """Boxes held for TLS never go out in plaintext, even when the connection closes."""
    loop = asyncio.get_running_loop()
    raws: list[RawTLSServer] = []

    def build() -> RawTLSServer:
        raws.append(RawTLSServer(server_ctx))
        return raws[-1]

    server = await loop.create_server(build, HOST, 0)
    try:
        async with client(port_of(server), Peer) as proto, asyncio.timeout(LONG):
            starting = proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname=HOST)
            held = proto.call_remote(Sum, a=1, b=2)
            await raws[0].asked
            proto.close()
            await proto.wait_closed()
            with pytest.raises(amp.ConnectionLostError):
                await starting
            with pytest.raises(amp.ConnectionLostError):
                await held
            await asyncio.sleep(SHORT)
            assert bytes(raws[0].received) == encode_box({b"_ask": b"1", b"_command": b"StartTLS"})
    finally:
        close_raw(raws)
        server.close()
        await server.wait_closed()
