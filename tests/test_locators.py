"""Locators, locate_responder() and unhandled_command(), over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp._locators import Located, responders_of
from helpers import HOST, LONG, SHORT, client, eventually, port_of, raw_connection, running_server


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Greet(amp.Command):
    arguments = [("name", amp.String())]
    response = [("greeting", amp.String())]
    errors = {LookupError: "NOBODY"}


class Wait(amp.Command):
    arguments = [("key", amp.String())]
    response = [("key", amp.String())]


class Ping(amp.Command):
    response = [("pong", amp.Bytes())]


class Echo(amp.Command):
    arguments = [("text", amp.String())]
    response = [("text", amp.String())]


class Own(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b + 1000}


class Adder:
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Greet.responder
    async def greet(self, name: str) -> dict[str, str]:
        await asyncio.sleep(0)
        if name == "nobody":
            raise LookupError("no one by that name")
        if name == "boom":
            raise RuntimeError("internal detail")
        return {"greeting": f"hello {name}"}


class Greeter:
    @Greet.responder
    def greet(self, name: str) -> dict[str, str]:
        return {"greeting": f"hi {name}"}

    @Ping.responder
    def ping(self) -> dict[str, bytes]:
        return {"pong": b"from the second locator"}


class LoudGreeter(Greeter):
    def greet(self, name: str) -> dict[str, str]:  # an override, not decorated again
        return {"greeting": f"HI {name.upper()}"}


# Unit: the tables


def test_responders_of_binds_methods_and_follows_overrides() -> None:
    greeter = LoudGreeter()
    table = responders_of(greeter)
    assert set(table) == {b"Greet", b"Ping"}
    command, responder, is_coroutine = table[b"Greet"]
    assert command is Greet and not is_coroutine
    assert responder("x") == {"greeting": "HI X"}
    assert responders_of(Adder())[b"Greet"][2] is True


def test_the_first_locator_wins_and_own_responders_come_first() -> None:
    located = Located([Adder(), Greeter()], Own._responder_table, Own._ask_parsers)
    assert set(located.table) == {b"Greet", b"Ping"}  # Sum is the protocol's own
    assert located.table[b"Greet"][0] is Greet
    assert located.table[b"Greet"][2] is True  # Adder's, the first
    assert located.ask_parsers[b"Sum"] is Own._ask_parsers[b"Sum"]
    assert located.ask_parsers[b"Ping"][1] is located.table[b"Ping"]


def test_locators_property_and_its_checks() -> None:
    adder, greeter = Adder(), Greeter()
    proto = amp.AMPProtocol(locators=iter([adder, greeter]))
    assert proto.locators == (adder, greeter)
    assert b"Sum" in proto._conn.ask_parsers
    proto.locators = []
    assert proto.locators == ()
    assert b"Sum" not in proto._conn.ask_parsers
    with pytest.raises(TypeError, match="iterable"):
        proto.locators = adder  # type: ignore[assignment]
    with pytest.raises(TypeError, match="iterable"):
        proto.locators = "abc"
    with pytest.raises(TypeError, match="locator"):
        amp.AMPProtocol(locators=[None])
    assert amp.AMPProtocol().locators == ()


def test_locate_responder_by_default() -> None:
    adder, greeter = Adder(), Greeter()
    proto = Own(locators=[adder, greeter])
    assert proto.locate_responder(b"Sum") == proto.sum  # its own first
    assert proto.locate_responder(b"Greet") == adder.greet
    assert proto.locate_responder(b"Ping") == greeter.ping
    assert proto.locate_responder(b"Nope") is None


# Locators over real connections


async def test_calls_go_to_own_responders_then_each_locator_in_order() -> None:
    adder, greeter = Adder(), Greeter()
    async with (
        running_server(lambda: Own(locators=[adder, greeter])) as (_, port, _),
        client(port) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 1003}
        assert await proto.call_remote(Greet, name="ann") == {"greeting": "hello ann"}
        assert await proto.call_remote(Ping) == {"pong": b"from the second locator"}
        with pytest.raises(amp.UnhandledCommandError, match="Unhandled Command: b'Echo'"):
            await proto.call_remote(Echo, text="x")


async def test_serve_and_connect_take_locators() -> None:
    server = await amp.serve(amp.AMPProtocol, HOST, 0, locators=iter([Adder()]))
    async with server:
        # An iterator is read once, for every connection.
        for _ in range(2):
            proto = await amp.connect(HOST, port_of(server), locators=[Greeter()])
            async with proto:
                assert await proto.call_remote(Sum, a=2, b=3) == {"total": 5}
                assert proto.locators and isinstance(proto.locators[0], Greeter)
    with pytest.raises(TypeError, match="iterable"):
        await amp.serve(amp.AMPProtocol, HOST, 0, locators=5)


async def test_a_locators_errors_map_like_a_responders(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with (
        running_server(lambda: amp.AMPProtocol(locators=[Adder()])) as (_, port, _),
        client(port) as proto,
    ):
        with pytest.raises(LookupError, match="no one by that name"):
            await proto.call_remote(Greet, name="nobody")
        with pytest.raises(amp.UnknownRemoteError) as info:
            await proto.call_remote(Greet, name="boom")
        assert info.value.description == "Unknown Error"
        # A value that does not decode: UNKNOWN, and the connection stays up.
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote_box("Sum", {"a": "x", "b": "1"})
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
    assert any("internal detail" in repr(r.exc_info) for r in caplog.records)


async def test_a_locators_calls_decode_without_the_fast_path() -> None:
    # Logging at DEBUG turns off decoding straight from the bytes: the calls come
    # as boxes, and the table miss finds the locator's responder.
    logger = logging.getLogger("asyncio_amp")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with (
            running_server(lambda: amp.AMPProtocol(locators=[Adder()])) as (_, port, protos),
            client(port) as proto,
        ):
            assert await proto.call_remote(Sum, a=4, b=5) == {"total": 9}
            assert protos[0]._conn.decode_values is False
    finally:
        logger.setLevel(level)


class Gate:
    """A locator whose Wait responder waits until its key is released."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.release: dict[str, asyncio.Event] = {}

    @Wait.responder
    async def wait(self, key: str) -> dict[str, str]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.setdefault(key, asyncio.Event()).wait()
        finally:
            self.running -= 1
        return {"key": key}


async def test_locator_responders_hold_places_under_max_responders() -> None:
    gate = Gate()
    async with (
        running_server(lambda: amp.AMPProtocol(locators=[gate]), max_responders=1) as (_, port, _),
        client(port) as proto,
    ):
        first = proto.call_remote(Wait, key="a")
        second = proto.call_remote(Wait, key="b")
        await eventually(lambda: gate.running == 1, "the first call started")
        await asyncio.sleep(SHORT)
        assert "b" not in gate.release  # the second waits for the place
        gate.release["a"].set()
        async with asyncio.timeout(LONG):
            assert await first == {"key": "a"}
            await eventually(lambda: "b" in gate.release, "the second call started")
            gate.release["b"].set()
            assert await second == {"key": "b"}
    assert gate.most == 1


class Relay:
    """A locator made for one connection: its responder calls the peer back."""

    def __init__(self, protocol: amp.AMPProtocol) -> None:
        self.protocol = protocol

    @Echo.responder
    async def echo(self, text: str) -> dict[str, str]:
        answer = await self.protocol.call_remote(Echo, text=text)  # the client's Echo
        return {"text": answer["text"] + "!"}

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


class EchoClient(amp.AMPProtocol):
    @Echo.responder
    async def echo(self, text: str) -> dict[str, str]:
        # Calls the server while the server's Echo responder waits for this answer.
        total = await self.call_remote(Sum, a=len(text), b=0)
        return {"text": f"{text}:{total['total']}"}


def relay_server() -> amp.AMPProtocol:
    proto = amp.AMPProtocol(max_responders=1)
    proto.locators = [Relay(proto)]
    return proto


async def test_a_locator_responder_lends_its_place_while_it_calls_back() -> None:
    async with (
        running_server(relay_server) as (_, port, _),
        client(port, EchoClient) as proto,
        asyncio.timeout(LONG),
    ):
        # Without lending, Sum would wait for the place Echo holds: a deadlock.
        assert await proto.call_remote(Echo, text="abc") == {"text": "abc:3!"}


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class ContextReader:
    @Greet.responder
    async def greet(self, name: str) -> dict[str, str]:
        before = request_id.get()
        request_id.set(name)
        await asyncio.sleep(0)
        return {"greeting": f"{before}->{request_id.get()}"}


async def test_locator_responders_run_in_fresh_contexts() -> None:
    async with (
        running_server(lambda: amp.AMPProtocol(locators=[ContextReader()])) as (_, port, _),
        client(port) as proto,
    ):
        answers = await asyncio.gather(*(proto.call_remote(Greet, name=str(i)) for i in range(5)))
        assert answers == [{"greeting": f"none->{i}"} for i in range(5)]


# locate_responder() overridden


class Dynamic(amp.AMPProtocol):
    """Finds responders by a rule: locators are given the names it asks for."""

    def __init__(self) -> None:
        super().__init__(locators=[Adder()])
        self.asked: list[bytes] = []
        self.greeter = Greeter()

    def locate_responder(self, name: bytes) -> Any:
        self.asked.append(name)
        if name == b"Greet":
            return self.greeter.greet
        if name == b"Echo":
            return lambda text: {"text": text}  # not marked as a responder
        if name == b"Ping":
            raise RuntimeError("the lookup failed")
        return super().locate_responder(name)


async def test_an_overridden_locate_responder_sees_every_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with (
        running_server(Dynamic) as (_, port, protos),
        client(port) as proto,
    ):
        assert await proto.call_remote(Greet, name="bo") == {"greeting": "hi bo"}
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}  # via super()
        # The locators' commands are not decoded ahead of the hook.
        assert b"Sum" not in protos[0]._conn.ask_parsers
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Echo, text="x")
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Ping)
        with pytest.raises(amp.UnhandledCommandError):
            await proto.call_remote_box("Nope")
        assert protos[0].asked == [b"Greet", b"Sum", b"Echo", b"Ping", b"Nope"]
        assert await proto.call_remote(Sum, a=2, b=2) == {"total": 4}
    messages = [r.getMessage() for r in caplog.records]
    assert any("not marked as the responder" in m for m in messages)
    assert any("locate_responder(b'Ping')" in m for m in messages)


# unhandled_command()


class Gateway(amp.AMPProtocol):
    """Answers any command by name with a raw box."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()

    async def unhandled_command(self, name: bytes, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        self.seen.append((name, box))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if name == b"Hold":
                await self.release.wait()
            if name == b"Refuse":
                raise amp.RemoteAmpError("REFUSED", "not today ✗")
            if name == b"Crash":
                raise ValueError("internal detail")
            if name == b"Reserved":
                return {b"_error": b"1"}
            if name == b"TooLong":
                return {b"v": b"x" * 65_536}
            if name == b"Text":
                return {"k": "v"}  # type: ignore[dict-item]
            if name == b"Nothing":
                return await super().unhandled_command(name, box)  # type: ignore[misc]
            if name == b"Sum":
                a, b = int(box[b"a"]), int(box[b"b"])
                return {b"total": b"%d" % (a + b)}
            return {b"name": name, **box}
        finally:
            self.running -= 1


async def test_unhandled_command_answers_raw_boxes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio_amp")
    async with (
        running_server(Gateway) as (_, port, protos),
        client(port) as proto,
    ):
        assert await proto.call_remote_box("Anything", {"x": "1"}) == {
            b"name": b"Anything",
            b"x": b"1",
        }
        # A typed call decodes the raw answer like any other.
        assert await proto.call_remote(Sum, a=20, b=22) == {"total": 42}
        with pytest.raises(amp.RemoteAmpError) as refused:
            await proto.call_remote_box("Refuse")
        assert (refused.value.error_code, refused.value.description) == ("REFUSED", "not today ✗")
        assert type(refused.value) is amp.RemoteAmpError
        for name in ("Crash", "Reserved", "TooLong", "Text"):
            with pytest.raises(amp.UnknownRemoteError) as info:
                await proto.call_remote_box(name)
            assert info.value.description == "Unknown Error"
        with pytest.raises(amp.UnhandledCommandError) as unhandled:
            await proto.call_remote_box("Nothing")
        assert unhandled.value.description == "Unhandled Command: b'Nothing'"
        # No answer wanted: it still runs, and nothing comes back.
        await proto.call_remote_box("Quiet", {"q": "1"}, requires_answer=False)
        await eventually(lambda: protos[0].seen[-1][0] == b"Quiet", "the quiet call ran")
        assert protos[0].seen[0] == (b"Anything", {b"x": b"1"})
        assert await proto.call_remote_box("Last") == {b"name": b"Last"}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "unhandled_command(b'Crash')" in messages
    assert "unhandled_command(b'Reserved')" in messages
    assert "answering UNKNOWN" in messages


async def test_unhandled_command_holds_a_responder_place() -> None:
    async with (
        running_server(Gateway, max_responders=1) as (_, port, protos),
        client(port) as proto,
    ):
        held = proto.call_remote_box("Hold")
        after = proto.call_remote_box("After")
        await eventually(lambda: protos[0].running == 1, "Hold started")
        await asyncio.sleep(SHORT)
        assert [name for name, _ in protos[0].seen] == [b"Hold"]
        protos[0].release.set()
        async with asyncio.timeout(LONG):
            assert await held == {b"name": b"Hold"}
            assert await after == {b"name": b"After"}
        assert protos[0].most == 1


class SyncGateway(amp.AMPProtocol):
    def unhandled_command(self, name: bytes, box: dict[bytes, bytes]) -> Any:
        if name == b"Later":
            return self.later(box)
        if name == b"LaterRefused":
            return self.refuse_later()
        if name == b"Refuse":
            raise amp.UnknownRemoteError("ODD", "odd code")
        return {b"sync": name}

    async def later(self, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        await asyncio.sleep(0)
        return {b"later": box.get(b"k", b"")}

    async def refuse_later(self) -> dict[bytes, bytes]:
        await asyncio.sleep(0)
        raise amp.RemoteAmpError("LATE", "refused later")


async def test_a_plain_unhandled_command_may_return_an_awaitable() -> None:
    async with (
        running_server(SyncGateway) as (_, port, _),
        client(port) as proto,
    ):
        assert await proto.call_remote_box("Now") == {b"sync": b"Now"}
        assert await proto.call_remote_box("Later", {"k": "v"}) == {b"later": b"v"}
        with pytest.raises(amp.RemoteAmpError, match="refused later"):
            await proto.call_remote_box("LaterRefused")
        # The code of a RemoteAmpError subclass goes as it is.
        with pytest.raises(amp.RemoteAmpError) as info:
            await proto.call_remote_box("Refuse")
        assert info.value.error_code == "ODD"


async def test_the_default_answer_is_twisteds_unhandled_bytes() -> None:
    async with (
        running_server(amp.AMPProtocol) as (_, port, _),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(amp.encode_box({b"_ask": b"7", b"_command": b"Nope"}))
        async with asyncio.timeout(LONG):
            data = await reader.readexactly(
                len(
                    amp.encode_box(
                        {
                            b"_error": b"7",
                            b"_error_code": b"UNHANDLED",
                            b"_error_description": b"Unhandled Command: b'Nope'",
                        }
                    )
                )
            )
        assert amp.parse_boxes(data) == [
            {
                b"_error": b"7",
                b"_error_code": b"UNHANDLED",
                b"_error_description": b"Unhandled Command: b'Nope'",
            }
        ]
