"""
Protocol switching (ProtocolSwitchCommand) on 127.0.0.1, against our peer and raw peers.

After a successful answer the new protocols own the transport on both sides:
``connection_made``, the bytes already read past the answer, every later byte,
then ``connection_lost``. While a switch waits for its answer, other calls
raise ``ProtocolSwitchedError``; an error answer unlocks the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp._wire import encode_box, parse_boxes
from helpers import HOST, LONG, SHORT, client, eventually, port_of, running_server


class Refused(Exception):
    pass


class Switch(amp.ProtocolSwitchCommand):
    arguments = [("name", amp.Unicode())]
    errors = {Refused: "REFUSED"}


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Raw(asyncio.Protocol):
    """A byte-stream protocol that records what happens to it, and may echo or greet."""

    def __init__(self, *, echo: bool = False, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.events: list[Any] = []
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data.upper())

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


class Buffered(asyncio.BufferedProtocol):
    """A buffered byte-stream protocol with a small buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray(3)
        self.received = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buffer[:nbytes]

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class Switcher(amp.AMPProtocol):
    """Switches to an echoing Raw protocol, or refuses with REFUSED for the name 'no'."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: Raw | None = None
        self.lost_with: list[Exception | None] = []

    @Switch.responder
    def switch(self, name: str) -> Raw:
        if name == "no":
            raise Refused("not now")
        self.raw = Raw(echo=True, greeting=b"hi " + name.encode())
        return self.raw

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_with.append(exc)
        super().connection_lost(exc)


async def test_both_sides_switch_and_the_new_protocols_own_the_transport() -> None:
    async with (
        running_server(Switcher) as (_, port, servers),
        client(port, Switcher) as proto,
        asyncio.timeout(LONG),
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        new = await proto.call_remote(Switch, protocol_factory=Raw, name="x")
        assert isinstance(new, Raw)
        assert new.transport is proto.transport
        await eventually(lambda: bytes(new.received) == b"hi x", "the far side's greeting")
        assert new.transport is not None
        new.transport.write(b"raw bytes")
        await eventually(lambda: new.received.endswith(b"RAW BYTES"), "the echo")
        server = servers[0]
        assert server.raw is not None and server.raw.events[0] == "made"
        # The AMP protocols are done, on both sides.
        assert proto.closed and server.closed
        assert isinstance(proto.lost_with[0], amp.ProtocolSwitchedError)
        with pytest.raises(amp.ProtocolSwitchedError):
            proto.call_remote(Sum, a=1, b=2)
        with pytest.raises(amp.ProtocolSwitchedError):
            server.call_remote(Sum, a=1, b=2)
        # connection_lost reaches the new protocols.
        new.transport.close()
        assert await server.raw.lost is None
        await new.lost
        assert new.events[-1] == "lost"
        assert server.raw.events[-1] == "lost"


async def close_switched(new: Raw) -> None:
    """Close a switched connection: it is neither the server's nor the AMP protocol's any more."""
    assert new.transport is not None
    new.transport.close()
    async with asyncio.timeout(LONG):
        await new.lost


class RawAMPServer(asyncio.Protocol):
    """Reads a call box, then answers it with whatever bytes the test gives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.asked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\x00\x00") and not self.asked.done():
            self.asked.set_result(None)


async def raw_server(raws: list[RawAMPServer]) -> asyncio.Server:
    def build() -> RawAMPServer:
        raws.append(RawAMPServer())
        return raws[-1]

    return await asyncio.get_running_loop().create_server(build, HOST, 0)


async def close_server(server: asyncio.Server, raws: list[RawAMPServer]) -> None:
    for raw in raws:
        if raw.transport is not None:
            raw.transport.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("split", [False, True])
async def test_bytes_after_the_answer_go_to_the_new_protocol(split: bool) -> None:
    raws: list[RawAMPServer] = []
    server = await raw_server(raws)
    try:
        async with client(port_of(server)) as proto, asyncio.timeout(LONG):
            switching = proto.call_remote(Switch, protocol_factory=Raw, name="y")
            await raws[0].asked
            (box,) = parse_boxes(bytes(raws[0].received))
            assert box == {b"_ask": b"1", b"_command": b"Switch", b"name": b"y"}
            assert raws[0].transport is not None
            answer = encode_box({b"_answer": b"1"})
            if split:  # the answer in pieces, the raw bytes in the same read as its end
                raws[0].transport.write(answer[:5])
                await asyncio.sleep(SHORT)
                raws[0].transport.write(answer[5:] + b"\x00\x00not a box")
            else:
                raws[0].transport.write(answer + b"\x00\x00not a box")
            new = await switching
            # Everything read past the answer box, before the call returned.
            assert new.events == ["made", ("data", b"\x00\x00not a box")]
            raws[0].transport.write(b"later")
            await eventually(lambda: new.received.endswith(b"later"), "later bytes")
    finally:
        await close_server(server, raws)


async def test_an_empty_remainder_is_not_delivered() -> None:
    raws: list[RawAMPServer] = []
    server = await raw_server(raws)
    try:
        async with client(port_of(server)) as proto, asyncio.timeout(LONG):
            switching = proto.call_remote(Switch, protocol_factory=Raw, name="y")
            await raws[0].asked
            assert raws[0].transport is not None
            raws[0].transport.write(encode_box({b"_answer": b"1"}))
            new = await switching
            await asyncio.sleep(SHORT)
            assert new.events == ["made"]
    finally:
        await close_server(server, raws)


async def test_a_buffered_protocol_gets_the_remainder_through_its_buffer() -> None:
    raws: list[RawAMPServer] = []
    server = await raw_server(raws)
    try:
        async with client(port_of(server)) as proto, asyncio.timeout(LONG):
            switching = proto.call_remote(Switch, protocol_factory=Buffered, name="y")
            await raws[0].asked
            assert raws[0].transport is not None
            raws[0].transport.write(encode_box({b"_answer": b"1"}) + b"0123456789")
            new = await switching
            assert bytes(new.received) == b"0123456789"
            raws[0].transport.write(b"abc")
            await eventually(lambda: new.received.endswith(b"abc"), "later bytes")
    finally:
        await close_server(server, raws)


async def test_other_calls_are_refused_while_the_switch_waits() -> None:
    raws: list[RawAMPServer] = []
    server = await raw_server(raws)
    try:
        async with client(port_of(server)) as proto, asyncio.timeout(LONG):
            switching = proto.call_remote(Switch, protocol_factory=Raw, name="y")
            with pytest.raises(amp.ProtocolSwitchedError, match="switching protocols"):
                proto.call_remote(Sum, a=1, b=2)
            with pytest.raises(amp.ProtocolSwitchedError):
                proto.call_remote_box("Sum", {"a": "1", "b": "2"})
            with pytest.raises(amp.ProtocolSwitchedError):
                proto.call_remote(Switch, protocol_factory=Raw, name="z")
            await raws[0].asked
            assert raws[0].transport is not None
            raws[0].transport.write(encode_box({b"_answer": b"1"}))
            await switching
            with pytest.raises(amp.ProtocolSwitchedError, match="switched protocols"):
                proto.call_remote(Sum, a=1, b=2)
    finally:
        await close_server(server, raws)


async def test_an_error_answer_unlocks_the_connection() -> None:
    async with (
        running_server(Switcher) as (_, port, _servers),
        client(port, Switcher) as proto,
        asyncio.timeout(LONG),
    ):
        with pytest.raises(Refused, match="not now"):
            await proto.call_remote(Switch, protocol_factory=Raw, name="no")
        assert not proto.closed
        assert await proto.call_remote(Sum, a=2, b=2) == {"total": 4}
        # And a later switch still works.
        new = await proto.call_remote(Switch, protocol_factory=Raw, name="ok")
        await eventually(lambda: bytes(new.received) == b"hi ok", "the greeting")
        await close_switched(new)


async def test_answers_to_the_peer_are_held_while_the_switch_waits() -> None:
    """The peer's calls that arrive before the answer are answered after an error answer."""
    raws: list[RawAMPServer] = []
    server = await raw_server(raws)
    try:
        async with client(port_of(server), Switcher) as proto, asyncio.timeout(LONG):
            switching = proto.call_remote(Switch, protocol_factory=Raw, name="y")
            await raws[0].asked
            raws[0].received.clear()
            assert raws[0].transport is not None
            raws[0].transport.write(
                encode_box({b"_ask": b"a", b"_command": b"Sum", b"a": b"1", b"b": b"2"})
            )
            await asyncio.sleep(SHORT)
            assert raws[0].received == b""  # held
            raws[0].transport.write(
                encode_box(
                    {b"_error": b"1", b"_error_code": b"REFUSED", b"_error_description": b"x"}
                )
            )
            with pytest.raises(Refused):
                await switching
            await eventually(lambda: bool(raws[0].received), "the held answer")
            assert parse_boxes(bytes(raws[0].received)) == [{b"_answer": b"a", b"total": b"3"}]
    finally:
        await close_server(server, raws)


async def test_pending_calls_fail_when_the_peer_switches() -> None:
    """Our call still waiting when the peer's switch call is answered fails as on a lost connection."""

    class Slow(Switcher):
        @Sum.responder
        async def sum(self, a: int, b: int) -> dict[str, int]:  # type: ignore[override]
            await asyncio.sleep(LONG)
            return {"total": a + b}

    async with (
        running_server(Slow) as (_, port, servers),
        client(port, Switcher) as proto,
        asyncio.timeout(LONG),
    ):
        await eventually(lambda: bool(servers), "accepted")
        pending = servers[0].call_remote(Sum, a=1, b=2)  # our client answers it at once
        assert await pending == {"total": 3}
        waiting = proto.call_remote(Sum, a=1, b=2)  # the slow server never answers
        await eventually(lambda: bool(servers[0]._tasks), "the slow responder runs")
        # The server switches: its running responder is cancelled, and the client
        # (which answers) ends its AMP side too, failing the call it still waits for.
        new = await servers[0].call_remote(Switch, protocol_factory=Raw, name="s")
        await eventually(lambda: new.received == b"hi s", "the greeting")
        with pytest.raises(amp.ConnectionLostError) as caught:
            await waiting
        assert isinstance(caught.value.__cause__, amp.ProtocolSwitchedError)
        await close_switched(new)


async def test_a_responder_that_returns_no_protocol_answers_unknown() -> None:
    class Bad(amp.AMPProtocol):
        @Switch.responder
        async def switch(self, name: str) -> dict[str, str]:
            return {}

    async with (
        running_server(Bad) as (_, port, _servers),
        client(port, Switcher) as proto,
        asyncio.timeout(LONG),
    ):
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Switch, protocol_factory=Raw, name="y")
        assert not proto.closed


async def test_the_server_forgets_a_connection_that_switched() -> None:
    server = await amp.serve(Switcher, HOST, 0)
    port = port_of(server)  # type: ignore[arg-type]
    async with client(port, Switcher) as proto, asyncio.timeout(LONG):
        new = await proto.call_remote(Switch, protocol_factory=Raw, name="x")
        server.close()
        await server.wait_closed()
        # The switched connection is not the server's any more: it is still up.
        assert new.transport is not None and not new.transport.is_closing()
        new.transport.close()
        await new.lost


async def test_calling_a_switch_needs_a_factory() -> None:
    async with running_server(Switcher) as (_, port, _servers), client(port) as proto:
        with pytest.raises(TypeError, match="protocol_factory"):
            proto.call_remote(Switch, name="x")
        with pytest.raises(TypeError):
            proto.call_remote(Switch, protocol_factory=Raw, nom="x")
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


def test_a_switch_command_has_no_response_and_requires_an_answer() -> None:
    with pytest.raises(TypeError, match="no response"):

        class WithResponse(amp.ProtocolSwitchCommand):
            response = [("x", amp.Integer())]

    with pytest.raises(TypeError, match="requires an answer"):

        class NoAnswer(amp.ProtocolSwitchCommand):
            requires_answer = False


async def test_a_factory_that_fails_closes_the_connection() -> None:
    def broken() -> Raw:
        raise RuntimeError("no protocol today")

    async with (
        running_server(Switcher) as (_, port, servers),
        client(port, Switcher) as proto,
        asyncio.timeout(LONG),
    ):
        with pytest.raises(RuntimeError, match="no protocol today"):
            await proto.call_remote(Switch, protocol_factory=broken, name="x")
        await proto.wait_closed()
        raw = servers[0].raw
        assert raw is not None
        await raw.lost
