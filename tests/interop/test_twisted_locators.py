"""QuitBox, locators, unhandled_command and raw calls against a real Twisted peer, both ways.

* Twisted's ``responseType = QuitBox`` called by us, and our
  ``close_after_answer`` command called by Twisted.
* Commands that our locators and ``unhandled_command`` answer, called by a
  Twisted client, and by a Twisted server on the connection we opened.
* ``call_remote_box`` and Twisted's ``callRemoteString``, each talking to the
  same hand-written byte server: what they send, byte for byte, and what their
  callers get back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from commands import CallBack, Quit, RecordingProtocol, Slow, Sum
from peer import PeerError, TwistedPeer

import asyncio_amp as amp
from helpers import LONG, accepting_server, client, eventually, running_server

LOST_TYPES = {"ConnectionDone", "ConnectionLost"}


# QuitBox


async def test_twisted_quitbox_answers_us_then_closes() -> None:
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port) as proto:
            accepted = await peer.wait_event("accepted")
            slow = proto.call_remote(Slow, delay=LONG, value=1)
            assert await proto.call_remote(Quit) == {"bye": "bye"}
            async with asyncio.timeout(LONG):
                await proto.wait_closed()
            with pytest.raises(amp.ConnectionLostError):
                await slow
            lost = await peer.wait_event("lost", conn=accepted["conn"])
            assert lost["reason_type"] in LOST_TYPES
    finally:
        await peer.stop()


class Quitter(RecordingProtocol):
    @Quit.responder
    def quit(self) -> dict[str, Any]:
        return {"bye": "bye"}

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}


async def test_twisted_calls_our_close_after_answer_command() -> None:
    peer = await TwistedPeer.start()
    try:
        async with running_server(Quitter) as (_, port, protocols):
            conn = await peer.connect(port)
            assert await peer.call(conn, "Sum", a=1, b=2) == {"total": 3}
            assert await peer.call(conn, "Quit") == {"bye": "bye"}
            lost = await peer.wait_event("lost", conn=conn)
            assert lost["reason_type"] in LOST_TYPES
            ours = protocols[0]
            async with asyncio.timeout(LONG):
                await ours.wait_closed()
            # The answer is the box Twisted's QuitBox would have written.
            expected = await peer.request("serialize", box={b"_answer": b"2", b"bye": b"bye"})
            assert bytes(ours.sent).endswith(bytes.fromhex(expected["hex"]))
            with pytest.raises(PeerError):
                await peer.call(conn, "Sum", a=1, b=2)
    finally:
        await peer.stop()


# Locators and unhandled_command


class Arithmetic:
    @Sum.responder
    async def sum(self, a: int, b: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"total": a + b}


class Gateway(RecordingProtocol):
    """Answers Sum through a locator and other commands by name."""

    def __init__(self) -> None:
        super().__init__()
        self.locators = [Arithmetic()]
        self.seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    async def unhandled_command(self, name: bytes, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        self.seen.append((name, box))
        if name == b"Refuse":
            raise amp.RemoteAmpError("REFUSED", "not today")
        if name == b"Hello":
            return await super().unhandled_command(name, box)  # type: ignore[misc]
        return {b"name": name, **box}


async def test_a_twisted_client_calls_what_our_locators_answer() -> None:
    peer = await TwistedPeer.start()
    try:
        async with running_server(Gateway) as (_, port, protocols):
            conn = await peer.connect(port)
            assert await peer.call(conn, "Sum", a=13, b=81) == {"total": 94}
            raw = await peer.request(
                "call_raw", conn=conn, command="Anything", box={b"k": b"\xff\x00"}
            )
            # Twisted's callRemoteString gives the answer box with its _answer key.
            assert raw == {b"_answer": b"2", b"name": b"Anything", b"k": b"\xff\x00"}
            with pytest.raises(PeerError) as refused:
                await peer.request("call_raw", conn=conn, command="Refuse", box={})
            assert (refused.value.type, refused.value.code, refused.value.description) == (
                "RemoteAmpError",
                "REFUSED",
                "not today",
            )
            with pytest.raises(PeerError) as unhandled:
                await peer.call(conn, "Hello", **{"hello-name": "x"})
            assert (unhandled.value.code, unhandled.value.description) == (
                "UNHANDLED",
                "Unhandled Command: b'Hello'",
            )
            assert protocols[0].seen[0] == (b"Anything", {b"k": b"\xff\x00"})
            assert await peer.call(conn, "Sum", a=1, b=1) == {"total": 2}
    finally:
        await peer.stop()


async def test_a_twisted_server_calls_back_what_our_locators_answer() -> None:
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port, lambda: amp.AMPProtocol(locators=[Arithmetic()])) as proto:
            # Twisted's CallBack responder calls our Sum, which a locator answers.
            assert await proto.call_remote(CallBack, a=2, b=3) == {"total": 1005}
    finally:
        await peer.stop()


# call_remote_box and callRemoteString


class Recorder:
    """A hand-written AMP peer: records the bytes of three calls, then answers two."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.data = b""

    async def serve(self) -> None:
        async with asyncio.timeout(LONG):
            while True:
                self.data += await self.reader.read(65_536)
                try:
                    boxes = amp.parse_boxes(self.data)
                except amp.ProtocolError:
                    continue  # not all there yet
                if len(boxes) == 3:
                    break
        first, _, third = boxes
        self.writer.write(
            amp.encode_box({b"_answer": first[b"_ask"], b"total": b"3", b"x": b""})
            + amp.encode_box(
                {
                    b"_error": third[b"_ask"],
                    b"_error_code": b"CUSTOM",
                    b"_error_description": "caf\xe9 \u2713".encode(),
                }
            )
        )
        await self.writer.drain()


async def three_calls(
    call: Callable[[str, dict[bytes, bytes], bool], Any],
) -> tuple[bytes, list[Any]]:
    """Make three raw calls to a Recorder; return the bytes it got and the outcomes."""
    async with accepting_server(Recorder) as (port, recorders):
        calls = await call_all(call, port)
        recorder = await recorders.get()
        await recorder.serve()
        async with asyncio.timeout(LONG):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        return recorder.data, outcomes


async def call_all(call: Callable[..., Any], port: int) -> list[Any]:
    connect = call("connect", {}, port)
    await connect
    return [
        asyncio.ensure_future(call("Sum", {b"a": b"1", b"b": b"2"}, True)),
        asyncio.ensure_future(call("Notify", {b"message": b"hi \xc3\xa9"}, False)),
        asyncio.ensure_future(call("Divide", {b"numerator": b"1", b"denominator": b"0"}, True)),
    ]


@asynccontextmanager
async def twisted_caller() -> AsyncIterator[Callable[..., Any]]:
    peer = await TwistedPeer.start()
    state: dict[str, int] = {}

    async def call(command: str, box: dict[bytes, bytes], answer: Any) -> Any:
        if command == "connect":
            state["conn"] = await peer.connect(answer)
            return None
        return await peer.request(
            "call_raw", conn=state["conn"], command=command, box=box, requires_answer=answer
        )

    try:
        yield call
    finally:
        await peer.stop()


@asynccontextmanager
async def our_caller() -> AsyncIterator[Callable[..., Any]]:
    protocols: list[amp.AMPProtocol] = []

    async def call(command: str, box: dict[bytes, bytes], answer: Any) -> Any:
        if command == "connect":
            async with asyncio.timeout(LONG):
                protocols.append(await amp.connect("127.0.0.1", answer))
            return None
        return await protocols[0].call_remote_box(command, box, requires_answer=answer)

    try:
        yield call
    finally:
        for proto in protocols:
            proto.close()
            async with asyncio.timeout(LONG):
                await proto.wait_closed()


async def test_call_remote_box_sends_and_returns_what_call_remote_string_does() -> None:
    async with twisted_caller() as call:
        twisted_bytes, twisted_outcomes = await three_calls(call)
    async with our_caller() as call:
        our_bytes, our_outcomes = await three_calls(call)
    # The same bytes: keys in sorted order, tags 1 and 3 (the call without an
    # answer takes tag 2 without sending it), on both sides.
    assert our_bytes == twisted_bytes
    assert amp.parse_boxes(our_bytes)[1] == {b"_command": b"Notify", b"message": b"hi \xc3\xa9"}
    # The answer: Twisted's box also holds the _answer key, ours does not.
    twisted_answer, twisted_none, twisted_error = twisted_outcomes
    our_answer, our_none, our_error = our_outcomes
    assert twisted_answer == {b"_answer": b"1", b"total": b"3", b"x": b""}
    assert our_answer == {b"total": b"3", b"x": b""}
    assert twisted_none is None and our_none is None
    # The error: RemoteAmpError with the code and the description as text.
    assert isinstance(twisted_error, PeerError) and isinstance(our_error, amp.RemoteAmpError)
    assert (twisted_error.type, twisted_error.code, twisted_error.description) == (
        "RemoteAmpError",
        "CUSTOM",
        "caf\xe9 \u2713",
    )
    assert type(our_error) is amp.RemoteAmpError
    assert (our_error.error_code, our_error.description) == ("CUSTOM", "caf\xe9 \u2713")


async def test_raw_error_codes_map_like_twisteds() -> None:
    # UNHANDLED and UNKNOWN have their own classes on both sides.
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port) as proto:
            with pytest.raises(amp.UnhandledCommandError):
                await proto.call_remote_box("Nope")
            with pytest.raises(amp.UnknownRemoteError):
                await proto.call_remote_box("Boom")
        await eventually(lambda: any(e.get("event") == "lost" for e in peer.events), "lost")
    finally:
        await peer.stop()
