"""Self-tests of the Twisted reference peer: Twisted talking to Twisted.

These check the test harness itself (``twisted_peer.py`` driven by ``peer.py``),
so that interoperability failures can be blamed on ``asyncio_amp`` rather than
on the harness.  Each test is a plain function running its own event loop, and
every wait is bounded.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import pytest
from peer import PeerError, TwistedPeer, decode_value, encode_value, scaled

TEST_TIMEOUT = 60.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(scaled(TEST_TIMEOUT)):
            await test()

    asyncio.run(bounded())


@dataclass
class Link:
    """A connection between a listening peer and a connecting peer."""

    server: TwistedPeer
    server_conn: int
    client: TwistedPeer
    client_conn: int


@asynccontextmanager
async def started_peer() -> AsyncIterator[TwistedPeer]:
    peer = await TwistedPeer.start()
    try:
        yield peer
    finally:
        await peer.stop()


async def link(server: TwistedPeer, client: TwistedPeer) -> Link:
    port = await server.listen()
    client_conn = await client.connect(port)
    accepted = await server.wait_event("accepted")
    # Later links on the same server peer announce new conn ids; take the newest.
    accepted = [e for e in server.events if e.get("event") == "accepted"][-1]
    return Link(server, int(accepted["conn"]), client, client_conn)


@asynccontextmanager
async def two_peers() -> AsyncIterator[Link]:
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(started_peer())
        client = await stack.enter_async_context(started_peer())
        yield await link(server, client)


# ---------------------------------------------------------------------------
# JSON conventions (pure Python, no subprocess)
# ---------------------------------------------------------------------------


def test_value_conventions_round_trip() -> None:
    values = [1, -5, True, False, "héllo", b"\x00\xff", 1.5, math.inf, -math.inf, None]
    for value in values:
        encoded = encode_value(value)
        assert decode_value(encoded) == value
        assert type(decode_value(encoded)) is type(value)
    assert encode_value(b"ab") == {"$bytes": "6162"}
    assert encode_value(0.1) == {"$float": "0.1"}
    assert math.isnan(decode_value(encode_value(math.nan)))
    assert encode_value({b"k": b"v"}) == {"$box": {"6b": "76"}}
    assert decode_value({"$box": {"6b": "76"}}) == {b"k": b"v"}
    assert encode_value({"x": [b"a", 2.0]}) == {"x": [{"$bytes": "61"}, {"$float": "2.0"}]}


# ---------------------------------------------------------------------------
# Reference operations that need no connection
# ---------------------------------------------------------------------------


def test_serialize_and_argument_codecs() -> None:
    async def main() -> None:
        async with started_peer() as peer:
            box = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
            result = await peer.request("serialize", box=box)
            assert bytes.fromhex(result["hex"]) == (
                b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum"
                b"\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00"
            )
            # Twisted sorts keys when serializing.
            shuffled = {b"b": b"81", b"a": b"13", b"_command": b"Sum", b"_ask": b"1"}
            assert await peer.request("serialize", box=shuffled) == result

            async def encode(type_name: str, value: object) -> bytes:
                result = await peer.request("encode", type=type_name, value=value)
                return bytes.fromhex(result["hex"])

            async def decode(type_name: str, raw: bytes) -> object:
                return await peer.request("decode", type=type_name, hex=raw.hex())

            assert await encode("Float", math.nan) == b"nan"
            assert await encode("Float", math.inf) == b"inf"
            assert await encode("Float", -math.inf) == b"-inf"
            assert await encode("Float", 0.1) == b"0.1"
            assert await encode("Integer", -42) == b"-42"
            assert await encode("Boolean", True) == b"True"
            assert await encode("Unicode", "é") == "é".encode()
            assert await encode("String", b"\x00\x01") == b"\x00\x01"
            assert math.isnan(await decode("Float", b"nan"))  # type: ignore[arg-type]
            assert await decode("Float", b"-inf") == -math.inf
            assert await decode("Integer", b"123") == 123
            assert await decode("Boolean", b"False") is False
            assert await decode("Unicode", "é".encode()) == "é"
            assert await decode("String", b"\xff") == b"\xff"
            with pytest.raises(PeerError) as info:
                await decode("Boolean", b"yes")
            assert info.value.type == "TypeError"
            with pytest.raises(PeerError) as info:
                await decode("Integer", b"x")
            assert info.value.type == "ValueError"
            with pytest.raises(PeerError) as info:
                await peer.request("no_such_op")
            assert info.value.type == "PeerRequestError"

    run(main)


# ---------------------------------------------------------------------------
# Twisted talking to Twisted
# ---------------------------------------------------------------------------


def test_calls_between_two_peers() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn

            assert await client.call(conn, "Sum", a=13, b=81) == {"total": 94}
            assert await client.call(conn, "Sum", a=-(2**70), b=1) == {"total": 1 - 2**70}

            assert await client.call(conn, "Divide", numerator=1, denominator=4) == {"result": 0.25}
            with pytest.raises(PeerError) as info:
                await client.call(conn, "Divide", numerator=1, denominator=0)
            assert info.value.type == "ZeroDivisionError"
            assert info.value.code == "ZERO_DIVISION"
            assert info.value.description == "float division by zero"

            for f in (math.inf, -math.inf, 1e300, -0.0):
                args = {"i": 7, "s": "ünï", "b": b"\x00\xffz", "f": f, "flag": True}
                assert await client.call(conn, "EchoAll", **args) == {**args, "opt": None}
            echoed = await client.call(
                conn, "EchoAll", i=0, s="", b=b"", f=math.nan, flag=False, opt="here"
            )
            assert math.isnan(echoed.pop("f"))
            assert echoed == {"i": 0, "s": "", "b": b"", "flag": False, "opt": "here"}

            assert await client.call(conn, "Notify", message="fire and forget") is None
            # Boxes are handled in order, so once Sum is answered Notify has run.
            assert await client.call(conn, "Sum", a=1, b=2) == {"total": 3}

            assert await client.call(conn, "Hello", **{"hello-name": "bob"}) == {
                "greeting": "hello bob"
            }
            # The Python spelling of the argument name works too.
            assert await client.call(conn, "Hello", hello_name="al") == {"greeting": "hello al"}

            # The server calls Sum back on the client, then adds 1000.
            assert await client.call(conn, "CallBack", a=2, b=3) == {"total": 1005}

            received = await ln.server.request("received", conn=ln.server_conn)
            assert [r["command"] for r in received] == [
                "Sum",
                "Sum",
                "Divide",
                "Divide",
                "EchoAll",
                "EchoAll",
                "EchoAll",
                "EchoAll",
                "EchoAll",
                "Notify",
                "Sum",
                "Hello",
                "Hello",
                "CallBack",
            ]
            assert received[0]["args"] == {"a": 13, "b": 81}
            assert received[4]["args"] == {
                "i": 7,
                "s": "ünï",
                "b": b"\x00\xffz",
                "f": math.inf,
                "flag": True,
                "opt": None,
            }
            assert received[9] == {"command": "Notify", "args": {"message": "fire and forget"}}
            assert received[11]["args"] == {"hello-name": "bob"}
            assert received[13]["args"] == {"a": 2, "b": 3}
            # The call-back ran on the client side of the same connection.
            assert await client.request("received", conn=conn) == [
                {"command": "Sum", "args": {"a": 2, "b": 3}}
            ]

            # Both directions work on one connection.
            assert await ln.server.call(ln.server_conn, "Sum", a=5, b=6) == {"total": 11}

    run(main)


def test_peer_connects_to_itself() -> None:
    async def main() -> None:
        async with started_peer() as peer:
            ln = await link(peer, peer)
            assert ln.client_conn != ln.server_conn
            assert await peer.call(ln.client_conn, "Sum", a=1, b=1) == {"total": 2}
            assert await peer.call(ln.server_conn, "CallBack", a=1, b=1) == {"total": 1002}
            assert await peer.request("received", conn=ln.server_conn) == [
                {"command": "Sum", "args": {"a": 1, "b": 1}},
                {"command": "Sum", "args": {"a": 1, "b": 1}},
            ]
            assert await peer.request("received", conn=ln.client_conn) == [
                {"command": "CallBack", "args": {"a": 1, "b": 1}}
            ]

    run(main)


def test_slow_answers_come_back_out_of_order() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            slow = asyncio.ensure_future(client.call(conn, "Slow", delay=0.5, value=9))
            await asyncio.sleep(0)  # let the Slow request be written first
            fast = await client.call(conn, "Sum", a=1, b=1)
            assert fast == {"total": 2}
            assert not slow.done()
            assert await slow == {"value": 9}

    run(main)


def test_raw_calls_and_unknown_command() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            answer = await client.request(
                "call_raw", conn=conn, command="Sum", box={b"a": b"40", b"b": b"2"}
            )
            assert answer == {b"_answer": b"1", b"total": b"42"}
            with pytest.raises(PeerError) as info:
                await client.request("call_raw", conn=conn, command="Nope", box={b"x": b"y"})
            assert info.value.type == "UnhandledCommand"
            assert info.value.code == "UNHANDLED"
            with pytest.raises(PeerError) as info:
                await client.request(
                    "call_raw",
                    conn=conn,
                    command="Divide",
                    box={b"numerator": b"1", b"denominator": b"0"},
                )
            assert info.value.type == "RemoteAmpError"
            assert info.value.code == "ZERO_DIVISION"
            none = await client.request(
                "call_raw",
                conn=conn,
                command="Notify",
                box={b"message": b"raw"},
                requires_answer=False,
            )
            assert none is None
            # A hand-made box on the wire is answered like any other.
            await client.request(
                "send_raw",
                conn=conn,
                hex=(
                    b"\x00\x08_command\x00\x03Sum\x00\x01a\x00\x011\x00\x01b\x00\x012\x00\x00"
                ).hex(),
            )
            assert await client.call(conn, "Sum", a=0, b=0) == {"total": 0}
            commands = await ln.server.request("received", conn=ln.server_conn)
            assert [c["command"] for c in commands] == ["Sum", "Divide", "Notify", "Sum", "Sum"]
            assert commands[2]["args"] == {"message": "raw"}

    run(main)


def test_local_too_long_is_reported_synchronously() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            with pytest.raises(PeerError) as info:
                await client.call(conn, "EchoAll", i=1, s="s", b=b"x" * 65536, f=1.0, flag=True)
            assert info.value.type == "TooLong"
            # Nothing was sent; the connection is still usable.
            assert await client.call(conn, "Sum", a=1, b=2) == {"total": 3}
            assert not [e for e in client.events if e.get("event") == "lost"]

    run(main)


@pytest.mark.parametrize(
    ("command", "error_type", "code"),
    [
        ("Fatal", "KeyError", "FATAL_KEY"),
        ("Boom", "UnknownRemoteError", "UNKNOWN"),
    ],
)
def test_fatal_and_unknown_errors_drop_the_connection(
    command: str, error_type: str, code: str
) -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            with pytest.raises(PeerError) as info:
                await client.call(conn, command)
            assert info.value.type == error_type
            assert info.value.code == code
            if command == "Fatal":
                # Twisted sends str(KeyError("kk")), which is "'kk'".
                assert info.value.description == "'kk'"
            else:
                assert info.value.description == "Unknown Error"
                assert "secret" not in info.value.description
            await client.wait_event("lost", conn=conn)
            await ln.server.wait_event("lost", conn=ln.server_conn)
            with pytest.raises(PeerError) as info:
                await client.call(conn, "Sum", a=1, b=2)
            assert info.value.type in {"ConnectionDone", "ConnectionLost"}

    run(main)


def test_too_long_answer_drops_the_connection() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            assert await client.call(conn, "Big", size=65535) == {"data": b"x" * 65535}
            with pytest.raises(PeerError) as info:
                await client.call(conn, "Big", size=65536)
            assert info.value.type in {"ConnectionDone", "ConnectionLost"}
            await ln.server.wait_event("lost", conn=ln.server_conn)

    run(main)


def test_close_reports_lost_on_both_sides_and_fails_pending_calls() -> None:
    async def main() -> None:
        async with two_peers() as ln:
            client, conn = ln.client, ln.client_conn
            pending = asyncio.ensure_future(client.call(conn, "Slow", delay=30.0, value=1))
            await asyncio.sleep(0.2)
            await ln.server.request("close", conn=ln.server_conn)
            with pytest.raises(PeerError) as info:
                await pending
            assert info.value.type in {"ConnectionDone", "ConnectionLost"}
            lost = await client.wait_event("lost", conn=conn)
            assert lost["reason_type"] in {"ConnectionDone", "ConnectionLost"}
            server_lost = await ln.server.wait_event("lost", conn=ln.server_conn)
            assert server_lost["reason_type"] in {"ConnectionDone", "ConnectionLost"}

    run(main)


def test_peer_exits_when_stdin_closes() -> None:
    async def main() -> None:
        peer = await TwistedPeer.start()
        try:
            stdin = peer._process.stdin
            assert stdin is not None
            stdin.close()
            async with asyncio.timeout(scaled(20)):
                assert await peer._process.wait() == 0
        finally:
            await peer.stop()

    run(main)
