"""
StartTLS and protocol switching between asyncio_amp and a Twisted peer, in both roles.

Twisted picks the TLS roles from the TCP roles, and we make the caller of
StartTLS the TLS client: the two agree when the TCP client calls StartTLS,
which is what these tests do in each direction. Protocol switching uses
``SwitchToRaw`` on the Twisted side (wire name ``Switch``), whose raw protocol
greets with ``hi <name>`` and echoes upper-cased, like our ``Raw`` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme
from commands import Sum
from peer import PeerError, TwistedPeer

import asyncio_amp as amp
from helpers import HOST, LONG, eventually, running_server


class Switch(amp.ProtocolSwitchCommand):
    arguments = [("name", amp.Unicode())]


class Raw(asyncio.Protocol):
    """Greets with ``hi <name>`` when built with a name, records, and echoes upper-cased."""

    def __init__(self, name: str = "", *, echo: bool = False) -> None:
        self.name = name
        self.echo = echo
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.name:
            self.transport.write(b"hi " + self.name.encode())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data.upper())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Ours(amp.AMPProtocol):
    """Answers Sum, StartTLS with ``context`` (if any), and Switch with an echoing Raw."""

    context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        super().__init__()
        self.raw: Raw | None = None

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Switch.responder
    def switch(self, name: str) -> Raw:
        self.raw = Raw(name, echo=True)
        return self.raw

    def start_tls_context(self) -> ssl.SSLContext | None:
        return self.context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    paths = {name: directory / name for name in ("ca.pem", "server.pem", "server.key")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths["server.pem"]), append=True)
    server.private_key_pem.write_to_path(str(paths["server.key"]))
    return {"ca": ca, "server": server, **paths}


def server_context(pki: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server.pem"], pki["server.key"])
    return context


def client_context(pki: dict[str, Any]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki["ca.pem"])


@contextlib.asynccontextmanager
async def twisted_peer() -> AsyncIterator[TwistedPeer]:
    peer = await TwistedPeer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@contextlib.asynccontextmanager
async def our_client(port: int) -> AsyncIterator[Ours]:
    async with asyncio.timeout(LONG):
        proto = await amp.connect(HOST, port, protocol_factory=Ours)
    try:
        yield proto
    finally:
        proto.close()
        async with asyncio.timeout(LONG):
            await proto.wait_closed()


# StartTLS


async def test_we_call_starttls_on_a_twisted_server(pki: dict[str, Any]) -> None:
    async with twisted_peer() as peer:
        port = await peer.listen()
        await peer.request("tls_identity", cert=str(pki["server.pem"]), key=str(pki["server.key"]))
        async with our_client(port) as proto, asyncio.timeout(LONG):
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
            later = proto.call_remote(Sum, a=2, b=3)  # held, then sent over TLS
            assert (
                await proto.call_remote(amp.StartTLS, ssl=client_context(pki), server_hostname=HOST)
                == {}
            )
            assert proto.tls
            assert await later == {"total": 5}
            assert await proto.call_remote(Sum, a=20, b=22) == {"total": 42}
            conn = (await peer.wait_event("accepted"))["conn"]
            assert await peer.call(conn, "Sum", a=7, b=8) == {"total": 15}


async def test_twisted_calls_starttls_on_our_server(pki: dict[str, Any]) -> None:
    factory = type("TLSOurs", (Ours,), {"context": server_context(pki)})
    async with (
        running_server(factory) as (_, port, servers),
        twisted_peer() as peer,
        asyncio.timeout(LONG),
    ):
        conn = await peer.connect(port)
        result = await peer.request("start_tls", conn=conn, ca=str(pki["ca.pem"]))
        assert "127.0.0.1" in result["subject"] or "localhost" in result["subject"] or result
        await eventually(lambda: servers[0].tls, "our side sees TLS")
        assert await peer.call(conn, "Sum", a=1, b=2) == {"total": 3}
        assert await servers[0].call_remote(Sum, a=3, b=4) == {"total": 7}


async def test_twisted_gets_tls_error_from_our_side_without_a_context(
    pki: dict[str, Any],
) -> None:
    async with (
        running_server(Ours) as (_, port, servers),
        twisted_peer() as peer,
        asyncio.timeout(LONG),
    ):
        conn = await peer.connect(port)
        with pytest.raises(PeerError) as caught:
            await peer.request("start_tls", conn=conn, ca=str(pki["ca.pem"]))
        # Twisted's StartTLS maps no code, so TLS_ERROR reaches it as an
        # UnknownRemoteError (code UNKNOWN) with our description.
        assert caught.value.type == "UnknownRemoteError"
        assert caught.value.description == "TLS not available"
        # (Twisted keeps holding the boxes it sends after a StartTLS that failed,
        # so this connection says nothing more; ours stays in plaintext.)
        assert not servers[0].tls
        assert not servers[0].closed


async def test_twisted_temporary_certificate_does_not_verify(pki: dict[str, Any]) -> None:
    """Without an identity Twisted answers StartTLS with a self-signed temporary certificate."""
    async with twisted_peer() as peer:
        port = await peer.listen()
        async with our_client(port) as proto, asyncio.timeout(LONG):
            with pytest.raises(ssl.SSLCertVerificationError):
                await proto.call_remote(amp.StartTLS, ssl=client_context(pki), server_hostname=HOST)
            assert proto.closed
            event = await peer.wait_event("lost")
            assert event["conn"] >= 1


# Protocol switching


async def test_we_switch_a_twisted_server_to_a_raw_protocol() -> None:
    async with twisted_peer() as peer:
        port = await peer.listen()
        async with our_client(port) as proto, asyncio.timeout(LONG):
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
            new = await proto.call_remote(Switch, protocol_factory=Raw, name="asyncio")
            assert isinstance(new, Raw)
            await eventually(lambda: bytes(new.received) == b"hi asyncio", "Twisted's greeting")
            assert new.transport is not None
            new.transport.write(b"bytes, not boxes")
            await eventually(lambda: new.received.endswith(b"BYTES, NOT BOXES"), "the echo")
            with pytest.raises(amp.ProtocolSwitchedError):
                proto.call_remote(Sum, a=1, b=2)
            new.transport.close()
            await new.lost


async def test_twisted_switches_our_server_to_a_raw_protocol() -> None:
    async with (
        running_server(Ours) as (_, port, servers),
        twisted_peer() as peer,
        asyncio.timeout(LONG),
    ):
        conn = await peer.connect(port)
        assert await peer.request("switch", conn=conn, name="twisted") == {}

        async def received() -> bytes:
            return bytes.fromhex((await peer.request("raw_received", conn=conn))["hex"])

        for _ in range(1000):
            if await received() == b"hi twisted":
                break
            await asyncio.sleep(0.01)
        assert await received() == b"hi twisted"
        assert servers[0].closed  # the AMP side is done
        raw = servers[0].raw
        assert raw is not None
        await peer.request("raw_send", conn=conn, hex=b"from twisted".hex())
        await eventually(lambda: raw.received == b"from twisted", "Twisted's bytes")
        for _ in range(1000):
            if (await received()).endswith(b"FROM TWISTED"):
                break
            await asyncio.sleep(0.01)
        assert await received() == b"hi twistedFROM TWISTED"
        await peer.request("raw_close", conn=conn)
        await raw.lost


async def test_a_refused_switch_leaves_twisted_and_us_talking_amp() -> None:
    class Refusing(Ours):
        @Switch.responder
        def switch(self, name: str) -> Raw:
            raise ValueError("no switching here")

    async with (
        running_server(Refusing) as (_, port, servers),
        twisted_peer() as peer,
        asyncio.timeout(LONG),
    ):
        conn = await peer.connect(port)
        with pytest.raises(PeerError) as caught:
            await peer.request("switch", conn=conn, name="x")
        assert caught.value.code == "UNKNOWN"
        # The error answer unlocked Twisted's side: AMP goes on both ways.
        assert await peer.call(conn, "Sum", a=1, b=2) == {"total": 3}
        assert await servers[0].call_remote(Sum, a=2, b=2) == {"total": 4}
        assert servers[0].raw is None
