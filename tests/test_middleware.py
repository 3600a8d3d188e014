"""Middleware around responders and calls, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextvars
import json
import ssl
import weakref
from typing import Any

import pytest
import trustme

import asyncio_amp as amp
from helpers import HOST, LONG, SHORT, client, raw_connection, running_server


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]
    errors = {PermissionError: "DENIED"}


class Note(amp.Command):
    arguments = [("text", amp.String())]
    requires_answer = False


class Back(amp.Command):
    """The server calls the client back with this, from its responder of Relay."""

    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Relay(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Slow(amp.Command):
    response = [("done", amp.Boolean())]


class Big(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("size", amp.Integer())]


notes: list[str] = []
request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


class Server(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Note.responder
    def note(self, text: str) -> None:
        notes.append(text)

    @Relay.responder
    async def relay(self, n: int) -> dict[str, int]:
        answer = await self.call_remote(Back, n=n + 1)
        return {"n": answer["n"] + 1}

    @Slow.responder
    async def slow(self) -> dict[str, bool]:
        await asyncio.sleep(LONG)
        return {"done": True}

    @Big.responder
    def big(self, data: bytes) -> dict[str, int]:
        return {"size": len(data)}


class Caller(amp.AMPProtocol):
    @Back.responder
    def back(self, n: int) -> dict[str, int]:
        return {"n": n * 10}


class Record(amp.Middleware):
    """Write down what passes, in both directions, under a name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.log.append(f"{self.name} in {call.name} {call.tag!r}")
        try:
            answer = await call_next(call)
        except BaseException as exc:
            self.log.append(f"{self.name} in {call.name} {call.outcome(exc)}")
            raise
        self.log.append(f"{self.name} in {call.name} {call.outcome(None)}")
        return answer

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.log.append(f"{self.name} out {call.name} {call.tag!r}")
        try:
            answer = await call_next(call)
        except BaseException as exc:
            self.log.append(f"{self.name} out {call.name} {call.outcome(exc)}")
            raise
        self.log.append(f"{self.name} out {call.name} {call.tag!r} {call.outcome(None)}")
        return answer


async def test_incoming_runs_in_list_order_around_the_responder() -> None:
    log: list[str] = []
    middleware = [Record("first", log), Record("second", log)]
    async with (
        running_server(Server, middleware=middleware) as (_, port, _),
        client(port) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
    assert log == [
        "first in Sum b'1'",
        "second in Sum b'1'",
        "second in Sum ok",
        "first in Sum ok",
    ]


async def test_outgoing_runs_in_list_order_and_learns_the_tag() -> None:
    log: list[str] = []
    async with running_server(Server) as (_, port, _):
        proto = await amp.connect(
            HOST, port, middleware=[Record("first", log), Record("second", log)]
        )
        async with proto:
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
            assert await proto.call_remote(Sum(a=2, b=2)) == {"total": 4}
    assert log == [
        "first out Sum None",
        "second out Sum None",
        "second out Sum b'1' ok",
        "first out Sum b'1' ok",
        "first out Sum None",
        "second out Sum None",
        "second out Sum b'2' ok",
        "first out Sum b'2' ok",
    ]


class AddOne(amp.Middleware):
    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        call.arguments["a"] += 1
        answer = await call_next(call)
        return {"total": answer["total"] * 100}

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        call.arguments["b"] += 10
        answer = await call_next(call)
        return {"total": -answer["total"]}


async def test_middleware_changes_arguments_and_answers_both_ways() -> None:
    async with (
        running_server(Server, middleware=[AddOne()]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[AddOne()])) as proto,
    ):
        # (1 + 1) + (2 + 10) = 14, times 100 on the server, negated on the client.
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": -1400}


class Cache(amp.Middleware):
    """Answer Sum(0, 0) without running anything."""

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.command is Sum and call.arguments == {"a": 0, "b": 0}:
            return {"total": 42}
        return await call_next(call)

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.command is Sum and call.arguments == {"a": 0, "b": 1}:
            return {"total": 7}
        return await call_next(call)


async def test_short_circuit_answers() -> None:
    log: list[str] = []
    async with (
        running_server(Server, middleware=[Cache(), Record("inner", log)]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Cache()])) as proto,
    ):
        assert await proto.call_remote(Sum, a=0, b=0) == {"total": 42}
        assert await proto.call_remote(Sum, a=0, b=1) == {"total": 7}  # never sent
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
    # The inner middleware saw only the call that went through.
    assert log == ["inner in Sum b'2'", "inner in Sum ok"]


class Refuse(amp.Middleware):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        raise self.exc


async def test_a_refusal_is_answered_like_a_responder_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    async with (
        running_server(
            Server, middleware=[Record("outer", log), Refuse(PermissionError("no entry"))]
        ) as (_, port, _),
        client(port) as proto,
    ):
        # Mapped by the Command's errors, with the description.
        with pytest.raises(PermissionError, match="no entry"):
            await proto.call_remote(Sum, a=1, b=2)
        # Not mapped: UNKNOWN, and nothing of the text crosses the wire.
        with pytest.raises(amp.UnknownRemoteError) as raised:
            await proto.call_remote(Relay, n=1)
        assert "no entry" not in str(raised.value)
    assert log[1] == "outer in Sum DENIED"
    assert log[3] == "outer in Relay UNKNOWN"
    assert any("raised PermissionError" in r.getMessage() for r in caplog.records)


async def test_a_middleware_that_raises_cancelled_error_answers_unknown() -> None:
    async with (
        running_server(Server, middleware=[Refuse(asyncio.CancelledError())]) as (_, port, _),
        client(port) as proto,
    ):
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Sum, a=1, b=2)
        # The connection goes on.
        with pytest.raises(amp.UnknownRemoteError):
            await proto.call_remote(Sum, a=1, b=2)


class Hold(amp.Middleware):
    """Wait forever before passing the call on; note cancellations."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.started.set()
        try:
            await asyncio.sleep(LONG)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await call_next(call)


async def test_a_held_call_is_cancelled_with_the_connection() -> None:
    hold = Hold()
    async with running_server(Server, middleware=[hold]) as (_, port, protocols):
        async with client(port) as proto:
            call = proto.call_remote(Sum, a=1, b=2)
            async with asyncio.timeout(LONG):
                await hold.started.wait()
            proto.close()
            with pytest.raises(amp.ConnectionLostError):
                await call
        async with asyncio.timeout(LONG):
            await hold.cancelled.wait()
            await protocols[0].wait_closed()


async def test_a_cancelled_responder_task_answers_unknown() -> None:
    hold = Hold()
    async with (
        running_server(Server, middleware=[hold]) as (_, port, protocols),
        client(port) as proto,
    ):
        call = proto.call_remote(Sum, a=1, b=2)
        async with asyncio.timeout(LONG):
            await hold.started.wait()
        for task in protocols[0]._tasks or ():
            task.cancel()
        with pytest.raises(amp.UnknownRemoteError):
            async with asyncio.timeout(LONG):
                await call
        assert hold.cancelled.is_set()


async def test_outgoing_cancellation_forgets_the_call() -> None:
    log: list[str] = []
    async with (
        running_server(Server) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Record("c", log)])) as proto,
    ):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(SHORT):
                await proto.call_remote(Slow)
        assert log == ["c out Slow None", "c out Slow CancelledError"]
        assert not proto._pending or all(s[1].done() for s in proto._pending.values())
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_middleware_around_a_nested_call() -> None:
    """The server's responder calls the client back: both sides' middleware see it all."""
    server_log: list[str] = []
    client_log: list[str] = []
    async with (
        running_server(Server, middleware=[Record("s", server_log)], max_responders=1) as (
            _,
            port,
            _,
        ),
        client(port, lambda: Caller(middleware=[Record("c", client_log)])) as proto,
    ):
        # Relay(1) -> Back(2) = 20 -> 21; several at once, over one responder
        # place: each lends it while it waits for Back's answer.
        answers = await asyncio.gather(*(proto.call_remote(Relay, n=i) for i in range(5)))
        assert answers == [{"n": (i + 1) * 10 + 1} for i in range(5)]
    assert server_log.count("s in Relay ok") == 5
    assert sum(line.startswith("s out Back b'") for line in server_log) == 5
    assert client_log.count("c in Back ok") == 5
    assert client_log.count("c out Relay None") == 5


async def test_calls_without_an_answer_have_no_tag() -> None:
    log: list[str] = []
    notes.clear()
    async with (
        running_server(Server, middleware=[Record("s", log)]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Record("c", log)])) as proto,
    ):
        assert await proto.call_remote(Note, text="hi") is None
        assert await proto.call_remote(Sum, a=1, b=1) == {"total": 2}
    assert notes == ["hi"]
    assert "c out Note None ok" in log
    assert "s in Note None" in log
    assert "s in Note ok" in log


class Trace(amp.Middleware):
    """Put an extra key in each call going out; read it from each call coming in."""

    def __init__(self) -> None:
        self.seen: list[dict[bytes, bytes]] = []

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.seen.append(dict(call.extra))
        return await call_next(call)

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        call.extra[b"traceparent"] = b"00-" + call.name.encode()
        return await call_next(call)


async def test_extra_keys_travel_in_the_box() -> None:
    server, client_side = Trace(), Trace()
    async with (
        running_server(Server, middleware=[server]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[client_side])) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert await proto.call_remote(Big, data=b"x" * 100_000) == {"size": 100_000}
        assert await proto.call_remote_box("Sum", {"a": "5", "b": "6"}) == {b"total": b"11"}
    assert server.seen == [
        {b"traceparent": b"00-Sum"},
        {b"traceparent": b"00-Big"},  # not the chunk keys of data
        {b"traceparent": b"00-Sum"},
    ]


async def test_a_peer_without_middleware_ignores_extra_keys() -> None:
    async with (
        running_server(Server) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Trace()])) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}


class BadExtra(amp.Middleware):
    def __init__(self, key: Any) -> None:
        self.key = key

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        call.extra[self.key] = b"x"
        return await call_next(call)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (b"a", ValueError),
        (b"_ask", ValueError),
        ("text", TypeError),
        (b"k" * 256, amp.TooLongError),
    ],
)
async def test_bad_extra_keys_are_refused_before_sending(key: Any, error: type[Exception]) -> None:
    async with (
        running_server(Server) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[BadExtra(key)])) as proto,
    ):
        with pytest.raises(error):
            await proto.call_remote(Sum, a=1, b=2)
        assert not proto._pending


class Counts(amp.Middleware):
    """Counts the calls it sees going out; with ``bad``, makes their ``a`` a str."""

    def __init__(self, bad: bool = False) -> None:
        self.seen = 0
        self.bad = bad

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.seen += 1
        if self.bad:
            call.arguments["a"] = "x"
        return await call_next(call)


async def test_bad_arguments_raise_at_once_before_the_middleware() -> None:
    # As without middleware: the call fails at once, and no middleware sees it.
    counts = Counts()
    async with (
        running_server(Server) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[counts])) as proto,
    ):
        with pytest.raises(TypeError, match="expected an int"):
            proto.call_remote(Sum, a="x", b=2)
        with pytest.raises(TypeError, match="missing"):
            proto.call_remote(Sum, a=1)
        with pytest.raises(amp.TooLongError):
            proto.call_remote(Note, text="x" * 70_000)
        assert counts.seen == 0
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert counts.seen == 1


async def test_arguments_a_middleware_changes_are_checked_when_encoded() -> None:
    counts = Counts(bad=True)
    async with (
        running_server(Server) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[counts])) as proto,
    ):
        with pytest.raises(TypeError, match="expected an int"):
            await proto.call_remote(Sum, a=1, b=2)
        assert counts.seen == 1
        assert not proto._pending
        counts.bad = False
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}


class Gateway(amp.AMPProtocol):
    def unhandled_command(self, name: bytes, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        if name == b"Fail":
            raise amp.RemoteAmpError("NOPE", "refused")
        return {b"name": name, b"keys": b",".join(sorted(box))}


async def test_calls_without_a_command_class() -> None:
    log: list[str] = []
    seen: list[tuple[Any, str, dict[Any, Any]]] = []

    class Look(amp.Middleware):
        async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[Any, Any]:
            seen.append((call.command, call.name, dict(call.arguments)))
            return await call_next(call)

        async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[Any, Any]:
            seen.append((call.command, call.name, dict(call.arguments)))
            return await call_next(call)

    async with (
        running_server(Gateway, middleware=[Record("s", log), Look()]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Look()])) as proto,
    ):
        assert await proto.call_remote_box("Any", {"x": "1"}) == {b"name": b"Any", b"keys": b"x"}
        with pytest.raises(amp.RemoteAmpError, match="refused") as raised:
            await proto.call_remote_box(b"Fail")
        assert raised.value.error_code == "NOPE"
    assert seen == [
        (None, "Any", {"x": "1"}),
        (None, "Any", {b"x": b"1"}),
        (None, "Fail", {}),
        (None, "Fail", {}),
    ]
    assert log == ["s in Any b'1'", "s in Any ok", "s in Fail b'2'", "s in Fail NOPE"]


async def test_unhandled_commands_go_through_middleware() -> None:
    log: list[str] = []
    async with (
        running_server(Server, middleware=[Record("s", log)]) as (_, port, _),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(amp.encode_box({b"_command": b"Nope", b"_ask": b"7"}))
        async with asyncio.timeout(LONG):
            data = await reader.readuntil(b"\x00\x00")
        # The answer of a server without middleware, byte for byte.
        assert amp.parse_boxes(data) == [
            {
                b"_error": b"7",
                b"_error_code": b"UNHANDLED",
                b"_error_description": b"Unhandled Command: b'Nope'",
            }
        ]
    assert log == ["s in Nope b'7'", "s in Nope UNHANDLED"]


async def test_responders_run_in_a_fresh_context_and_may_be_plain() -> None:
    seen: list[str] = []

    class SetVar(amp.Middleware):
        async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
            seen.append(request.get())
            request.set(f"call {call.tag!r}")
            return await call_next(call)

    async with (
        running_server(Server, middleware=[SetVar()]) as (_, port, _),
        client(port) as proto,
    ):
        for _ in range(3):
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
    assert seen == ["", "", ""]


async def test_flow_control_holds_with_middleware() -> None:
    """max_responders still bounds the calls at work, and every call is answered."""
    at_work = 0
    most = 0

    class Count(amp.Middleware):
        async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
            nonlocal at_work, most
            at_work += 1
            most = max(most, at_work)
            try:
                await asyncio.sleep(SHORT / 10)
                return await call_next(call)
            finally:
                at_work -= 1

    async with (
        running_server(Server, middleware=[Count()], max_responders=3) as (_, port, _),
        client(port) as proto,
    ):
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(*(proto.call_remote(Sum, a=i, b=1) for i in range(200)))
    assert answers == [{"total": i + 1} for i in range(200)]
    assert 1 < most <= 3


async def test_middleware_is_checked_and_set_before_connecting() -> None:
    with pytest.raises(TypeError):
        amp.AMPProtocol(middleware=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        amp.AMPProtocol(middleware="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await amp.serve(Server, HOST, 0, middleware=[object()])
    record = Record("x", [])
    assert amp.AMPProtocol(middleware=[record]).middleware == (record,)
    assert amp.AMPProtocol().middleware == ()
    async with running_server(Server) as (_, port, _), client(port) as proto:
        with pytest.raises(RuntimeError):
            proto.middleware = [record]


async def test_a_closed_connection_refuses_calls_at_once() -> None:
    async with running_server(Server) as (_, port, _):
        proto = await amp.connect(HOST, port, middleware=[Record("c", [])])
        proto.close()
        await proto.wait_closed()
        with pytest.raises(amp.ConnectionLostError):
            proto.call_remote(Sum, a=1, b=2)


class PerConnection(amp.Middleware):
    """State kept per connection, by protocol."""

    def __init__(self) -> None:
        self.counts: weakref.WeakKeyDictionary[amp.AMPProtocol, int] = weakref.WeakKeyDictionary()

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.counts[call.protocol] = self.counts.get(call.protocol, 0) + 1
        answer = await call_next(call)
        return {"total": answer["total"] * 1000 + self.counts[call.protocol]}


async def test_one_instance_serves_every_connection() -> None:
    middleware = PerConnection()
    async with (
        running_server(Server, middleware=[middleware]) as (_, port, _),
        client(port) as one,
        client(port) as two,
    ):
        assert await one.call_remote(Sum, a=1, b=0) == {"total": 1001}
        assert await one.call_remote(Sum, a=1, b=0) == {"total": 1002}
        assert await two.call_remote(Sum, a=1, b=0) == {"total": 1001}


async def test_a_direction_without_middleware_takes_no_chain() -> None:
    proto = amp.AMPProtocol(middleware=[BadExtra(b"z")])
    assert proto._incoming is None and proto._outgoing is not None
    proto = amp.AMPProtocol(middleware=[Hold()])
    assert proto._incoming is not None and proto._outgoing is None


class Adder:
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


async def test_a_locators_responder_goes_through_middleware_with_its_command() -> None:
    log: list[str] = []
    seen: list[Any] = []

    class Look(amp.Middleware):
        async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
            seen.append(call.command)
            return await call_next(call)

    async with (
        running_server(
            amp.AMPProtocol, locators=[Adder()], middleware=[Record("s", log), Look(), AddOne()]
        ) as (_, port, _),
        client(port) as proto,
    ):
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 400}
    assert seen == [Sum]
    assert log == ["s in Sum b'1'", "s in Sum ok"]


async def test_access_log_as_a_library_feature(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="asyncio_amp.access")
    async with (
        running_server(Server, middleware=[amp.AccessLog()]) as (_, port, _),
        client(port, lambda: Caller(middleware=[amp.AccessLog("json")])) as proto,
    ):
        assert await proto.call_remote(Relay, n=1) == {"n": 21}
        with pytest.raises(amp.UnhandledCommandError):
            await proto.call_remote_box("Nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "asyncio_amp.access"]
    text = [line for line in lines if not line.startswith("{")]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # The server: the peer's Relay, its own call back, and the unhandled call.
    assert [line.split(" ", 2)[2].rsplit(" ", 1)[0] for line in text] == [
        "> Back 1 ok",
        "< Relay 1 ok",
        "< Nope 2 UNHANDLED",
    ]
    assert [(r["direction"], r["command"], r["tag"], r["outcome"]) for r in records] == [
        ("incoming", "Back", "1", "ok"),
        ("outgoing", "Relay", "1", "ok"),
        ("outgoing", "Nope", "2", "UNHANDLED"),
    ]
    with pytest.raises(ValueError):
        amp.AccessLog("xml")  # type: ignore[arg-type]


async def test_starttls_goes_through_middleware_both_ways() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    class TLSServer(Server):
        def start_tls_context(self) -> ssl.SSLContext | None:
            return server_ctx

    log: list[str] = []
    async with (
        running_server(TLSServer, middleware=[Record("s", log), Trace()]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Record("c", log), Trace()])) as proto,
        asyncio.timeout(LONG),
    ):
        answer = await proto.call_remote(amp.StartTLS, ssl=client_ctx, server_hostname="localhost")
        assert answer == {}
        assert proto.tls
        assert await proto.call_remote(Sum, a=40, b=2) == {"total": 42}
    # (Going out, an upgrade call's tag is not told to the middleware.)
    assert "c out StartTLS None ok" in log
    assert "s in StartTLS b'1'" in log
    assert "s in StartTLS ok" in log
    assert "s in Sum ok" in log
