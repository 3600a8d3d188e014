"""
AMPProtocol: the asyncio layer that drives an :class:`AMPConnection`.

It moves bytes between the transport and the sans-I/O connection, matches
answers to the futures of pending calls, runs responders, and logs. All writes
go through one method, :meth:`AMPProtocol._flush`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import weakref
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, ClassVar, Self, cast

from ._commands import (
    RESPONDER_ATTRIBUTE,
    Command,
    encode_error,
    encode_unhandled_error,
    encode_unknown_error,
)
from ._connection import AMPConnection, Answer, Ask, ErrorAnswer, Failure, State
from ._errors import ConnectionLostError, ProtocolError
from ._wire import DEFAULT_MAX_BOX_SIZE, DEFAULT_MAX_KEYS, PREFIXES

__all__ = ["AMPProtocol"]

logger = logging.getLogger("asyncio_amp")

# While handling one read, queued answers are written every this many boxes, so the
# peer can start on the first answers while the rest are still being computed.
WRITE_BATCH = 32

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


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(peername, str | bytes) and peername:
        return str(peername)
    return "unknown peer"


class _Call(asyncio.Future[Any]):
    """The future of one pending call: it forgets its tag when cancelled."""

    __slots__ = ("_command", "_protocol", "_tag")

    _command: type[Command]
    _protocol: AMPProtocol | None
    _tag: bytes

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol._forget(self._tag)
        return True


class AMPProtocol(asyncio.BufferedProtocol):
    """
    An AMP connection on asyncio: call the peer's commands and answer its calls.

    Use it as it is for a client, or subclass it and mark methods with
    ``@SomeCommand.responder`` to answer commands; both sides of a connection may
    do both. It works with plain asyncio::

        server = await loop.create_server(MyServer, "localhost", 8000)
        transport, proto = await loop.create_connection(AMPProtocol, "localhost", 8000)

    Subclasses that override :meth:`connection_made` or :meth:`connection_lost`
    must call ``super()``.

    Args:
        max_box_size: The most bytes one received box may take; a bigger box is
            bad input and closes the connection.
        max_keys: The most keys one received box may have.
    """

    # command wire name -> (Command class, attribute name, responder is a coroutine function)
    _responder_table: ClassVar[dict[bytes, tuple[type[Command], str, bool]]] = {}

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

    def __init__(
        self,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        #: The transport, once connected.
        self.transport: asyncio.Transport | None = None
        self._conn = AMPConnection(max_box_size=max_box_size, max_keys=max_keys)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer = "unconnected peer"
        self._pending: dict[bytes, _Call] = {}
        self._cancelled: dict[bytes, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._receiving = False
        self._flush_handle: asyncio.Handle | None = None
        self._close_after_flush = False
        self._close_cause: BaseException | None = None
        self._lost = False
        self._closed_waiter: asyncio.Future[None] | None = None
        self._debug = False
        self._read_buffer: memoryview | None = None

    def __repr__(self) -> str:
        state = "closed" if self._lost else "open" if self.transport else "unconnected"
        return f"<{type(self).__name__} {state} {self._peer} pending={len(self._pending)}>"

    # asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start using ``transport``. Subclasses that override this must call ``super()``."""
        # Not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self._closed_waiter = loop.create_future()
        self._peer = _format_peer(transport.get_extra_info("peername"))
        self._read_buffer = _read_buffer_for(loop)
        self._debug = logger.isEnabledFor(logging.DEBUG)
        if self._debug:
            logger.debug("= connection made with %s", self._peer)

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
        conn = self._conn
        conn.receive_data(data)
        events = conn.events_received()
        if not events:
            return
        self._receiving = True
        try:
            for event in events:
                kind = type(event)
                if self._debug and kind is not Failure:
                    logger.debug("< %s %r", self._peer, event.box)  # type: ignore[union-attr]
                if kind is Answer:
                    self._answer_received(event)  # type: ignore[arg-type]
                elif kind is Ask:
                    self._ask_received(event)  # type: ignore[arg-type]
                elif kind is ErrorAnswer:
                    self._error_received(event)  # type: ignore[arg-type]
                else:
                    self._protocol_failure(event.error)  # type: ignore[union-attr]
                if self._close_cause is not None:
                    break
        finally:
            self._receiving = False
        if conn.has_data_to_send or self._close_after_flush:
            self._flush()

    def eof_received(self) -> bool | None:
        """The peer will send nothing more; close our side too."""
        if self._debug:
            logger.debug("= %s sent EOF", self._peer)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """
        Fail every pending call and stop every running responder.

        Subclasses that override this must call ``super()``.
        """
        if self._lost:
            return
        self._lost = True
        truncated = self._conn.connection_lost()
        cause = self._close_cause or exc or truncated
        if truncated is not None:
            logger.info("connection with %s closed inside a box: %s", self._peer, truncated)
        if self._debug:
            logger.debug("= connection with %s lost: %s", self._peer, cause or "closed")
        self._fail_pending(cause)
        for task in self._tasks:
            task.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._conn.data_to_send()
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

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

        Returns:
            A future of the answer: a dict keyed like ``command.response``. For a
            command with ``requires_answer = False`` the future is already done,
            with ``None``.

        Raises:
            TypeError: An argument is unknown, missing or of the wrong type.
            ValueError: An argument's type cannot represent its value.
            TooLongError: A value is over 65,535 bytes. Nothing was sent, no tag
                was taken, and the connection is unaffected.
            ConnectionLostError: The connection is closed (raised at once), or it
                closes before the answer comes (raised by the future).

        The future raises the exception the command maps to the peer's error code,
        :class:`UnhandledCommandError` if the peer has no responder for it, or
        :class:`UnknownRemoteError` for any other error answer.
        """
        if isinstance(command, Command):
            if arguments:
                raise TypeError(
                    "call_remote() takes a Command instance or a Command class with keyword "
                    "arguments, not both"
                )
            cmd: type[Command] = type(command)
            arguments = command.values
        elif isinstance(command, type) and issubclass(command, Command):
            cmd = command
        else:
            raise TypeError(f"call_remote() needs a Command class or instance, not {command!r}")
        conn = self._conn
        if conn.state is not State.OPEN or self._loop is None or self._close_after_flush:
            raise self._lost_error(f"cannot call {cmd.__qualname__}")
        parts, slot = cmd._encode_ask(arguments)
        idle = not self._pending
        if slot < 0:
            conn.skip_tag()
            self._send(b"".join(parts), now=idle)
            done = self._loop.create_future()
            done.set_result(None)
            return done
        tag = conn.next_tag()
        parts[slot] = PREFIXES[len(tag)] + tag
        call = _Call(loop=self._loop)
        call._command = cmd
        call._protocol = self
        call._tag = tag
        self._pending[tag] = call
        self._send(b"".join(parts), now=idle)
        return call

    def close(self) -> None:
        """Close the connection once the data already queued has been written."""
        if self.transport is None or self._lost:
            return
        self._close_after_flush = True
        if not self._receiving:
            self._flush()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and every pending call has failed."""
        if self._closed_waiter is None:
            return
        await asyncio.shield(self._closed_waiter)

    @property
    def closed(self) -> bool:
        """``True`` once the connection is lost."""
        return self._lost

    @property
    def peer(self) -> str:
        """The peer's address as text, as used in log lines."""
        return self._peer

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

    # Private methods: calls and answers

    def _forget(self, tag: bytes) -> None:
        # A cancelled call: its answer, if it comes, is dropped.
        if self._pending.pop(tag, None) is not None and not self._lost:
            cancelled = self._cancelled
            cancelled[tag] = None
            if len(cancelled) > MAX_CANCELLED_TAGS:
                del cancelled[next(iter(cancelled))]

    def _take_call(self, tag: bytes) -> _Call | None:
        call = self._pending.pop(tag, None)
        if call is not None:
            return call
        if self._cancelled.pop(tag, False) is None:
            if self._debug:
                logger.debug("= dropped the late answer to cancelled call %r", tag)
            return None
        self._protocol_failure(
            ProtocolError(f"answer for tag {tag!r}, which was never sent or is already answered")
        )
        return None

    def _answer_received(self, event: Answer) -> None:
        call = self._take_call(event.tag)
        if call is None:
            return
        try:
            result = call._command._decode_response(event.box)
        except ProtocolError as exc:
            call.set_exception(exc)
        else:
            call.set_result(result)

    def _error_received(self, event: ErrorAnswer) -> None:
        call = self._take_call(event.tag)
        if call is None:
            return
        call.set_exception(call._command._exception_for(event.code, event.description))

    def _ask_received(self, event: Ask) -> None:
        tag = event.tag
        entry = self._responder_table.get(event.command)
        if entry is None:
            logger.warning(
                "%s called %r, which has no responder%s",
                self._peer,
                event.command,
                "; answering UNHANDLED" if tag is not None else "",
            )
            if tag is not None:
                self._send(encode_unhandled_error(tag, event.command))
            return
        command, attribute, is_coroutine = entry
        try:
            arguments = command._decode_arguments(event.box)
            if is_coroutine:
                self._run_task(command, tag, getattr(self, attribute)(**arguments))
                return
            result = getattr(self, attribute)(**arguments)
        except Exception as exc:
            self._responder_failed(command, tag, exc)
            return
        if type(result) is not dict and inspect.isawaitable(result):
            self._run_task(command, tag, result)
        else:
            self._answer(command, tag, result)

    def _run_task(
        self, command: type[Command], tag: bytes | None, awaitable: Awaitable[Any]
    ) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._respond(command, tag, awaitable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(
        self, command: type[Command], tag: bytes | None, awaitable: Awaitable[Any]
    ) -> None:
        try:
            result = await awaitable
        except Exception as exc:
            self._responder_failed(command, tag, exc)
        else:
            self._answer(command, tag, result)

    def _answer(self, command: type[Command], tag: bytes | None, result: Any) -> None:
        if tag is None or self._lost:
            return
        try:
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
            data = encode_unknown_error(tag)
        self._send(data)

    def _responder_failed(self, command: type[Command], tag: bytes | None, exc: Exception) -> None:
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
            if tag is not None and not self._lost:
                self._send(encode_unknown_error(tag))
            return
        code, fatal = mapped
        if tag is not None and not self._lost:
            self._send(encode_error(tag, code, str(exc).encode("utf-8", "replace")))
        if fatal:
            logger.info(
                "the responder of %s for %s raised fatal error %s; closing the connection",
                command.__qualname__,
                self._peer,
                code.decode("utf-8", "backslashreplace"),
            )
            self.close()
        elif self._debug:
            logger.debug("! %s: %s answered error %r", self._peer, command.__qualname__, code)

    # Private methods: connection state

    def _protocol_failure(self, error: ProtocolError) -> None:
        """The peer broke the protocol: log it once, fail every call and close."""
        if self._close_cause is not None:
            return
        self._conn.fail(error)
        self._close_cause = error
        logger.warning("closing the connection with %s: %s", self._peer, error)
        self._fail_pending(error)
        self.close()

    def _lost_error(self, what: str) -> ConnectionLostError:
        if self._loop is None:
            return ConnectionLostError(f"{what}: the protocol is not connected yet")
        error = ConnectionLostError(f"{what}: the connection with {self._peer} is closed")
        error.__cause__ = self._close_cause
        return error

    def _fail_pending(self, cause: BaseException | None) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        reason = f": {cause}" if cause is not None else ""
        for call in pending.values():
            call._protocol = None
            if not call.done():
                error = ConnectionLostError(
                    f"the connection with {self._peer} closed before "
                    f"{call._command.__qualname__} was answered{reason}"
                )
                error.__cause__ = cause
                call.set_exception(error)

    # Private methods: writing

    def _send(self, data: bytes, *, now: bool = False) -> None:
        """
        Queue ``data`` for the transport.

        Bytes queued while a read is being handled go out in one write at its end.
        Otherwise the first write of an idle connection goes out at once (no added
        latency for one call at a time) and later ones are gathered until the
        event loop's next turn.
        """
        self._conn.send(data)
        if self._debug:
            logger.debug("> %s %r", self._peer, data)
        if self._receiving:
            if self._conn.queued >= WRITE_BATCH:
                self._flush()
            return
        if self._flush_handle is not None:
            return
        if now:
            self._flush()
        else:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what is queued: the one place where bytes reach the transport."""
        self._flush_handle = None
        data = self._conn.data_to_send()
        transport = self.transport
        if transport is None or self._lost:
            return
        if data and not transport.is_closing():
            transport.write(data[0] if len(data) == 1 else b"".join(data))
        if self._close_after_flush:
            transport.close()
