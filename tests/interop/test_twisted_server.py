"""Our asyncio_amp client against a Twisted AMP server (``twisted_peer.py``).

Every test starts the Twisted peer, makes it listen on 127.0.0.1, connects our
client to it and stops the peer at the end. The peer records the calls it
answers (``received``) and reports lost connections (``lost`` events), so each
test can check what Twisted saw as well as what our caller got.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
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
    Nope,
    Notify,
    RecordingProtocol,
    Slow,
    Sum,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peer import PeerError, TwistedPeer

import asyncio_amp as amp
from helpers import LONG, TIME, client, loop_factory


class Client(RecordingProtocol):
    """Our client: it also answers the calls the Twisted server makes back on the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        self.calls.append(("Sum", {"a": a, "b": b}))
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        self.calls.append(("Divide", {"numerator": numerator, "denominator": denominator}))
        return {"result": numerator / denominator}


@dataclass
class Session:
    peer: TwistedPeer
    proto: Client
    # The id of the connection on the Twisted side.
    conn: int

    async def received(self) -> list[dict[str, Any]]:
        """The calls the Twisted server has answered on this connection, in order."""
        result: list[dict[str, Any]] = await self.peer.request("received", conn=self.conn)
        return result

    def lost_events(self) -> list[dict[str, Any]]:
        return [e for e in self.peer.events if e.get("event") == "lost"]


@asynccontextmanager
async def twisted_server() -> AsyncIterator[Session]:
    """A Twisted peer listening on 127.0.0.1 and our client connected to it."""
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port, Client) as proto:
            assert isinstance(proto, Client)
            accepted = await peer.wait_event("accepted")
            yield Session(peer, proto, int(accepted["conn"]))
    finally:
        await peer.stop()


def amp_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("asyncio_amp") and r.levelno >= logging.INFO
    ]


# Calls that succeed


async def test_sum() -> None:
    async with twisted_server() as s:
        assert await s.proto.call_remote(Sum, a=13, b=81) == {"total": 94}
        assert await s.proto.call_remote(Sum, a=-(2**70), b=1) == {"total": 1 - 2**70}
        assert await s.proto.call_remote(Sum, a=0, b=-5) == {"total": -5}
        assert await s.received() == [
            {"command": "Sum", "args": {"a": 13, "b": 81}},
            {"command": "Sum", "args": {"a": -(2**70), "b": 1}},
            {"command": "Sum", "args": {"a": 0, "b": -5}},
        ]


async def test_sum_instance_form() -> None:
    async with twisted_server() as s:
        assert await s.proto.call_remote(Sum(a=40, b=2)) == {"total": 42}
        assert await s.received() == [{"command": "Sum", "args": {"a": 40, "b": 2}}]


async def test_echo_all_round_trip_of_every_type() -> None:
    async with twisted_server() as s:
        for case in ECHO_CASES:
            answer = await s.proto.call_remote(EchoAll, **case)
            expected = {"opt": None, **case}
            assert answer == expected
            assert type(answer["b"]) is bytes
            assert type(answer["s"]) is str
            assert type(answer["flag"]) is bool
            # Same float, sign of zero included.
            assert math.copysign(1.0, answer["f"]) == math.copysign(1.0, case["f"])
        nan = await s.proto.call_remote(EchoAll, i=5, s="n", b=b"n", f=math.nan, flag=True)
        assert math.isnan(nan.pop("f"))
        assert nan == {"i": 5, "s": "n", "b": b"n", "flag": True, "opt": None}

        # What Twisted decoded from our bytes: the same values, opt absent as None.
        received = await s.received()
        assert len(received) == len(ECHO_CASES) + 1
        for record, case in zip(received, ECHO_CASES, strict=False):
            assert record["command"] == "EchoAll"
            assert record["args"] == {"opt": None, **case}
        assert math.isnan(received[-1]["args"]["f"])

        # The absent optional argument is not on the wire at all; an empty one is.
        asks = [box for box in s.proto.sent_boxes() if box.get(b"_command") == b"EchoAll"]
        assert [b"opt" in box for box in asks] == ["opt" in case for case in ECHO_CASES] + [False]
        assert asks[3][b"opt"] == b""
        assert asks[1][b"f"] == b"inf"
        assert asks[2][b"f"] == b"-inf"
        assert asks[-1][b"f"] == b"nan"


async def test_hello_with_dashed_wire_name() -> None:
    async with twisted_server() as s:
        answer = await s.proto.call_remote(Hello, hello_name="wörld")
        assert answer == {"greeting": "hello wörld"}
        assert await s.received() == [{"command": "Hello", "args": {"hello-name": "wörld"}}]
        (ask,) = s.proto.sent_boxes()
        assert ask[b"hello-name"] == "wörld".encode()
        assert b"hello_name" not in ask


# Error answers


async def test_divide_by_zero_is_mapped_and_connection_stays_usable() -> None:
    async with twisted_server() as s:
        with pytest.raises(ZeroDivisionError) as info:
            await s.proto.call_remote(Divide, numerator=1, denominator=0)
        assert str(info.value) == "float division by zero"
        assert await s.proto.call_remote(Divide, numerator=1, denominator=4) == {"result": 0.25}
        assert await s.proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert not s.proto.closed
        assert s.lost_events() == []


async def test_fatal_error_is_mapped_then_twisted_closes() -> None:
    async with twisted_server() as s:
        with pytest.raises(KeyError) as info:
            await s.proto.call_remote(Fatal)
        # Twisted sends str(KeyError("kk")), which is "'kk'".
        assert info.value.args == ("'kk'",)
        async with asyncio.timeout(LONG):
            await s.proto.wait_closed()
        assert s.proto.closed
        with pytest.raises(amp.ConnectionLostError):
            await s.proto.call_remote(Sum, a=1, b=2)
        await s.peer.wait_event("lost", conn=s.conn)
        assert [r["command"] for r in await s.received()] == ["Fatal"]


async def test_unmapped_error_is_unknown_then_twisted_closes() -> None:
    async with twisted_server() as s:
        with pytest.raises(amp.UnknownRemoteError) as info:
            await s.proto.call_remote(Boom)
        assert info.value.error_code == "UNKNOWN"
        assert info.value.description == "Unknown Error"
        assert "secret" not in str(info.value)
        assert b"secret" not in s.proto.received
        # Twisted answers an unexpected exception and then drops the connection
        # (its behaviour, unlike ours: see test_twisted_client.py).
        async with asyncio.timeout(LONG):
            await s.proto.wait_closed()
        with pytest.raises(amp.ConnectionLostError):
            await s.proto.call_remote(Sum, a=1, b=2)
        await s.peer.wait_event("lost", conn=s.conn)


async def test_unknown_command_is_unhandled_and_connection_stays_usable() -> None:
    async with twisted_server() as s:
        with pytest.raises(amp.UnhandledCommandError) as info:
            await s.proto.call_remote(Nope, x=1)
        assert info.value.error_code == "UNHANDLED"
        assert info.value.description == "Unhandled Command: b'Nope'"
        assert await s.proto.call_remote(Sum, a=2, b=2) == {"total": 4}
        with pytest.raises(amp.UnhandledCommandError):
            await s.proto.call_remote(Nope)
        assert await s.proto.call_remote(Sum, a=3, b=3) == {"total": 6}
        assert not s.proto.closed
        assert s.lost_events() == []


async def test_call_remote_box_against_twisted() -> None:
    async with twisted_server() as s:
        assert await s.proto.call_remote_box("Sum", {"a": "13", "b": "81"}) == {b"total": b"94"}
        with pytest.raises(amp.RemoteAmpError) as mapped:
            await s.proto.call_remote_box("Divide", {"numerator": "1", "denominator": "0"})
        assert mapped.value.error_code == "ZERO_DIVISION"
        with pytest.raises(amp.UnhandledCommandError) as unhandled:
            await s.proto.call_remote_box(b"Nope")
        assert unhandled.value.description == "Unhandled Command: b'Nope'"
        assert s.proto.call_remote_box("Notify", {"message": "hi"}, requires_answer=False).done()
        assert await s.proto.call_remote_box("Sum", {"a": "1", "b": "1"}) == {b"total": b"2"}
        assert await s.received() == [
            {"command": "Sum", "args": {"a": 13, "b": 81}},
            {"command": "Divide", "args": {"numerator": 1, "denominator": 0}},
            {"command": "Notify", "args": {"message": "hi"}},
            {"command": "Sum", "args": {"a": 1, "b": 1}},
        ]


# No answer, ordering, concurrency


async def test_notify_completes_at_once_with_none() -> None:
    async with twisted_server() as s:
        future = s.proto.call_remote(Notify, message="fire and forget ✓")
        assert future.done()
        assert await future is None
        # Twisted handles boxes in order, so once Sum is answered Notify has run.
        assert await s.proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        assert await s.received() == [
            {"command": "Notify", "args": {"message": "fire and forget ✓"}},
            {"command": "Sum", "args": {"a": 1, "b": 1}},
        ]
        notify, ask = s.proto.sent_boxes()
        assert notify == {b"_command": b"Notify", b"message": "fire and forget ✓".encode()}
        # The Notify took tag 1 without sending it, as Twisted's counter does.
        assert ask[b"_ask"] == b"2"
        # Nothing but the Sum answer came back.
        assert s.proto.received_boxes() == [{b"_answer": b"2", b"total": b"2"}]


async def test_slow_answer_comes_after_a_later_fast_one() -> None:
    async with twisted_server() as s:
        slow = s.proto.call_remote(Slow, delay=0.5 * TIME, value=7)
        assert await s.proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert not slow.done()
        async with asyncio.timeout(LONG):
            assert await slow == {"value": 7}
        answers = [box[b"_answer"] for box in s.proto.received_boxes()]
        assert answers == [b"2", b"1"]


async def test_many_concurrent_calls() -> None:
    async with twisted_server() as s:
        count = 2000
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(
                *(s.proto.call_remote(Sum, a=n, b=3 * n) for n in range(count))
            )
        assert answers == [{"total": 4 * n} for n in range(count)]
        tags = s.proto.sent_tags()
        assert tags == [b"%x" % n for n in range(1, count + 1)]
        assert len(await s.received()) == count


async def test_cancelled_call_drops_late_answer_and_never_reuses_tags(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio_amp")
    async with twisted_server() as s:
        assert await s.proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1 * TIME):
                await s.proto.call_remote(Slow, delay=0.6 * TIME, value=5)
        # The connection works while the cancelled call is still running remotely.
        assert await s.proto.call_remote(Sum, a=2, b=2) == {"total": 4}
        # Wait for the late answer to the cancelled call (tag 2) to arrive.
        async with asyncio.timeout(LONG):
            late = await s.proto.wait_received(lambda box: box.get(b"_answer") == b"2")
        assert late == {b"_answer": b"2", b"value": b"5"}
        await asyncio.sleep(0.05 * TIME)
        assert not s.proto.closed
        assert await s.proto.call_remote(Sum, a=3, b=3) == {"total": 6}
        tags = s.proto.sent_tags()
        assert tags == [b"1", b"2", b"3", b"4"]
        assert len(set(tags)) == len(tags)
        assert [r["command"] for r in await s.received()] == ["Sum", "Slow", "Sum", "Sum"]
        assert s.lost_events() == []
        assert [r for r in amp_warnings(caplog) if r.levelno >= logging.WARNING] == []


async def test_twisted_calls_back_our_client_on_the_same_connection() -> None:
    async with twisted_server() as s:
        assert await s.proto.call_remote(CallBack, a=2, b=3) == {"total": 1005}
        assert s.proto.calls == [("Sum", {"a": 2, "b": 3})]
        assert await s.proto.call_remote(CallBack, a=-10, b=4) == {"total": 994}
        assert [r["command"] for r in await s.received()] == ["CallBack", "CallBack"]
        # Both directions also work when started from the Twisted side.
        assert await s.peer.call(s.conn, "Sum", a=5, b=6) == {"total": 11}
        assert s.proto.calls[-1] == ("Sum", {"a": 5, "b": 6})


# Length limits


async def test_too_long_answer_makes_twisted_drop_the_connection() -> None:
    async with twisted_server() as s:
        async with asyncio.timeout(LONG):
            assert await s.proto.call_remote(Big, size=65535) == {"data": b"x" * 65535}
        with pytest.raises(amp.ConnectionLostError):
            async with asyncio.timeout(LONG):
                await s.proto.call_remote(Big, size=70_000)
        async with asyncio.timeout(LONG):
            await s.proto.wait_closed()
        await s.peer.wait_event("lost", conn=s.conn)


async def test_too_long_value_is_refused_locally_before_sending() -> None:
    async with twisted_server() as s:
        assert await s.proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        sent_before = bytes(s.proto.sent)
        with pytest.raises(amp.TooLongError):
            s.proto.call_remote(EchoAll, i=1, s="s", b=b"x" * 65536, f=1.0, flag=True)
        assert bytes(s.proto.sent) == sent_before
        # The connection is unaffected and no tag was used up.
        assert await s.proto.call_remote(Sum, a=2, b=2) == {"total": 4}
        assert s.proto.sent_tags() == [b"1", b"2"]
        # The largest value that fits does go through.
        async with asyncio.timeout(LONG):
            answer = await s.proto.call_remote(
                EchoAll, i=1, s="s", b=b"y" * 65535, f=1.0, flag=True
            )
        assert answer["b"] == b"y" * 65535
        assert [r["command"] for r in await s.received()] == ["Sum", "Sum", "EchoAll"]
        assert s.lost_events() == []


# Byte-exactness against Twisted's own serializer


async def serialized_by_twisted(peer: TwistedPeer, box: dict[bytes, bytes]) -> bytes:
    result = await peer.request("serialize", box=box)
    return bytes.fromhex(result["hex"])


async def test_our_boxes_are_byte_identical_to_twisteds() -> None:
    async with twisted_server() as s:
        proto = s.proto
        # An ask with a tag.
        assert await proto.call_remote(Sum, a=13, b=81) == {"total": 94}
        sum_ask = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
        assert bytes(proto.sent) == await serialized_by_twisted(s.peer, sum_ask)
        assert bytes(proto.sent) == (
            b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum"
            b"\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00"
        )
        # An ask with every type, and one with the optional argument left out.
        mark = len(proto.sent)
        await proto.call_remote(
            EchoAll, i=-12, s="ünï ✓", b=b"\x00\xff\x00", f=-1.25e-7, flag=False, opt="o"
        )
        echo_ask = {
            b"_ask": b"2",
            b"_command": b"EchoAll",
            b"b": b"\x00\xff\x00",
            b"f": b"-1.25e-07",
            b"flag": b"False",
            b"i": b"-12",
            b"opt": b"o",
            b"s": "ünï ✓".encode(),
        }
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, echo_ask)
        mark = len(proto.sent)
        await proto.call_remote(EchoAll, i=0, s="", b=b"", f=math.nan, flag=True)
        echo_ask2 = {
            b"_ask": b"3",
            b"_command": b"EchoAll",
            b"b": b"",
            b"f": b"nan",
            b"flag": b"True",
            b"i": b"0",
            b"s": b"",
        }
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, echo_ask2)

        # An answer: Twisted calls our Sum responder (Twisted's first tag is 1).
        mark = len(proto.sent)
        assert await s.peer.call(s.conn, "Sum", a=20, b=22) == {"total": 42}
        answer = {b"_answer": b"1", b"total": b"42"}
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, answer)

        # A mapped error answer.
        mark = len(proto.sent)
        with pytest.raises(PeerError) as info:
            await s.peer.call(s.conn, "Divide", numerator=1, denominator=0)
        assert info.value.code == "ZERO_DIVISION"
        error = {
            b"_error": b"2",
            b"_error_code": b"ZERO_DIVISION",
            b"_error_description": b"division by zero",
        }
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, error)

        # The UNHANDLED answer to a command we lack.
        mark = len(proto.sent)
        with pytest.raises(PeerError) as info:
            await s.peer.request("call_raw", conn=s.conn, command="Hello", box={b"x": b"y"})
        assert info.value.code == "UNHANDLED"
        unhandled = {
            b"_error": b"3",
            b"_error_code": b"UNHANDLED",
            b"_error_description": b"Unhandled Command: b'Hello'",
        }
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, unhandled)

        # The UNKNOWN answer to a call whose argument does not decode.
        mark = len(proto.sent)
        with pytest.raises(PeerError) as info:
            await s.peer.request(
                "call_raw", conn=s.conn, command="Sum", box={b"a": b"x", b"b": b"1"}
            )
        assert info.value.code == "UNKNOWN"
        unknown = {
            b"_error": b"4",
            b"_error_code": b"UNKNOWN",
            b"_error_description": b"Unknown Error",
        }
        assert bytes(proto.sent[mark:]) == await serialized_by_twisted(s.peer, unknown)

        # And what Twisted wrote to us parses back to the boxes it serializes.
        for box in proto.received_boxes():
            assert await serialized_by_twisted(s.peer, box) in bytes(proto.received)


# Scalar encodings against Twisted's argument types, with generated values


TWISTED_NAME = {
    amp.Integer: "Integer",
    amp.Float: "Float",
    amp.Boolean: "Boolean",
    amp.String: "Unicode",
    amp.Bytes: "String",
}

VALUES: dict[type[amp.Argument[Any]], st.SearchStrategy[Any]] = {
    amp.Integer: st.one_of(
        st.integers(), st.integers(min_value=-(2**300), max_value=2**300), st.just(0)
    ),
    amp.Float: st.floats(allow_nan=True, allow_infinity=True),
    amp.Boolean: st.booleans(),
    amp.String: st.text(),
    amp.Bytes: st.binary(),
}

# Wire bytes to decode: valid encodings and arbitrary bytes, which both sides
# must accept or reject alike.
WIRE: dict[type[amp.Argument[Any]], st.SearchStrategy[bytes]] = {
    amp.Integer: st.one_of(
        st.integers().map(lambda n: b"%d" % n),
        st.from_regex(rb"\A[ +\-]?[0-9_]{1,8} ?\Z"),
        st.binary(max_size=6),
    ),
    amp.Float: st.one_of(
        st.floats().map(lambda f: repr(f).encode()),
        st.sampled_from([b"nan", b"NaN", b"inf", b"-inf", b"Infinity", b" 1.0 ", b"1e5", b"-0"]),
        st.from_regex(rb"\A[+\-]?[0-9]{0,3}\.?[0-9]{0,3}(e[+\-]?[0-9]{1,3})?\Z"),
        st.binary(max_size=6),
    ),
    amp.Boolean: st.one_of(
        st.sampled_from([b"True", b"False", b"true", b"TRUE", b"1", b"0", b"", b" True"]),
        st.binary(max_size=5),
    ),
    amp.String: st.one_of(st.text().map(str.encode), st.binary()),
    amp.Bytes: st.binary(),
}


def same(a: Any, b: Any) -> bool:
    """Equal values of the same type; floats compared by repr (nan, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    return bool(a == b)


@pytest.fixture
def codec_peer() -> Any:
    """A Twisted peer on a private event loop, shared by all examples of one test."""
    with asyncio.Runner(debug=True, loop_factory=loop_factory) as runner:
        peer = runner.run(TwistedPeer.start())
        try:
            yield runner, peer
        finally:
            runner.run(peer.stop())


CODEC_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ARGUMENT_TYPES = list(TWISTED_NAME)

FIXED_VALUES: dict[type, list[Any]] = {
    amp.Integer: [0, -1, 2**70, -(2**70), 10**4000],
    amp.Float: [math.nan, math.inf, -math.inf, -0.0, 0.1, 1e100, 5e-324, 1.7976931348623157e308],
    amp.Boolean: [True, False],
    amp.String: ["", "é", "\U0001f40d", "\x00", "a\u0300"],
    amp.Bytes: [b"", bytes(range(256)), b"\x00" * 10],
}


def check_encoding(runner: asyncio.Runner, peer: TwistedPeer, kind: type, value: Any) -> None:
    async def check() -> None:
        ours = kind().to_bytes(value)
        result = await peer.request("encode", type=TWISTED_NAME[kind], value=value)
        assert ours == bytes.fromhex(result["hex"]), (kind, value)

    runner.run(check())


def check_decoding(runner: asyncio.Runner, peer: TwistedPeer, kind: type, data: bytes) -> None:
    async def check() -> None:
        try:
            ours: Any = kind().from_bytes(data)
        except (TypeError, ValueError):
            ours = None
        try:
            theirs = await peer.request("decode", type=TWISTED_NAME[kind], hex=data.hex())
        except PeerError as exc:
            assert exc.type in {"TypeError", "ValueError", "UnicodeDecodeError"}, exc
            theirs = None
        assert (ours is None) == (theirs is None), (kind, data, ours, theirs)
        if ours is not None:
            assert same(ours, theirs), (kind, data, ours, theirs)

    runner.run(check())


@pytest.mark.parametrize("kind", ARGUMENT_TYPES, ids=lambda k: k.__name__)
def test_scalar_encoding_matches_twisted(codec_peer: Any, kind: type) -> None:
    runner, peer = codec_peer
    for fixed in FIXED_VALUES[kind]:
        check_encoding(runner, peer, kind, fixed)

    @CODEC_SETTINGS
    @given(value=VALUES[kind])
    def check(value: Any) -> None:
        check_encoding(runner, peer, kind, value)

    check()


@pytest.mark.parametrize("kind", ARGUMENT_TYPES, ids=lambda k: k.__name__)
def test_scalar_decoding_matches_twisted(codec_peer: Any, kind: type) -> None:
    runner, peer = codec_peer
    for kind_fixed in FIXED_VALUES[kind]:
        check_decoding(runner, peer, kind, kind().to_bytes(kind_fixed))

    @CODEC_SETTINGS
    @given(data=WIRE[kind])
    def check(data: bytes) -> None:
        check_decoding(runner, peer, kind, data)

    check()
