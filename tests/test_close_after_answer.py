"""Commands with ``close_after_answer`` (Twisted's QuitBox), over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import asyncio_amp as amp
from helpers import LONG, client, eventually, running_server


class Shutdown(amp.Command):
    response = [("bye", amp.String())]
    close_after_answer = True
    errors = {PermissionError: "NOT_ALLOWED"}


class AsyncShutdown(amp.Command):
    close_after_answer = True


class BadShutdown(amp.Command):
    response = [("bye", amp.String())]
    close_after_answer = True


class Slow(amp.Command):
    response = [("done", amp.Boolean())]


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


def test_close_after_answer_is_checked_at_class_creation() -> None:
    assert amp.Command.close_after_answer is False
    assert Shutdown.close_after_answer is True
    with pytest.raises(TypeError, match="close_after_answer must be True or False"):

        class Wrong(amp.Command):
            close_after_answer = 1  # type: ignore[assignment]


class Worker(amp.AMPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.allowed = True
        self.slow_started = asyncio.Event()

    @Shutdown.responder
    def shutdown_now(self) -> dict[str, Any]:
        if not self.allowed:
            raise PermissionError("not now")
        return {"bye": "bye"}

    @AsyncShutdown.responder
    async def shutdown_later(self) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {}

    @BadShutdown.responder
    def bad_shutdown(self) -> dict[str, Any]:
        return {"bye": 5}

    @Slow.responder
    async def slow(self) -> dict[str, Any]:
        self.slow_started.set()
        await asyncio.sleep(LONG)
        return {"done": True}

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


@pytest.mark.parametrize("command", [Shutdown, AsyncShutdown])
async def test_the_caller_gets_the_answer_then_the_connection_closes(
    command: type[amp.Command],
) -> None:
    async with running_server(Worker) as (_, port, protos), client(port) as proto:
        slow = proto.call_remote(Slow)
        await eventually(lambda: bool(protos) and protos[0].slow_started.is_set(), "Slow started")
        answer = await proto.call_remote(command)
        assert answer == ({"bye": "bye"} if command is Shutdown else {})
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
            await protos[0].wait_closed()
        with pytest.raises(amp.ConnectionLostError):
            await slow
        with pytest.raises(amp.ConnectionLostError):
            proto.call_remote(Sum, a=1, b=2)


async def test_the_responders_side_takes_no_new_calls_after_the_answer() -> None:
    async with running_server(Worker) as (_, port, protos), client(port) as proto:
        assert await proto.call_remote(Shutdown) == {"bye": "bye"}
        with pytest.raises(amp.ConnectionLostError):
            protos[0].call_remote(Sum, a=1, b=2)


async def test_an_error_answer_leaves_the_connection_open() -> None:
    async with running_server(Worker) as (_, port, protos), client(port) as proto:
        protos[0].allowed = False
        with pytest.raises(PermissionError, match="not now"):
            await proto.call_remote(Shutdown)
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert not proto.closed


async def test_an_answer_that_cannot_be_sent_is_unknown_and_leaves_it_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with running_server(Worker) as (_, port, _), client(port) as proto:
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(BadShutdown)
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
    assert any("cannot be sent" in r.getMessage() for r in caplog.records)


async def test_a_call_without_ask_does_not_close() -> None:
    async with running_server(Worker) as (_, port, _), client(port) as proto:
        await proto.call_remote_box("Shutdown", requires_answer=False)
        assert await proto.call_remote(Sum, a=2, b=2) == {"total": 4}
        assert not proto.closed
