"""Middleware on our side of a connection with a real Twisted AMP peer, both ways.

Our middleware adds an extra key to every call it sends (as a tracing
middleware does): Twisted ignores it. Our server's middleware refuses calls
with mapped and unmapped errors, and Twisted's caller gets them as from a
responder. Calls nested in both directions go through our middleware too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from commands import Boom, CallBack, Divide, Notify, RecordingProtocol, Sum
from peer import PeerError, TwistedPeer

import asyncio_amp as amp
from helpers import LONG, client, running_server


class Journal(amp.Middleware):
    """Tag every call going out with an extra key; write down every call and its outcome."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.extra: list[dict[bytes, bytes]] = []

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.extra.append(dict(call.extra))
        return await self._noted(call, call_next)

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        call.extra[b"traceparent"] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        return await self._noted(call, call_next)

    async def _noted(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        try:
            answer = await call_next(call)
        except Exception as exc:
            self.log.append(f"{call.direction} {call.name} {call.outcome(exc)}")
            raise
        self.log.append(f"{call.direction} {call.name} {call.outcome(None)}")
        return answer


class Refuse(amp.Middleware):
    """Refuse Divide with its mapped error, and Boom with an unmapped one."""

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.command is Divide and call.arguments["numerator"] < 0:
            raise ZeroDivisionError("negative numerators are refused")
        if call.command is Boom:
            raise PermissionError("not for you")
        if call.command is Sum:
            call.arguments["a"] += 1000
        return await call_next(call)


class Ours(RecordingProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}

    @Boom.responder
    def boom(self) -> dict[str, Any]:
        return {}

    @CallBack.responder
    async def call_back(self, a: int, b: int) -> dict[str, Any]:
        answer = await self.call_remote(Sum, a=a, b=b)
        return {"total": answer["total"] + 1}


def ours(*middleware: amp.Middleware) -> Ours:
    protocol = Ours()
    protocol.middleware = middleware
    return protocol


async def test_our_client_with_middleware_calls_twisted() -> None:
    journal = Journal()
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port, lambda: ours(journal)) as proto:
            conn = int((await peer.wait_event("accepted"))["conn"])
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
            with pytest.raises(ZeroDivisionError):
                await proto.call_remote(Divide, numerator=1, denominator=0)
            assert await proto.call_remote(Notify, message="hi") is None
            # Twisted's responder calls our Sum back: nested, through our incoming side.
            assert await proto.call_remote(CallBack, a=2, b=3) == {"total": 1005}
            # The extra key went out in the box, and Twisted answered all the same.
            assert b"traceparent" in proto.sent_boxes()[0]
            received = await peer.request("received", conn=conn)
            assert [r["command"] for r in received] == ["Sum", "Divide", "Notify", "CallBack"]
    finally:
        await peer.stop()
    assert journal.log == [
        "outgoing Sum ok",
        "outgoing Divide ZERO_DIVISION",
        "outgoing Notify ok",
        "incoming Sum ok",
        "outgoing CallBack ok",
    ]
    assert journal.extra == [{}]  # Twisted sends no extra keys


async def test_twisted_calls_our_server_with_middleware() -> None:
    journal = Journal()
    async with running_server(Ours, middleware=[journal, Refuse()]) as (_, port, _):
        peer = await TwistedPeer.start()
        try:
            conn = await peer.connect(port)
            assert await peer.call(conn, "Sum", a=1, b=2) == {"total": 1003}
            assert await peer.call(conn, "Divide", numerator=1, denominator=2) == {"result": 0.5}
            with pytest.raises(PeerError) as mapped:
                await peer.call(conn, "Divide", numerator=-1, denominator=2)
            assert mapped.value.code == "ZERO_DIVISION"
            assert "negative numerators" in mapped.value.description
            with pytest.raises(PeerError) as unmapped:
                await peer.call(conn, "Boom")
            assert unmapped.value.code == "UNKNOWN"
            assert "not for you" not in unmapped.value.description
            # Our responder calls Twisted back, through our outgoing middleware,
            # with the extra key, which Twisted ignores.
            async with asyncio.timeout(LONG):
                assert await peer.call(conn, "CallBack", a=2, b=3) == {"total": 6}
            assert await peer.call(conn, "Sum", a=1, b=1) == {"total": 1002}
        finally:
            await peer.stop()
    assert journal.log == [
        "incoming Sum ok",
        "incoming Divide ok",
        "incoming Divide ZERO_DIVISION",
        "incoming Boom UNKNOWN",
        "outgoing Sum ok",
        "incoming CallBack ok",
        "incoming Sum ok",
    ]
