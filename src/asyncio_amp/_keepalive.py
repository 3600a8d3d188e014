"""
Keepalive: find out that a silent peer is gone, and drop its connection.

Theory of operation
-------------------

A peer that vanishes without a FIN or a RST (a crashed host, a pulled cable, a
NAT that forgot the flow, a process stopped with SIGSTOP) leaves a connection
that looks open: calls to it hang until TCP gives up, minutes later, and a
server keeps its responders and buffers. With ``keepalive=interval`` a side
checks that the peer still talks:

* **Anything counts.** ``AMPProtocol.data_received`` sets one flag,
  ``_received``: a single attribute store per read, nothing more on the hot
  path. A periodic timer (one handle, re-armed once per ``interval``, never
  once per read) looks at the flag and clears it.
* **Silence.** When a whole period passes with nothing received, the side
  sends a heartbeat call (at most one waits for its answer at any time). The
  peer is silent for ``interval`` to ``2 x interval`` seconds when it goes.
* **Writing counts too.** A peer busy reading a long transfer of ours sends
  nothing back, and our heartbeat waits behind the transfer's bytes (in our
  buffer and the kernel's). Bytes of ours leaving those buffers mean that the
  peer reads, so a tick also counts as alive when what we have not yet had
  acknowledged shrank since the last tick (the transport's buffer, plus on
  Linux the socket's send queue, ``SIOCOUTQ``), or when writing resumed.
* **Timeout.** If nothing at all is received within ``keepalive_timeout``
  seconds of the heartbeat, the connection is aborted: the reason is logged,
  and every pending call fails with [`ConnectionLostError`][] saying
  "keepalive timeout". A dead peer is thus dropped at most ``2 x interval +
  keepalive_timeout`` seconds after its last byte.

The heartbeat is the command ``asyncio-amp:heartbeat`` with no arguments; its
namespaced name stays clear of users' commands. Any answer counts, an error
too: a Twisted peer, which has no responder for it, answers ``UNHANDLED``, and
that is bytes received like any other. Every ``AMPProtocol`` answers a
heartbeat at once (:func:`answer_heartbeat`), without a responder: it takes no
place under ``max_responders``, and it never waits behind the calls that do.

Our heartbeat call never waits for ``max_pending_calls`` and does not count
against it (the limit is raised by one while it is out, see
:meth:`Keepalive.send`). While writing is paused it waits in the send queue
like an answer does: a peer that reads nothing from us and sends us nothing
for ``keepalive_timeout`` is rightly taken for gone, and one that does either
keeps the connection. A pending heartbeat also keeps reading on (rule 4 of
``_flow``), so a side whose responders are all busy still reads, and answers,
the peer's heartbeats.

A peer that floods heartbeats without reading our answers cannot make us hold
them without bound: past ``MAX_HELD_ANSWERS`` answers queued while writing is
paused, the connection is closed as for any other flood.

While StartTLS or a protocol switch is under way (``_upgrade``), no heartbeat
is sent and silence is not counted: the handshake has its own timeout. After
a switch the AMP connection is over, and so is its keepalive.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from typing import Any

from ._commands import Command
from ._errors import ConnectionLostError, ProtocolError

# The AMPProtocol that drives this module (it imports this module, so it is
# not imported back, even for type checking).
AMPProtocol = Any

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp")

#: The heartbeat's command name on the wire: namespaced, so that no user's
#: command is taken for it.
HEARTBEAT_NAME = b"asyncio-amp:heartbeat"

# How long, by default, a side waits for any byte after its heartbeat before it
# drops the connection: gRPC's default keepalive timeout. Long enough for a
# loaded peer or a slow link, short enough that a vanished peer is found in well
# under a minute.
DEFAULT_KEEPALIVE_TIMEOUT = 20.0

# The most heartbeat answers held while writing is paused: a peer of this
# library has one heartbeat out at a time (ping, one per reply), so more than
# this is a flood.
MAX_HELD_ANSWERS = 100


if sys.platform.startswith("linux"):
    import fcntl
    import termios

    def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
        """Bytes in the socket's send queue, not yet acknowledged by the peer (SIOCOUTQ)."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            buffer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):  # not a TCP or UNIX socket, or closed
            return 0
        return int.from_bytes(buffer, sys.byteorder, signed=True)

else:  # pragma: no cover - other systems: the transport's buffer only

    def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
        return 0


def unacknowledged(transport: Any) -> int:
    """What we wrote that the peer has not taken yet, as far as we can see."""
    try:
        return int(transport.get_write_buffer_size()) + _kernel_unsent(transport)
    except Exception:  # a transport that cannot tell
        return 0


class Heartbeat(Command):
    """The keepalive's call: no arguments, an empty answer; every AMPProtocol answers it."""

    command_name = HEARTBEAT_NAME.decode("ascii")


def interval_value(name: str, value: float | None) -> float | None:
    """Check a keepalive interval: a positive finite number of seconds, or ``None``."""
    return None if value is None else seconds_value(name, value)


def seconds_value(name: str, value: float) -> float:
    """Check a keepalive duration: a positive finite number of seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
    return float(value)


def answer_heartbeat(proto: AMPProtocol, tag: bytes | None) -> None:
    """Answer the peer's heartbeat at once, whatever the responders are doing."""
    if tag is None:
        return  # sent without _ask: nothing to answer
    if proto._writing_paused:
        keepalive = for_protocol(proto)
        keepalive.held += 1
        if keepalive.held > MAX_HELD_ANSWERS:
            proto._protocol_failure(
                ProtocolError(
                    f"the peer sent more than {MAX_HELD_ANSWERS} heartbeats while it "
                    "read none of our answers"
                )
            )
            return
    proto._send(Heartbeat._encode_answer(tag, {}))


def probe(proto: AMPProtocol) -> asyncio.Future[Any]:
    """
    Send a heartbeat now, unless one is out already, and return it.

    Whatever answer it gets, an error included, the peer reads and answers. It
    bypasses middleware and ``max_pending_calls`` like the keepalive's own.
    """
    keepalive = for_protocol(proto)
    if keepalive.heartbeat is None:
        keepalive.send()
    assert keepalive.heartbeat is not None
    return keepalive.heartbeat


def for_protocol(proto: AMPProtocol) -> Keepalive:
    """The protocol's keepalive state, created when first needed."""
    keepalive: Keepalive | None = proto._keepalive
    if keepalive is None:
        keepalive = proto._keepalive = Keepalive(proto)
    return keepalive


class Keepalive:
    """
    The keepalive of one connection: its timer, and its heartbeat while one is out.

    Created only when needed (keepalive on, or heartbeats held while writing is
    paused), so a connection without keepalive holds none.
    """

    __slots__ = ("deadline", "drained", "handle", "heartbeat", "held", "proto", "unsent")

    def __init__(self, proto: AMPProtocol) -> None:
        self.proto = proto
        self.handle: asyncio.TimerHandle | None = None
        # Our heartbeat waiting for its answer, if any.
        self.heartbeat: asyncio.Future[Any] | None = None
        # True from a silent period to the next tick: the peer must send
        # something within keepalive_timeout.
        self.deadline = False
        # Heartbeat answers queued since writing paused (see answer_heartbeat).
        self.held = 0
        # Writing resumed since the last tick; our bytes the peer had not taken then.
        self.drained = False
        self.unsent = 0

    # Called by the protocol

    def start(self) -> None:
        """(Re)start the timer with the protocol's ``keepalive`` interval; stop it if off."""
        self.stop()
        proto = self.proto
        interval = proto._keepalive_interval
        if interval is None or proto._loop is None or proto._lost:
            return
        proto._received = self.drained = False
        self.unsent = 0
        self.handle = proto._loop.call_later(interval, self.tick)

    def resumed(self) -> None:
        """Writing resumed: the peer reads (and its heartbeat answers may go)."""
        self.held = 0
        self.drained = True

    def stop(self) -> None:
        """Cancel the timer (the heartbeat out, if any, fails with the connection)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.deadline = False

    # Private methods

    def tick(self) -> None:
        """Once a period: all is well, or send a heartbeat, or give up on the peer."""
        self.handle = None
        proto = self.proto
        interval = proto._keepalive_interval
        if proto._lost or proto.transport is None or interval is None:
            return
        loop = proto._loop
        before, self.unsent = self.unsent, unacknowledged(proto.transport)
        if proto._received or proto._upgrade is not None or self.drained or self.unsent < before:
            # The peer talks or reads, or a handshake is under way (it has its
            # own timeout).
            proto._received = self.drained = False
            self.deadline = False
            self.handle = loop.call_later(interval, self.tick)
            return
        if self.deadline:
            self.expire()
            return
        if proto._close_after_flush:
            return  # closing: close_timeout decides how long it may take
        if self.heartbeat is None:
            self.send()
        self.deadline = True
        self.handle = loop.call_later(proto._keepalive_timeout, self.tick)

    def send(self) -> None:
        """Send a heartbeat call, past max_pending_calls and any call waiting for it."""
        proto = self.proto
        parts, slot = Heartbeat._encode_ask({})
        future: asyncio.Future[Any] = proto._loop.create_future()
        self.heartbeat = future
        # It does not count against max_pending_calls (see the theory of operation).
        proto._own_flow().max_pending_calls += 1
        future.add_done_callback(self._answered)
        if proto._debug:
            logger.debug("= %s has been silent for %s s: heartbeat", proto.peer, proto.keepalive)
        proto._send_call(future, Heartbeat, parts, slot, now=True)

    def _answered(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # any answer counts, an error too (retrieved: no warning)
        if future is self.heartbeat:
            self.heartbeat = None
            self.proto._own_flow().max_pending_calls -= 1

    def expire(self) -> None:
        """Nothing came within keepalive_timeout of the heartbeat: drop the connection."""
        proto = self.proto
        timeout = proto._keepalive_timeout
        error = ConnectionLostError(
            f"keepalive timeout: nothing received from {proto.peer} within {timeout:g} s "
            "of a heartbeat"
        )
        logger.warning(
            "%s sent nothing within %g s of a heartbeat (keepalive timeout); "
            "dropping the connection",
            proto.peer,
            timeout,
        )
        if proto._close_cause is None:
            proto._close_cause = error
        proto._accepting = False
        proto._fail_pending(error)
        proto.transport.abort()
