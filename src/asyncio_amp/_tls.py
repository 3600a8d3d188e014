"""
StartTLS: turn a plaintext AMP connection into a TLS one, in the middle of it.

Theory of operation
-------------------

Twisted's sequence (``amp.StartTLS``), with one change: the side that calls
[`StartTLS`][] is always the TLS client, and the side that answers is the TLS
server, whichever side accepted the TCP connection (Twisted follows the TCP
roles, which fails when both sides think they are clients: Twisted #3278 and
#5690).

The caller (:func:`call_start_tls`):

1. sends ``{_ask: N, _command: StartTLS}``; its ``ssl`` and
   ``server_hostname`` never go on the wire. From then on every box it would
   send is held, and the connection stops decoding after the answer to ``N``;
2. on the answer (plaintext), it pauses reading and runs ``loop.start_tls`` as
   the client. A TLS server speaks only after the client's hello, so any bytes
   after the answer box are a protocol error. Boxes that arrive over TLS before
   the protocol adopts the new transport are kept undecoded and decoded then;
3. once the handshake is done it adopts the TLS transport (with the old one's
   write buffer limits, and its own flow control from then on), sends what was
   held, and the call returns ``{}``. If the handshake fails (a certificate
   that does not verify), the call raises that error, the connection is
   closed, and the other pending calls fail with [`ConnectionLostError`][]. An
   error answer (``TLS_ERROR``) unlocks the connection and raises as usual.

The responder (:func:`answer_start_tls`) takes its context from
``AMPProtocol.start_tls_context()``. Without one it answers ``TLS_ERROR`` /
``TLS not available``, as Twisted does. With one it writes the answer in
plaintext, holds every later box, stops reading, and runs ``loop.start_tls``
as the server.

``loop.start_tls`` gives the transport to its own TLS protocol; it must not
start while the old transport's buffer is over its high-water mark (the TLS
protocol would then get a ``resume_writing`` it never paused for), so it waits
for the buffer to drain first. Nothing is written meanwhile, so that happens.

Connections that pass file descriptors (UNIX sockets read with ``recvmsg``)
refuse StartTLS: descriptors cannot travel over TLS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from ._commands import Command, encode_error
from ._errors import AmpError, ConnectionLostError, ProtocolError
from ._switch import Upgrade, send_upgrade_call, unlock

# The AMPProtocol that drives this module (it imports this module, so it is
# not imported back, even for type checking).
AMPProtocol = Any

__all__ = ["StartTLS"]

logger = logging.getLogger("asyncio_amp")

TLS_ERROR_CODE = b"TLS_ERROR"
TLS_NOT_AVAILABLE = b"TLS not available"


class StartTLS(Command):
    """
    Switch the connection to TLS (Twisted's ``amp.StartTLS``).

    Call it with the client side's context; ``ssl`` and ``server_hostname``
    stay local:

        await proto.call_remote(StartTLS, ssl=client_context, server_hostname="name")

    It returns ``{}`` once the handshake is done; boxes sent meanwhile are held
    and go over TLS. The caller is always the TLS client. The peer answers with
    the context its ``start_tls_context()`` returns, or with the error code
    ``TLS_ERROR`` if it has none ([`UnknownRemoteError`][] on our side). A
    certificate that does not verify raises ``ssl.SSLCertVerificationError``
    and closes the connection. Cancelling the call before TLS is up closes the
    connection.

    Raises:
        AmpError: TLS is already on (or starting) on this connection, or the
            connection passes file descriptors.
    """

    command_name = "StartTLS"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _no_shortcuts(cls)

    @staticmethod
    def _upgrade_call(
        proto: AMPProtocol, command: type[Command], arguments: Mapping[str, Any]
    ) -> asyncio.Future[Any]:
        return call_start_tls(proto, command, arguments)

    @staticmethod
    def _upgrade_answer(
        proto: AMPProtocol, command: type[Command], tag: bytes, result: Any
    ) -> bytes | None:
        return answer_start_tls(proto, command, tag, result)


def _no_shortcuts(cls: type[Command]) -> None:
    # The protocol goes the general way for StartTLS, where _upgrade_call and
    # _upgrade_answer take over.
    cls._plain_ask = None
    cls._plain_answer = None


_no_shortcuts(StartTLS)


class _StartingTLS(Upgrade):
    """TLS is starting: our call waits for its answer, or the handshake runs."""

    __slots__ = ("context", "drained", "result", "server_hostname", "task")

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        super().__init__()
        self.context = context
        self.server_hostname = server_hostname
        self.result: asyncio.Future[Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self.drained: asyncio.Future[None] | None = None

    def resume_writing(self) -> bool:
        holding = super().resume_writing()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        return holding

    def answered(self, proto: AMPProtocol, answer: asyncio.Future[Any]) -> None:
        """Our StartTLS call got its answer: start the handshake, or unlock on an error."""
        result = self.result
        assert result is not None
        error = None if answer.cancelled() else answer.exception()
        if answer.cancelled() or error is not None:
            unlock(proto, self)
            if not result.done():
                result.set_exception(error or ConnectionLostError("StartTLS was cancelled"))
            return
        if proto._lost or proto.transport is None:
            if not result.done():
                result.set_exception(
                    ConnectionLostError(f"the connection with {proto.peer} closed before TLS")
                )
            return
        extra = proto._conn.resume()
        if extra:
            proto._protocol_failure(
                ProtocolError(
                    f"the peer sent {len(extra)} bytes in plaintext after its answer to "
                    "StartTLS (a TLS server waits for the client's hello)"
                )
            )
            if not result.done():
                result.set_exception(
                    ConnectionLostError(f"the connection with {proto.peer} closed before TLS")
                )
            return
        self.start(proto, server_side=False)

    def start(self, proto: AMPProtocol, *, server_side: bool) -> None:
        """Stop reading, keep what comes undecoded, and run the handshake."""
        assert proto._loop is not None and proto.transport is not None
        self.owns_reading = True
        proto._conn.stop()
        proto.transport.pause_reading()
        self.task = proto._loop.create_task(self._handshake(proto, server_side))

    async def _handshake(self, proto: AMPProtocol, server_side: bool) -> None:
        loop = proto._loop
        old = proto.transport
        assert loop is not None and old is not None
        result = self.result
        try:
            while self.transport_paused:
                self.drained = loop.create_future()
                await self.drained
            # The transport's protocol may wrap ours (a Server tracks its
            # connections that way): the TLS transport gets the same one.
            new = await loop.start_tls(
                old,
                old.get_protocol(),
                self.context,
                server_side=server_side,
                server_hostname=None if server_side else self.server_hostname,
            )
            if new is None or proto._lost:
                raise ConnectionLostError(f"the connection with {proto.peer} closed during TLS")
        except BaseException as exc:
            if proto._upgrade is self:
                proto._upgrade = None
            self.holding = False
            if not proto._lost:
                if proto._close_cause is None and isinstance(exc, Exception):
                    proto._close_cause = exc
                old.abort()
                proto.connection_lost(exc if isinstance(exc, Exception) else None)
            if result is None:
                if isinstance(exc, Exception):
                    logger.warning("StartTLS from %s failed: %s", proto.peer, exc)
            elif not result.done():
                if isinstance(exc, asyncio.CancelledError):
                    result.cancel()
                else:
                    result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        # Adopt the TLS transport, with the old one's limits.
        low, high = old.get_write_buffer_limits()
        new.set_write_buffer_limits(high=high, low=low)
        proto.transport = new
        proto._upgrade = None
        if proto._reading_paused:
            new.pause_reading()
        early = proto._conn.resume()
        self.transport_paused = False
        self.release(proto)
        if proto._debug:
            logger.debug("= TLS is up with %s", proto.peer)
        if result is not None and not result.done():
            result.set_result({})
        if early and not proto._lost:
            proto.data_received(early)

    def cancelled(self, proto: AMPProtocol, result: asyncio.Future[Any]) -> None:
        """The caller gave up on StartTLS: the connection cannot go on in plaintext."""
        if result.cancelled() and proto._upgrade is self and proto.transport is not None:
            logger.info("StartTLS with %s was cancelled; closing the connection", proto.peer)
            if self.task is not None:
                self.task.cancel()
            else:
                proto.transport.abort()


def _refuse_reason(proto: AMPProtocol) -> str | None:
    if proto.tls:
        return "TLS is already on"
    if proto._upgrade is not None:
        return "TLS is already starting, or the connection is switching"
    if proto._fds is not None:
        return "the connection passes file descriptors, which cannot travel over TLS"
    return None


def call_start_tls(
    proto: AMPProtocol, command: type[Command], arguments: Mapping[str, Any]
) -> asyncio.Future[Any]:
    """Call StartTLS: see the theory of operation."""
    values = dict(arguments)
    context = values.pop("ssl", None)
    server_hostname = values.pop("server_hostname", None)
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(
            f"call_remote({command.__qualname__}) needs ssl=, the ssl.SSLContext of the "
            f"TLS client, not {context!r}"
        )
    reason = _refuse_reason(proto)
    if reason is not None:
        raise AmpError(f"cannot call {command.__qualname__} with {proto.peer}: {reason}")
    parts, slot = command._encode_ask(values)
    assert proto._loop is not None
    starting = _StartingTLS(context, server_hostname)
    result: asyncio.Future[Any] = proto._loop.create_future()
    starting.result = result
    answer = send_upgrade_call(proto, starting, command, parts, slot)
    answer.add_done_callback(functools.partial(starting.answered, proto))
    result.add_done_callback(functools.partial(starting.cancelled, proto))
    return result


def answer_start_tls(
    proto: AMPProtocol, command: type[Command], tag: bytes, result: Any
) -> bytes | None:
    """The StartTLS responder returned: answer in plaintext and start TLS as the server."""
    context = proto.start_tls_context()
    if context is None:
        reason: str | None = TLS_NOT_AVAILABLE.decode()
    else:
        reason = _refuse_reason(proto)
    if reason is not None:
        logger.info("%s called StartTLS; answering TLS_ERROR: %s", proto.peer, reason)
        return encode_error(tag, TLS_ERROR_CODE, reason.encode("utf-8"))
    assert context is not None
    try:
        data = command._encode_answer(tag, {} if result is None else result)
    except Exception as exc:
        logger.error("the responder of StartTLS returned an answer that cannot be sent: %s", exc)
        data = command._encode_answer(tag, {})
    proto._send(data)
    proto._flush()
    starting = _StartingTLS(context, None)
    proto._upgrade = starting
    starting.hold(proto)
    starting.start(proto, server_side=True)
    return None
