"""A Twisted AMP client (``twisted_peer.py``) against our asyncio_amp server.

Every test serves :class:`Server` (responders for the peer's commands, plain and
``async def``) on 127.0.0.1, starts the Twisted peer, has it connect, and stops
the peer at the end. :class:`Server` records the bytes it writes, so tests can
check exactly what crossed the wire, and the peer reports what Twisted's caller
got (``PeerError`` for an error answer) and lost connections (``lost`` events).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from commands import (
    ECHO_CASES,
    Big,
    Boom,
    CallBack,
    Divide,
    EchoAll,
    Fatal,
    Hello,
    Notify,
    RecordingProtocol,
    Slow,
    Sum,
)
from peer import PeerError, TwistedPeer

from helpers import LONG, TIME, running_server

LOST_TYPES = {"ConnectionDone", "ConnectionLost"}


class Server(RecordingProtocol):
    """Our server: a responder for every command of the peer."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.notified = asyncio.Event()

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append(("Sum", {"a": a, "b": b}))
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        self.calls.append(("Divide", {"numerator": numerator, "denominator": denominator}))
        return {"result": float(numerator) / denominator}

    @Fatal.responder
    def fatal(self) -> dict[str, Any]:
        self.calls.append(("Fatal", {}))
        raise KeyError("kk")

    @Boom.responder
    async def boom(self) -> dict[str, Any]:
        self.calls.append(("Boom", {}))
        await asyncio.sleep(0)
        raise RuntimeError("secret internal detail")

    @Notify.responder
    async def notify(self, message: str) -> dict[str, Any]:
        self.calls.append(("Notify", {"message": message}))
        self.notified.set()
        return {}

    @EchoAll.responder
    async def echo_all(
        self, *, i: int, s: str, b: bytes, f: float, flag: bool, opt: str | None
    ) -> dict[str, Any]:
        args = {"i": i, "s": s, "b": b, "f": f, "flag": flag, "opt": opt}
        self.calls.append(("EchoAll", args))
        return dict(args)

    @Big.responder
    def big(self, size: int) -> dict[str, Any]:
        self.calls.append(("Big", {"size": size}))
        return {"data": b"x" * size}

    @Slow.responder
    async def slow(self, delay: float, value: int) -> dict[str, Any]:
        self.calls.append(("Slow", {"delay": delay, "value": value}))
        await asyncio.sleep(delay)
        return {"value": value}

    @CallBack.responder
    async def call_back(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append(("CallBack", {"a": a, "b": b}))
        answer = await self.call_remote(Sum, a=a, b=b)
        return {"total": answer["total"] + 1000}

    @Hello.responder
    def hello(self, hello_name: str) -> dict[str, Any]:
        self.calls.append(("Hello", {"hello_name": hello_name}))
        return {"greeting": "hello " + hello_name}


class SumOnlyServer(RecordingProtocol):
    """A server that answers Sum and nothing else."""

    @Sum.responder
    async def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}


@dataclass
class Session:
    peer: TwistedPeer
    # The Twisted client's connection id.
    conn: int
    port: int
    protocols: list[Any]

    @property
    def proto(self) -> Server:
        proto: Server = self.protocols[0]
        return proto

    async def call(self, command: str, **args: Any) -> Any:
        return await self.peer.call(self.conn, command, **args)

    async def call_raw(self, command: str, box: dict[bytes, bytes], **fields: Any) -> Any:
        return await self.peer.request(
            "call_raw", conn=self.conn, command=command, box=box, **fields
        )

    def lost_events(self) -> list[dict[str, Any]]:
        return [e for e in self.peer.events if e.get("event") == "lost"]

    async def connect_again(self) -> int:
        """Open another Twisted connection to our server; wait until our side has it."""
        count = len(self.protocols)
        conn = await self.peer.connect(self.port)
        await wait_for(lambda: len(self.protocols) > count)
        return conn


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(LONG):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


@asynccontextmanager
async def twisted_client(factory: Callable[[], Any] = Server) -> AsyncIterator[Session]:
    """Our server on 127.0.0.1, and a Twisted peer connected to it."""
    peer = await TwistedPeer.start()
    try:
        async with running_server(factory) as (_, port, protocols):
            conn = await peer.connect(port)
            await wait_for(lambda: len(protocols) == 1)
            yield Session(peer, conn, port, protocols)
    finally:
        await peer.stop()


async def serialized_by_twisted(peer: TwistedPeer, box: dict[bytes, bytes]) -> bytes:
    result = await peer.request("serialize", box=box)
    return bytes.fromhex(result["hex"])


# Calls that succeed


async def test_sum() -> None:
    async with twisted_client() as s:
        assert await s.call("Sum", a=13, b=81) == {"total": 94}
        assert await s.call("Sum", a=-(2**70), b=-1) == {"total": -(2**70) - 1}
        assert s.proto.calls == [("Sum", {"a": 13, "b": 81}), ("Sum", {"a": -(2**70), "b": -1})]
        # Twisted's first call has tag 1, and our answer is what Twisted would write.
        first_answer = await serialized_by_twisted(s.peer, {b"_answer": b"1", b"total": b"94"})
        assert bytes(s.proto.sent).startswith(first_answer)


async def test_echo_all_both_ways() -> None:
    async with twisted_client() as s:
        # Twisted calls our async responder.
        for case in ECHO_CASES:
            answer = await s.call("EchoAll", **case)
            assert answer == {"opt": None, **case}
            assert math.copysign(1.0, answer["f"]) == math.copysign(1.0, case["f"])
        answer = await s.call("EchoAll", i=1, s="n", b=b"\xff", f=math.nan, flag=False)
        assert math.isnan(answer.pop("f"))
        assert answer == {"i": 1, "s": "n", "b": b"\xff", "flag": False, "opt": None}
        # Our responder got exactly the values, with the right types.
        echoed = [args for name, args in s.proto.calls if name == "EchoAll"]
        assert echoed[: len(ECHO_CASES)] == [{"opt": None, **case} for case in ECHO_CASES]
        for args in echoed:
            assert type(args["b"]) is bytes
            assert type(args["s"]) is str
            assert type(args["flag"]) is bool
            assert type(args["f"]) is float
        assert math.isnan(echoed[-1]["f"])

        # Our server calls the Twisted client on the same connection.
        for case in ECHO_CASES:
            async with asyncio.timeout(LONG):
                answer = await s.proto.call_remote(EchoAll, **case)
            assert answer == {"opt": None, **case}
            assert math.copysign(1.0, answer["f"]) == math.copysign(1.0, case["f"])
        async with asyncio.timeout(LONG):
            answer = await s.proto.call_remote(
                EchoAll, i=2, s="n", b=b"", f=math.nan, flag=True, opt="o"
            )
        assert math.isnan(answer.pop("f"))
        assert answer == {"i": 2, "s": "n", "b": b"", "flag": True, "opt": "o"}
        received = await s.peer.request("received", conn=s.conn)
        assert [r["args"] for r in received[: len(ECHO_CASES)]] == [
            {"opt": None, **case} for case in ECHO_CASES
        ]
        assert math.isnan(received[-1]["args"]["f"])


async def test_hello_with_dashed_wire_name() -> None:
    async with twisted_client() as s:
        assert await s.call("Hello", **{"hello-name": "wörld"}) == {"greeting": "hello wörld"}
        raw = await s.call_raw("Hello", {b"hello-name": "ünï".encode()})
        assert raw == {b"_answer": b"2", b"greeting": "hello ünï".encode()}
        assert s.proto.calls == [
            ("Hello", {"hello_name": "wörld"}),
            ("Hello", {"hello_name": "ünï"}),
        ]
        # A key spelled the Python way is not the argument: the call is missing it.
        with pytest.raises(PeerError) as info:
            await s.call_raw("Hello", {b"hello_name": b"x"})
        assert info.value.code == "UNKNOWN"


# Error answers


async def test_divide_by_zero_is_mapped_and_connection_stays_open() -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call("Divide", numerator=1, denominator=0)
        assert info.value.code == "ZERO_DIVISION"
        assert info.value.type == "ZeroDivisionError"
        assert info.value.description == "float division by zero"
        assert await s.call("Divide", numerator=1, denominator=4) == {"result": 0.25}
        assert await s.call("Sum", a=1, b=2) == {"total": 3}
        assert s.lost_events() == []
        assert not s.proto.closed


async def test_fatal_error_is_sent_then_our_server_closes() -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call("Fatal")
        assert info.value.code == "FATAL_KEY"
        assert info.value.type == "KeyError"
        assert info.value.description == "'kk'"
        lost = await s.peer.wait_event("lost", conn=s.conn)
        assert lost["reason_type"] in LOST_TYPES
        async with asyncio.timeout(LONG):
            await s.proto.wait_closed()
        with pytest.raises(PeerError) as info:
            await s.call("Sum", a=1, b=2)
        assert info.value.type in LOST_TYPES
        assert s.proto.calls == [("Fatal", {})]


async def test_unmapped_exception_is_unknown_and_unlike_twisted_connection_stays_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call("Boom")
        assert info.value.code == "UNKNOWN"
        assert info.value.type == "UnknownRemoteError"
        assert info.value.description == "Unknown Error"
        assert b"secret" not in s.proto.sent
        # The traceback stays on our side, in the log.
        logged = [r for r in caplog.records if r.name.startswith("asyncio_amp") and r.exc_info]
        assert len(logged) == 1
        exc_info = logged[0].exc_info
        assert exc_info is not None
        assert isinstance(exc_info[1], RuntimeError)
        assert str(exc_info[1]) == "secret internal detail"
        # Twisted would now drop the connection; we keep it open.
        assert await s.call("Sum", a=4, b=5) == {"total": 9}
        assert s.lost_events() == []
        assert not s.proto.closed


async def test_undecodable_arguments_are_unknown_and_connection_stays_open() -> None:
    async with twisted_client() as s:
        bad_calls = [
            ("Sum", {b"a": b"x", b"b": b"1"}),
            ("Hello", {b"hello-name": b"\xff\xfe"}),
            (
                "EchoAll",
                {b"i": b"1", b"s": b"s", b"b": b"b", b"f": b"1.0", b"flag": b"yes"},
            ),
            (
                "EchoAll",
                {b"i": b"1", b"s": b"s", b"b": b"b", b"f": b"one", b"flag": b"True"},
            ),
        ]
        for command, box in bad_calls:
            with pytest.raises(PeerError) as info:
                await s.call_raw(command, box)
            assert info.value.code == "UNKNOWN", command
            assert info.value.description == "Unknown Error"
        # No responder ran.
        assert s.proto.calls == []
        assert await s.call("Sum", a=1, b=1) == {"total": 2}
        assert s.lost_events() == []


async def test_missing_required_argument_is_unknown_and_connection_stays_open() -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call_raw("Sum", {b"a": b"1"})
        assert (info.value.code, info.value.description) == ("UNKNOWN", "Unknown Error")
        with pytest.raises(PeerError) as info:
            await s.call_raw("Slow", {b"value": b"1"})
        assert info.value.code == "UNKNOWN"
        assert s.proto.calls == []
        # A missing optional argument is fine: it reaches the responder as None.
        raw = await s.call_raw(
            "EchoAll", {b"i": b"1", b"s": b"s", b"b": b"b", b"f": b"1.5", b"flag": b"True"}
        )
        assert raw == {
            b"_answer": b"3",
            b"i": b"1",
            b"s": b"s",
            b"b": b"b",
            b"f": b"1.5",
            b"flag": b"True",
        }
        assert s.proto.calls[-1][1]["opt"] is None
        assert await s.call("Sum", a=1, b=1) == {"total": 2}
        assert s.lost_events() == []


async def test_unknown_extra_keys_are_ignored() -> None:
    async with twisted_client() as s:
        raw = await s.call_raw("Sum", {b"a": b"1", b"b": b"2", b"extra": b"zzz", b"c": b"9"})
        assert raw == {b"_answer": b"1", b"total": b"3"}
        assert s.proto.calls == [("Sum", {"a": 1, "b": 2})]


async def test_unknown_command_is_unhandled_and_connection_stays_open() -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call_raw("Nope", {b"x": b"y"})
        assert info.value.code == "UNHANDLED"
        assert info.value.type == "UnhandledCommand"
        assert info.value.description == "Unhandled Command: b'Nope'"
        assert await s.call("Sum", a=2, b=3) == {"total": 5}
        assert s.lost_events() == []
        assert not s.proto.closed


async def test_command_our_server_lacks_is_unhandled() -> None:
    async with twisted_client(SumOnlyServer) as s:
        with pytest.raises(PeerError) as info:
            await s.call("Hello", **{"hello-name": "x"})
        assert info.value.code == "UNHANDLED"
        assert info.value.description == "Unhandled Command: b'Hello'"
        with pytest.raises(PeerError) as info:
            await s.call("Divide", numerator=1, denominator=0)
        assert info.value.code == "UNHANDLED"
        assert info.value.description == "Unhandled Command: b'Divide'"
        assert await s.call("Sum", a=2, b=3) == {"total": 5}
        assert s.lost_events() == []


async def test_too_long_answer_is_unknown_and_connection_stays_usable() -> None:
    async with twisted_client() as s:
        with pytest.raises(PeerError) as info:
            await s.call("Big", size=70_000)
        assert (info.value.code, info.value.description) == ("UNKNOWN", "Unknown Error")
        # Twisted would drop the connection here; we answer and keep it.
        assert await s.call("Big", size=65_535) == {"data": b"x" * 65_535}
        assert await s.call("Sum", a=1, b=2) == {"total": 3}
        assert s.lost_events() == []
        assert not s.proto.closed


# No answer, ordering, calls in both directions


async def test_notify_runs_our_responder_and_nothing_is_answered() -> None:
    async with twisted_client() as s:
        assert await s.call("Notify", message="fire and forget ✓") is None
        async with asyncio.timeout(LONG):
            await s.proto.notified.wait()
        assert s.proto.calls == [("Notify", {"message": "fire and forget ✓"})]
        # Twisted's no-answer call used up tag 1, so Sum is tag 2.
        assert await s.call("Sum", a=1, b=1) == {"total": 2}
        assert s.proto.received_boxes()[0] == {
            b"_command": b"Notify",
            b"message": "fire and forget ✓".encode(),
        }
        # The only box we wrote is the Sum answer.
        assert s.proto.sent_boxes() == [{b"_answer": b"2", b"total": b"2"}]
        assert s.lost_events() == []


async def test_slow_async_responder_does_not_hold_up_a_later_call() -> None:
    async with twisted_client() as s:
        slow = asyncio.ensure_future(s.call("Slow", delay=0.5 * TIME, value=9))
        try:
            await wait_for(lambda: any(name == "Slow" for name, _ in s.proto.calls))
            assert await s.call("Sum", a=1, b=1) == {"total": 2}
            assert not slow.done()
        finally:
            async with asyncio.timeout(LONG):
                assert await slow == {"value": 9}
        assert [box[b"_answer"] for box in s.proto.sent_boxes()] == [b"2", b"1"]


async def test_our_responder_calls_back_the_twisted_client() -> None:
    async with twisted_client() as s:
        assert await s.call("CallBack", a=2, b=3) == {"total": 1005}
        assert await s.peer.request("received", conn=s.conn) == [
            {"command": "Sum", "args": {"a": 2, "b": 3}}
        ]
        # Several at once, each waiting on its own call back.
        results = await asyncio.gather(*(s.call("CallBack", a=n, b=n) for n in range(10)))
        assert results == [{"total": 2 * n + 1000} for n in range(10)]
        ours = [box for box in s.proto.sent_boxes() if b"_ask" in box]
        assert [box[b"_ask"] for box in ours] == [b"%x" % n for n in range(1, 12)]
        assert all(box[b"_command"] == b"Sum" for box in ours)
        assert s.lost_events() == []


# Bad input and tags


async def test_garbage_closes_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    async with twisted_client() as s:
        second = await s.connect_again()
        first_proto, second_proto = s.protocols
        await s.peer.request("send_raw", conn=s.conn, hex=b"GET / HTTP/1.0\r\n\r\n".hex())
        lost = await s.peer.wait_event("lost", conn=s.conn)
        assert lost["reason_type"] in LOST_TYPES
        async with asyncio.timeout(LONG):
            await first_proto.wait_closed()
        assert first_proto.sent == b""
        assert any(
            r.name.startswith("asyncio_amp") and r.levelno >= logging.WARNING
            for r in caplog.records
        )
        # The other connection is unaffected.
        assert await s.peer.call(second, "Sum", a=20, b=22) == {"total": 42}
        assert not second_proto.closed
        assert [e["conn"] for e in s.lost_events()] == [s.conn]


async def test_twisted_tags_are_echoed_exactly() -> None:
    async with twisted_client() as s:
        count = 20
        results = await asyncio.gather(*(s.call("Sum", a=n, b=100) for n in range(count)))
        assert results == [{"total": n + 100} for n in range(count)]
        asks = {box[b"_ask"]: box for box in s.proto.received_boxes()}
        answers = {box[b"_answer"]: box for box in s.proto.sent_boxes()}
        assert set(asks) == {b"%x" % n for n in range(1, count + 1)}
        assert set(answers) == set(asks)
        for tag, ask in asks.items():
            assert int(answers[tag][b"total"]) == int(ask[b"a"]) + int(ask[b"b"])

        # A tag that is not Twisted's hex counter is still echoed byte for byte.
        odd_tag = b"T\xff\x00-\xc3\xa9"
        ask = {b"_ask": odd_tag, b"_command": b"Sum", b"a": b"1", b"b": b"2"}
        mark = len(s.proto.sent)
        await s.peer.request(
            "send_raw", conn=s.conn, hex=(await serialized_by_twisted(s.peer, ask)).hex()
        )
        await wait_for(lambda: len(s.proto.sent) > mark)
        assert bytes(s.proto.sent[mark:]) == await serialized_by_twisted(
            s.peer, {b"_answer": odd_tag, b"total": b"3"}
        )
        # Twisted never sent that tag, so it drops the connection on the answer.
        await s.peer.wait_event("lost", conn=s.conn)
