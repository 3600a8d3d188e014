"""
connect_pipes() and serve_stdio(): AMP over a pair of pipes, and over standard I/O.

An AMP protocol wants one transport that reads and writes. A pipe carries bytes
one way only, so asyncio gives one transport for the pipe we read
(``loop.connect_read_pipe``) and another for the pipe we write
(``loop.connect_write_pipe``). ``_PipesTransport`` joins the two into the one
``asyncio.Transport`` the protocol sees:

* Reading: the read pipe's bytes go straight to the protocol's
  ``data_received``; ``pause_reading`` and ``resume_reading`` pause and resume
  the read pipe. Nothing is read before the protocol is connected.
* Writing: ``write`` and the write buffer's size and limits are the write
  pipe's, and so is flow control: the protocol's ``pause_writing`` and
  ``resume_writing`` follow the write pipe's.
* EOF on the read pipe goes to the protocol's ``eof_received``; unless that
  returns true, the connection closes, as a socket's does.
* ``close()`` stops reading at once and closes the write pipe once what is
  buffered is written; ``abort()`` closes both at once.
* When the peer stops reading for good (its end of our write pipe closes, as
  when a child process exits), nothing more can reach it, but what it wrote
  before may still be in the read pipe: reading goes on until EOF, for at most
  the protocol's ``close_timeout``, and the connection then ends.
* ``connection_lost`` is called once, when both pipes are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

from ._network import _with_limits
from ._protocol import DEFAULT_CLOSE_TIMEOUT, AMPProtocol

__all__ = ["connect_pipes", "serve_stdio"]

P = TypeVar("P", bound=AMPProtocol)

#: What connect_pipes() takes for a pipe: a file object or a file descriptor.
Pipe = IO[bytes] | IO[str] | int


class _ReadEnd(asyncio.Protocol):
    """The protocol of the read pipe's transport: it reports to the joined transport."""

    def __init__(self, pipes: _PipesTransport) -> None:
        self._pipes = pipes
        # Where the bytes read go: kept until the protocol is connected, then to
        # the protocol (see _PipesTransport._start). A method that looks it up,
        # because uvloop keeps the bound data_received it saw at the start.
        self.deliver: Callable[[bytes], None] = pipes._early_data.append

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._pipes._read_made(transport)

    def data_received(self, data: bytes) -> None:
        self.deliver(data)

    def eof_received(self) -> bool | None:
        self._pipes._read_eof()
        return None  # the read pipe's transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipes._read_lost(exc)


class _WriteEnd(asyncio.BaseProtocol):
    """The protocol of the write pipe's transport: it reports to the joined transport."""

    def __init__(self, pipes: _PipesTransport) -> None:
        self._pipes = pipes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._pipes._write_made(transport)

    def pause_writing(self) -> None:
        self._pipes._pause_writing()

    def resume_writing(self) -> None:
        self._pipes._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipes._write_lost(exc)


def _feeder(protocol: asyncio.BaseProtocol) -> Callable[[bytes], None]:
    """How bytes read reach ``protocol``: its ``data_received``, or its buffer."""
    data_received = getattr(protocol, "data_received", None)
    if data_received is not None:
        return data_received  # type: ignore[no-any-return]
    assert isinstance(protocol, asyncio.BufferedProtocol)

    def feed(data: bytes) -> None:
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]

    return feed


class _PipesTransport(asyncio.Transport):
    """One transport for a protocol, made of a read pipe's and a write pipe's (see above)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, extra: dict[str, Any]
    ) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol = protocol
        # Before the protocol is connected: what the pipes already said.
        self._early_data: list[bytes] = []
        self._early_eof = False
        self._read_end = _ReadEnd(self)
        self._write_end = _WriteEnd(self)
        self._reader: asyncio.ReadTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._read_open = False
        self._write_open = False
        self._started = False
        # What the protocol asked for, and what the write pipe said.
        self._reading = True
        self._writing_paused = False
        self._eof_written = False
        self._closing = False
        self._lost = False
        self._exc: Exception | None = None
        self._drain_handle: asyncio.TimerHandle | None = None

    # The pipes' transports report here

    def _read_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader = transport  # type: ignore[assignment]
        self._read_open = True
        if not self._started:
            # Nothing is read until the protocol is connected.
            self._reader.pause_reading()  # type: ignore[union-attr]

    def _write_made(self, transport: asyncio.BaseTransport) -> None:
        self._writer = transport  # type: ignore[assignment]
        self._write_open = True

    def _read_eof(self) -> None:
        if not self._started:
            self._early_eof = True
            return
        if not self._protocol.eof_received():  # type: ignore[attr-defined]
            self.close()

    def _read_lost(self, exc: Exception | None) -> None:
        self._read_open = False
        if exc is not None:
            # A read error is fatal, as on a socket: drop the writing side too.
            self._exc = self._exc or exc
            if self._writer is not None and self._write_open:
                self._closing = True
                self._writer.abort()
        self._maybe_lost()

    def _write_lost(self, exc: Exception | None) -> None:
        self._write_open = False
        if exc is not None:
            self._exc = self._exc or exc
        if not self._closing and not self._eof_written and self._read_open:
            # The peer stopped reading: nothing more can reach it. What it wrote
            # before may still be in the read pipe (a child process that answered
            # and exited), so reading goes on until EOF, within close_timeout.
            self._closing = True
            timeout = getattr(self._protocol, "close_timeout", DEFAULT_CLOSE_TIMEOUT)
            self._drain_handle = self._loop.call_later(timeout, self.abort)
        self._maybe_lost()

    def _pause_writing(self) -> None:
        self._writing_paused = True
        if self._started:
            self._protocol.pause_writing()

    def _resume_writing(self) -> None:
        self._writing_paused = False
        if self._started:
            self._protocol.resume_writing()

    def _maybe_lost(self) -> None:
        if self._read_open or self._write_open or self._lost:
            return
        if self._reader is None or self._writer is None:
            return  # still connecting: connect_pipes() reports the failure
        self._lost = True
        self._closing = True
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        if self._started:
            self._protocol.connection_lost(self._exc)

    def _start(self) -> None:
        """Both pipes are connected: connect the protocol, then read."""
        self._started = True
        self._protocol.connection_made(self)
        if self._writing_paused:
            self._protocol.pause_writing()
        feed = self._read_end.deliver = _feeder(self._protocol)
        early, self._early_data = self._early_data, []
        for data in early:
            if self._lost:
                return
            feed(data)
        if self._early_eof:
            self._read_eof()
        if not self._read_open or not self._write_open:
            # A pipe closed while connecting (the peer exited at once).
            if not self._closing:
                self.close()
            self._maybe_lost()
        elif self._reading and not self._closing:
            assert self._reader is not None
            self._reader.resume_reading()

    # asyncio.Transport

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._reader is not None and self._read_open:
            self._reader.close()
        if self._writer is not None and self._write_open:
            self._writer.close()

    def abort(self) -> None:
        self._closing = True
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        if self._reader is not None and self._read_open:
            self._reader.close()
        if self._writer is not None and self._write_open:
            self._writer.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        if self._started:
            self._read_end.deliver = _feeder(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return self._reading and self._read_open and not self._closing

    def pause_reading(self) -> None:
        if not self._reading:
            return
        self._reading = False
        if self._started and self._reader is not None and self._read_open:
            self._reader.pause_reading()

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self._started and self._reader is not None and self._read_open:
            self._reader.resume_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer is not None and self._write_open and not self._eof_written:
            self._writer.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Close the write pipe once its buffer is written: that is EOF for the peer."""
        if self._eof_written or self._closing:
            return
        self._eof_written = True
        if self._writer is not None and self._write_open:
            self._writer.close()

    def get_write_buffer_size(self) -> int:
        if self._writer is None or not self._write_open:
            return 0
        return self._writer.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._writer is not None
        return self._writer.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert self._writer is not None
        self._writer.set_write_buffer_limits(high=high, low=low)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<_PipesTransport {state} {self.get_extra_info('peername')}>"


def _file(pipe: Pipe, mode: str) -> IO[Any]:
    """A file object for ``pipe``; a descriptor is wrapped, and closed with it."""
    if isinstance(pipe, int):
        return open(pipe, mode, buffering=0)
    return pipe


def _close(*pipes: Pipe) -> None:
    for pipe in pipes:
        with contextlib.suppress(OSError):
            if isinstance(pipe, int):
                os.close(pipe)
            else:
                pipe.close()


async def connect_pipes(
    read_pipe: Pipe,
    write_pipe: Pipe,
    *,
    protocol_factory: Callable[[], P] = AMPProtocol,  # type: ignore[assignment]
    **kwargs: Any,
) -> P:
    """
    Run an AMP connection over a pair of pipes and return its protocol once connected.

    The protocol reads what the peer writes into ``read_pipe`` and writes into
    ``write_pipe``: to talk to a child process, give the child's stdout as
    ``read_pipe`` and its stdin as ``write_pipe``. Flow control, limits and
    ``close_timeout`` work as over a socket: writing pauses when the write pipe's
    buffer is full, and reading pauses when the protocol says so.

    The pipes belong to the connection from now on: both are closed when it
    closes. EOF on ``read_pipe`` closes the connection; so does the peer
    closing its end of ``write_pipe``, once what it wrote before is read (within
    ``close_timeout``).

    Args:
        read_pipe: The pipe to read from: a file object, or a file descriptor,
            as ``loop.connect_read_pipe`` takes (a pipe, a socket or a character
            device).
        write_pipe: The pipe to write to, in the same way; not the same
            descriptor as ``read_pipe``.
        protocol_factory: Builds the protocol; [`AMPProtocol`][] by default.
        **kwargs: The limits of [`AMPProtocol`][] (``max_box_size``,
            ``max_keys``, ``max_responders``, ``max_pending_calls``,
            ``max_queued_calls``, ``close_timeout``, ``keepalive``,
            ``keepalive_timeout``).

    Returns:
        The protocol, connected. Use it as an async context manager to close
        it at the end.

    Raises:
        ValueError: Both pipes are the same descriptor, or the event loop does
            not take one of them (a regular file, say): then both pipes are
            closed.
        TypeError: A keyword is not a limit of [`AMPProtocol`][].
    """
    loop = asyncio.get_running_loop()
    factory = _with_limits(protocol_factory, kwargs)
    if kwargs:
        raise TypeError(f"connect_pipes() got unexpected keyword arguments: {', '.join(kwargs)}")
    read_fd = read_pipe if isinstance(read_pipe, int) else read_pipe.fileno()
    write_fd = write_pipe if isinstance(write_pipe, int) else write_pipe.fileno()
    if read_fd == write_fd:
        raise ValueError("connect_pipes() needs two descriptors, one to read and one to write")
    for fd in (read_fd, write_fd):
        # Checked here, as asyncio's loop does: uvloop's aborts the process.
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
            _close(read_pipe, write_pipe)
            raise ValueError(
                f"connect_pipes() takes pipes, sockets and character devices, not fd {fd}"
            )
    protocol = factory()
    reader, writer = _file(read_pipe, "rb"), _file(write_pipe, "wb")
    peername = f"pipes (read {read_fd}, write {write_fd})"
    pipes = _PipesTransport(
        loop, protocol, {"peername": peername, "read_pipe": reader, "write_pipe": writer}
    )
    try:
        await loop.connect_read_pipe(lambda: pipes._read_end, reader)
        await loop.connect_write_pipe(lambda: pipes._write_end, writer)
    except BaseException:
        pipes.abort()
        # A pipe that no transport took is closed here.
        _close(
            *(
                pipe
                for pipe, taken in ((reader, pipes._reader), (writer, pipes._writer))
                if taken is None
            )
        )
        raise
    pipes._start()
    return protocol


async def serve_stdio(protocol_factory: Callable[[], P], **kwargs: Any) -> P:
    """
    Serve one AMP connection on this process's standard input and output.

    This is how a child process answers its parent, like a language server:
    the parent writes calls into the child's stdin and reads answers from its
    stdout (with [`connect_pipes`][asyncio_amp.connect_pipes]). It returns when
    the connection ends: at EOF on stdin, when the protocol closes it, or when
    the parent stops reading.

    Standard output belongs to the connection, so that nothing else can write
    into the AMP stream: descriptor 1 is pointed at stderr (and descriptor 0
    at ``os.devnull``) while serving and after, and ``sys.stdout`` is
    ``sys.stderr`` while serving. A stray ``print()`` goes to stderr; anything
    meant for the parent must go through AMP. Whatever was written to
    ``sys.stdout`` before is flushed first.

    Args:
        protocol_factory: Builds the protocol.
        **kwargs: The limits of [`AMPProtocol`][], as for
            [`connect_pipes`][asyncio_amp.connect_pipes].

    Returns:
        The protocol, once its connection is closed.

    Cancelling it drops the connection at once.
    """
    if sys.stdout is not None:
        sys.stdout.flush()
    stdin, stdout_pipe = _file(os.dup(0), "rb"), _file(os.dup(1), "wb")
    # Duplicates kept until the end, to put the blocking mode of standard input
    # and output back as it was (it belongs to the open files, which the parent
    # or a terminal may share).
    keep_in, keep_out = os.dup(0), os.dup(1)
    blocking = os.get_blocking(keep_in), os.get_blocking(keep_out)
    _take_stdio()
    stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        try:
            protocol = await connect_pipes(
                stdin, stdout_pipe, protocol_factory=protocol_factory, **kwargs
            )
        except BaseException:
            stdin.close()  # unless connect_pipes() did already
            stdout_pipe.close()
            raise
        try:
            await protocol.wait_closed()
        except asyncio.CancelledError:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
    finally:
        if sys.stdout is sys.stderr:
            sys.stdout = stdout
        for fd, was_blocking in zip((keep_in, keep_out), blocking, strict=True):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, was_blocking)
            os.close(fd)
    return protocol


def _take_stdio() -> None:
    """Point descriptor 0 at os.devnull and descriptor 1 at stderr (or os.devnull)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, 0)
        try:
            os.dup2(2, 1)
        except OSError:  # no stderr
            os.dup2(null, 1)
    finally:
        os.close(null)
