"""Observers: middleware that also hears what a connection tells about itself."""

from __future__ import annotations

from typing import Any

import asyncio_amp as amp
from asyncio_amp._observe import Observer, Observers, observer_of
from helpers import client, eventually, raw_connection, running_server


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}


class Journal(amp.Middleware, Observer):
    """Write down every connection event, with the protocol it came from."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.received = self.sent = 0

    def connection_made(self, protocol: Any) -> None:
        self.events.append(("made", protocol))

    def connection_lost(self, protocol: Any) -> None:
        self.events.append(("lost", protocol))

    def bytes_received(self, protocol: Any, count: int) -> None:
        self.received += count

    def bytes_sent(self, protocol: Any, count: int) -> None:
        self.sent += count

    def protocol_failure(self, protocol: Any, error: amp.ProtocolError) -> None:
        self.events.append(("failure", str(error)))


def test_observers_are_picked_out_of_the_middleware() -> None:
    one, two = Journal(), Journal()
    assert observer_of([amp.Middleware()]) is None
    assert observer_of([amp.Middleware(), one]) is one
    both = observer_of([one, amp.Middleware(), two])
    assert isinstance(both, Observers)
    assert both.items == (one, two)


async def test_every_observer_hears_the_connection() -> None:
    one, two = Journal(), Journal()
    plain = amp.AMPProtocol()
    async with (
        running_server(Calculator, middleware=[one, two]) as (_, port, servers),
        client(port, lambda: plain) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        (server,) = servers
        assert isinstance(server._observer, Observers)
        assert plain._observer is None
        call = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum\x00\x01a\x00\x011\x00\x01b\x00\x012\x00\x00"
        answer = b"\x00\x07_answer\x00\x011\x00\x05total\x00\x013\x00\x00"
        for journal in (one, two):
            assert journal.received == len(call)
            assert journal.sent == len(answer)
    await eventually(lambda: len(two.events) == 2, "the connection lost")
    assert one.events == two.events == [("made", server), ("lost", server)]


async def test_observers_hear_protocol_failures() -> None:
    journal = Journal()
    async with (
        running_server(Calculator, middleware=[journal]) as (_, port, _),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(b"\x00\x00")
        await reader.read()
    await eventually(lambda: len(journal.events) == 3, "the connection lost")
    assert [event for event, _ in journal.events] == ["made", "failure", "lost"]
    assert "empty box" in journal.events[1][1]
    assert journal.received == 2
