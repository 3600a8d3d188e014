"""
AMPProtocol: the asyncio layer that drives an ``AMPConnection``.

It moves bytes between the transport and the sans-I/O connection, matches
answers to the futures of pending calls, runs responders, and logs. All writes
go through one method, ``AMPProtocol._flush``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import socket
import ssl
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, cast, overload

from ._commands import (
    RESPONDER_ATTRIBUTE,
    Command,
    RawArguments,
    RawCommand,
    encode_error,
    encode_unknown_error,
)
from ._connection import AMPConnection, Answer, Ask, Called, ErrorAnswer, Failure
from ._errors import ConnectionLostError, ProtocolError, UnhandledCommandError
from ._fds import FdChannel
from ._flow import (
    DEFAULT_MAX_PENDING_CALLS,
    DEFAULT_MAX_QUEUED_CALLS,
    FlowControl,
    Verdict,
    shared_flow,
)
from ._keepalive import (
    DEFAULT_KEEPALIVE_TIMEOUT,
    HEARTBEAT_NAME,
    Keepalive,
    answer_heartbeat,
    for_protocol,
    interval_value,
    seconds_value,
)
from ._locators import Located, default_hook, default_locate, is_default_hook, locate
from ._middleware import Chain, Middleware, build, check_arguments
from ._observe import MAX_PENDING_CALLS, MAX_RESPONDERS, Observer, observer_of
from ._switch import Upgrade
from ._tls import StartTLS
from ._wire import DEFAULT_MAX_BOX_SIZE, DEFAULT_MAX_KEYS, PREFIXES, Box, parse_boxes

__all__ = ["AMPProtocol"]

logger = logging.getLogger("asyncio_amp")

# While handling one read, queued answers are written every this many boxes, so the
# peer can start on the first answers while the rest are still being computed.
WRITE_BATCH = 32

# Queued bytes are written as soon as they reach this size, whatever else is
# gathered, so that the transport can say it is full (pause_writing) before a
# burst of calls is all copied into its buffer: what follows waits as the
# callers' encoded parts.
FLUSH_BYTES = 64 * 1024

SHUTDOWN_DESCRIPTION = b"the peer is shutting down"

# How many cancelled calls' tags are remembered, so that their late answers are
# dropped quietly. Older ones are forgotten: a late answer for one of those closes
# the connection like any answer for a tag we never sent.
MAX_CANCELLED_TAGS = 65_536


# The buffer the transport reads into (asyncio.BufferedProtocol). The bytes are
# copied out and parsed as soon as a read completes, so on the selector-based loops
# (asyncio on Unix, uvloop), where a read and its buffer_updated() call happen in
# one step, every connection of a loop can share one buffer: an idle connection
# then holds no read buffer at all. The proactor loop (Windows) holds the buffer
# across an overlapped read, so there each connection gets its own.
READ_BUFFER_SIZE = 256 * 1024
_shared_read_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def _read_buffer_for(loop: asyncio.AbstractEventLoop) -> memoryview:
    if sys.platform == "win32":
        return memoryview(bytearray(64 * 1024))
    try:
        return _shared_read_buffers[loop]
    except KeyError:
        buffer = _shared_read_buffers[loop] = memoryview(bytearray(READ_BUFFER_SIZE))
        return buffer
    except TypeError:  # a loop that cannot be weakly referenced
        return memoryview(bytearray(64 * 1024))


# The context of the last connection made on each loop. A protocol only ever runs
# copies of its context (each responder gets a fresh one), never the context
# itself, so connections made in contexts with equal contents can share one: the
# many connections a server accepts in the same context then hold no context each.
_shared_contexts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, contextvars.Context] = (
    weakref.WeakKeyDictionary()
)


def _context_for(loop: asyncio.AbstractEventLoop) -> contextvars.Context:
    """A copy of the current context, or an equal one an earlier connection holds."""
    context = contextvars.copy_context()
    try:
        shared = _shared_contexts.get(loop)
    except TypeError:  # a loop that cannot be weakly referenced
        return context
    if shared is not None and shared == context:
        return shared
    _shared_contexts[loop] = context
    return context


# Default limits; see AMPProtocol's docstring.
DEFAULT_MAX_RESPONDERS = 100
# (DEFAULT_MAX_QUEUED_CALLS comes from _flow.)
DEFAULT_CLOSE_TIMEOUT = 10.0

# The error code of an answer to a call that arrives while the connection shuts down.
SHUTDOWN_ERROR_CODE = b"SHUTDOWN"


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


def _close_unstarted(coroutine: Coroutine[Any, Any, Any], task: asyncio.Task[None]) -> None:
    """Close a responder's coroutine whose task was cancelled before awaiting it."""
    if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
        coroutine.close()


def _label(command: type[Command] | RawCommand) -> str:
    """The name of a call's command in messages."""
    if isinstance(command, RawCommand):
        return command.label
    return command.__qualname__


def _log_sent(peer: str, data: bytes) -> None:
    """Log a sent box at DEBUG as received ones are: as its dict of keys and values."""
    try:
        boxes: Any = parse_boxes(data)
    except ProtocolError:
        boxes = [data]
    for box in boxes:
        logger.debug("> %s %r", peer, box)


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peername, str | bytes) and peername:
        return str(peername)
    return "unknown peer"


# The futures of calls are plain asyncio futures: a Task awaiting one of them
# takes asyncio's fast path, which a Future subclass does not (measured: 28 %
# fewer instructions for each await). What the protocol keeps about a call:
#
# * sent and waiting for its answer, in the connection's pending table: the
#   parser of its answer (or None), its future, its command;
# * not sent yet (over max_pending_calls, or writing paused): its future, its
#   command, its encoded parts and the index of its tag in them.
#
# A cancelled call is forgotten lazily: its answer is dropped when it comes, and
# its place is taken back when max_pending_calls is reached (see _sweep).
_Sent = tuple[Any, "asyncio.Future[Any]", "type[Command] | RawCommand"]
_Held = tuple["asyncio.Future[Any]", "type[Command] | RawCommand", list[bytes], int]


class _Responding:
    """
    A running responder, as its own calls to the peer see it.

    Each responder task runs in its own context, where ``_responding`` holds this
    record: a call the responder makes on the same connection then lends the
    responder's place to the peer's other calls until it is answered (see
    ``_flow``).
    """

    __slots__ = ("ended", "protocol", "waiting")

    def __init__(self, protocol: AMPProtocol) -> None:
        self.protocol = protocol
        self.waiting = 0  # its calls on this connection not answered yet
        self.ended = False


_responding: contextvars.ContextVar[_Responding | None] = contextvars.ContextVar(
    "asyncio_amp_responding", default=None
)


class AMPProtocol(asyncio.BufferedProtocol):
    """
    An AMP connection on asyncio: call the peer's commands and answer its calls.

    Use it as it is for a client, or subclass it and mark methods with
    ``@SomeCommand.responder`` to answer commands; both sides of a connection may
    do both. It works with plain asyncio:

        server = await loop.create_server(MyServer, "localhost", 8000)
        transport, proto = await loop.create_connection(AMPProtocol, "localhost", 8000)

    Subclasses that override [`connection_made`][] or [`connection_lost`][]
    must call ``super()``.

    Every limit below is also an attribute of the same name, which may be changed
    until the connection is made (``serve`` and ``connect`` take them as keywords
    and set them that way).

    Args:
        max_box_size: The most bytes one received box may take (16 MiB); a bigger
            box is bad input and closes the connection.
        max_keys: The most keys one received box may have (1,024); more is bad
            input and closes the connection.
        max_responders: The most responders that may work at once on this
            connection (100). A responder that waits for the answer to its own
            call on this connection does not count while it waits, and one whose
            answer is queued no longer counts. At the limit, further calls wait
            their turn in order, and the protocol stops reading from the peer, so
            a flooding peer is held back by TCP; but it never stops reading while
            a call of ours waits for its answer.
        max_pending_calls: The most calls of ours that may wait for an answer at
            once (1,000). Further calls wait, in order, before being sent.
        max_queued_calls: How many more calls from the peer than
            ``max_responders`` may be in our hands (running, or waiting for a
            responder) while reading goes on because a call of ours waits for
            its answer (10,000). More is a flood: the connection is closed as
            for any broken limit. Calls our responders make back to the peer do
            not wait for ``max_pending_calls``.
        close_timeout: How long [`close`][] lets the data already queued drain
            to the peer before it drops the connection anyway (10 seconds), so a
            peer that stops reading cannot keep a connection open.
        locators: Objects whose ``@Command.responder`` methods answer the
            commands this protocol has no responder of its own for, tried in
            order (see [`locators`][asyncio_amp.AMPProtocol.locators]).
        keepalive: Seconds of silence from the peer after which a heartbeat
            call is sent (``None``, the default: no keepalive). A whole period
            with nothing received sends one.
        keepalive_timeout: Seconds to wait for any byte from the peer after
            a heartbeat (20). Then the connection is aborted and its pending
            calls fail with [`ConnectionLostError`][] ("keepalive timeout").
            Any answer counts, an error too, so Twisted peers need no change.
        middleware: [`Middleware`][asyncio_amp.Middleware] that runs around
            the responders of the peer's calls and around our calls, in list
            order, the first outermost (see
            [`middleware`][asyncio_amp.AMPProtocol.middleware]).

    While the transport's write buffer is over its high-water mark
    (``pause_writing``), new calls wait as their encoded parts, answers stay
    queued, and no new responder starts; everything goes on at
    ``resume_writing``. ``_flow`` explains why no cycle of waits can close.

    Each responder, a coroutine or a plain function, runs in a fresh copy of the
    context the connection was made in, so context variables that one request
    sets are never seen by another.
    """

    __slots__ = (
        "__weakref__",
        "_abort_handle",
        "_accepting",
        "_cancelled",
        "_close_after_flush",
        "_close_cause",
        "_close_timeout",
        "_closed_waiter",
        "_conn",
        "_context",
        "_debug",
        "_fds",
        "_flow",
        "_flush_handle",
        "_gather",
        "_incoming",
        "_keepalive",
        "_keepalive_interval",
        "_keepalive_timeout",
        "_locators",
        "_loop",
        "_lost",
        "_middleware",
        "_observer",
        "_outgoing",
        "_peer",
        "_pending",
        "_read_buffer",
        "_reading_paused",
        "_received",
        "_receiving",
        "_release_handle",
        "_shutdown_handle",
        "_shutting_down",
        "_sweep_handle",
        "_tasks",
        "_upgrade",
        "_waiting",
        "_waiting_nested",
        "_watching",
        "_writing_paused",
        "transport",
    )

    # command wire name -> (Command class, attribute name, responder is a coroutine function)
    _responder_table: ClassVar[dict[bytes, tuple[type[Command], str, bool]]] = {}
    # command wire name -> (its arguments' parser, its entry in _responder_table),
    # for the connection to decode the usual calls straight to their arguments
    _ask_parsers: ClassVar[dict[bytes, tuple[Any, tuple[type[Command], str, bool]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[bytes, tuple[type[Command], str]] = {}
        for klass in reversed(cls.__mro__):
            for attribute, value in vars(klass).items():
                commands = getattr(value, RESPONDER_ATTRIBUTE, None)
                if commands:
                    for command in commands:
                        table[command.wire_name] = (command, attribute)
        # The attribute is looked up on the class now, so that a subclass that
        # overrides a responder's method (decorated or not) gets its own method.
        cls._responder_table = {
            name: (command, attribute, inspect.iscoroutinefunction(getattr(cls, attribute)))
            for name, (command, attribute) in table.items()
        }
        cls._ask_parsers = {
            name: (entry[0]._parse_arguments, entry)
            for name, entry in cls._responder_table.items()
            if entry[0]._parse_arguments is not None
        }

    def __init__(
        self,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_responders: int = DEFAULT_MAX_RESPONDERS,
        max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
        max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        locators: Iterable[object] = (),
        keepalive: float | None = None,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        #: The transport, once connected.
        self.transport: asyncio.Transport | None = None
        self._conn = AMPConnection(max_box_size=max_box_size, max_keys=max_keys)
        # Shared and read-only while the connection is idle: _own_flow() before
        # any change (see _flow).
        self._flow = shared_flow(
            _positive("max_responders", max_responders),
            _positive("max_queued_calls", max_queued_calls),
            _positive("max_pending_calls", max_pending_calls),
        )
        self._close_timeout = 0.0
        self.close_timeout = close_timeout
        self._abort_handle: asyncio.TimerHandle | None = None
        # Created when first needed: an idle connection should cost little memory.
        self._waiting: collections.deque[_Held] | tuple[()] = ()
        # Calls made by our responders to the peer that wait for writing to
        # resume: they never wait for max_pending_calls (see _flow).
        self._waiting_nested: collections.deque[_Held] | tuple[()] = ()
        # True while cancellations of sent calls are watched, because calls wait
        # for a place under max_pending_calls (see _send_waiting).
        self._watching = False
        self._reading_paused = False
        self._writing_paused = False
        self._release_handle: asyncio.Handle | None = None
        # The context the connection was made in: each responder runs in a copy.
        self._context: contextvars.Context | None = None
        self._shutting_down = False
        # The end of the grace period of shutdown() called from a responder.
        self._shutdown_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer = "unconnected peer"
        # The connection's table: it takes out the calls whose answers it decodes.
        self._pending: dict[bytes, _Sent] = self._conn.pending
        self._conn.ask_parsers = self._ask_parsers
        self._locators: Located | None = None
        # The middleware, and its chains for each direction (see _middleware):
        # None where no middleware runs, which is all the hot paths test.
        self._middleware: tuple[Middleware, ...] = ()
        self._incoming: Chain | None = None
        self._outgoing: Chain | None = None
        # The middleware that observe the connection itself (see _observe): None
        # without, which is all the hot paths test.
        self._observer: Observer | None = None
        if locators:
            self.locators = locators
        # Tags of cancelled calls taken out of pending, with their commands.
        self._cancelled: dict[bytes, type[Command] | RawCommand] | None = None
        self._tasks: set[asyncio.Task[None]] | None = None
        self._receiving = False
        self._flush_handle: asyncio.Handle | None = None
        self._sweep_handle: asyncio.Handle | None = None
        # True after a read that answered several calls: the calls their callers
        # make next are gathered into one write instead of the first going alone.
        self._gather = False
        self._close_after_flush = False
        self._close_cause: BaseException | None = None
        # True while calls may be made: connected, and not closing or shutting down.
        self._accepting = False
        self._lost = False
        self._closed_waiter: asyncio.Future[None] | None = None
        self._debug = False
        self._read_buffer: memoryview | None = None
        # On UNIX socket connections: descriptor passing (see _fds).
        self._fds: FdChannel | None = None
        # While StartTLS or a protocol switch changes what the connection
        # carries (see _tls and _switch): it holds writes, and may own reading.
        self._upgrade: Upgrade | None = None
        # Keepalive (see _keepalive): set by each read, cleared by its timer.
        self._received = False
        self._keepalive: Keepalive | None = None
        self._keepalive_interval = interval_value("keepalive", keepalive)
        self._keepalive_timeout = seconds_value("keepalive_timeout", keepalive_timeout)
        if middleware:
            self.middleware = middleware

    def __repr__(self) -> str:
        state = "closed" if self._lost else "open" if self.transport else "unconnected"
        return f"<{type(self).__name__} {state} {self._peer} pending={len(self._pending)}>"

    # asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start using ``transport``. Subclasses that override this must call ``super()``."""
        # Not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self._context = _context_for(loop)
        self._accepting = not (
            self._close_after_flush or self._lost or self._close_cause or self._shutting_down
        )
        self._peer = _format_peer(transport.get_extra_info("peername"))
        self._read_buffer = _read_buffer_for(loop)
        self._debug = logger.isEnabledFor(logging.DEBUG)
        if self._debug:
            logger.debug("= connection made with %s", self._peer)
            # Every box is logged as it came: no decoding straight to values.
            self._conn.decode_values = False
        sock = transport.get_extra_info("socket")
        if (
            # uvloop starts the transport's reading after connection_made(), so the
            # protocol cannot read by itself there: Descriptor says it is unsupported.
            isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
            and sock is not None
            and getattr(sock, "family", None) == socket.AF_UNIX
            and transport.get_extra_info("sslcontext") is None
        ):
            self._fds = FdChannel(self, loop, sock.fileno())
        if self._keepalive_interval is not None:
            for_protocol(self).start()
        if self._middleware:
            # The middleware that observe the connection (see _observe): fixed
            # from now on, as the middleware is.
            self._observer = observer_of(self._middleware)
            if self._observer is not None:
                self._observer.connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Return the buffer for the transport to read into."""
        buffer = self._read_buffer
        if buffer is None:
            buffer = self._read_buffer = memoryview(bytearray(64 * 1024))
        return buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Take the ``nbytes`` just read into the buffer."""
        assert self._read_buffer is not None
        self.data_received(bytes(self._read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """Decode ``data``, resolve the calls it answers and run the calls it makes."""
        self._received = True  # the peer is alive (see _keepalive)
        conn = self._conn
        if self._observer is not None:
            self._observer.bytes_received(self, len(data))
        conn.receive_data(data)
        events = conn.events_received()
        if not events:
            return
        self._receiving = True
        flow = self._flow
        if flow.shared:
            flow = self._own_flow()
        context = self._context
        remaining = iter(events)
        try:
            for event in remaining:
                kind = type(event)
                if kind is tuple:
                    if len(event) == 2:  # type: ignore[arg-type]
                        # An answer the connection decoded: its call is out of pending.
                        sent, result = event  # type: ignore[misc]
                        try:  # noqa: SIM105 (a with block costs more on this path)
                            sent[1].set_result(result)
                        except asyncio.InvalidStateError:
                            pass  # the call was cancelled: its answer is dropped
                    elif (
                        flow.working < flow.max_responders
                        and not flow.deferred
                        and not flow.lending
                        and not self._writing_paused
                    ):
                        flow.working += 1  # FlowControl.arrive, inline
                        found, tag, arguments = event  # type: ignore[misc]
                        command, attribute, is_coroutine = found
                        if is_coroutine or self._shutting_down or self._incoming is not None:
                            self._dispatch(event)  # type: ignore[arg-type]
                        else:
                            # _dispatch, inline for a plain responder's call decoded
                            # by the connection (its tag is never None): run it in a
                            # fresh copy of the connection's context, encode its
                            # answer with the compiled encoder, queue it (_responded
                            # and _send, inline) and free its place.
                            try:
                                responder = (
                                    getattr(self, attribute)
                                    if type(attribute) is str
                                    else attribute
                                )
                                result = context.copy().run(responder, **arguments)  # type: ignore[union-attr]
                            except Exception as exc:
                                self._responded(self._failure_answer(command, tag, exc))
                            else:
                                if type(result) is dict and (
                                    (encoder := command._plain_answer) is not None
                                ):
                                    try:
                                        data = b"".join(encoder(result, tag))
                                    except Exception:  # the general path reports it
                                        self._responded(self._answer_for(command, tag, result))
                                    else:
                                        # AMPConnection.send, inline.
                                        conn.queued_bytes += len(data)
                                        outgoing = conn._outgoing
                                        if outgoing is None:
                                            conn._outgoing = [data]
                                        else:
                                            outgoing.append(data)
                                            if (
                                                len(outgoing) >= WRITE_BATCH
                                                and not self._writing_paused
                                            ):
                                                self._flush()
                                        flow.working -= 1  # FlowControl.ended, inline
                                        if flow.deferred:
                                            self._schedule_release()
                                else:
                                    self._result(command, tag, result)
                    else:
                        self._arrive(event)  # type: ignore[arg-type]
                    if self._close_cause is not None:
                        break
                    continue
                if self._debug and kind is not Failure:
                    logger.debug("< %s %r", self._peer, event.box)  # type: ignore[union-attr]
                if kind is Answer:
                    # A box the connection did not decode: its compiled decoder
                    # first, the general way for anything it does not take.
                    sent = self._take_call(event.tag, event.box)  # type: ignore[union-attr,arg-type]
                    if sent is not None:
                        command = sent[2]
                        try:
                            if command._uses_descriptors:
                                raise LookupError  # needs this connection's descriptors
                            result = command._fast_response(event.box)  # type: ignore[union-attr]
                        except Exception:
                            self._resolve(sent, event.box)  # type: ignore[union-attr]
                        else:
                            sent[1].set_result(result)
                elif kind is Ask:
                    if event.command == HEARTBEAT_NAME:  # type: ignore[union-attr]
                        answer_heartbeat(self, event.tag)  # type: ignore[union-attr]
                    else:
                        self._arrive(event)  # type: ignore[arg-type]
                elif kind is ErrorAnswer:
                    self._error_received(event)  # type: ignore[arg-type]
                else:
                    self._protocol_failure(event.error)  # type: ignore[union-attr]
                if self._close_cause is not None:
                    break
        finally:
            self._receiving = False
        if self._close_cause is not None:
            # The calls whose answers came after the fault were already taken out
            # of pending by the connection: they fail like the others did.
            self._fail_pending(
                self._close_cause,
                [e[0] for e in remaining if type(e) is tuple and len(e) == 2],
            )
        if len(events) > 1:
            self._gather = True
        if self._waiting or self._waiting_nested:
            self._send_waiting()
        if (conn.has_data_to_send and not self._writing_paused) or self._close_after_flush:
            self._flush()
        if flow.deferred or self._writing_paused or self._reading_paused:
            self._update_reading()
        if self._watching and not self._pending:
            self._watching = False

    def eof_received(self) -> bool | None:
        """The peer will send nothing more; close our side too."""
        if self._debug:
            logger.debug("= %s sent EOF", self._peer)
        return None

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold back calls, answers and new responders."""
        self._writing_paused = True
        self._own_flow().pause_writing()
        if self._upgrade is not None:
            self._upgrade.pause_writing()
        if self._debug:
            logger.debug("= writing to %s paused", self._peer)

    def resume_writing(self) -> None:
        """The transport's buffer has drained: send what was held back."""
        if self._fds is not None:
            # Descriptors may have waited for the buffer to drain: back to its own limits.
            self._fds.restore_limits(self.transport)
        if self._upgrade is not None and self._upgrade.resume_writing():
            return  # writes are held until the upgrade is done
        self._writing_paused = False
        self._own_flow().resume_writing()
        if self._keepalive is not None:
            self._keepalive.resumed()
        if self._debug:
            logger.debug("= writing to %s resumed", self._peer)
        if not self._lost:
            # Not from inside the transport's drain, where this is called: when a
            # write made there fails, asyncio's selector transport (before
            # CPython gh-156512) calls connection_lost twice.
            self._loop.call_soon(self._resumed)  # type: ignore[union-attr]

    def _resumed(self) -> None:
        """Writing resumed: send what was held back."""
        if self._lost or self._writing_paused:
            return
        self._flush()
        if (self._waiting or self._waiting_nested) and not self._writing_paused:
            self._send_waiting()
        if self._flow.deferred:
            self._release()
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """
        Fail every pending call and stop every running responder.

        Subclasses that override this must call ``super()``.
        """
        if self._lost:
            return
        self._lost = True
        self._accepting = False
        truncated = self._conn.connection_lost()
        cause = self._close_cause or exc or truncated
        if truncated is not None:
            logger.info("connection with %s closed inside a box: %s", self._peer, truncated)
        if self._debug:
            logger.debug("= connection with %s lost: %s", self._peer, cause or "closed")
        self._fail_pending(cause)
        if not self._flow.shared:
            self._flow.drop_waiting()
        for task in self._tasks or ():
            task.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        if self._shutdown_handle is not None:
            self._shutdown_handle.cancel()
            self._shutdown_handle = None
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if self._keepalive is not None:
            self._keepalive.stop()
        self._conn.data_to_send()
        if self._fds is not None:
            self._fds.close()
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        if self._observer is not None and self.transport is not None:
            self._observer.connection_lost(self)

    # Public methods

    def call_remote(
        self, command: type[Command] | Command, /, **arguments: Any
    ) -> asyncio.Future[Any]:
        """
        Call ``command`` on the peer and return a future of its answer.

        Give either a Command class and its arguments as keywords, or a Command
        instance that carries them. The result is awaitable and works with
        ``asyncio.timeout``, ``wait_for`` and ``gather``; cancelling it forgets the
        call, and its answer is dropped if it comes later.

        The call is checked and encoded at once. It is sent at once too, unless
        ``max_pending_calls`` calls already wait for answers or the transport's
        buffer is full: then it waits its turn, and the future stays pending.

        Returns:
            A future of the answer: a dict keyed like ``command.response``. For a
            command with ``requires_answer = False`` the future is done with
            ``None`` as soon as the call is handed to the transport (at once,
            unless it had to wait).

        Raises:
            TypeError: An argument is unknown, missing or of the wrong type.
            ValueError: An argument's type cannot represent its value.
            TooLongError: A value is over 65,535 bytes. Nothing was sent, no tag
                was taken, and the connection is unaffected.
            ConnectionLostError: The connection is closed or shutting down (raised
                at once), or it closes before the answer comes (raised by the
                future).
            ProtocolSwitchedError: The connection is switching, or has switched,
                to another protocol (see [`ProtocolSwitchCommand`][]).

        The future raises the exception the command maps to the peer's error code,
        [`UnhandledCommandError`][] if the peer has no responder for it, or
        [`UnknownRemoteError`][] for any other error answer.
        """
        if isinstance(command, type):
            if not issubclass(command, Command):
                raise TypeError(f"call_remote() needs a Command class or instance, not {command!r}")
            cmd: type[Command] = command
        elif isinstance(command, Command):
            if arguments:
                raise TypeError(
                    "call_remote() takes a Command instance or a Command class with keyword "
                    "arguments, not both"
                )
            cmd = type(command)
            arguments = command.values
        else:
            raise TypeError(f"call_remote() needs a Command class or instance, not {command!r}")
        if not self._accepting:
            raise self._refusal(cmd.__qualname__)
        if self._outgoing is not None:
            check_arguments(self, cmd, arguments)  # before the chain, as without it
            return self._outgoing.call(self, cmd, cmd.wire_name, arguments)
        encoder = cmd._plain_ask
        if encoder is not None:
            try:
                parts, slot = encoder(arguments)
            except Exception:  # anything unusual: the general path reports it
                parts, slot = cmd._encode_ask(arguments)
        elif (upgrade := getattr(cmd, "_upgrade_call", None)) is not None:
            return upgrade(self, cmd, arguments)  # type: ignore[no-any-return]  # StartTLS, switch
        elif cmd._uses_descriptors and self._fds is not None:
            parts, slot = self._fds.encode(cmd._encode_ask, arguments)
        else:
            parts, slot = cmd._encode_ask(arguments)
        future = self._loop.create_future()  # type: ignore[union-attr]
        pending = self._pending
        responding = _responding.get()
        if responding is not None and responding.protocol is self and slot >= 0:
            # A responder of ours calls the peer back (see _flow).
            self._lend(responding, future)
            if self._writing_paused:
                self._hold_nested((future, cmd, parts, slot))
                return future
        elif (  # not FlowControl.may_send(nested=False), inline
            self._waiting
            or self._writing_paused
            or (slot >= 0 and len(pending) >= self._flow.max_pending_calls)
        ):
            self._hold((future, cmd, parts, slot))
            return future
        if slot < 0 or self._debug or self._reading_paused or self._watching:
            self._send_call(future, cmd, parts, slot, now=not pending and not self._gather)
            return future
        # _send_call and _send, inline for the usual call that wants an answer, with
        # AMPConnection.send_call inline too: take the next tag, put it in its slot,
        # expect the answer under it, and queue the box.
        now = not pending and not self._gather
        conn = self._conn
        n = conn._tag_counter = conn._tag_counter + 1
        tag = b"%x" % n
        parts[slot] = PREFIXES[len(tag)] + tag
        pending[tag] = (cmd._parse_response, future, cmd)
        data = b"".join(parts)
        queued_bytes = conn.queued_bytes = conn.queued_bytes + len(data)
        outgoing = conn._outgoing
        if outgoing is None:
            outgoing = conn._outgoing = [data]
        else:
            outgoing.append(data)
        if self._receiving:
            if len(outgoing) >= WRITE_BATCH or queued_bytes >= FLUSH_BYTES:
                self._flush()
        elif now or queued_bytes >= FLUSH_BYTES:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        return future

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: Literal[True] = True,
    ) -> asyncio.Future[Box]: ...

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: Literal[False],
    ) -> asyncio.Future[None]: ...

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: bool,
    ) -> asyncio.Future[Box | None]: ...

    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: bool = True,
    ) -> asyncio.Future[Any]:
        """
        Call a command by name with raw wire values, without a [`Command`][] class.

        This is the untyped form of [`call_remote`][], for tools and for peers
        whose schema is not known in advance: keys and values are sent as they are
        (``str`` as UTF-8), and the answer comes back as its wire box. It queues,
        waits and is cancelled exactly like [`call_remote`][].

        Args:
            command: The command name on the wire.
            arguments: Argument keys to wire values.
            requires_answer: If false, no ``_ask`` is sent and the future is done
                with ``None`` once the call is handed to the transport.

        Returns:
            A future of the answer box (wire keys to wire values, without the
            ``_answer`` key).

        Raises:
            TypeError: A key or value is neither ``str`` nor bytes.
            ValueError: A key is empty or reserved (``_ask``, ``_command``...).
            TooLongError: A key is over 255 bytes or a value over 65,535 bytes.
            ConnectionLostError: The connection is closed or shutting down, or
                it closes before the answer comes (raised by the future).

        The future raises [`UnhandledCommandError`][] for ``UNHANDLED``,
        [`UnknownRemoteError`][] for ``UNKNOWN`` and [`RemoteAmpError`][]
        for any other error code.
        """
        raw = RawCommand(command, arguments, requires_answer)
        if not self._accepting:
            raise self._refusal(raw.label)
        if self._outgoing is not None:
            return self._outgoing.call(self, None, raw.wire_name, arguments, raw)
        parts, slot = raw._encode_ask({})
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        self._submit(future, raw, parts, slot)
        return future

    def close(self) -> None:
        """
        Close the connection once the data already queued has been written.

        If the peer does not read it within ``close_timeout`` seconds, the
        connection is dropped anyway.
        """
        if self.transport is None or self._lost:
            return
        self._close_after_flush = True
        self._accepting = False
        if not self._receiving:
            self._flush()

    async def shutdown(self, grace: float | None = 30.0) -> None:
        """
        Close the connection gracefully.

        New local calls are refused at once with [`ConnectionLostError`][],
        and calls that arrive from the peer are answered with the error code
        ``SHUTDOWN``. The responders already running finish and send their
        answers, and our calls already sent get theirs, for up to ``grace``
        seconds (``None``: no limit). Then the connection closes: responders still
        running are cancelled and calls still unanswered fail with
        [`ConnectionLostError`][].

        Awaited in one of this connection's own responders, it returns once the
        rest is done (or the grace period is over), and the connection closes
        as soon as that responder has returned and its answer is queued.
        """
        if self._loop is None or self._lost:
            await self.wait_closed()
            return
        loop = self._loop
        deadline = None if grace is None else loop.time() + grace
        self._shutting_down = True
        self._accepting = False
        for future, command, _, _ in (*self._waiting, *self._waiting_nested):
            if not future.done():
                future.set_exception(
                    ConnectionLostError(
                        f"the connection with {self._peer} shut down before "
                        f"{_label(command)} was sent"
                    )
                )
        self._waiting = self._waiting_nested = ()
        for event in () if self._flow.shared else self._flow.drop_waiting():
            self._refuse_shutting_down(event)
        current = asyncio.current_task()
        work: set[asyncio.Future[Any]] = {
            *(self._tasks or ()),
            *(sent[1] for sent in self._pending.values() if not sent[1].done()),
        }
        own = current in work
        if current is not None:
            work.discard(current)
        if work:
            await asyncio.wait(work, timeout=grace)
        if own and not self._lost:
            # Called from one of our responders: its answer is still to come.
            assert current is not None
            current.add_done_callback(lambda _: self.close())
            if deadline is not None and self._shutdown_handle is None:
                self._shutdown_handle = loop.call_later(
                    max(0.0, deadline - loop.time()), self.close
                )
            return
        # Let the answers drain within what is left of the grace period, then drop.
        self.close()
        left = None if deadline is None else max(0.0, deadline - loop.time())
        if left is not None and self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
            if not self._lost:
                self._abort_handle = loop.call_later(left, self._abort)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and every pending call has failed."""
        if self._loop is None or self._lost:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
        await asyncio.shield(self._closed_waiter)

    @property
    def closed(self) -> bool:
        """``True`` once the connection is lost."""
        return self._lost

    @property
    def tls(self) -> bool:
        """``True`` while the connection runs over TLS (``ssl=``, or after [`StartTLS`][])."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is not None

    def start_tls_context(self) -> ssl.SSLContext | None:
        """
        The context to answer the peer's [`StartTLS`][] with, as the TLS server.

        Override it to accept StartTLS; the default, ``None``, answers the error
        code ``TLS_ERROR`` ("TLS not available"), as Twisted does without TLS.
        """
        return None

    @StartTLS.responder
    def _start_tls_responder(self) -> dict[str, Any]:
        # The answer and the handshake are _tls.answer_start_tls's (see _answer_for).
        return {}

    @property
    def peer(self) -> str:
        """The peer's address as text, as used in log lines."""
        return self._peer

    @property
    def max_responders(self) -> int:
        """The most responders that may work at once (see the class docstring)."""
        return self._flow.max_responders

    @max_responders.setter
    def max_responders(self, value: int) -> None:
        self._set_limits(max_responders=_positive("max_responders", value))

    @property
    def max_queued_calls(self) -> int:
        """The most calls from the peer that may wait for a responder while reading goes on."""
        return self._flow.max_queued_calls

    @max_queued_calls.setter
    def max_queued_calls(self, value: int) -> None:
        self._set_limits(max_queued_calls=_positive("max_queued_calls", value))

    @property
    def max_pending_calls(self) -> int:
        """The most calls of ours that may wait for an answer at once."""
        # Not counting the place added for a heartbeat while it is out (see _keepalive).
        return self._flow.max_pending_calls - self._heartbeat_out()

    @max_pending_calls.setter
    def max_pending_calls(self, value: int) -> None:
        self._set_limits(
            max_pending_calls=_positive("max_pending_calls", value) + self._heartbeat_out()
        )

    def _own_flow(self) -> FlowControl:
        """The connection's own flow control, taken from the shared one when first needed."""
        flow = self._flow
        if flow.shared:
            flow = self._flow = flow.own()
        return flow

    def _set_limits(self, **limits: int) -> None:
        flow = self._flow
        if not flow.shared:
            for name, value in limits.items():
                setattr(flow, name, value)
            return
        values = {
            "max_responders": flow.max_responders,
            "max_queued_calls": flow.max_queued_calls,
            "max_pending_calls": flow.max_pending_calls,
            **limits,
        }
        self._flow = shared_flow(**values)

    def _heartbeat_out(self) -> int:
        return int(self._keepalive is not None and self._keepalive.heartbeat is not None)

    @property
    def keepalive(self) -> float | None:
        """
        Seconds of silence from the peer after which a heartbeat is sent; ``None``: off.

        Setting it on a live connection starts, restarts or stops the keepalive.
        """
        return self._keepalive_interval

    @keepalive.setter
    def keepalive(self, value: float | None) -> None:
        self._keepalive_interval = interval_value("keepalive", value)
        if self._loop is not None and not self._lost:
            if self._keepalive_interval is not None:
                for_protocol(self).start()
            elif self._keepalive is not None:
                self._keepalive.stop()

    @property
    def keepalive_timeout(self) -> float:
        """Seconds to wait for any byte after a heartbeat before dropping the connection."""
        return self._keepalive_timeout

    @keepalive_timeout.setter
    def keepalive_timeout(self, value: float) -> None:
        self._keepalive_timeout = seconds_value("keepalive_timeout", value)

    @property
    def close_timeout(self) -> float:
        """Seconds that [`close`][] lets queued data drain before dropping the connection."""
        return self._close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"close_timeout must be a number of seconds >= 0, not {value!r}")
        self._close_timeout = float(value)

    @property
    def max_box_size(self) -> int:
        """The most bytes one received box may take."""
        return self._conn.max_box_size

    @max_box_size.setter
    def max_box_size(self, value: int) -> None:
        self._conn.max_box_size = value

    @property
    def max_keys(self) -> int:
        """The most keys one received box may have."""
        return self._conn.max_keys

    @max_keys.setter
    def max_keys(self, value: int) -> None:
        self._conn.max_keys = value

    @property
    def locators(self) -> tuple[object, ...]:
        """
        The objects that answer the commands this protocol has no responder for.

        Any object whose class has ``@Command.responder`` methods is a locator. A
        call from the peer goes to the protocol's own responder if it has one,
        else to the first locator that has one, else to
        [`unhandled_command`][asyncio_amp.AMPProtocol.unhandled_command]. A
        locator's responder runs exactly like the protocol's own (the same limits,
        context and error answers), with the arguments as keywords. Setting it
        (to any iterable) replaces the locators; ``serve`` and ``connect`` take
        it as the ``locators`` keyword.
        """
        located = self._locators
        return () if located is None else located.locators

    @locators.setter
    def locators(self, value: Iterable[object]) -> None:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError(f"locators must be an iterable of objects, not {value!r}")
        located = Located(value, self._responder_table, self._ask_parsers)
        if not located.locators:
            self._locators = None
            self._conn.ask_parsers = self._ask_parsers
            return
        self._locators = located
        # The connection decodes the locators' calls straight from the bytes too,
        # unless locate_responder() is overridden and must see every miss.
        if is_default_hook(type(self).locate_responder):
            self._conn.ask_parsers = located.ask_parsers

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """
        The [`Middleware`][asyncio_amp.Middleware] that runs around calls, outermost first.

        Each call from the peer goes through the ``incoming`` methods, in this
        order, on its way to its responder; each of our calls
        ([`call_remote`][asyncio_amp.AMPProtocol.call_remote] and
        [`call_remote_box`][asyncio_amp.AMPProtocol.call_remote_box]) goes
        through the ``outgoing`` methods on its way to the peer. Set it (to any
        iterable of Middleware) before the connection is made; ``serve`` and
        ``connect`` take it as the ``middleware`` keyword.

        Raises:
            TypeError: An item is not a Middleware instance.
            RuntimeError: The connection is already made.
        """
        return self._middleware

    @middleware.setter
    def middleware(self, value: Iterable[Middleware]) -> None:
        if self.transport is not None or self._lost:
            raise RuntimeError("middleware is set before the connection is made")
        self._middleware, self._incoming, self._outgoing = build(value)

    @default_hook
    def locate_responder(self, name: bytes) -> Callable[..., Any] | None:
        """
        Find the responder of the command named ``name`` (wire bytes).

        Called for each call from the peer that the protocol's own responders do
        not answer. By default it returns the responder of the first of
        [`locators`][asyncio_amp.AMPProtocol.locators] that has one. Override
        it for dynamic dispatch; the responder it returns must be marked
        ``@Command.responder`` for a Command named ``name`` and is called with
        the decoded arguments, like any responder. An exception here is logged,
        and the caller is answered ``UNKNOWN``.

        Returns:
            The bound responder, or ``None``: the call then goes to
            [`unhandled_command`][asyncio_amp.AMPProtocol.unhandled_command].
        """
        return default_locate(self, name)

    @default_hook
    def unhandled_command(
        self, name: bytes, box: dict[bytes, bytes]
    ) -> Mapping[bytes, bytes] | Awaitable[Mapping[bytes, bytes]]:
        """
        Answer a call from the peer that no responder answers.

        Override it to answer commands by name with raw boxes, as a router or a
        gateway does (Twisted's ``SimpleStringLocator``). It may be a coroutine
        function. It runs like a responder: it holds a place under
        ``max_responders``, in a copy of the connection's context. For a call
        without ``_ask`` its result is dropped.

        Args:
            name: The command name on the wire.
            box: The call's argument keys and values, without ``_ask`` and
                ``_command``.

        Returns:
            The answer box: bytes keys to bytes values, without ``_answer``. A box
            that breaks AMP's rules or limits is logged, and the caller is
            answered ``UNKNOWN``.

        Raises:
            RemoteAmpError: Answer the call with this error code and
                description. Any other exception is logged, and the caller is
                answered ``UNKNOWN``. By default it raises
                [`UnhandledCommandError`][] (``UNHANDLED``, with Twisted's
                description).
        """
        raise UnhandledCommandError("UNHANDLED", f"Unhandled Command: {name!r}")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # Private methods: our calls

    def _submit(
        self,
        future: asyncio.Future[Any],
        command: type[Command] | RawCommand,
        parts: list[bytes],
        slot: int,
    ) -> None:
        """Send an encoded call, or hold it until the limits let it go (call_remote_box's way)."""
        responding = _responding.get()
        if responding is not None and responding.protocol is self and slot >= 0:
            self._lend(responding, future)
            if self._writing_paused:
                self._hold_nested((future, command, parts, slot))
                return
        elif (  # not FlowControl.may_send(nested=False), inline
            self._waiting
            or self._writing_paused
            or (slot >= 0 and len(self._pending) >= self._flow.max_pending_calls)
        ):
            self._hold((future, command, parts, slot))
            return
        self._send_call(future, command, parts, slot, now=not self._pending)

    def _send_call(
        self,
        future: asyncio.Future[Any],
        command: type[Command] | RawCommand,
        parts: list[bytes],
        slot: int,
        *,
        now: bool,
    ) -> None:
        """Take a tag for a call and queue its box (which was checked when encoded)."""
        conn = self._conn
        if slot < 0:
            conn.skip_tag()
            self._send(b"".join(parts), now=now)
            future.set_result(None)
            return
        tag = conn.send_call(parts, slot, (command._parse_response, future, command))
        if self._upgrade is not None:
            self._upgrade.sent(self, future, tag)
        if self._outgoing is not None:
            self._outgoing.sent(future, tag)
        if self._watching:
            future.add_done_callback(self._pending_done)
        if self._debug:
            _log_sent(self._peer, b"".join(parts))
        if self._reading_paused:
            self._update_reading()  # its answer must be read
        self._after_send(now)

    def _refusal(self, name: str) -> Exception:
        """The error for a call made while the connection cannot take one."""
        if self._upgrade is not None and (switched := self._upgrade.refusal(name)) is not None:
            return switched  # ProtocolSwitchedError
        closed = self._close_after_flush or self._lost or self._loop is None or self._close_cause
        if self._shutting_down and not closed:
            return ConnectionLostError(
                f"cannot call {name}: the connection with {self._peer} is shutting down"
            )
        return self._lost_error(f"cannot call {name}")

    def _hold(self, held: _Held) -> None:
        """Queue a call that cannot be sent yet (call limit, or writing paused)."""
        if not self._waiting:
            self._waiting = collections.deque()
        self._waiting.append(held)
        if self._observer is not None and len(self._pending) >= self._flow.max_pending_calls:
            self._observer.limit_hit(self, MAX_PENDING_CALLS)
        if len(self._waiting) == 1 and not self._writing_paused:
            # Over the limit: cancelled calls may hold places that can be taken back.
            self._schedule_sweep()

    def _hold_nested(self, held: _Held) -> None:
        """Queue a call of one of our responders until writing resumes."""
        if not self._waiting_nested:
            self._waiting_nested = collections.deque()
        self._waiting_nested.append(held)

    def _send_waiting(self) -> None:
        """Send the calls that waited, in order, as far as the limits allow."""
        conn = self._conn
        flow = self._flow
        nested = self._waiting_nested
        while nested and not self._lost and flow.may_send(0, nested=True, behind=False):
            future, command, parts, slot = nested.popleft()
            if not future.done():
                self._send_call(future, command, parts, slot, now=False)
                if conn.queued_bytes >= FLUSH_BYTES and not self._receiving:
                    self._flush()
        waiting = self._waiting
        while waiting and not self._writing_paused and not self._lost:
            future, command, parts, slot = waiting[0]
            if future.done():  # cancelled while it waited: it never takes a tag
                waiting.popleft()
                continue
            if slot >= 0 and not flow.may_send(len(self._pending), nested=False, behind=False):
                self._watch_pending()
                return
            waiting.popleft()
            self._send_call(future, command, parts, slot, now=False)
            if conn.queued_bytes >= FLUSH_BYTES and not self._receiving:
                self._flush()  # may pause writing: the rest waits as it is

    def _watch_pending(self) -> None:
        """
        Calls wait for a place under max_pending_calls: watch the sent calls.

        A cancelled call is not taken out of the pending calls at once (that would
        take a future subclass or a callback per call, which makes every call
        slower), so once calls wait for a place, each sent call's future tells
        when it is cancelled (_pending_done), and its place is taken back then.
        This goes on until no call is pending, so that a future gets one such
        callback at most.
        """
        if self._watching:
            return
        self._watching = True
        for sent in self._pending.values():
            sent[1].add_done_callback(self._pending_done)

    def _pending_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() and self._waiting:
            self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self._sweep_handle is None and self._loop is not None and not self._lost:
            self._sweep_handle = self._loop.call_soon(self._sweep)

    def _sweep(self) -> None:
        """Take back the places of sent calls that were cancelled, and send what waits."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        pending = self._pending
        gone = [tag for tag, sent in pending.items() if sent[1].done()]
        if gone:
            cancelled = self._cancelled
            if cancelled is None:
                cancelled = self._cancelled = {}
            for tag in gone:
                # Its late answer is dropped, not taken for an answer never asked.
                cancelled[tag] = pending.pop(tag)[2]
            while len(cancelled) > MAX_CANCELLED_TAGS:
                del cancelled[next(iter(cancelled))]
            if not pending:
                self._watching = False
                self._update_reading()  # no answer is expected any more
        if self._waiting and not self._receiving:
            self._send_waiting()

    def _lend(self, responding: _Responding, future: asyncio.Future[Any]) -> None:
        """A responder calls the peer: it lends its place until the answer comes."""
        if responding.ended or self._lost:
            return
        responding.waiting += 1
        future.add_done_callback(functools.partial(self._reclaim, responding))
        if responding.waiting == 1:
            self._own_flow().lend()
            if self._flow.deferred:
                self._schedule_release()

    def _reclaim(self, responding: _Responding, future: asyncio.Future[Any]) -> None:
        responding.waiting -= 1
        if responding.waiting == 0 and not responding.ended and not self._lost:
            self._own_flow().reclaim()

    def _take_call(self, tag: bytes, box: Mapping[bytes, bytes] | None = None) -> _Sent | None:
        """
        The call ``tag`` answers, out of pending; ``None`` if it was cancelled or never sent.

        The descriptors that the late answer ``box`` of a cancelled call carries
        are closed.
        """
        sent = self._pending.pop(tag, None)
        command: type[Command] | RawCommand | None
        if sent is not None:
            if not sent[1].done():
                return sent
            command = sent[2]
        else:
            command = None if not self._cancelled else self._cancelled.pop(tag, None)
            if command is None:
                self._protocol_failure(
                    ProtocolError(
                        f"answer for tag {tag!r}, which was never sent or is already answered"
                    )
                )
                return None
        if self._debug:
            logger.debug("= dropped the late answer to cancelled call %r", tag)
        if box is not None and command._uses_descriptors and self._fds is not None:
            with contextlib.suppress(Exception):  # whatever it names, nobody wants it
                self._fds.decode(command._decode_response, box, discard=True)  # type: ignore[arg-type]
        return None

    def _resolve(self, sent: _Sent, box: Mapping[bytes, bytes]) -> None:
        """Complete a call (already taken from the pending calls) with its answer box."""
        _, future, command = sent
        result: Any
        try:
            if command._uses_descriptors and self._fds is not None:
                result = self._fds.decode(command._decode_response, box)  # type: ignore[arg-type]
            else:
                result = command._decode_response(box)
        except ProtocolError as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _error_received(self, event: ErrorAnswer) -> None:
        sent = self._take_call(event.tag)
        if sent is None:
            return
        sent[1].set_exception(sent[2]._exception_for(event.code, event.description))

    # Private methods: the peer's calls

    def _arrive(self, event: Ask | Called) -> None:
        """A call from the peer: start it, keep it waiting for a place, or refuse a flood."""
        verdict = self._own_flow().arrive(event)
        if verdict is Verdict.START:
            self._dispatch(event)
        elif verdict is Verdict.DEFER:
            if self._observer is not None and not self._writing_paused:
                self._observer.limit_hit(self, MAX_RESPONDERS)
            if not self._receiving:
                self._update_reading()
        else:
            self._protocol_failure(
                ProtocolError(
                    "the peer has more than max_responders + max_queued_calls "
                    f"({self._flow.max_responders + self._flow.max_queued_calls}) calls "
                    "in our hands while it has our calls to answer"
                )
            )

    def _schedule_release(self) -> None:
        """Start the calls that wait for a place, soon, in the connection's own context."""
        if self._release_handle is None and self._loop is not None and not self._lost:
            self._release_handle = self._loop.call_soon(self._release)

    def _release(self) -> None:
        """Start the calls that wait, as far as the places allow; read again if none wait."""
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        flow = self._flow
        while not self._lost:
            event = flow.next_call()
            if event is None:
                break
            self._dispatch(event)
        self._update_reading()
        if self._conn.has_data_to_send and not self._writing_paused and not self._receiving:
            self._flush()

    def _update_reading(self) -> None:
        """Pause or resume reading as the flow control says (see _flow)."""
        if self.transport is None or self._lost:
            return
        if self._upgrade is not None and self._upgrade.owns_reading:
            return  # TLS is starting: it is read again once the handshake is done
        if self._flow.wants_reading(bool(self._pending)):
            if self._reading_paused:
                self._resume_reading()
        elif not self._reading_paused:
            self._pause_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = True
            if self._fds is not None:
                self._fds.pause_reading()
            else:
                self.transport.pause_reading()
            if self._debug:
                logger.debug("= reading from %s paused", self._peer)

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = False
            # In a fresh copy of the connection's context: the event loop may keep
            # the context of the code that resumes reading for its read callbacks.
            assert self._context is not None
            if self._fds is not None:
                self._context.copy().run(self._fds.resume_reading, self)
            else:
                self._context.copy().run(self.transport.resume_reading)
            if self._debug:
                logger.debug("= reading from %s resumed", self._peer)

    def _refuse_shutting_down(self, event: Ask | Called) -> None:
        """Answer a call that waited for a place with SHUTDOWN (it never holds one)."""
        tag = event[1] if type(event) is tuple else event.tag  # type: ignore[union-attr]
        if tag is not None:
            self._send(encode_error(tag, SHUTDOWN_ERROR_CODE, SHUTDOWN_DESCRIPTION))

    def _dispatch(self, event: Ask | Called) -> None:
        """Run the responder of a call from the peer; the call already holds a place."""
        tag: bytes | None
        if type(event) is tuple:
            # Decoded by the connection: a command we answer, and its arguments.
            found, tag, arguments = event
        else:
            found = None
            tag = event.tag  # type: ignore[union-attr]
        if self._shutting_down:
            refusal = (
                None
                if tag is None
                else encode_error(tag, SHUTDOWN_ERROR_CODE, SHUTDOWN_DESCRIPTION)
            )
            self._responded(refusal)
            return
        if found is not None:
            command, attribute, is_coroutine = found
        else:
            found = self._responder_table.get(event.command)  # type: ignore[union-attr]
            if found is None:
                # Not ours: a locator's, or unhandled_command (see _locators).
                found = locate(self, event)  # type: ignore[arg-type]
                if found is None:
                    return  # already answered
            command, attribute, is_coroutine = found
            try:
                if command._uses_descriptors and self._fds is not None:
                    arguments = self._fds.decode(command._decode_arguments, event.box)  # type: ignore[union-attr]
                else:
                    try:
                        arguments = command._fast_arguments(event.box)  # type: ignore[union-attr]
                    except Exception:  # the general path says what is wrong
                        arguments = command._decode_arguments(event.box)  # type: ignore[union-attr]
            except Exception as exc:
                logger.warning(
                    "%s called %s with arguments that do not decode (%s)%s",
                    self._peer,
                    command.__qualname__,
                    exc,
                    "; answering UNKNOWN" if tag is not None else "",
                )
                self._responded(None if tag is None else encode_unknown_error(tag))
                return
        if self._incoming is not None:
            self._incoming.dispatch(self, command, attribute, tag, arguments, event)
            return
        try:
            # A name for the protocol's own responders, the responder itself for
            # those found elsewhere (see _locators).
            responder = getattr(self, attribute) if type(attribute) is str else attribute
            if is_coroutine:
                # The coroutine is created inside the task: a task cancelled before
                # its first step (the connection closed) then leaves none unawaited.
                self._run_task(command, tag, responder, arguments)
                return
            # In a fresh copy of the connection's context, like a coroutine's task.
            result = self._context.copy().run(responder, **arguments)  # type: ignore[union-attr]
        except Exception as exc:
            self._responded(self._failure_answer(command, tag, exc))
            return
        self._result(command, tag, result)

    def _result(self, command: type[Command], tag: bytes | None, result: Any) -> None:
        """Answer with what a plain responder returned (an awaitable runs as a task)."""
        if type(result) is dict:
            encoder = command._plain_answer
            if encoder is not None and tag is not None:
                try:
                    data = b"".join(encoder(result, tag))
                except Exception:  # anything unusual: the general path reports it
                    pass
                else:
                    if self._receiving and not self._debug:
                        # _responded and _send, inline for an answer to a call just read.
                        if self._conn.send(data) >= WRITE_BATCH and not self._writing_paused:
                            self._flush()
                        flow = self._flow
                        flow.working -= 1  # FlowControl.ended, inline
                        if flow.deferred:
                            self._schedule_release()
                    else:
                        self._responded(data)
                    return
        elif inspect.isawaitable(result):
            task = self._run_task(command, tag, lambda: result, None)
            if inspect.iscoroutine(result):
                # Close it if the task is cancelled before it starts awaiting it.
                task.add_done_callback(functools.partial(_close_unstarted, result))
            return
        self._responded(self._answer_for(command, tag, result))

    def _run_task(
        self,
        command: type[Command],
        tag: bytes | None,
        responder: Callable[..., Awaitable[Any]],
        arguments: dict[str, Any] | None,
    ) -> asyncio.Task[None]:
        assert self._loop is not None and self._context is not None
        # Each responder in a fresh copy of the connection's context, whatever
        # the context of the code that starts it.
        task = self._loop.create_task(
            self._respond(command, tag, responder, arguments), context=self._context.copy()
        )
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)

    async def _respond(
        self,
        command: type[Command],
        tag: bytes | None,
        responder: Callable[..., Awaitable[Any]],
        arguments: dict[str, Any] | None,
    ) -> None:
        """Run a responder to its end, however it ends: answer, and free its place."""
        responding = _Responding(self)
        _responding.set(responding)  # in this task's own context
        data: bytes | None = None
        try:
            result = await (responder() if arguments is None else responder(**arguments))
        except asyncio.CancelledError:
            if self._lost:
                raise  # the connection closed: there is no one to answer
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            logger.error(
                "the responder of %s for %s %s%s",
                command.__qualname__,
                self._peer,
                "was cancelled" if cancelled else "raised CancelledError",
                "; answering UNKNOWN" if tag is not None else "",
            )
            data = None if tag is None else encode_unknown_error(tag)
            if cancelled:
                raise  # the task was cancelled: it ends cancelled, after answering
        except Exception as exc:
            data = self._failure_answer(command, tag, exc)
        else:
            data = self._answer_for(command, tag, result)
        finally:
            self._responded(data, responding)

    def _responded(self, data: bytes | None, responding: _Responding | None = None) -> None:
        """A responder is done: queue its answer (if any) and free its place."""
        if responding is not None:
            if responding.ended:
                return
            responding.ended = True
        if self._lost:
            return
        flow = self._flow
        flow.ended(lending=responding is not None and responding.waiting > 0)
        if data is not None:
            self._send(data)
        if flow.deferred:
            self._schedule_release()

    def _answer_for(self, command: type[Command], tag: bytes | None, result: Any) -> bytes | None:
        if tag is None:
            return None
        if command._plain_answer is None and (
            (upgrade := getattr(command, "_upgrade_answer", None)) is not None
        ):  # StartTLS, ProtocolSwitchCommand (which have no plain answer encoder)
            return upgrade(self, command, tag, result)  # type: ignore[no-any-return]
        try:
            if command._uses_descriptors and self._fds is not None:
                data: bytes = self._fds.encode(
                    command._encode_answer, tag, {} if result is None else result
                )
            else:
                data = command._encode_answer(tag, {} if result is None else result)
        except Exception as exc:
            logger.error(
                "the responder of %s for %s returned an answer that cannot be sent "
                "(%s: %s); answering UNKNOWN",
                command.__qualname__,
                self._peer,
                type(exc).__name__,
                exc,
            )
            return encode_unknown_error(tag)
        if command.close_after_answer:
            # Twisted's QuitBox: the connection closes once this answer is written.
            if self._debug:
                logger.debug("= %s answered; closing the connection", command.__qualname__)
            self._close_after_flush = True
            self._accepting = False
        return data

    def _failure_answer(
        self, command: type[Command], tag: bytes | None, exc: Exception
    ) -> bytes | None:
        mapped = command._error_code_for(exc)
        if mapped is None:
            logger.error(
                "the responder of %s for %s raised %s%s",
                command.__qualname__,
                self._peer,
                type(exc).__name__,
                "; answering UNKNOWN" if tag is not None else "",
                exc_info=exc,
            )
            return None if tag is None else encode_unknown_error(tag)
        code, fatal = mapped
        if fatal:
            logger.info(
                "the responder of %s for %s raised fatal error %s; closing the connection",
                command.__qualname__,
                self._peer,
                code.decode("utf-8", "backslashreplace"),
            )
            self._close_after_flush = True
            self._accepting = False
        elif self._debug:
            logger.debug("! %s: %s answered error %r", self._peer, command.__qualname__, code)
        if tag is None:
            return None
        try:
            description = str(exc)
        except Exception as problem:
            # The mapped code still goes; the text that cannot be made stays out.
            logger.error(
                "the responder of %s for %s raised %s, whose str() fails (%s: %s); "
                "answering %s with the name of the exception",
                command.__qualname__,
                self._peer,
                type(exc).__name__,
                type(problem).__name__,
                problem,
                code.decode("utf-8", "backslashreplace"),
            )
            description = type(exc).__name__
        return encode_error(tag, code, description.encode("utf-8", "replace"))

    # Private methods: connection state

    def _protocol_failure(self, error: ProtocolError) -> None:
        """The peer broke the protocol: log it once, fail every call and close."""
        if self._close_cause is not None:
            return
        self._conn.fail(error)
        self._close_cause = error
        self._accepting = False
        logger.warning("closing the connection with %s: %s", self._peer, error)
        if self._observer is not None:
            self._observer.protocol_failure(self, error)
        self._fail_pending(error)
        # The answers to the peer's good calls go out if it reads them at once; a
        # peer that broke the protocol gets no time to drain more than that.
        self._close_after_flush = True
        if not self._receiving:
            self._flush()

    def _lost_error(self, what: str) -> ConnectionLostError:
        if self._loop is None:
            return ConnectionLostError(f"{what}: the protocol is not connected yet")
        error = ConnectionLostError(f"{what}: the connection with {self._peer} is closed")
        error.__cause__ = self._close_cause
        return error

    def _fail_pending(self, cause: BaseException | None, taken: list[_Sent] | None = None) -> None:
        """Fail every call waiting for an answer or to be sent, and ``taken`` ones."""
        calls = [
            *((sent[1], sent[2]) for sent in self._pending.values()),
            *((held[0], held[1]) for held in (*self._waiting, *self._waiting_nested)),
            *((sent[1], sent[2]) for sent in taken or ()),
        ]
        self._pending.clear()
        self._waiting = self._waiting_nested = ()
        reason = f": {cause}" if cause is not None else ""
        for future, command in calls:
            if not future.done():
                error = ConnectionLostError(
                    f"the connection with {self._peer} closed before "
                    f"{_label(command)} was answered{reason}"
                )
                error.__cause__ = cause
                future.set_exception(error)

    # Private methods: writing

    def _send(self, data: bytes, *, now: bool = False) -> None:
        """
        Queue ``data`` for the transport.

        Bytes queued while a read is being handled go out every WRITE_BATCH boxes
        and at its end. Otherwise the first write of an idle connection goes out at
        once (no added latency for one call at a time) and later ones are gathered
        until the event loop's next turn. While writing is paused, they wait.
        """
        self._conn.send(data)
        if self._debug:
            _log_sent(self._peer, data)
        self._after_send(now)

    def _after_send(self, now: bool) -> None:
        """Flush or schedule a flush (see _send) after bytes were queued."""
        if self._writing_paused:
            return
        conn = self._conn
        if self._receiving:
            # Answers to the calls of one read go out every WRITE_BATCH boxes; no
            # new responder starts once writing pauses.
            if conn.queued >= WRITE_BATCH:
                self._flush()
            return
        if now or conn.queued_bytes >= FLUSH_BYTES:
            self._flush()
        elif self._flush_handle is None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what is queued: the one place where bytes reach the transport."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._gather = False
        if self._upgrade is not None and self._upgrade.holds_writes(self):
            return  # StartTLS or a switch holds what would go out now
        transport = self.transport
        if (
            self._fds is not None
            and self._fds.outgoing
            and transport is not None
            and not self._lost
            and not transport.is_closing()
            and not self._fds.flush(self)
        ):
            return  # the bytes wait in the queue, with their descriptors
        data = self._conn.data_to_send()
        if transport is None or self._lost:
            return
        if data and not transport.is_closing():
            if self._observer is not None:
                self._observer.bytes_sent(self, sum(map(len, data)))
            # No name for the joined bytes: the transport's copy should be the
            # only one left once it has taken them.
            transport.write(data[0] if len(data) == 1 else b"".join(data))
        if self._close_after_flush:
            self._close_transport(0 if self._close_cause is not None else self.close_timeout)

    def _close_transport(self, timeout: float) -> None:
        """Close the transport, and abort it if it has not closed within ``timeout``."""
        transport = self.transport
        if transport is None or self._lost:
            return
        if timeout <= 0 and transport.get_write_buffer_size():
            transport.abort()
            return
        if not transport.is_closing():
            # Once is enough: asyncio's TLS transport forgets its TLS protocol
            # on a second close(), and then fails in get_write_buffer_size().
            transport.close()
        # Even with nothing left to write, closing may wait for the peer: a TLS
        # transport sends close_notify and waits for the peer's (asyncio's own
        # timeout for that is 30 s). The connection is dropped after the timeout
        # whatever it waits for.
        if self._abort_handle is None and self._loop is not None and not self._lost:
            self._abort_handle = self._loop.call_later(max(timeout, 0.0), self._abort)

    def _abort(self) -> None:
        self._abort_handle = None
        transport = self.transport
        if transport is not None and not self._lost:
            unread = transport.get_write_buffer_size()
            logger.info(
                "%s did not %s within %s s; dropping the connection",
                self._peer,
                f"read the last {unread} bytes" if unread else "finish closing the connection",
                self.close_timeout,
            )
            transport.abort()


# AMPProtocol's own responders (StartTLS) into its tables, as for a subclass.
AMPProtocol.__init_subclass__()
