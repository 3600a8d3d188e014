"""
Server: what ``serve()`` returns, an ``asyncio.Server`` that also owns its connections.

``asyncio.Server.close()`` stops listening and leaves the open connections as
they are, and its ``wait_closed()`` waits for them on some Python versions and
not on others. A ``Server`` keeps the set of its live connections, so that
``close()`` ends them too (at once, or gracefully with ``grace``) and
``wait_closed()`` returns once every one of them is closed, on every version.
This follows websockets, whose ``serve()`` returns a server that closes its
connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from ._protocol import AMPProtocol

__all__ = ["Server"]

logger = logging.getLogger("asyncio_amp")

P = TypeVar("P", bound=AMPProtocol)


class _Tracked(asyncio.BufferedProtocol):
    """
    The protocol the transport sees: it tells the server when its connection
    is made and lost, and hands everything else straight to the AMP protocol.

    The AMP protocol's own bound methods for reading are stored on the instance,
    so the transport calls them directly and reading costs no extra call. The
    rarer callbacks go through a method of ours: a bound method takes 64 bytes,
    and a server may hold many idle connections.
    """

    # Slots that shadow the base class's methods, on purpose (see above).
    __slots__ = ("_protocol", "_server", "buffer_updated", "get_buffer")

    def __init__(self, server: Server[Any], protocol: AMPProtocol) -> None:
        self._server = server
        self._protocol = protocol
        self.get_buffer = protocol.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = protocol.buffer_updated  # type: ignore[method-assign]

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received()

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._protocol.connection_made(transport)
        self._server._connected(self._protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._server._lost(self._protocol)


class Server(Generic[P]):
    """
    An AMP server: it listens, and it owns the connections it accepted.

    [`serve`][asyncio_amp.serve] returns one, already serving. It offers what
    ``asyncio.Server`` offers (``sockets``, ``is_serving()``, ``get_loop()``,
    ``start_serving()``, ``serve_forever()``, ``async with``), but its
    [`close`][asyncio_amp.Server.close] closes the open connections too, and
    [`wait_closed`][asyncio_amp.Server.wait_closed] waits until every one of
    them is closed. ``close(grace=...)`` shuts them down gracefully instead,
    letting the calls already running finish.

    Leaving the ``async with`` block closes the server (without grace, unless
    ``close(grace=...)`` was called first) and waits until it is closed.

    Args:
        protocol_factory: Builds the protocol of each connection.
    """

    def __init__(self, protocol_factory: Callable[[], P]) -> None:
        self._protocol_factory = protocol_factory
        self._server: asyncio.Server | None = None
        self._connections: set[P] = set()
        self._closing = False
        self._grace: float | None = None
        self._shutdowns: set[asyncio.Task[None]] = set()
        self._all_closed: asyncio.Event | None = None
        self._forever: asyncio.Future[None] | None = None
        # A UNIX socket's path, and the identity of the file we created there.
        self._path: str | None = None
        self._path_identity: tuple[int, int] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closing else "serving" if self.is_serving() else "not serving"
        return f"<Server {state} connections={len(self._connections)}>"

    # Public methods

    def close(self, grace: float | None = None) -> None:
        """
        Stop listening, and close every connection.

        Listening stops at once. Without ``grace``, each connection is closed
        with [`AMPProtocol.close`][asyncio_amp.AMPProtocol.close] (queued data
        still drains, for up to its ``close_timeout``): the calls pending on
        both sides fail with [`ConnectionLostError`][asyncio_amp.ConnectionLostError].
        With ``grace``, every connection shuts down at the same time with
        [`AMPProtocol.shutdown(grace)`][asyncio_amp.AMPProtocol.shutdown]: the
        responders already running finish and answer, for up to ``grace``
        seconds. Calling ``close()`` again without ``grace`` during a graceful
        shutdown closes the connections at once.

        A UNIX socket's path is removed, unless another server has taken it
        since.

        Args:
            grace: Seconds to let running calls finish; ``None`` for none.
        """
        if self._server is None:
            raise RuntimeError("the server is not listening yet")
        first = not self._closing
        if first:
            self._closing = True
            self._grace = grace
            self._server.close()
            self._remove_path()
            if self._forever is not None and not self._forever.done():
                self._forever.cancel()
        elif grace is None and self._grace is not None:
            self._grace = None  # close() again without grace: stop waiting now
        else:
            return
        for protocol in list(self._connections):
            self._end(protocol)
        self._check_closed()

    def close_clients(self) -> None:
        """
        Close every connection, and keep listening.

        Each connection closes with [`AMPProtocol.close`][asyncio_amp.AMPProtocol.close],
        as with ``asyncio.Server.close_clients()`` (Python 3.13).
        """
        for protocol in list(self._connections):
            protocol.close()

    def abort_clients(self) -> None:
        """
        Drop every connection at once, without letting queued data drain, and keep listening.

        As ``asyncio.Server.abort_clients()`` (Python 3.13).
        """
        for protocol in list(self._connections):
            if protocol.transport is not None:
                protocol.transport.abort()

    async def wait_closed(self) -> None:
        """
        Wait until the server is closed: listening has stopped and every connection is closed.

        It returns only after [`close`][asyncio_amp.Server.close] was called
        (as ``asyncio.Server.wait_closed()`` does on Python 3.12 and later).
        """
        if self._all_closed is None:
            self._all_closed = asyncio.Event()
            self._check_closed()
        await self._all_closed.wait()
        if self._shutdowns:
            await asyncio.wait(self._shutdowns)
        # Not asyncio.Server.wait_closed(): on Python 3.12 and later it also waits
        # for every transport the server accepted, including those handed to
        # another protocol by a switch, which this server no longer owns.

    def is_serving(self) -> bool:
        """``True`` while the server accepts new connections."""
        return self._server is not None and self._server.is_serving()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on."""
        return self._listener().get_loop()

    async def start_serving(self) -> None:
        """Start accepting connections, if not yet started (``serve()`` has started it)."""
        await self._listener().start_serving()

    async def serve_forever(self) -> None:
        """
        Accept connections until cancelled or closed.

        When the task running it is cancelled, the server closes (without grace)
        and waits until it is closed, then ``CancelledError`` propagates, as with
        ``asyncio.Server.serve_forever()``.

        Raises:
            RuntimeError: ``serve_forever()`` is already running, or the server
                is closed.
        """
        if self._forever is not None:
            raise RuntimeError(f"{self!r} is already being awaited on serve_forever()")
        if self._closing:
            raise RuntimeError(f"{self!r} is closed")
        await self.start_serving()
        self._forever = self.get_loop().create_future()
        try:
            await self._forever
        except asyncio.CancelledError:
            try:
                if not self._closing:
                    self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._forever = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The sockets the server listens on (empty once closed)."""
        if self._server is None:
            return ()
        return tuple(self._server.sockets)

    @property
    def connections(self) -> frozenset[P]:
        """The protocols of the connections open now (a snapshot, not a live view)."""
        return frozenset(self._connections)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closing:
            self.close()
        await self.wait_closed()

    # Private methods: used by serve()

    def _build(self) -> asyncio.BufferedProtocol:
        """The protocol factory given to the event loop."""
        return _Tracked(self, self._protocol_factory())

    def _listen(self, server: asyncio.Server, path: str | None = None) -> None:
        """Take over ``server``, listening on the UNIX socket ``path`` if given."""
        self._server = server
        if path is not None and not path.startswith("\0"):
            try:
                info = os.stat(path)
            except OSError:
                return
            self._path = path
            self._path_identity = (info.st_dev, info.st_ino)

    # Private methods

    def _listener(self) -> asyncio.Server:
        if self._server is None:
            raise RuntimeError("the server is not listening yet")
        return self._server

    def _connected(self, protocol: P) -> None:
        self._connections.add(protocol)
        if self._closing:
            # Accepted before close(), made after it (a TLS handshake, or the
            # event loop's next turn): it ends like the others.
            self._end(protocol)

    def _lost(self, protocol: P) -> None:
        self._connections.discard(protocol)
        self._check_closed()

    def _end(self, protocol: P) -> None:
        """Close one connection as close() was asked to."""
        if self._grace is None:
            protocol.close()
            return
        task = self.get_loop().create_task(self._shutdown(protocol, self._grace))
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdowns.discard)

    async def _shutdown(self, protocol: P, grace: float) -> None:
        try:
            await protocol.shutdown(grace)
        except Exception:  # a subclass's override may fail; the connection must still end
            logger.exception("shutting down the connection with %s failed", protocol.peer)
            protocol.close()

    def _check_closed(self) -> None:
        if self._closing and not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _remove_path(self) -> None:
        """Remove our UNIX socket's file, if it is still ours (asyncio 3.11 leaves it)."""
        if self._path is None:
            return
        path, self._path = self._path, None
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == self._path_identity:
                os.unlink(path)
        except OSError:
            pass  # gone already (asyncio 3.13 removes it too), or not ours to remove
