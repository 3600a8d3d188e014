"""
Descriptor passing (SCM_RIGHTS) on UNIX socket connections, for `AMPProtocol`.

asyncio's transports neither send nor receive ancillary data, so on such a
connection the protocol reads by itself with recvmsg() (the transport's own
reading stays paused) and, when a write must carry descriptors, sends it with
sendmsg() once the transport's buffer is empty, so that nothing can overtake it.
Both use a duplicate of the transport's socket. `FdChannel` does this for one
connection; the protocol holds one (``None`` on every other connection) and calls
it through a few methods. Which descriptor a box names, and who owns it, is the
sans-I/O `DescriptorExchange`'s business (``_arguments``).

The channel keeps no reference to its protocol: the protocol passes itself in,
and the event loop's reader and writer callbacks carry it as their argument.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ._arguments import MAX_UNCLAIMED_FDS, DescriptorExchange, descriptor_exchange
from ._connection import AMPConnection
from ._errors import ProtocolError

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp")

# Linux takes at most 253 descriptors per message (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class _Owner(Protocol):
    """What a channel uses of the AMPProtocol that holds it."""

    transport: asyncio.Transport | None
    _conn: AMPConnection
    _lost: bool
    _peer: str
    _close_cause: BaseException | None
    _accepting: bool

    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> bool | None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def _protocol_failure(self, error: ProtocolError) -> None: ...


class FdChannel:
    """
    The descriptors of one UNIX socket connection, and the socket they go through.

    Created by the protocol's ``connection_made``: from then on the channel reads
    the connection (with the descriptors that come with the bytes) and hands what
    it reads to the protocol, until ``close``.
    """

    __slots__ = ("_blocked", "_limits", "_loop", "_socket", "exchange", "outgoing")

    def __init__(self, owner: _Owner, loop: asyncio.AbstractEventLoop, fileno: int) -> None:
        assert owner.transport is not None
        self._loop = loop
        #: The descriptors sent and received on this connection.
        self.exchange = DescriptorExchange()
        #: The descriptors waiting to go out with the next write (the exchange's list).
        self.outgoing = self.exchange.outgoing
        # A duplicate: the event loop refuses a reader on the transport's own fd.
        self._socket: socket.socket | None = socket.socket(fileno=os.dup(fileno))
        self._socket.setblocking(False)
        # While descriptors wait for the transport's buffer to drain: its own
        # write buffer limits, replaced by zeros so that it says when it is empty.
        self._limits: tuple[int, int] | None = None
        # True while descriptors wait for the socket to take more (EAGAIN).
        self._blocked = False
        owner.transport.pause_reading()
        loop.add_reader(self._socket.fileno(), self._read, owner)

    # Public methods

    def pause_reading(self) -> None:
        """Stop reading (the protocol's flow control, or the end of the connection)."""
        if self._socket is not None:
            self._loop.remove_reader(self._socket.fileno())

    def resume_reading(self, owner: _Owner) -> None:
        """Read again, in the context this is called in."""
        if self._socket is not None:
            self._loop.add_reader(self._socket.fileno(), self._read, owner)

    def restore_limits(self, transport: asyncio.Transport | None) -> None:
        """Writing resumed: if descriptors waited for the buffer to drain, restore its limits."""
        if self._limits is not None and transport is not None:
            low, high = self._limits
            self._limits = None
            transport.set_write_buffer_limits(high=high, low=low)

    def flush(self, owner: _Owner) -> bool:
        """
        Send the queued bytes with the descriptors waiting to go out.

        Returns ``False`` if they must wait (they stay queued and a retry is
        scheduled), ``True`` if the protocol's flush should go on with what is left.
        """
        transport, exchange, sock = owner.transport, self.exchange, self._socket
        assert transport is not None and sock is not None
        conn = owner._conn
        if not conn.has_data_to_send:
            return True  # the box that names them waits for its turn
        if self._blocked or self._limits is not None:
            return False  # already waiting
        if transport.get_write_buffer_size():
            # Bytes written earlier are still in the transport: the descriptors,
            # sent directly, would overtake them. Wait until it drains, with
            # writing paused meanwhile (no polling, nothing piling up): with
            # limits of zero, the transport calls pause_writing now, and
            # resume_writing once it is empty.
            self._limits = transport.get_write_buffer_limits()
            transport.set_write_buffer_limits(high=0, low=0)
            return False
        data = b"".join(conn.data_to_send())
        fds = exchange.outgoing
        try:
            while fds:
                # Each message carries a batch of descriptors and at least one byte;
                # the last one carries the rest of the bytes.
                batch = fds[:MAX_FDS_PER_MESSAGE]
                chunk = data if len(fds) <= MAX_FDS_PER_MESSAGE else data[:1]
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))]
                sent = sock.sendmsg([chunk], rights)
                del fds[: len(batch)]
                for fd in batch:
                    os.close(fd)  # the peer has its own copies now
                data = data[sent:]
        except (BlockingIOError, InterruptedError):
            if data:
                conn.send(data)  # nothing of it was sent: try again later
            # The socket is full: writing pauses until it takes more.
            self._blocked = True
            owner.pause_writing()
            self._loop.add_writer(sock.fileno(), self._writable, owner)
            return False
        except OSError as exc:
            _fail(owner, exc)
            transport.abort()
            return False
        if data:
            conn.send(data)  # a partial send: the transport writes the rest
        return True

    def encode(self, encode: Callable[..., Any], *args: Any) -> Any:
        """Encode a box that may hold a Descriptor, with this connection's exchange."""
        exchange = self.exchange
        token = descriptor_exchange.set(exchange)
        mark = exchange.mark()
        try:
            return encode(*args)
        except BaseException:
            exchange.rollback(mark)  # the box is not sent: neither are its descriptors
            raise
        finally:
            descriptor_exchange.reset(token)

    def decode(
        self,
        decode: Callable[[Mapping[bytes, bytes]], dict[str, Any]],
        box: Mapping[bytes, bytes],
        *,
        discard: bool = False,
    ) -> dict[str, Any]:
        """
        Decode a box that may name Descriptors, with this connection's exchange.

        With ``discard``, the descriptors it names are closed instead.
        """
        exchange = self.exchange
        token = descriptor_exchange.set(exchange)
        ok = False
        try:
            result = decode(box)
            ok = not discard
            return result
        finally:
            exchange.end_decode(ok)
            descriptor_exchange.reset(token)

    def close(self) -> None:
        """The connection is lost: stop, close the socket and every descriptor still held."""
        sock = self._socket
        if sock is not None:
            self.pause_reading()
            if self._blocked:
                self._loop.remove_writer(sock.fileno())
            sock.close()
            self._socket = None
        self.exchange.close()

    # Private methods

    def _read(self, owner: _Owner) -> None:
        """Read what the peer sent, with the descriptors that came with it."""
        sock, exchange, transport = self._socket, self.exchange, owner.transport
        if sock is None or transport is None or owner._lost:
            return
        if transport.is_closing():
            self.pause_reading()  # as the transport itself stops reading when closed
            return
        buffer = owner.get_buffer(-1)
        try:
            nbytes, ancdata, flags, _ = sock.recvmsg_into([buffer], _ANCILLARY_SIZE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.pause_reading()
            _fail(owner, exc)
            transport.abort()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                dropped = exchange.received(fds)
                if dropped:
                    logger.warning(
                        "%s sent file descriptors that no box claims; closed the %d oldest "
                        "(at most %d wait)",
                        owner._peer,
                        dropped,
                        MAX_UNCLAIMED_FDS,
                    )
        if flags & socket.MSG_CTRUNC:
            owner._protocol_failure(
                ProtocolError(
                    f"the peer sent more than {MAX_FDS_PER_MESSAGE} file descriptors at once"
                )
            )
            return
        if nbytes == 0:
            self.pause_reading()
            if not owner.eof_received():
                transport.close()
            return
        owner.buffer_updated(nbytes)

    def _writable(self, owner: _Owner) -> None:
        """The socket takes more: send the descriptors that waited."""
        self._blocked = False
        if self._socket is not None:
            self._loop.remove_writer(self._socket.fileno())
        if not owner._lost:
            owner.resume_writing()


def _fail(owner: _Owner, exc: OSError) -> None:
    """The socket failed: that is why the connection closes, and no call may start."""
    if owner._close_cause is None:
        owner._close_cause = exc
        owner._accepting = False
