"""
Protocol switching: a call after which the connection carries another protocol.

Theory of operation
-------------------

A [`ProtocolSwitchCommand`][] is an ordinary call and answer; nothing on the
wire marks the switch (Twisted's ``ProtocolSwitchCommand``). What follows the
answer box is raw bytes of the new protocol, in both directions.

The caller (:func:`call_switch`):

1. sends the call box, then *locks* the connection: any other call raises
   [`ProtocolSwitchedError`][], and every box still to go (answers of our
   responders) is held, since the peer may switch as soon as it answers;
2. tells the connection to stop decoding after the answer to that tag, so
   that the bytes after it are never taken for boxes;
3. on the answer, builds the new protocol and hands it the transport and the
   bytes read past the answer box (an empty remainder is not delivered); on an
   error answer, unlocks the connection and raises the error as usual.

The responder returns a protocol instead of a dict (:func:`answer_switch`):
its answer is written at once, then the protocol hands over the transport.

Handing over (:func:`hand_over`) ends the AMP connection as a lost connection
would (its calls fail with [`ConnectionLostError`][], its responders are
cancelled), except that the transport stays open: ``set_protocol`` gives it to
the new protocol, which gets ``connection_made``, the remainder, every later
byte, then ``connection_lost``.

:class:`Upgrade` is the state both this module and ``_tls`` keep on the
protocol while a call changes what the connection carries: it holds every
write (``_flush`` asks it, with one attribute test when there is none), and it
may own reading until the new layer is in place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ._commands import Command, encode_unknown_error
from ._errors import AmpError, ConnectionLostError, ProtocolSwitchedError

# The AMPProtocol that drives this module (it imports this module, so it is
# not imported back, even for type checking).
AMPProtocol = Any

__all__ = ["ProtocolSwitchCommand"]

logger = logging.getLogger("asyncio_amp")


class Upgrade:
    """
    What a protocol keeps while a call changes what its connection carries.

    Attributes:
        answer: The future of our own call's answer (None on the responder's side).
        holding: Every write is held (the protocol's writing counts as paused).
        owns_reading: The upgrade pauses and resumes reading, not flow control.
        transport_paused: The transport itself asked to pause writing.
    """

    __slots__ = ("answer", "holding", "owns_reading", "transport_paused")

    def __init__(self) -> None:
        self.answer: asyncio.Future[Any] | None = None
        self.holding = False
        self.owns_reading = False
        self.transport_paused = False

    # Called by the protocol

    def sent(self, proto: AMPProtocol, future: asyncio.Future[Any], tag: bytes) -> None:
        """A call went into the send queue with ``tag``: if it is ours, stop and hold after it."""
        if future is self.answer:
            proto._conn.stop_after_answer(tag)
            proto._flush()
            self.hold(proto)

    def holds_writes(self, proto: AMPProtocol) -> bool:
        """
        Whether ``_flush`` must write nothing now.

        A connection that closes while writes are held drops them: they were
        meant for the layer that is not there yet.
        """
        if not self.holding:
            return False
        if proto._close_after_flush:
            proto._conn.data_to_send()
            self.holding = False
            proto._close_transport(0)
        return True

    def refusal(self, name: str) -> Exception | None:
        """The error for a call made while calls are refused, if the upgrade is the reason."""
        return None

    def pause_writing(self) -> None:
        """The transport's buffer is full."""
        self.transport_paused = True

    def resume_writing(self) -> bool:
        """The transport's buffer drained; ``True`` if writing stays held."""
        self.transport_paused = False
        return self.holding

    # Helpers for _tls and this module

    def hold(self, proto: AMPProtocol) -> None:
        """Hold every write from now on (writing counts as paused)."""
        if self.holding:
            return
        self.holding = True
        self.transport_paused = proto._writing_paused
        proto._writing_paused = True
        proto._own_flow().pause_writing()

    def release(self, proto: AMPProtocol) -> None:
        """Stop holding writes: send what waited, unless the transport itself is full."""
        if not self.holding:
            return
        self.holding = False
        if not self.transport_paused and not proto._lost:
            proto.resume_writing()


class ProtocolSwitchCommand(Command):
    """
    A command after whose answer the connection carries another protocol.

    Subclass it like any [`Command`][] (``arguments``, ``errors``; no
    ``response``). Its responder returns an ``asyncio.Protocol`` instance
    instead of a dict: once the answer is written, that protocol owns the
    transport (``connection_made``, then every later byte, then
    ``connection_lost``), and the AMP protocol is closed.

    The caller passes a factory as well as the arguments:

        new = await proto.call_remote(Switch, protocol_factory=MyProtocol, name="x")

    After a successful answer ``new`` is the protocol the factory built, which
    owns the transport and got the bytes already read past the answer. While
    the call waits for its answer, other calls raise
    [`ProtocolSwitchedError`][] and our answers to the peer's calls are held;
    an error answer unlocks the connection and raises as usual. Cancelling the
    call closes the connection.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls._response_schema.fields:
            raise TypeError(f"{cls.__qualname__}: a ProtocolSwitchCommand has no response")
        if not cls.requires_answer:
            raise TypeError(f"{cls.__qualname__}: a ProtocolSwitchCommand requires an answer")
        # The protocol goes the general way for these (see _upgrade_call).
        cls._plain_ask = None
        cls._plain_answer = None

    @staticmethod
    def _upgrade_call(
        proto: AMPProtocol, command: type[Command], arguments: Mapping[str, Any]
    ) -> asyncio.Future[Any]:
        return call_switch(proto, command, arguments)

    @staticmethod
    def _upgrade_answer(
        proto: AMPProtocol, command: type[Command], tag: bytes, result: Any
    ) -> bytes | None:
        return answer_switch(proto, command, tag, result)


class _Switch(Upgrade):
    """A switch: our call waits for its answer, or the connection has switched."""

    __slots__ = ("command", "factory", "result", "switched")

    def __init__(self, command: type[Command], factory: Callable[[], asyncio.BaseProtocol]) -> None:
        super().__init__()
        self.command = command
        self.factory = factory
        self.result: asyncio.Future[Any] | None = None
        self.switched = False

    def refusal(self, name: str) -> Exception | None:
        if self.switched:
            return ProtocolSwitchedError(
                f"cannot call {name}: the connection switched protocols after "
                f"{self.command.__qualname__}"
            )
        return ProtocolSwitchedError(
            f"cannot call {name}: the connection is switching protocols "
            f"({self.command.__qualname__} waits for its answer)"
        )

    def answered(self, proto: AMPProtocol, answer: asyncio.Future[Any]) -> None:
        """Our switch call got its answer (or failed): switch, or unlock."""
        result = self.result
        assert result is not None
        error = None if answer.cancelled() else answer.exception()
        if answer.cancelled() or error is not None:
            unlock(proto, self)
            if not result.done():
                result.set_exception(error or ConnectionLostError("the switch was cancelled"))
            return
        if result.done():  # cancelled: the peer has switched, we cannot go on
            logger.info(
                "%s was cancelled after %s switched protocols; closing the connection",
                self.command.__qualname__,
                proto.peer,
            )
            self.switched = True
            if proto.transport is not None:
                proto.transport.abort()
            return
        if proto._lost or proto.transport is None:
            result.set_exception(
                ConnectionLostError(
                    f"the connection with {proto.peer} closed before "
                    f"{self.command.__qualname__} could switch protocols"
                )
            )
            return
        remainder = proto._conn.resume()
        try:
            new = self.factory()
        except Exception as exc:
            self.switched = True
            if proto.transport is not None:
                proto.transport.abort()
            result.set_exception(exc)
            return
        self.switched = True
        hand_over(proto, new, remainder)
        result.set_result(new)


def unlock(proto: AMPProtocol, upgrade: Upgrade) -> None:
    """An upgrade did not happen: back to plain AMP, and send what was held."""
    if proto._upgrade is upgrade:
        proto._upgrade = None
    leftover = proto._conn.resume()
    proto._accepting = not (
        proto._close_after_flush or proto._lost or proto._close_cause or proto._shutting_down
    )
    upgrade.release(proto)
    if leftover and not proto._lost:
        proto.data_received(leftover)


def send_upgrade_call(
    proto: AMPProtocol,
    upgrade: Upgrade,
    command: type[Command],
    parts: list[bytes],
    slot: int,
) -> asyncio.Future[Any]:
    """Send (or queue, in order) the call that upgrades the connection; return its answer."""
    assert proto._loop is not None
    answer: asyncio.Future[Any] = proto._loop.create_future()
    upgrade.answer = answer
    proto._upgrade = upgrade
    if not proto._flow.may_send(len(proto._pending), nested=False, behind=bool(proto._waiting)):
        proto._hold((answer, command, parts, slot))
    else:
        proto._send_call(answer, command, parts, slot, now=True)
    return answer


def call_switch(
    proto: AMPProtocol, command: type[Command], arguments: Mapping[str, Any]
) -> asyncio.Future[Any]:
    """Call a ProtocolSwitchCommand: see the theory of operation."""
    values = dict(arguments)
    factory = values.pop("protocol_factory", None)
    if not callable(factory):
        raise TypeError(
            f"call_remote({command.__qualname__}) needs protocol_factory=, a callable "
            "that returns the protocol to switch to"
        )
    if proto._upgrade is not None:
        raise AmpError(
            f"cannot call {command.__qualname__}: the connection with {proto.peer} is "
            "already being upgraded (StartTLS or a switch waits for its answer)"
        )
    parts, slot = command._encode_ask(values)  # checked before anything changes
    assert proto._loop is not None
    switch = _Switch(command, factory)
    result: asyncio.Future[Any] = proto._loop.create_future()
    switch.result = result
    answer = send_upgrade_call(proto, switch, command, parts, slot)
    proto._accepting = False  # other calls are refused: see _Switch.refusal
    answer.add_done_callback(functools.partial(switch.answered, proto))
    return result


def answer_switch(
    proto: AMPProtocol, command: type[Command], tag: bytes, result: Any
) -> bytes | None:
    """
    The responder of a switch returned ``result``: answer, then hand over the transport.

    Returns the bytes to answer with when the switch cannot happen (an error
    answer), else ``None`` (the answer is already written).
    """
    if not isinstance(result, asyncio.BaseProtocol):
        logger.error(
            "the responder of %s for %s returned %s, not an asyncio protocol; answering UNKNOWN",
            command.__qualname__,
            proto.peer,
            type(result).__name__,
        )
        return encode_unknown_error(tag)
    if proto._upgrade is not None or proto.transport is None:
        logger.error(
            "%s called %s while the connection is being upgraded; answering UNKNOWN",
            proto.peer,
            command.__qualname__,
        )
        return encode_unknown_error(tag)
    proto._send(command._encode_answer(tag, {}))
    proto._flush()
    switch = _Switch(command, lambda: result)
    switch.switched = True
    proto._upgrade = switch
    hand_over(proto, result, b"")
    return None


def hand_over(proto: AMPProtocol, new: asyncio.BaseProtocol, remainder: bytes) -> None:
    """Give ``new`` the transport and ``remainder``; the AMP connection ends."""
    transport = proto.transport
    assert transport is not None
    resume = proto._reading_paused or proto._fds is not None
    # Through the transport's protocol, which may wrap ours (a Server forgets
    # the connection that way): the AMP connection ends here.
    transport.get_protocol().connection_lost(
        ProtocolSwitchedError(f"the connection switched to {type(new).__qualname__}")
    )
    transport.set_protocol(new)
    new.connection_made(transport)
    if resume and not transport.is_closing():
        transport.resume_reading()
    if remainder:
        deliver(new, remainder)


def deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to ``protocol`` as the transport would (buffered or not)."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            if not buffer:
                raise RuntimeError(f"{type(protocol).__qualname__}.get_buffer() returned no space")
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)
