#!/usr/bin/env python3
"""
Fuzz target: an AMP server fed raw bytes, as if a peer had sent them.

Each input (see ``fuzz_input.py`` for its layout) drives a fresh
:class:`FuzzServer` through an in-memory transport on one event loop, created
once for the whole run. The stream goes to ``data_received`` in chunks; between
chunks and at the end the loop runs (a bounded number of turns) so that
responders finish, then the peer hangs up. The target checks that:

* no exception escapes ``data_received``, and the loop's exception handler is
  never called (no callback or task failed);
* everything the server wrote parses as AMP boxes: answers and error answers to
  tags the peer asked with, each tag answered at most as often as it was asked,
  plus the server's own calls; an UNKNOWN error carries only the generic text;
* if the peer broke the protocol (compared with a reference run of the sans-I/O
  ``AMPConnection`` on the same stream), the server closed its transport, and it
  closed it for no other reason than that, a fatal error or a shutdown; when
  it did not close, was not shut down and the peer waited for the answers,
  every ask with a tag got exactly one;
* reading is never left paused with no responder running, nothing is written
  after the transport is closing, and after ``connection_lost`` no task is left
  on the loop and every call the server made has finished with its answer or an
  AMP error (never another exception);
* every log line formats, and none is empty, and no warning is issued (such
  as a responder's coroutine that was never awaited).

Option bits in the input's last byte (besides those of fuzz_input.py) make the
server call the peer first (so the peer's answers have tags to match) and
perhaps cancel one of those calls, lower ``max_responders``, make the transport
pause writing after a few bytes, log at DEBUG level, have the peer hang up while
responders still run, or shut the server down gracefully halfway through.

Run it with atheris (``pip install atheris``)::

    python fuzzing/fuzz_server.py -runs=1000000 -dict=fuzzing/amp.dict "$(mktemp -d)" \\
        fuzzing/corpus
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped]  # it ships no type hints

    # Coverage feedback from the package only; asyncio itself is not instrumented.
    _instrumented: contextlib.AbstractContextManager[Any] = atheris.instrument_imports(
        include=["asyncio_amp"]
    )
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    import asyncio_amp as amp
    from asyncio_amp._connection import AMPConnection, Answer, Ask, ErrorAnswer, Failure
    from asyncio_amp._errors import ProtocolError
    from asyncio_amp._wire import parse_boxes

from fuzz_input import FuzzInput, split

# Option bits of the server target (fuzz_input.py uses 0x01 to 0x04).
CALLS = 0x08  # the server calls the peer before reading
FEW_RESPONDERS = 0x10  # max_responders from 1 to 4
PAUSE_WRITING = 0x20  # the transport pauses writing past a small high-water mark
DEBUG_LOG = 0x40  # log at DEBUG level (the protocol caches this per connection)
MORE = 0x80  # a second option byte follows, with the bits below
# Bits of the second option byte.
HANG_UP_EARLY = 0x01  # the peer resets the connection before the responders finish
SHUTDOWN = 0x02  # the server calls shutdown() before a chunk whose index is read from the input
CANCEL = 0x04  # the server cancels its Echo call once it is sent (a late answer is dropped)

# Turns of the event loop to wait for something that must happen (reading to
# resume, responders to finish, connection_lost to be called). The responders
# below finish within a few turns, so reaching this bound means a stall.
MAX_TURNS = 200


# Commands


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION", OverflowError: b"OVERFLOW"}


class Echo(amp.Command):
    arguments = [("data", amp.Bytes()), ("text", amp.String(optional=True))]
    response = [("data", amp.Bytes()), ("text", amp.String(optional=True))]


class Join(amp.Command):
    arguments = [("items", amp.ListOf(amp.String())), ("sep", amp.Bytes(optional=True))]
    response = [("joined", amp.String()), ("count", amp.Integer())]


ROW: list[tuple[str | bytes, amp.Argument[Any]]] = [
    ("name", amp.String()),
    ("count", amp.Integer(optional=True)),
]


class Tally(amp.Command):
    arguments = [("rows", amp.AmpList(ROW))]
    response = [("rows", amp.AmpList(ROW)), ("total", amp.Integer())]
    errors = {KeyError: "KEY"}


class Blob(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("data", amp.BigBytes()), ("size", amp.Integer())]


class Stamp(amp.Command):
    arguments = [
        ("when", amp.DateTime()),
        ("amount", amp.Decimal(optional=True)),
        ("ok", amp.Boolean(optional=True)),
        ("path", amp.Path(optional=True)),
        ("ratio", amp.Float(optional=True)),
    ]
    response = [("when", amp.DateTime()), ("amount", amp.Decimal(optional=True))]


class FatalError(Exception):
    pass


class Crash(amp.Command):
    """Fails as the argument says: unmapped (UNKNOWN), fatal (closes), or a bad answer."""

    arguments = [("how", amp.Bytes())]
    response = [("value", amp.Integer())]
    fatal_errors = {FatalError: "FATAL"}


class Note(amp.Command):
    arguments = [("text", amp.String())]
    requires_answer = False


class FuzzServer(amp.AMPProtocol):
    """A server with plain and async responders of every kind of argument."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fatal_raised = False
        self.notes: list[str] = []

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Divide.responder
    async def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        await asyncio.sleep(0)
        return {"result": numerator / denominator}

    @Echo.responder
    async def echo(self, data: bytes, text: str | None) -> dict[str, Any]:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return {"data": data, "text": text}

    @Join.responder
    def join(self, items: list[str], sep: bytes | None) -> Any:
        # A plain function that returns a coroutine: the protocol awaits it too.
        return self._join(items, sep)

    async def _join(self, items: list[str], sep: bytes | None) -> dict[str, Any]:
        await asyncio.sleep(0)
        separator = (sep or b",").decode("utf-8", "replace")
        return {"joined": separator.join(items), "count": len(items)}

    @Tally.responder
    async def tally(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        total = 0
        for index, row in enumerate(rows):
            if index < 3:  # a bounded number of turns, whatever the number of rows
                await asyncio.sleep(0)
            if row["name"] == "missing":
                raise KeyError(row["name"])
            total += row["count"] or 0
        return {"rows": rows, "total": total}

    @Blob.responder
    def blob(self, data: bytes) -> dict[str, Any]:
        return {"data": data * 3, "size": len(data)}

    @Stamp.responder
    def stamp(self, **values: Any) -> dict[str, Any]:
        return {"when": values["when"], "amount": values["amount"]}

    @Crash.responder
    def crash(self, how: bytes) -> dict[str, Any]:
        if how == b"fatal":
            self.fatal_raised = True
            raise FatalError("fatal error from the fuzz target")
        if how == b"answer":
            return {"value": "not an int"}  # cannot be encoded: answered UNKNOWN
        if how == b"none":
            return {}  # a required key is missing: answered UNKNOWN
        raise RuntimeError(f"internal detail {how!r}")

    @Note.responder
    def note(self, text: str) -> None:
        self.notes.append(text)


# What the server may write: error codes it can send, and its own calls.
ERROR_CODES = {
    b"UNKNOWN",
    b"UNHANDLED",
    b"SHUTDOWN",
    b"ZERO_DIVISION",
    b"OVERFLOW",
    b"KEY",
    b"FATAL",
}
UNKNOWN_DESCRIPTION = b"Unknown Error"
# The server's own calls, in order, and the tags they get: the note takes no tag,
# but it uses up a number ("2"), as in Twisted.
OWN_CALLS: list[tuple[type[amp.Command], dict[str, Any]]] = [
    (Sum, {"a": 1, "b": 2}),
    (Note, {"text": "hello"}),
    (Echo, {"data": b"\x00\xff", "text": "é"}),
    (Tally, {"rows": [{"name": "a", "count": 1}, {"name": "b"}]}),
    (Crash, {"how": b"x"}),
]
OWN_TAGS = [b"1", b"3", b"4", b"5"]
CANCELLED_CALL = 2  # the index of the Echo call in OWN_CALLS (tag "3")
OWN_COMMANDS = {command.wire_name for command, _ in OWN_CALLS}
# Every way a call of ours may fail: an error answer (mapped or not), an answer
# that does not decode, or the connection closing first.
CALL_ERRORS = (
    amp.RemoteAmpError,
    ProtocolError,
    amp.ConnectionLostError,
    ZeroDivisionError,
    OverflowError,
    KeyError,
    FatalError,
)


class MemoryTransport(asyncio.Transport):
    """
    A transport that records what is written and behaves like asyncio's own.

    ``close()`` and ``abort()`` call the protocol's ``connection_lost`` on the
    next turn of the loop. Without a high-water mark, writes go out at once;
    with one, written bytes stay buffered until the next turn, and a write that
    goes over the mark calls ``pause_writing`` at once and ``resume_writing``
    when the buffer drains.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int = 0) -> None:
        super().__init__()
        self._loop = loop
        self._protocol: amp.AMPProtocol | None = None
        self._high_water = high_water
        self._buffered = 0
        self._draining = False
        self.writing_paused = False
        self.written: list[bytes] = []
        self.reading_paused = False
        self.closing = False
        self.lost = False
        self.problems: list[str] = []

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, amp.AMPProtocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("fuzz", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return not self.reading_paused

    def pause_reading(self) -> None:
        if self.reading_paused:
            self.problems.append("pause_reading() while reading is paused")
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            self.problems.append("resume_reading() while reading is not paused")
        self.reading_paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing:
            self.problems.append(f"write after close: {bytes(data)[:60]!r}")
            return
        if not data:
            self.problems.append("an empty write")
        self.written.append(bytes(data))
        if not self._high_water:
            return
        self._buffered += len(data)
        if not self._draining:
            self._draining = True
            self._loop.call_soon(self._drained)
        if not self.writing_paused and self._buffered > self._high_water:
            self.writing_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, self._high_water)

    def _drained(self) -> None:
        self._draining = False
        self._buffered = 0
        if self.writing_paused and not self.lost:
            self.writing_paused = False
            assert self._protocol is not None
            self._protocol.resume_writing()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self._connection_lost, None)

    def abort(self, exc: Exception | None = None) -> None:
        self.closing = True
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            assert self._protocol is not None
            self._protocol.connection_lost(exc)


class _StrictHandler(logging.Handler):
    """Formats every record (so a bad format string fails here) and keeps none."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if not record.getMessage():
            raise AssertionError(f"an empty log message from {record.pathname}:{record.lineno}")
        del message

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # noqa: PLE0704  # re-raise the formatting error, which logging would swallow


_logger = logging.getLogger("asyncio_amp")


@contextlib.contextmanager
def _strict_logging() -> Iterator[None]:
    """Send the package's log lines to a _StrictHandler only, and restore the logger after."""
    handler = _StrictHandler()
    level, propagate = _logger.level, _logger.propagate
    _logger.addHandler(handler)
    _logger.propagate = False
    try:
        yield
    finally:
        _logger.removeHandler(handler)
        _logger.setLevel(level)
        _logger.propagate = propagate


_loop: asyncio.AbstractEventLoop | None = None
_loop_errors: list[dict[str, Any]] = []


def get_loop() -> asyncio.AbstractEventLoop:
    """The event loop of the whole run, created on first use."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        _loop.set_exception_handler(lambda loop, context: _loop_errors.append(context))
    return _loop


def close_loop() -> None:
    """Close the run's event loop (a later input creates a new one)."""
    global _loop
    if _loop is not None:
        _loop.close()
        _loop = None


def test_one_input(data: bytes) -> None:
    """Check one input; any exception or failed assertion is a finding."""
    run_input(data)


def run_input(data: bytes) -> bytes:
    """Check one input, and return what the server wrote in reply to the peer."""
    loop = get_loop()
    with _strict_logging(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = loop.run_until_complete(drive(data))
    if _loop_errors:
        context = _loop_errors.pop()
        _loop_errors.clear()
        raise AssertionError(f"the event loop reported an error: {context}")
    # A coroutine never awaited, say: Python only warns about it.
    if caught:
        raise AssertionError(f"warnings: {[str(w.message) for w in caught]}")
    return written


async def turns(condition: Any, what: str) -> None:
    """Let the loop run until ``condition()`` is true, for at most MAX_TURNS turns."""
    for _ in range(MAX_TURNS):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"stalled: {what} after {MAX_TURNS} turns of the loop")


async def drive(data: bytes) -> bytes:
    """Feed one input to a fresh server, check what it did; return what it wrote in reply."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    inp = FuzzInput(data)
    options = inp.options
    points = inp.chunk_points()
    limits = inp.limits()
    kwargs: dict[str, Any] = dict(limits)
    if options & FEW_RESPONDERS:
        kwargs["max_responders"] = 1 + inp.take(1) % 4
    high_water = 1 + inp.take(1) * 4 if options & PAUSE_WRITING else 0
    more = inp.take(1) if options & MORE else 0
    shutdown_at = inp.take(1) if more & SHUTDOWN else None
    stream = inp.stream()
    chunks = split(stream, points)
    _logger.setLevel(logging.DEBUG if options & DEBUG_LOG else logging.INFO)

    transport = MemoryTransport(loop, high_water)
    server = FuzzServer(**kwargs)
    transport.set_protocol(server)
    server.connection_made(transport)

    calls: list[asyncio.Future[Any]] = []
    if options & CALLS:
        calls = [server.call_remote(command, **values) for command, values in OWN_CALLS]
        # All of them are on the wire before the peer's bytes come (with a small
        # high-water mark, some wait for the transport to drain).
        await turns(
            lambda: len(parse_boxes(b"".join(transport.written))) == len(calls),
            "the server's calls not sent",
        )
        if more & CANCEL:
            calls[CANCELLED_CALL].cancel()
    own_wire = b"".join(transport.written)
    assert len(parse_boxes(own_wire)) == len(calls)

    def idle() -> bool:
        return (
            not transport.reading_paused
            and not transport.writing_paused
            and len(asyncio.all_tasks()) == 1
        )

    shutdown: asyncio.Task[None] | None = None
    for index, chunk in enumerate(chunks):
        if shutdown_at is not None and index == shutdown_at % len(chunks):
            # Without calls of ours to wait for, the shutdown waits for the
            # responders; otherwise it gives them no time at all.
            shutdown = loop.create_task(server.shutdown(grace=0 if calls else None))
            await asyncio.sleep(0)
        if transport.closing:
            break
        # A real transport delivers nothing while reading is paused, nor once it
        # is closing (the connection may close while reading is paused).
        await turns(
            lambda: transport.closing or not transport.reading_paused, "reading still paused"
        )
        if transport.closing:
            break
        server.data_received(chunk)
    hung_up_early = bool(more & HANG_UP_EARLY) and not transport.closing
    if hung_up_early:
        transport.abort(ConnectionResetError("the fuzz peer reset the connection"))
    else:
        # Idle twice, a few turns apart: an answer is written on the turn after
        # its responder finishes.
        for _ in range(2):
            await turns(lambda: transport.closing or idle(), "responders still running")
            for _ in range(3):
                await asyncio.sleep(0)
    closed_by_protocol = transport.closing and not hung_up_early
    if not transport.closing:
        # The peer sends EOF; eof_received() returning a false value closes the transport.
        assert not server.eof_received()
        transport.close()
    await turns(lambda: transport.lost, "connection_lost not called")
    assert server.closed
    await turns(lambda: all(t is me for t in asyncio.all_tasks()), "tasks left after close")
    # Nor a timer (the protocol's drop-after-close_timeout one, say): the loop
    # has no public way to list them.
    timers = [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]
    assert not timers, f"timers left after close: {timers}"
    assert all(call.done() for call in calls)
    if shutdown is not None:
        assert shutdown.done()
        shutdown.result()
    for call in calls:
        if call.cancelled():
            continue
        error = call.exception()
        assert error is None or isinstance(error, CALL_ERRORS), repr(error)
    assert not transport.problems, transport.problems

    written = b"".join(transport.written)[len(own_wire) :]
    check_output(
        stream,
        limits,
        written,
        own_tags=OWN_TAGS if calls else [],
        closed_by_protocol=closed_by_protocol,
        fatal_raised=server.fatal_raised,
        shut_down=shutdown is not None,
        complete=not hung_up_early and shutdown is None,
    )
    return written


def check_output(
    stream: bytes,
    limits: dict[str, int],
    written: bytes,
    *,
    own_tags: list[bytes],
    closed_by_protocol: bool,
    fatal_raised: bool,
    shut_down: bool,
    complete: bool,
) -> None:
    """Compare what the server wrote with a reference reading of the stream."""
    # The reference: the sans-I/O connection reads the stream; the first event
    # that breaks the protocol (bad framing, or an answer to a tag we never sent
    # or already got an answer for) is where the server must close.
    reference = AMPConnection(**limits)
    reference.receive_data(stream)
    unanswered = set(own_tags)
    asked: collections.Counter[bytes] = collections.Counter()
    must_close = False
    for event in reference.events_received():
        if isinstance(event, Ask):
            if event.tag is not None:
                asked[event.tag] += 1
        elif isinstance(event, Answer | ErrorAnswer) and event.tag in unanswered:
            unanswered.discard(event.tag)
        else:
            assert isinstance(event, Answer | ErrorAnswer | Failure)
            must_close = True
            break
    if must_close:
        assert closed_by_protocol, "the peer broke the protocol but the server did not close"
    if closed_by_protocol:
        assert must_close or fatal_raised or shut_down, "the server closed for no reason"

    answered: collections.Counter[bytes] = collections.Counter()
    for box in parse_boxes(written):
        if b"_answer" in box:
            assert b"_error" not in box and b"_command" not in box, box
            answered[box[b"_answer"]] += 1
        else:
            assert b"_error" in box and b"_command" not in box, box
            answered[box[b"_error"]] += 1
            code = box[b"_error_code"]
            assert code in ERROR_CODES, box
            if code == b"UNKNOWN":
                assert box[b"_error_description"] == UNKNOWN_DESCRIPTION, box
    for tag, count in answered.items():
        assert count <= asked[tag], f"tag {tag!r} answered {count} times, asked {asked[tag]}"
    if complete and not closed_by_protocol:
        assert answered == asked, (answered, asked)


def main() -> None:
    atexit.register(close_loop)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
