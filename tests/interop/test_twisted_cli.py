"""
The asyncio-amp command against Twisted: call a Twisted server, serve a Twisted
client, proxy between them, and decode bytes Twisted wrote.

The Twisted side is ``twisted_peer.py`` in a subprocess; the command runs as
``python -m asyncio_amp`` in another. ``--commands commands`` imports this
directory's ``commands.py``, our definitions of the Twisted peer's commands.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from peer import TwistedPeer, encode_box

from cli_helpers import proxied, run_cli, served
from helpers import HOST

pytestmark = pytest.mark.asyncio_loop_only

HERE = pathlib.Path(__file__).parent


async def test_call_a_twisted_server() -> None:
    async with await TwistedPeer.start() as peer:
        port = await peer.listen()
        target = f"{HOST}:{port}"

        raw = await run_cli("call", target, "Sum", "a=13", "b=81")
        assert (raw.status, raw.out, raw.err) == (0, "total: 94\n", "")
        conn = int((await peer.wait_event("accepted"))["conn"])
        assert await peer.request("received", conn=conn) == [
            {"command": "Sum", "args": {"a": 13, "b": 81}}
        ]

        typed = await run_cli(
            "call", target, "Hello", "hello-name=wörld", "--commands", "commands", "--json",
            cwd=HERE,
        )  # fmt: skip
        assert typed.status == 0, typed.err
        assert json.loads(typed.out) == {"greeting": "hello wörld"}

        mapped = await run_cli(
            "call", target, "Divide", "numerator=1", "denominator=0", "--commands", "commands",
            cwd=HERE,
        )  # fmt: skip
        assert mapped.status == 1
        assert mapped.err == (
            "asyncio-amp: error: Divide failed: ZERO_DIVISION: float division by zero\n"
        )

        unhandled = await run_cli("call", target, "Nope", "--json")
        assert unhandled.status == 1
        assert json.loads(unhandled.out) == {
            "error": {"code": "UNHANDLED", "description": "Unhandled Command: b'Nope'"}
        }

        sent = await run_cli("call", target, "Notify", "message=fire and forget", "--no-answer")
        assert (sent.status, sent.out) == (0, "")
        notify_conn = int((await peer.wait_event("accepted", conn=conn + 4))["conn"])
        await peer.wait_event("lost", conn=notify_conn)
        assert await peer.request("received", conn=notify_conn) == [
            {"command": "Notify", "args": {"message": "fire and forget"}}
        ]

        timeout = await run_cli("call", target, "Slow", "delay=30", "value=1", "--timeout", "0.3")
        assert timeout.status == 4


async def test_serve_answers_a_twisted_client() -> None:
    async with served() as (server, port), await TwistedPeer.start() as peer:
        conn = await peer.connect(port)
        assert await peer.call(conn, "Sum", a=2, b=40) == {"total": 42}
        await server.line(rf"INFO connection from {HOST}:\d+$")


async def test_proxy_between_our_call_and_a_twisted_server() -> None:
    async with await TwistedPeer.start() as peer:
        port = await peer.listen()
        async with proxied(port) as (proxy, listen):
            result = await run_cli("call", f"{HOST}:{listen}", "Sum", "a=1", "b=2")
            assert (result.status, result.out) == (0, "total: 3\n")
            failed = await run_cli(
                "call", f"{HOST}:{listen}", "Divide", "numerator=1", "denominator=0"
            )
            assert failed.status == 1
            await proxy.line(r"#2 closed", stream="out")
    text = "\n".join(proxy.out)
    assert re.search(r"#1 C->S call Sum tag=1 a=1 b=2", text)
    assert re.search(r"#1 S->C answer tag=1 Sum \d+\.\d{3} ms total=3", text)
    assert re.search(
        r"#2 S->C error tag=1 Divide \d+\.\d{3} ms ZERO_DIVISION: float division by zero", text
    )


async def test_proxy_between_a_twisted_client_and_our_server() -> None:
    async with (
        served() as (_, port),
        proxied(port) as (proxy, listen),
        await TwistedPeer.start() as peer,
    ):
        conn = await peer.connect(listen)
        assert await peer.call(conn, "Sum", a=5, b=6) == {"total": 11}
        assert await peer.call(conn, "Sum", a=7, b=8) == {"total": 15}
        await proxy.line(r"S->C answer tag=2 Sum", stream="out")
    text = "\n".join(proxy.out)
    # Twisted's tags, seen on the wire: a hex counter from 1.
    assert re.search(r"#1 C->S call Sum tag=1 a=5 b=6", text)
    assert re.search(r"#1 S->C answer tag=1 Sum \d+\.\d{3} ms total=11", text)
    assert re.search(r"#1 C->S call Sum tag=2 a=7 b=8", text)


async def test_decode_bytes_that_twisted_wrote() -> None:
    async with await TwistedPeer.start() as peer:
        first = await peer.request(
            "serialize",
            box=encode_box({b"_ask": b"a", b"_command": b"Sum", b"a": b"1", b"b": b"2"}),
        )
        second = await peer.request(
            "serialize",
            box=encode_box({b"_error": b"a", b"_error_code": b"X", b"_error_description": b"why"}),
        )
    stream = bytes.fromhex(first["hex"] + second["hex"])
    result = await run_cli("decode", stdin=stream)
    assert result.status == 0, result.err
    assert result.out == (
        "box 1 at byte 0 (38 bytes): call Sum, tag a\n"
        "  _ask: a\n  _command: Sum\n  a: 1\n  b: 2\n"
        "\n"
        f"box 2 at byte 38 ({len(stream) - 38} bytes): error, tag a: X: why\n"
        "  _error: a\n  _error_code: X\n  _error_description: why\n"
    )
    as_hex = await run_cli("decode", "--hex", stdin=(first["hex"] + second["hex"]).encode())
    assert as_hex.out == result.out
