"""AMPProtocol over real sockets on 127.0.0.1: calls, answers, errors, faults."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp import encode_box
from helpers import (
    HOST,
    LONG,
    SHORT,
    TIME,
    accepted,
    accepting_server,
    client,
    eventually,
    port_of,
    raw_connection,
    running_server,
)

# Commands


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class BaseError(Exception):
    pass


class SpecificError(BaseError):
    pass


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Checked(amp.Command):
    """Inherits Divide's errors and adds its own."""

    arguments = [("value", amp.Integer())]
    errors = {BaseError: b"BASE"}


class CheckedChild(Checked):
    errors = {KeyError: "KEY"}
    fatal_errors = {PermissionError: "DENIED"}


class Boom(amp.Command):
    pass


class Slow(amp.Command):
    arguments = [("delay", amp.Float()), ("value", amp.Integer())]
    response = [("value", amp.Integer())]


class Note(amp.Command):
    arguments = [("text", amp.String())]
    requires_answer = False


class Big(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.Bytes())]


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("data", amp.Bytes())]


class Nope(amp.Command):
    """No server implements it."""


class Ping(amp.Command):
    """The server calls the client with this."""

    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class PingBack(amp.Command):
    """The client asks the server to ping it back, from inside the responder."""

    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Server(amp.AMPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []
        self.noted = asyncio.Event()

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Divide.responder
    async def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        return {"result": numerator / denominator}

    @CheckedChild.responder
    def checked(self, value: int) -> dict[str, Any]:
        errors: dict[int, Exception] = {
            1: SpecificError("specific"),
            2: KeyError("kk"),
            3: PermissionError("no way"),
            4: ValueError("secret internal detail"),
        }
        if value in errors:
            raise errors[value]
        return {}

    @Boom.responder
    def boom(self) -> None:
        raise RuntimeError("secret internal detail")

    @Slow.responder
    async def slow(self, delay: float, value: int) -> dict[str, int]:
        await asyncio.sleep(delay)
        return {"value": value}

    @Note.responder
    def note(self, text: str) -> None:
        self.notes.append(text)
        self.noted.set()

    @Big.responder
    def big(self, size: int) -> dict[str, bytes]:
        return {"data": b"x" * size}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @PingBack.responder
    async def ping_back(self, n: int) -> dict[str, int]:
        answer = await self.call_remote(Ping, n=n + 1)
        return {"n": answer["n"] + 1}


class PingClient(amp.AMPProtocol):
    @Ping.responder
    def ping(self, n: int) -> dict[str, int]:
        return {"n": n * 10}


# A raw AMP peer on 127.0.0.1, for checking bytes and sending bad ones


class RawPeer:
    """One accepted connection on a plain asyncio server: read boxes, write bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = amp.BoxDecoder()
        self.boxes: list[amp.Box] = []
        self.raw = bytearray()

    async def read_box(self) -> amp.Box:
        async with asyncio.timeout(LONG):
            while not self.boxes:
                data = await self.reader.read(65536)
                assert data, "the connection closed before a box came"
                self.raw += data
                self.boxes += self.decoder.receive_data(data)
        return self.boxes.pop(0)

    def send(self, box: dict[bytes, bytes]) -> None:
        self.writer.write(encode_box(box))

    async def closed_by_peer(self) -> bool:
        async with asyncio.timeout(LONG):
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return True


def raw_server() -> contextlib.AbstractAsyncContextManager[tuple[int, asyncio.Queue[RawPeer]]]:
    """A plain asyncio server on 127.0.0.1 whose connections are RawPeer objects."""
    return accepting_server(RawPeer)


async def read_boxes(reader: asyncio.StreamReader, count: int) -> list[amp.Box]:
    decoder = amp.BoxDecoder()
    boxes: list[amp.Box] = []
    async with asyncio.timeout(LONG):
        while len(boxes) < count:
            data = await reader.read(65536)
            assert data, f"closed after {len(boxes)} of {count} boxes"
            boxes += decoder.receive_data(data)
    return boxes


# Calls and answers


async def test_call_with_plain_asyncio() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, HOST, 0)
    transport, proto = await loop.create_connection(amp.AMPProtocol, HOST, port_of(server))
    try:
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert await proto.call_remote(Sum(a=40, b=2)) == {"total": 42}
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


async def test_call_remote_argument_mistakes_raise_at_once() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(TypeError, match="'c' is not an argument name"):
            proto.call_remote(Sum, a=1, b=2, c=3)
        with pytest.raises(TypeError, match="'b' is missing"):
            proto.call_remote(Sum, a=1)
        with pytest.raises(TypeError, match="Sum: argument 'a': expected an int"):
            proto.call_remote(Sum, a="1", b=2)
        with pytest.raises(TypeError, match="not both"):
            proto.call_remote(Sum(a=1, b=2), a=1)
        with pytest.raises(TypeError, match="needs a Command"):
            proto.call_remote("Sum")  # type: ignore[arg-type]
        assert await proto.call_remote(Sum, a=2, b=2) == {"total": 4}


async def test_tags_are_a_hex_counter_and_keys_are_sorted() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=0) for i in range(17)]
        peer = await accepted(peers)
        boxes = [await peer.read_box() for _ in range(17)]
        assert [box[b"_ask"] for box in boxes] == [b"%x" % n for n in range(1, 18)]
        assert peer.raw.startswith(
            b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum\x00\x01a\x00\x010\x00\x01b\x00\x010\x00\x00"
        )
        # Answers in reverse order are matched by tag.
        for box in reversed(boxes):
            peer.send({b"_answer": box[b"_ask"], b"total": box[b"a"]})
        async with asyncio.timeout(LONG):
            results = await asyncio.gather(*calls)
        assert [r["total"] for r in results] == list(range(17))


async def test_peer_tags_are_echoed_as_opaque_bytes() -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        for tag in (b"zz-top", b"\xff\x00", b"0"):
            writer.write(encode_box({b"_ask": tag, b"_command": b"Sum", b"a": b"1", b"b": b"1"}))
        boxes = await read_boxes(reader, 3)
        assert [box[b"_answer"] for box in boxes] == [b"zz-top", b"\xff\x00", b"0"]
        assert all(box[b"total"] == b"2" for box in boxes)


async def test_keys_in_any_order_are_accepted() -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        # Hand-written box with the keys in reverse order.
        writer.write(
            b"\x00\x01b\x00\x012\x00\x01a\x00\x013\x00\x08_command\x00\x03Sum\x00\x04_ask\x00\x01x\x00\x00"
        )
        [box] = await read_boxes(reader, 1)
        assert box == {b"_answer": b"x", b"total": b"5"}


# Errors across the wire


async def test_mapped_error_reaches_the_caller_and_keeps_the_connection() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(ZeroDivisionError, match="division by zero"):
            await proto.call_remote(Divide, numerator=1, denominator=0)
        assert await proto.call_remote(Divide, numerator=1, denominator=4) == {"result": 0.25}


async def test_error_box_bytes() -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        writer.write(
            encode_box(
                {b"_ask": b"7", b"_command": b"Divide", b"numerator": b"1", b"denominator": b"0"}
            )
        )
        expected = (
            b"\x00\x06_error\x00\x017\x00\x0b_error_code\x00\x0dZERO_DIVISION"
            b"\x00\x12_error_description\x00\x10division by zero\x00\x00"
        )
        async with asyncio.timeout(LONG):
            data = await reader.readexactly(len(expected))
        assert data == expected


async def test_errors_are_inherited_and_subclasses_match() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        # SpecificError is mapped through its base class, declared on the parent command.
        with pytest.raises(BaseError, match="specific"):
            await proto.call_remote(CheckedChild, value=1)
        with pytest.raises(KeyError, match="kk"):
            await proto.call_remote(CheckedChild, value=2)
        assert await proto.call_remote(CheckedChild, value=0) == {}


async def test_fatal_error_is_sent_then_the_connection_closes() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        slow = proto.call_remote(Slow, delay=LONG, value=1)
        with pytest.raises(PermissionError, match="no way"):
            await proto.call_remote(CheckedChild, value=3)
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        with pytest.raises(amp.ConnectionLostError):
            await slow
        with pytest.raises(amp.ConnectionLostError, match="cannot call Sum"):
            proto.call_remote(Sum, a=1, b=1)


async def test_unexpected_exception_is_unknown_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(amp.UnknownRemoteError) as info:
            await proto.call_remote(Boom)
        assert info.value.error_code == "UNKNOWN"
        assert info.value.description == "Unknown Error"
        assert "secret" not in str(info.value)
        # Unlike Twisted, the connection stays open.
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
        # An exception mapped on no command is UNKNOWN too.
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(CheckedChild, value=4)
    records = [r for r in caplog.records if "Boom" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert "secret internal detail" in str(records[0].exc_info[1])


@pytest.mark.parametrize(
    "box",
    [
        {b"_ask": b"1", b"_command": b"Sum", b"a": b"x", b"b": b"1"},  # undecodable
        {b"_ask": b"1", b"_command": b"Sum", b"a": b"1"},  # missing argument
    ],
    ids=["undecodable", "missing"],
)
async def test_bad_arguments_are_answered_unknown(box: dict[bytes, bytes]) -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        writer.write(encode_box(box))
        writer.write(encode_box({b"_ask": b"2", b"_command": b"Sum", b"a": b"1", b"b": b"1"}))
        first, second = await read_boxes(reader, 2)
        assert first == {
            b"_error": b"1",
            b"_error_code": b"UNKNOWN",
            b"_error_description": b"Unknown Error",
        }
        assert second == {b"_answer": b"2", b"total": b"2"}


async def test_unknown_extra_keys_are_ignored() -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        box = {b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"1", b"zzz": b"?"}
        writer.write(encode_box(box))
        assert await read_boxes(reader, 1) == [{b"_answer": b"1", b"total": b"2"}]


async def test_unknown_command_is_unhandled() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(amp.UnhandledCommandError) as info:
            await proto.call_remote(Nope)
        assert info.value.error_code == "UNHANDLED"
        assert info.value.description == "Unhandled Command: b'Nope'"
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_unmapped_remote_code_is_unknown_remote_error_with_the_code() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        call = proto.call_remote(Sum, a=1, b=1)
        peer = await accepted(peers)
        box = await peer.read_box()
        peer.send(
            {b"_error": box[b"_ask"], b"_error_code": b"WEIRD", b"_error_description": b"\xff!"}
        )
        with pytest.raises(amp.UnknownRemoteError) as info:
            await call
        assert info.value.error_code == "WEIRD"
        assert info.value.description == "\ufffd!"


# requires_answer = False


async def test_no_answer_call_sends_no_ask_and_completes_at_once() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        done = proto.call_remote(Note, text="hi")
        assert done.done()
        assert await done is None
        second = proto.call_remote(Sum, a=1, b=1)
        peer = await accepted(peers)
        assert await peer.read_box() == {b"_command": b"Note", b"text": b"hi"}
        # As in Twisted, the no-answer call used up tag 1.
        assert (await peer.read_box())[b"_ask"] == b"2"
        peer.send({b"_answer": b"2", b"total": b"2"})
        assert await second == {"total": 2}


async def test_no_answer_responder_runs_and_nothing_is_answered() -> None:
    async with (
        running_server(Server) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(encode_box({b"_command": b"Note", b"text": b"hello"}))
        writer.write(encode_box({b"_command": b"Boom"}))  # fails: logged, not answered
        writer.write(encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"1"}))
        assert await read_boxes(reader, 1) == [{b"_answer": b"1", b"total": b"2"}]
        server = protocols[0]
        assert isinstance(server, Server)
        assert server.notes == ["hello"]


# Limits


async def test_too_long_value_raises_before_a_tag_is_taken() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        with pytest.raises(amp.TooLongError) as info:
            proto.call_remote(Echo, data=b"x" * 65_536)
        assert info.value.key == b"data"
        assert "65536" in str(info.value)
        assert isinstance(info.value, ValueError)
        call = proto.call_remote(Echo, data=b"y" * 65_535)
        peer = await accepted(peers)
        box = await peer.read_box()
        assert box[b"_ask"] == b"1"  # no tag was used by the refused call
        peer.send({b"_answer": b"1", b"data": box[b"data"]})
        assert await call == {"data": b"y" * 65_535}


async def test_too_long_answer_is_unknown_and_the_connection_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Big, size=65_536)
        assert await proto.call_remote(Big, size=65_535) == {"data": b"x" * 65_535}
    assert any("cannot be sent" in r.getMessage() for r in caplog.records)


async def test_answers_that_the_fast_path_does_not_take_go_the_general_way() -> None:
    # In one read: an answer that does not decode, one with an extra key and its
    # keys out of order, and a usual one.
    async with raw_server() as (port, peers), client(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=i) for i in range(3)]
        peer = await accepted(peers)
        tags = [(await peer.read_box())[b"_ask"] for _ in calls]
        peer.writer.write(
            encode_box({b"_answer": tags[0], b"total": b"not a number"})
            + b"\x00\x05total\x00\x012\x00\x01Z\x00\x00\x00\x07_answer\x00"
            + len(tags[1]).to_bytes(1, "big")
            + tags[1]
            + b"\x00\x00"
            + encode_box({b"_answer": tags[2], b"total": b"4"})
        )
        with pytest.raises(amp.ProtocolError, match="answer to Sum is invalid"):
            await calls[0]
        assert await calls[1] == {"total": 2}
        assert await calls[2] == {"total": 4}
        assert not proto.closed


# Connection loss


async def test_pending_calls_fail_when_the_connection_is_lost() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=i) for i in range(3)]
        peer = await accepted(peers)
        await peer.read_box()
        peer.writer.close()
        for call in calls:
            with pytest.raises(amp.ConnectionLostError, match="before Sum was answered"):
                async with asyncio.timeout(LONG):
                    await call
        with pytest.raises(amp.ConnectionLostError):
            proto.call_remote(Sum, a=1, b=1)
        assert proto.closed


async def test_close_inside_a_box_loses_nothing_received_before() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        first = proto.call_remote(Sum, a=1, b=1)
        second = proto.call_remote(Sum, a=2, b=2)
        peer = await accepted(peers)
        await peer.read_box()
        await peer.read_box()
        answer = encode_box({b"_answer": b"2", b"total": b"4"})
        peer.writer.write(encode_box({b"_answer": b"1", b"total": b"2"}) + answer[:9])
        await peer.writer.drain()
        peer.writer.close()
        async with asyncio.timeout(LONG):
            assert await first == {"total": 2}
        with pytest.raises(amp.ConnectionLostError) as info:
            async with asyncio.timeout(LONG):
                await second
        assert isinstance(info.value.__cause__, amp.ProtocolError)
        assert "inside a box" in str(info.value.__cause__)


async def test_call_before_connection_is_refused() -> None:
    with pytest.raises(amp.ConnectionLostError, match="not connected"):
        amp.AMPProtocol().call_remote(Sum, a=1, b=1)


# Cancellation


async def test_cancelled_call_forgets_its_tag_and_drops_the_late_answer() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(SHORT):
                await proto.call_remote(Sum, a=1, b=1)
        task = asyncio.ensure_future(proto.call_remote(Sum, a=2, b=2))
        peer = await accepted(peers)
        first, second = await peer.read_box(), await peer.read_box()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Late answers for both cancelled calls: dropped, the connection stays.
        peer.send({b"_answer": first[b"_ask"], b"total": b"2"})
        peer.send({b"_error": second[b"_ask"], b"_error_code": b"X", b"_error_description": b""})
        third = proto.call_remote(Sum, a=3, b=3)
        box = await peer.read_box()
        assert [first[b"_ask"], second[b"_ask"], box[b"_ask"]] == [b"1", b"2", b"3"]
        peer.send({b"_answer": b"3", b"total": b"6"})
        assert await third == {"total": 6}
        assert not proto.closed


async def test_wait_for_and_gather_cancel_calls() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proto.call_remote(Slow, delay=LONG, value=1), SHORT)
        slow = asyncio.gather(proto.call_remote(Slow, delay=LONG, value=2))
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        # Both cancelled calls are forgotten: no future waits for their answers.
        assert all(sent[1].cancelled() for sent in proto._pending.values())


# Both directions and concurrency


async def test_server_calls_the_client_from_inside_a_responder() -> None:
    async with running_server(Server) as (_, port, _), client(port, PingClient) as proto:
        # client -> PingBack(1) -> server -> Ping(2) -> client answers 20 -> server answers 21
        assert await proto.call_remote(PingBack, n=1) == {"n": 21}


async def test_both_sides_call_at_once() -> None:
    class BothServer(Server):
        @Ping.responder
        def ping(self, n: int) -> dict[str, int]:
            return {"n": -n}

    async with (
        running_server(BothServer) as (_, port, protocols),
        client(port, PingClient) as proto,
    ):
        server_side = protocols[0]
        from_client = [proto.call_remote(Ping, n=i) for i in range(50)]
        from_server = [server_side.call_remote(Ping, n=i) for i in range(50)]
        async with asyncio.timeout(LONG):
            results = await asyncio.gather(*from_client, *from_server)
        assert results == [{"n": -i} for i in range(50)] + [{"n": i * 10} for i in range(50)]


async def test_slow_responder_does_not_hold_up_others() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        slow = asyncio.ensure_future(proto.call_remote(Slow, delay=LONG / 2, value=1))
        fast = await proto.call_remote(Slow, delay=0, value=2)
        assert fast == {"value": 2}
        assert not slow.done()
        slow.cancel()


async def test_thousands_of_concurrent_calls() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        calls = [proto.call_remote(Sum, a=i, b=1) for i in range(5000)]
        calls += [proto.call_remote(Slow, delay=0, value=i) for i in range(1000)]
        async with asyncio.timeout(LONG):
            results = await asyncio.gather(*calls)
        assert [r["total"] for r in results[:5000]] == [i + 1 for i in range(5000)]
        assert [r["value"] for r in results[5000:]] == list(range(1000))


async def test_responders_are_cancelled_when_the_connection_closes() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    class Hanging(amp.AMPProtocol):
        @Slow.responder
        async def slow(self, delay: float, value: int) -> dict[str, int]:
            started.set()
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {"value": value}

    async with running_server(Hanging) as (_, port, _), client(port) as proto:
        call = proto.call_remote(Slow, delay=LONG, value=1)
        async with asyncio.timeout(LONG):
            await started.wait()
        proto.close()
        async with asyncio.timeout(LONG):
            await cancelled.wait()
        with pytest.raises(amp.ConnectionLostError):
            await call


# Bad input from the peer


BAD_INPUT = {
    "key-too-long": b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00",
    "http-request": b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    "empty-box": b"\x00\x00",
    "no-kind": encode_box({b"hello": b"world"}),
    "unknown-answer-tag": encode_box({b"_answer": b"999", b"total": b"1"}),
    "unknown-error-tag": encode_box(
        {b"_error": b"999", b"_error_code": b"X", b"_error_description": b""}
    ),
    "error-without-code": encode_box({b"_error": b"1", b"_error_description": b"oops"}),
    "error-without-description": encode_box({b"_error": b"1", b"_error_code": b"X"}),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
async def test_bad_input_closes_only_that_connection(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio_amp")
    async with (
        running_server(Server) as (_, port, _),
        client(port) as bystander,
        raw_server() as (raw_port, peers),
        client(raw_port) as victim,
    ):
        calls = [victim.call_remote(Sum, a=i, b=i) for i in range(3)]
        peer = await accepted(peers)
        await peer.read_box()
        peer.writer.write(BAD_INPUT[name])
        for call in calls:
            with pytest.raises(amp.ConnectionLostError) as info:
                async with asyncio.timeout(LONG):
                    await call
            assert isinstance(info.value.__cause__, amp.ProtocolError)
        assert await peer.closed_by_peer()
        async with asyncio.timeout(LONG):
            await victim.wait_closed()
        # The bystander is not disturbed, and the server still takes new clients.
        assert await bystander.call_remote(Sum, a=1, b=1) == {"total": 2}
        async with client(port) as newcomer:
            assert await newcomer.call_remote(Sum, a=2, b=2) == {"total": 4}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"{HOST}:{raw_port}" in message
    assert "closing the connection" in message


async def test_garbage_sent_to_a_server_closes_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio_amp")
    async with (
        running_server(Server) as (_, port, _),
        client(port) as bystander,
        raw_connection(port) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(LONG):
            assert await reader.read() == b""
        assert await bystander.call_remote(Sum, a=1, b=1) == {"total": 2}
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "18245" in record.getMessage()
    assert "not AMP" in record.getMessage()


async def test_boxes_before_bad_input_are_handled() -> None:
    async with running_server(Server) as (_, port, _), raw_connection(port) as (reader, writer):
        good = encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"1"})
        writer.write(good + b"\x00\x00")
        async with asyncio.timeout(LONG):
            data = await reader.read()
        assert amp.parse_boxes(data) == [{b"_answer": b"1", b"total": b"2"}]


# Logging


async def test_traffic_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    assert logging.getLogger("asyncio_amp").handlers == []
    caplog.set_level(logging.INFO, logger="asyncio_amp")
    async with running_server(Server) as (_, port, _), client(port) as proto:
        await proto.call_remote(Sum, a=1, b=1)
    assert not [r for r in caplog.records if r.name == "asyncio_amp"]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="asyncio_amp")
    async with running_server(Server) as (_, port, _), client(port) as proto:
        await proto.call_remote(Sum, a=1, b=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio_amp"]
    # Both directions are logged the same way: each box as its dict.
    sent = [m for m in messages if m.startswith("> ")]
    received = [m for m in messages if m.startswith("< ")]
    assert any(
        m.endswith("{b'_ask': b'1', b'_command': b'Sum', b'a': b'1', b'b': b'1'}") for m in sent
    )
    assert any(
        m.endswith("{b'_ask': b'1', b'_command': b'Sum', b'a': b'1', b'b': b'1'}") for m in received
    )
    assert any(m.endswith("{b'_answer': b'1', b'total': b'2'}") for m in sent)
    assert any(m.endswith("{b'_answer': b'1', b'total': b'2'}") for m in received)


async def test_repr_and_context_manager() -> None:
    async with running_server(Server) as (_, port, _):
        async with await amp.connect(HOST, port) as proto:
            assert "open" in repr(proto)
            assert proto.peer == f"{HOST}:{port}"
        assert proto.closed
        assert "closed" in repr(proto)


# call_remote_box: calls by name with wire values


async def test_call_remote_box_sends_wire_values_and_returns_the_answer_box() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        answer = await proto.call_remote_box("Sum", {"a": "13", b"b": b"81"})
        assert answer == {b"total": b"94"}
        # A typed call on the same connection still works; tags keep counting.
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert await proto.call_remote_box(b"Sum", {"a": "-5", "b": "5"}) == {b"total": b"0"}


async def test_call_remote_box_bytes_on_the_wire() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        peer = await accepted(peers)
        call = proto.call_remote_box("Hello", {"zz": "é", "Aa": b"\x00\xff"})
        box = await peer.read_box()
        # Keys sorted, str sent as UTF-8, a tag from the same counter as call_remote.
        assert list(box) == [b"Aa", b"_ask", b"_command", b"zz"]
        assert box == {
            b"Aa": b"\x00\xff",
            b"_ask": b"1",
            b"_command": b"Hello",
            b"zz": "é".encode(),
        }
        peer.writer.write(encode_box({b"_answer": b"1", b"x": b"\x01"}))
        async with asyncio.timeout(LONG):
            assert await call == {b"x": b"\x01"}


async def test_call_remote_box_without_answer_sends_no_ask() -> None:
    async with running_server(Server) as (_, port, protocols), client(port) as proto:
        result = proto.call_remote_box("Note", {"text": "hi"}, requires_answer=False)
        assert result.done() and result.result() is None
        async with asyncio.timeout(LONG):
            await protocols[0].noted.wait()
        assert protocols[0].notes == ["hi"]
        # The skipped tag is not reused: the next call still gets an answer.
        assert await proto.call_remote_box("Sum", {"a": "1", "b": "1"}) == {b"total": b"2"}


async def test_call_remote_box_error_answers() -> None:
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(amp.UnhandledCommandError) as unhandled:
            await proto.call_remote_box("Nope")
        assert unhandled.value.error_code == "UNHANDLED"
        assert unhandled.value.command == "Nope"
        with pytest.raises(amp.RemoteAmpError) as mapped:
            await proto.call_remote_box("Divide", {"numerator": "1", "denominator": "0"})
        # The code is known to the server's command, not to a raw call: the base class.
        assert type(mapped.value) is amp.RemoteAmpError
        assert (mapped.value.error_code, mapped.value.command) == ("ZERO_DIVISION", "Divide")
        with pytest.raises(amp.UnknownRemoteError) as unknown:
            await proto.call_remote_box("Boom")
        assert unknown.value.error_code == "UNKNOWN"
        # A bad wire value is the server's problem to report: its responder never runs.
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote_box("Sum", {"a": "one", "b": "2"})
        assert await proto.call_remote_box("Sum", {"a": "2", "b": "2"}) == {b"total": b"4"}


async def test_call_remote_box_mistakes_raise_before_sending() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        peer = await accepted(peers)
        with pytest.raises(ValueError, match="reserved"):
            proto.call_remote_box("Sum", {"_ask": "1"})
        with pytest.raises(ValueError, match="twice"):
            proto.call_remote_box("Sum", {"a": "1", b"a": "2"})
        with pytest.raises(ValueError, match="empty"):
            proto.call_remote_box("")
        with pytest.raises(ValueError, match="empty"):
            proto.call_remote_box("Sum", {"": "1"})
        with pytest.raises(TypeError, match="int"):
            proto.call_remote_box("Sum", {"a": 1})  # type: ignore[dict-item]
        with pytest.raises(amp.TooLongError):
            proto.call_remote_box("Sum", {"a": "x" * 65_536})
        with pytest.raises(amp.TooLongError):
            proto.call_remote_box("Sum", {"k" * 256: "1"})
        # Nothing was sent and no tag was taken.
        call = proto.call_remote_box("Sum", {"a": "1"})
        box = await peer.read_box()
        assert box[b"_ask"] == b"1"
        call.cancel()


async def test_call_remote_box_fails_when_the_connection_is_lost() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        peer = await accepted(peers)
        call = proto.call_remote_box("Wait")
        await peer.read_box()
        peer.writer.close()
        with pytest.raises(amp.ConnectionLostError, match="before Wait was answered"):
            async with asyncio.timeout(LONG):
                await call
        with pytest.raises(amp.ConnectionLostError, match="cannot call Wait"):
            proto.call_remote_box("Wait")


# Calls and answers decoded straight from the bytes (the connection's parsers)


class Gate(amp.Command):
    """Its responder waits until the test opens the gate."""

    arguments = [("value", amp.Integer())]
    response = [("value", amp.Integer())]


class GateServer(Server):
    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.open = asyncio.Event()

    @Gate.responder
    async def gate(self, value: int) -> dict[str, int]:
        self.entered.set()
        await self.open.wait()
        return {"value": value}


def sum_call(tag: bytes, a: int, b: int) -> bytes:
    return encode_box({b"_ask": tag, b"_command": b"Sum", b"a": b"%d" % a, b"b": b"%d" % b})


async def only_protocol(protocols: list[amp.AMPProtocol]) -> amp.AMPProtocol:
    await eventually(lambda: bool(protocols), "the connection is accepted")
    [protocol] = protocols
    return protocol


@pytest.mark.parametrize("max_responders", [1, 2])
async def test_pipelined_calls_over_max_responders_are_all_answered(max_responders: int) -> None:
    # In one write: plain calls decoded by the connection, calls to a coroutine
    # responder, a call the parser refuses (an extra key), and a call with no answer.
    calls = [sum_call(b"s%d" % i, i, i) for i in range(40)]
    calls[10] = encode_box(
        {b"_ask": b"d10", b"_command": b"Divide", b"numerator": b"1", b"denominator": b"4"}
    )
    calls[11] = encode_box(
        {b"_ask": b"x11", b"_command": b"Sum", b"a": b"1", b"b": b"1", b"c": b""}
    )
    calls[20] = encode_box({b"_command": b"Note", b"text": b"hi"})
    calls[30] = encode_box(
        {b"_ask": b"d30", b"_command": b"Divide", b"numerator": b"1", b"denominator": b"0"}
    )
    async with (
        running_server(Server, max_responders=max_responders) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(b"".join(calls))
        boxes = await read_boxes(reader, 39)
        server_side = await only_protocol(protocols)
        assert b"Sum" in server_side._conn.ask_parsers
        assert server_side._conn.decode_values
        assert isinstance(server_side, Server)
        assert server_side.notes == ["hi"]
        assert not server_side.closed
    tags = [box.get(b"_answer") or box[b"_error"] for box in boxes]
    expected = [b"s%d" % i for i in range(40)]
    expected[10:12] = [b"d10", b"x11"]
    expected[30] = b"d30"
    del expected[20]
    if max_responders == 1:
        # One responder at a time: the answers come in the order of the calls.
        assert tags == expected
    else:
        assert sorted(tags) == sorted(expected)
        assert [tag for tag in tags if tag.startswith(b"s")] == [
            tag for tag in expected if tag.startswith(b"s")
        ]
    by_tag = {tag: box for tag, box in zip(tags, boxes, strict=True)}
    for i in range(40):
        if i not in (10, 11, 20, 30):
            assert by_tag[b"s%d" % i] == {b"_answer": b"s%d" % i, b"total": b"%d" % (2 * i)}
    assert by_tag[b"d10"] == {b"_answer": b"d10", b"result": b"0.25"}
    assert by_tag[b"x11"] == {b"_answer": b"x11", b"total": b"2"}
    assert by_tag[b"d30"][b"_error_code"] == b"ZERO_DIVISION"


async def test_calls_during_shutdown_are_answered_shutdown() -> None:
    async with (
        running_server(GateServer) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(encode_box({b"_ask": b"g", b"_command": b"Gate", b"value": b"5"}))
        server_side = await only_protocol(protocols)
        assert isinstance(server_side, GateServer)
        async with asyncio.timeout(LONG):
            await server_side.entered.wait()
        shutdown = asyncio.create_task(server_side.shutdown(grace=LONG))
        await asyncio.sleep(0)  # shutdown() starts
        writer.write(sum_call(b"1", 1, 1) + sum_call(b"2", 2, 2))
        # Answered at once, while the responder still runs.
        assert await read_boxes(reader, 2) == [
            {
                b"_error": tag,
                b"_error_code": b"SHUTDOWN",
                b"_error_description": b"the peer is shutting down",
            }
            for tag in (b"1", b"2")
        ]
        server_side.open.set()
        assert await read_boxes(reader, 1) == [{b"_answer": b"g", b"value": b"5"}]
        async with asyncio.timeout(LONG):
            await shutdown
            assert await reader.read() == b""


async def test_calls_held_over_max_responders_are_answered_shutdown_after_it() -> None:
    # Read with the call that takes the only responder: held, and still waiting
    # when the server starts shutting down.
    async with (
        running_server(GateServer, max_responders=1) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(
            encode_box({b"_ask": b"g", b"_command": b"Gate", b"value": b"5"})
            + sum_call(b"1", 1, 1)
            + sum_call(b"2", 2, 2)
        )
        server_side = await only_protocol(protocols)
        assert isinstance(server_side, GateServer)
        async with asyncio.timeout(LONG):
            await server_side.entered.wait()
        await eventually(lambda: len(server_side._flow.deferred) == 2, "both calls are held")
        # Held as the connection decoded them.
        assert all(type(call) is tuple for call in server_side._flow.deferred)
        shutdown = asyncio.create_task(server_side.shutdown(grace=LONG))
        await asyncio.sleep(0)  # shutdown() starts
        server_side.open.set()
        # The held calls are refused as the shutdown starts; the running one answers.
        boxes = await read_boxes(reader, 3)
        assert sorted(boxes, key=lambda box: box.get(b"_answer", box.get(b"_error"))) == [
            *(
                {
                    b"_error": tag,
                    b"_error_code": b"SHUTDOWN",
                    b"_error_description": b"the peer is shutting down",
                }
                for tag in (b"1", b"2")
            ),
            {b"_answer": b"g", b"value": b"5"},
        ]
        async with asyncio.timeout(LONG):
            await shutdown
            assert await reader.read() == b""


async def test_debug_logs_every_box_as_received(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio_amp")
    async with (
        running_server(Server, max_responders=1) as (_, port, protocols),
        client(port) as proto,
    ):
        calls = [proto.call_remote(Sum, a=i, b=1) for i in range(3)]
        async with asyncio.timeout(LONG):
            assert await asyncio.gather(*calls) == [{"total": i + 1} for i in range(3)]
        server_side = await only_protocol(protocols)
        assert not server_side._conn.decode_values
        assert not proto._conn.decode_values
        client_peer = server_side.peer
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio_amp"]
    for i in range(3):
        tag = b"%d" % (i + 1)
        ask = {b"_ask": tag, b"_command": b"Sum", b"a": b"%d" % i, b"b": b"1"}
        assert f"< {client_peer} {ask!r}" in messages
        answer = {b"_answer": tag, b"total": b"%d" % (i + 1)}
        assert f"< {HOST}:{port} {answer!r}" in messages


async def test_answer_that_does_not_decode_fails_its_call_and_keeps_the_connection() -> None:
    async with raw_server() as (port, peers), client(port) as proto:
        call = proto.call_remote(Sum, a=1, b=2)
        peer = await accepted(peers)
        tag = (await peer.read_box())[b"_ask"]
        box = {b"_answer": tag, b"total": b"x"}
        peer.send(box)
        with pytest.raises(amp.ProtocolError) as info:
            async with asyncio.timeout(LONG):
                await call
        with pytest.raises(amp.ProtocolError) as expected:
            Sum._decode_response(box)
        assert str(info.value) == str(expected.value)
        assert str(info.value).startswith("the peer's answer to Sum is invalid: Sum: response")
        # The call is answered: the connection goes on, and the next answer decodes.
        assert not proto.closed
        assert tag not in proto._pending
        again = proto.call_remote(Sum, a=2, b=2)
        tag = (await peer.read_box())[b"_ask"]
        peer.send({b"_answer": tag, b"total": b"4"})
        async with asyncio.timeout(LONG):
            assert await again == {"total": 4}
        assert not proto.closed


async def test_calls_answered_after_a_bad_answer_in_the_same_read_fail() -> None:
    # An answer for a tag never sent closes the connection and fails the pending
    # calls, including the one whose answer comes after it in the same read.
    async with raw_server() as (port, peers), client(port) as proto:
        call = proto.call_remote(Sum, a=1, b=2)
        peer = await accepted(peers)
        tag = (await peer.read_box())[b"_ask"]
        peer.writer.write(
            encode_box({b"_answer": b"999", b"total": b"1"})
            + encode_box({b"_answer": tag, b"total": b"3"})
        )
        async with asyncio.timeout(LONG):
            await proto.wait_closed()
        assert call.done()
        with pytest.raises(amp.ConnectionLostError, match="before Sum was answered"):
            await call


class Cancel(amp.Command):
    arguments: list[tuple[str, amp.Argument[Any]]] = []
    response: list[tuple[str, amp.Argument[Any]]] = []


async def test_call_cancelled_by_a_responder_earlier_in_the_same_read() -> None:
    # The connection takes a decoded answer's call out of the pending calls while
    # it parses the read; a responder run before that answer is handled may
    # cancel the call. The late answer is then dropped, and the read goes on.
    cancelled: list[asyncio.Future[Any]] = []

    class Canceller(amp.AMPProtocol):
        @Cancel.responder
        def cancel(self) -> dict[str, Any]:
            cancelled[0].cancel()
            return {}

    async with raw_server() as (port, peers):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(Canceller, "127.0.0.1", port)
        try:
            first = proto.call_remote(Sum, a=1, b=1)
            second = proto.call_remote(Sum, a=2, b=2)
            cancelled.append(first)
            peer = await accepted(peers)
            tags = [(await peer.read_box())[b"_ask"] for _ in range(2)]
            peer.writer.write(
                encode_box({b"_ask": b"c1", b"_command": b"Cancel"})
                + encode_box({b"_answer": tags[0], b"total": b"2"})
                + encode_box({b"_answer": tags[1], b"total": b"4"})
            )
            assert await peer.read_box() == {b"_answer": b"c1"}
            assert await second == {"total": 4}
            assert first.cancelled()
            assert not proto.closed
            third = proto.call_remote(Sum, a=3, b=3)
            peer.send({b"_answer": (await peer.read_box())[b"_ask"], b"total": b"6"})
            assert await third == {"total": 6}
        finally:
            proto.close()


# Every way a responder can end answers and frees its place.


class Wait(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Touchy(Exception):
    """A mapped exception whose text cannot be made."""

    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class Fragile(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]
    errors = {Touchy: "TOUCHY"}


class Quit(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class EndingServer(amp.AMPProtocol):
    shared: asyncio.Future[None] | None = None

    @Wait.responder
    async def wait(self, n: int) -> dict[str, int]:
        assert self.shared is not None
        await asyncio.shield(self.shared)  # cancelled by other code
        return {"n": n}

    @Fragile.responder
    async def fragile(self, n: int) -> dict[str, int]:
        if n % 2:
            raise Touchy()
        return {"n": n}

    @Quit.responder
    async def quit(self, n: int) -> dict[str, int]:
        await self.shutdown(grace=LONG)
        return {"n": n}


@contextlib.contextmanager
def loop_errors() -> Any:
    """Collect what the event loop reports to its exception handler."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        yield reported
    finally:
        loop.set_exception_handler(None)


async def test_a_responder_ending_in_cancelled_error_answers_and_frees_its_place() -> None:
    EndingServer.shared = asyncio.get_running_loop().create_future()
    with loop_errors() as reported:
        async with (
            running_server(EndingServer, max_responders=2) as (_, port, _protocols),
            client(port) as proto,
        ):
            calls = [proto.call_remote(Wait, n=i) for i in range(3)]
            await asyncio.sleep(0.05 * TIME)
            EndingServer.shared.cancel()
            async with asyncio.timeout(LONG):
                results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, amp.UnknownRemoteError) for r in results), results
            # Every place is free again: max_responders more calls all run.
            EndingServer.shared = asyncio.get_running_loop().create_future()
            EndingServer.shared.set_result(None)
            async with asyncio.timeout(LONG):
                again = await asyncio.gather(*(proto.call_remote(Wait, n=i) for i in range(5)))
            assert [a["n"] for a in again] == list(range(5))
        assert reported == []


async def test_a_responder_cancelled_by_other_code_answers_and_frees_its_place() -> None:
    EndingServer.shared = asyncio.get_running_loop().create_future()
    async with (
        running_server(EndingServer, max_responders=1) as (_, port, protocols),
        client(port) as proto,
    ):
        calls = [proto.call_remote(Wait, n=i) for i in range(2)]
        server_side = await only_protocol(protocols)
        await eventually(lambda: bool(server_side._tasks), "a responder runs")
        for task in list(server_side._tasks or ()):
            task.cancel()
        async with asyncio.timeout(LONG):
            first = await asyncio.gather(calls[0], return_exceptions=True)
        assert isinstance(first[0], amp.UnknownRemoteError)
        EndingServer.shared.set_result(None)
        async with asyncio.timeout(LONG):
            assert await calls[1] == {"n": 1}


async def test_a_mapped_exception_whose_str_fails_answers_and_frees_its_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with loop_errors() as reported:
        async with (
            running_server(EndingServer, max_responders=2) as (_, port, _protocols),
            client(port) as proto,
        ):
            async with asyncio.timeout(LONG):
                results = await asyncio.gather(
                    *(proto.call_remote(Fragile, n=i) for i in range(7)), return_exceptions=True
                )
            for i, result in enumerate(results):
                if i % 2:
                    assert isinstance(result, Touchy)
                    assert result.args == ("Touchy",)
                else:
                    assert result == {"n": i}
        assert reported == []
    assert any("whose str() fails" in r.getMessage() for r in caplog.records)


async def test_shutdown_awaited_in_a_responder_sends_its_answer_then_closes() -> None:
    async with (
        running_server(EndingServer) as (_, port, protocols),
        client(port) as proto,
    ):
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(LONG / 2):
            assert await proto.call_remote(Quit, n=7) == {"n": 7}
            await proto.wait_closed()
            server_side = await only_protocol(protocols)
            await server_side.wait_closed()
        assert asyncio.get_running_loop().time() - started < LONG / 2
