"""
AMP over TLS between asyncio_amp and a Twisted peer (``twisted_peer.py``), both ways.

A certificate authority made with trustme signs the server certificate (for
127.0.0.1 and localhost) and the client certificates; the PEM files are written
to a temporary directory for the Twisted peer (``listen_tls`` and
``connect_tls``), and our side builds :class:`ssl.SSLContext` objects from the
same CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from commands import BigEcho, CallBack, Sum
from peer import PeerError, PeerProcessError, TwistedPeer

import asyncio_amp as amp
from helpers import HOST, LONG, running_server


@dataclass
class PKI:
    """Trustme CAs and the PEM files written for the Twisted peer."""

    ca: trustme.CA
    other_ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    ca_pem: pathlib.Path
    other_ca_pem: pathlib.Path
    server_pem: pathlib.Path
    server_key: pathlib.Path
    client_pem: pathlib.Path
    client_key: pathlib.Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    client = ca.issue_cert("client.example.org")
    pki = PKI(
        ca,
        other_ca,
        server,
        client,
        *(
            directory / name
            for name in (
                "ca.pem",
                "other-ca.pem",
                "server.pem",
                "server.key",
                "client.pem",
                "client.key",
            )
        ),
    )
    ca.cert_pem.write_to_path(str(pki.ca_pem))
    other_ca.cert_pem.write_to_path(str(pki.other_ca_pem))
    for leaf, pem, key in (
        (server, pki.server_pem, pki.server_key),
        (client, pki.client_pem, pki.client_key),
    ):
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(pem), append=True)
        leaf.private_key_pem.write_to_path(str(key))
    return pki


def server_context(pki: PKI, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_pem, pki.server_key)
    if require_client_cert:
        context.load_verify_locations(pki.ca_pem)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_pem: pathlib.Path, *, cert: tuple[pathlib.Path, pathlib.Path] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_pem)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


class Server(amp.AMPProtocol):
    """Our server: Sum, BigEcho and CallBack (which calls Sum back on the peer)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append("Sum")
        return {"total": a + b}

    @BigEcho.responder
    def big_echo(self, data: bytes, text: str) -> dict[str, Any]:
        self.calls.append("BigEcho")
        return {"data": data, "text": text}

    @CallBack.responder
    async def call_back(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append("CallBack")
        answer = await self.call_remote(Sum, a=a, b=b)
        return {"total": answer["total"] + 1000}


class Client(amp.AMPProtocol):
    """Our client: answers the Sum that the Twisted server's CallBack makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append("Sum")
        return {"total": a + b}


@contextlib.asynccontextmanager
async def twisted_peer() -> AsyncIterator[TwistedPeer]:
    peer = await TwistedPeer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@contextlib.asynccontextmanager
async def our_client(
    port: int, context: ssl.SSLContext, server_hostname: str
) -> AsyncIterator[Client]:
    async with asyncio.timeout(LONG):
        proto = await amp.connect(
            HOST, port, protocol_factory=Client, ssl=context, server_hostname=server_hostname
        )
    try:
        yield proto
    finally:
        proto.close()
        async with asyncio.timeout(LONG):
            await proto.wait_closed()


def library_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("asyncio_amp") and r.levelno >= level]


PAYLOAD = random.Random(7).randbytes(1024 * 1024)
TEXT = "ünïcødé ✓ " * 30_000


# Our client, Twisted's server


@pytest.mark.parametrize("server_hostname", [HOST, "localhost"])
async def test_our_client_calls_twisted_tls_server(pki: PKI, server_hostname: str) -> None:
    async with twisted_peer() as peer:
        port = await peer.listen_tls(pki.server_pem, pki.server_key)
        async with our_client(port, client_context(pki.ca_pem), server_hostname) as proto:
            assert proto.transport is not None
            assert proto.transport.get_extra_info("ssl_object") is not None
            async with asyncio.timeout(LONG):
                assert await proto.call_remote(Sum, a=13, b=81) == {"total": 94}
                # The Twisted server calls Sum back on our client, over the same TLS connection.
                assert await proto.call_remote(CallBack, a=1, b=2) == {"total": 1003}
                answer = await proto.call_remote(BigEcho, data=PAYLOAD, text=TEXT)
            assert answer == {"data": PAYLOAD, "text": TEXT}
            assert proto.calls == ["Sum"]
            accepted = await peer.wait_event("accepted")
            received = await peer.request("received", conn=accepted["conn"])
            assert [entry["command"] for entry in received] == ["Sum", "CallBack", "BigEcho"]
            assert received[0]["args"] == {"a": 13, "b": 81}


async def test_our_client_refuses_twisted_server_with_untrusted_certificate(pki: PKI) -> None:
    async with twisted_peer() as peer:
        port = await peer.listen_tls(pki.server_pem, pki.server_key)
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            async with asyncio.timeout(LONG):
                await amp.connect(
                    HOST, port, ssl=client_context(pki.other_ca_pem), server_hostname=HOST
                )
        # Twisted saw the connection fail and keeps serving clients that trust its CA.
        await peer.wait_event("lost")
        async with (
            our_client(port, client_context(pki.ca_pem), HOST) as proto,
            asyncio.timeout(LONG),
        ):
            assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_our_client_with_certificate_to_twisted_mutual_tls_server(pki: PKI) -> None:
    async with twisted_peer() as peer:
        port = await peer.listen_tls(pki.server_pem, pki.server_key, ca=pki.ca_pem)
        with_cert = client_context(pki.ca_pem, cert=(pki.client_pem, pki.client_key))
        async with our_client(port, with_cert, HOST) as proto, asyncio.timeout(LONG):
            assert await proto.call_remote(Sum, a=3, b=4) == {"total": 7}
        # Without a client certificate, Twisted refuses: in TLS 1.3 our handshake
        # completes first, so the refusal shows on the first call, with Twisted's
        # alert as the cause.
        async with our_client(port, client_context(pki.ca_pem), HOST) as proto:
            with pytest.raises(amp.ConnectionLostError, match="certificate required") as raised:
                async with asyncio.timeout(LONG):
                    await proto.call_remote(Sum, a=3, b=4)
            assert isinstance(raised.value.__cause__, ssl.SSLError)
        accepted, refused = [e["conn"] for e in peer.events if e.get("event") == "accepted"]
        lost = await peer.wait_event("lost", conn=refused)
        assert "peer did not return a certificate" in lost["reason"]
        assert await peer.request("received", conn=accepted) == [
            {"command": "Sum", "args": {"a": 3, "b": 4}}
        ]
        assert await peer.request("received", conn=refused) == []


# Twisted's client, our server


@pytest.mark.parametrize("hostname", [HOST, "localhost"])
async def test_twisted_tls_client_calls_our_server(
    pki: PKI, hostname: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with (
        running_server(Server, ssl=server_context(pki)) as (_, port, protocols),
        twisted_peer() as peer,
    ):
        conn = await peer.connect_tls(port, ca=pki.ca_pem, hostname=hostname)
        assert await peer.call(conn, "Sum", a=13, b=81) == {"total": 94}
        # Our server calls Sum back on the Twisted client, over the same TLS connection.
        assert await peer.call(conn, "CallBack", a=1, b=2) == {"total": 1003}
        answer = await peer.call(conn, "BigEcho", data=PAYLOAD, text=TEXT)
        assert answer == {"data": PAYLOAD, "text": TEXT}
        [proto] = protocols
        assert proto.calls == ["Sum", "CallBack", "BigEcho"]
        assert proto.transport is not None
        assert proto.transport.get_extra_info("ssl_object") is not None
        assert await peer.request("received", conn=conn) == [
            {"command": "Sum", "args": {"a": 1, "b": 2}}
        ]
    assert not library_records(caplog, logging.WARNING)


async def test_twisted_client_refuses_our_server_with_untrusted_certificate(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with (
        running_server(Server, ssl=server_context(pki)) as (_, port, protocols),
        twisted_peer() as peer,
    ):
        conn = await peer.connect_tls(port, ca=pki.other_ca_pem, hostname=HOST)
        lost = await peer.wait_event("lost", conn=conn)
        assert "certificate verify failed" in lost["reason"]
        with pytest.raises((PeerError, PeerProcessError)):
            await peer.call(conn, "Sum", a=1, b=2)
        # Our server keeps serving Twisted clients that trust its CA.
        good = await peer.connect_tls(port, ca=pki.ca_pem, hostname=HOST)
        assert await peer.call(good, "Sum", a=2, b=3) == {"total": 5}
        assert [call for proto in protocols for call in proto.calls] == ["Sum"]
    assert not library_records(caplog, logging.WARNING)


async def test_twisted_client_with_certificate_to_our_mutual_tls_server(pki: PKI) -> None:
    async with (
        running_server(Server, ssl=server_context(pki, require_client_cert=True)) as (
            _,
            port,
            protocols,
        ),
        twisted_peer() as peer,
    ):
        conn = await peer.connect_tls(
            port, ca=pki.ca_pem, hostname=HOST, cert=pki.client_pem, key=pki.client_key
        )
        assert await peer.call(conn, "Sum", a=20, b=22) == {"total": 42}
        [proto] = protocols
        assert proto.transport is not None
        peercert = proto.transport.get_extra_info("peercert")
        assert ("DNS", "client.example.org") in peercert["subjectAltName"]
        # Without a client certificate, our server refuses the Twisted client.
        # asyncio drops the connection without sending an alert, so Twisted sees
        # it cut short rather than a TLS error.
        refused = await peer.connect_tls(port, ca=pki.ca_pem, hostname=HOST)
        lost = await peer.wait_event("lost", conn=refused)
        assert lost["reason_type"] in {"ConnectionLost", "Error"}
        with pytest.raises((PeerError, PeerProcessError)):
            await peer.call(refused, "Sum", a=1, b=2)
        assert [call for proto in protocols for call in proto.calls] == ["Sum"]
