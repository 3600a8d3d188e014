"""
TLS: ``serve(..., ssl=)`` and ``connect(..., ssl=, server_hostname=)`` on 127.0.0.1.

A certificate authority is made per module with trustme; nothing is read from
the system trust store. Certificate errors must reach the caller as
:class:`ssl.SSLCertVerificationError`, a peer that does not speak TLS (or speaks
it to a plaintext server) must fail cleanly and in bounded time, and in every
case the server keeps serving the next client.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import pathlib
import random
import ssl
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import asyncio_amp as amp
from helpers import HOST, LONG, TIME, client, running_server


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Echo(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("data", amp.BigBytes())]


class Server(amp.AMPProtocol):
    """Answers the commands and records each call it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        self.calls.append("Sum")
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        self.calls.append("Divide")
        return {"result": numerator / denominator}

    @Echo.responder
    async def echo(self, data: bytes) -> dict[str, bytes]:
        self.calls.append("Echo")
        await asyncio.sleep(0)
        return {"data": data}


# Certificates


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The CA that the clients (and, for mutual TLS, the server) trust."""
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    """A second CA that nobody trusts."""
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(HOST, "localhost")


def server_context(
    cert: trustme.LeafCert, *, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    """A server context presenting ``cert``; with ``client_ca``, it requires client certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: trustme.CA,
    *,
    cert: trustme.LeafCert | None = None,
    maximum_version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    """A client context that trusts ``ca`` only and, with ``cert``, presents it."""
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca.cert_pem.bytes().decode("ascii"))
    if cert is not None:
        cert.configure_cert(context)
    context.maximum_version = maximum_version
    return context


def self_signed_cert(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a self-signed certificate for 127.0.0.1 and localhost and its key; return the paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed test server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "self-signed.pem"
    key_path = directory / "self-signed.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# Helpers


@contextlib.asynccontextmanager
async def tls_client(
    port: int, context: ssl.SSLContext, server_hostname: str = HOST
) -> AsyncIterator[amp.AMPProtocol]:
    """Connect over TLS to 127.0.0.1:port, and close the connection at the end."""
    async with asyncio.timeout(LONG):
        proto = await amp.connect(HOST, port, ssl=context, server_hostname=server_hostname)
    try:
        yield proto
    finally:
        proto.close()
        async with asyncio.timeout(LONG):
            await proto.wait_closed()


def calls_answered(protocols: list[Any]) -> list[str]:
    return [call for proto in protocols for call in proto.calls]


def library_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    """What our library logged at ``level`` or above."""
    return [r for r in caplog.records if r.name.startswith("asyncio_amp") and r.levelno >= level]


async def assert_serves_tls(port: int, ca: trustme.CA) -> None:
    """A well-configured TLS client still gets answers from the server on ``port``."""
    async with tls_client(port, client_context(ca)) as proto, asyncio.timeout(LONG):
        assert await proto.call_remote(Sum, a=40, b=2) == {"total": 42}


# A verified connection


@pytest.mark.parametrize("server_hostname", [HOST, "localhost"])
async def test_verified_connection_carries_calls(
    ca: trustme.CA, server_cert: trustme.LeafCert, server_hostname: str
) -> None:
    async with (
        running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols),
        tls_client(port, client_context(ca), server_hostname) as proto,
        asyncio.timeout(LONG),
    ):
        assert await proto.call_remote(Sum, a=2, b=3) == {"total": 5}
        assert await proto.call_remote(Divide, numerator=1, denominator=4) == {"result": 0.25}
        # A mapped error comes back as its exception class.
        with pytest.raises(ZeroDivisionError):
            await proto.call_remote(Divide, numerator=1, denominator=0)
        # The connection survives the error answer.
        assert await proto.call_remote(Sum, a=-1, b=1) == {"total": 0}

        # Both ends really speak TLS, and the client checked the server's certificate.
        assert proto.transport is not None
        client_ssl = proto.transport.get_extra_info("ssl_object")
        assert client_ssl is not None
        assert client_ssl.version() in {"TLSv1.2", "TLSv1.3"}
        peercert = proto.transport.get_extra_info("peercert")
        assert ("IP Address", HOST) in peercert["subjectAltName"]
        [server_proto] = protocols
        assert server_proto.transport is not None
        assert server_proto.transport.get_extra_info("ssl_object") is not None
        assert calls_answered(protocols) == ["Sum", "Divide", "Divide", "Sum"]


async def test_big_value_crosses_many_tls_records(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    # 4 MiB: about 64 AMP chunks of 64 KiB, each spread over several 16 KiB TLS records.
    data = random.Random(4).randbytes(4 * 1024 * 1024)
    async with (
        running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols),
        tls_client(port, client_context(ca)) as proto,
        asyncio.timeout(LONG),
    ):
        answer = await proto.call_remote(Echo, data=data)
        assert answer["data"] == data
        # Small calls still work after the big one, and interleaved with a second one.
        small, big = await asyncio.gather(
            proto.call_remote(Sum, a=1, b=2), proto.call_remote(Echo, data=data[:200_001])
        )
        assert small == {"total": 3}
        assert big["data"] == data[:200_001]
        assert sorted(calls_answered(protocols)) == ["Echo", "Echo", "Sum"]


async def test_many_concurrent_calls_over_tls(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    async with (
        running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols),
        tls_client(port, client_context(ca)) as first,
        tls_client(port, client_context(ca)) as second,
        asyncio.timeout(LONG),
    ):
        calls = [
            proto.call_remote(Sum, a=i, b=n)
            for i in range(400)
            for n, proto in enumerate([first, second])
        ]
        answers = await asyncio.gather(*calls)
        assert answers == [{"total": i + n} for i in range(400) for n in range(2)]
        assert len(protocols) == 2
        assert sorted(len(proto.calls) for proto in protocols) == [400, 400]


# Certificates that must be refused


async def test_client_trusting_another_ca_is_refused(
    ca: trustme.CA,
    other_ca: trustme.CA,
    server_cert: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols):
        with pytest.raises(ssl.SSLCertVerificationError) as raised:
            async with asyncio.timeout(LONG):
                await amp.connect(HOST, port, ssl=client_context(other_ca), server_hostname=HOST)
        assert "certificate verify failed" in str(raised.value)
        assert raised.value.verify_message == "unable to get local issuer certificate"
        # The server keeps serving clients that trust its CA.
        await assert_serves_tls(port, ca)
        assert calls_answered(protocols) == ["Sum"]
    assert not library_records(caplog, logging.WARNING)


async def test_self_signed_server_certificate_is_refused(
    ca: trustme.CA, tmp_path: pathlib.Path
) -> None:
    cert_path, key_path = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    async with running_server(Server, ssl=context) as (_, port, protocols):
        with pytest.raises(ssl.SSLCertVerificationError) as raised:
            async with asyncio.timeout(LONG):
                await amp.connect(HOST, port, ssl=client_context(ca), server_hostname=HOST)
        assert "certificate verify failed" in str(raised.value)
        # "self signed" before OpenSSL 3, "self-signed" since.
        assert "self" in raised.value.verify_message
        assert "signed" in raised.value.verify_message
        # The refusal is about trust, not a broken certificate: a client that
        # trusts this very certificate connects.
        trusting = ssl.create_default_context(cafile=cert_path)
        async with tls_client(port, trusting) as proto, asyncio.timeout(LONG):
            assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        assert calls_answered(protocols) == ["Sum"]


@pytest.mark.parametrize("server_hostname", ["example.org", "127.0.0.2"])
async def test_hostname_mismatch_is_refused(
    ca: trustme.CA, server_cert: trustme.LeafCert, server_hostname: str
) -> None:
    async with running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols):
        with pytest.raises(ssl.SSLCertVerificationError) as raised:
            async with asyncio.timeout(LONG):
                await amp.connect(
                    HOST, port, ssl=client_context(ca), server_hostname=server_hostname
                )
        assert "certificate verify failed" in str(raised.value)
        assert "mismatch" in raised.value.verify_message
        assert server_hostname in raised.value.verify_message
        await assert_serves_tls(port, ca)
        assert calls_answered(protocols) == ["Sum"]


# Mixing TLS and plaintext


async def test_plaintext_client_to_tls_server_fails_cleanly(
    ca: trustme.CA, server_cert: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with running_server(Server, ssl=server_context(server_cert)) as (_, port, protocols):
        # TCP connects; the server's TLS layer rejects the AMP box it gets
        # instead of a ClientHello and drops the connection.
        async with client(port) as plain:
            with pytest.raises(amp.ConnectionLostError, match="before Sum was answered"):
                async with asyncio.timeout(LONG):
                    await plain.call_remote(Sum, a=1, b=2)
            async with asyncio.timeout(LONG):
                await plain.wait_closed()
        assert calls_answered(protocols) == []
        await assert_serves_tls(port, ca)
        assert calls_answered(protocols) == ["Sum"]
    # The bad handshake never reached our protocol: at most a warning, no error.
    assert not library_records(caplog, logging.ERROR)


async def test_tls_client_to_plaintext_server_fails_cleanly(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with running_server(Server) as (_, port, protocols):
        # The server reads the ClientHello as a malformed box and closes; asyncio
        # and uvloop report a handshake cut short as ConnectionResetError.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            async with asyncio.timeout(LONG):
                await amp.connect(HOST, port, ssl=client_context(ca), server_hostname=HOST)
        [bad] = protocols
        async with asyncio.timeout(LONG):
            await bad.wait_closed()
        # The plaintext server logs the bad input once, as a warning naming the peer.
        warnings = library_records(caplog, logging.WARNING)
        assert [r.levelno for r in warnings] == [logging.WARNING]
        assert bad.peer in warnings[0].getMessage()
        # And keeps serving plaintext clients.
        async with client(port) as plain, asyncio.timeout(LONG):
            assert await plain.call_remote(Sum, a=2, b=2) == {"total": 4}
        assert calls_answered(protocols) == ["Sum"]


# Mutual TLS


async def test_mutual_tls(ca: trustme.CA, server_cert: trustme.LeafCert) -> None:
    client_cert = ca.issue_cert("client.example.org")
    context = server_context(server_cert, client_ca=ca)
    async with (
        running_server(Server, ssl=context) as (_, port, protocols),
        tls_client(port, client_context(ca, cert=client_cert)) as proto,
        asyncio.timeout(LONG),
    ):
        assert await proto.call_remote(Sum, a=3, b=4) == {"total": 7}
        [server_proto] = protocols
        assert server_proto.transport is not None
        peercert = server_proto.transport.get_extra_info("peercert")
        assert ("DNS", "client.example.org") in peercert["subjectAltName"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("issuer", ["none", "other CA"])
async def test_mutual_tls_refuses_client_without_trusted_certificate(
    ca: trustme.CA,
    other_ca: trustme.CA,
    server_cert: trustme.LeafCert,
    version: ssl.TLSVersion,
    issuer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    cert = other_ca.issue_cert("client.example.org") if issuer == "other CA" else None
    refused = client_context(ca, cert=cert, maximum_version=version)
    context = server_context(server_cert, client_ca=ca)
    async with running_server(Server, ssl=context) as (_, port, protocols):
        if version is ssl.TLSVersion.TLSv1_2:
            # The client's handshake waits for the server, which drops it.
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                async with asyncio.timeout(LONG):
                    await amp.connect(HOST, port, ssl=refused, server_hostname=HOST)
        else:
            # In TLS 1.3 the client's handshake is over before the server checks
            # the client's certificate, so the refusal shows on the first call.
            async with tls_client(port, refused) as proto:
                with pytest.raises(amp.ConnectionLostError):
                    async with asyncio.timeout(LONG):
                        await proto.call_remote(Sum, a=1, b=2)
        assert calls_answered(protocols) == []
        async with (
            tls_client(port, client_context(ca, cert=ca.issue_cert("ok.example.org"))) as proto,
            asyncio.timeout(LONG),
        ):
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert calls_answered(protocols) == ["Sum"]
    assert not library_records(caplog, logging.WARNING)


# UNIX sockets


async def test_tls_over_a_unix_socket(
    ca: trustme.CA,
    other_ca: trustme.CA,
    server_cert: trustme.LeafCert,
    tmp_path: pathlib.Path,
) -> None:
    path = str(tmp_path / "amp.sock")
    server = await amp.serve(Server, path=path, ssl=server_context(server_cert))
    async with server, asyncio.timeout(LONG):
        proto = await amp.connect(path=path, ssl=client_context(ca), server_hostname="localhost")
        async with proto:
            assert await proto.call_remote(Sum, a=20, b=22) == {"total": 42}
            assert proto.transport is not None
            assert proto.transport.get_extra_info("ssl_object") is not None
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await amp.connect(path=path, ssl=client_context(other_ca), server_hostname="localhost")


class StopsReading(asyncio.Protocol):
    """A TLS server side that stops reading once the handshake is done."""

    accepted: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.accepted.append(transport)
        transport.pause_reading()


@pytest.mark.parametrize("graceful", [False, True])
async def test_close_over_tls_keeps_to_close_timeout(
    ca: trustme.CA, server_cert: trustme.LeafCert, graceful: bool
) -> None:
    # Closing TLS waits for the peer's close_notify; a peer that stops reading
    # never sends it, and the connection must go after close_timeout anyway.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StopsReading, HOST, 0, ssl=server_context(server_cert))
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST, port, ssl=client_context(ca), server_hostname=HOST, close_timeout=0.3
            )
        started = loop.time()
        async with asyncio.timeout(LONG):
            if graceful:
                await proto.shutdown(grace=0.3)
            else:
                proto.close()
                await proto.wait_closed()
        assert loop.time() - started < 0.3 + 3 * TIME
    finally:
        for transport in StopsReading.accepted:
            transport.abort()
        StopsReading.accepted.clear()
        server.close()
        async with asyncio.timeout(LONG):
            await server.wait_closed()


async def test_close_called_twice_over_tls_still_keeps_to_close_timeout(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    # asyncio's TLS transport forgets its TLS protocol when close() is called a
    # second time; the drop after close_timeout must still happen then.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(StopsReading, HOST, 0, ssl=server_context(server_cert))
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST, port, ssl=client_context(ca), server_hostname=HOST, close_timeout=0.3
            )
        started = loop.time()
        async with asyncio.timeout(LONG):
            proto.close()
            proto.close()
            await proto.wait_closed()
        assert loop.time() - started < 0.3 + 3 * TIME
    finally:
        for transport in StopsReading.accepted:
            transport.abort()
        StopsReading.accepted.clear()
        server.close()
        async with asyncio.timeout(LONG):
            await server.wait_closed()
