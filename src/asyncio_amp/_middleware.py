"""
Middleware: code that runs around every call, in both directions.

A [`Middleware`][asyncio_amp.Middleware] wraps the responders of the peer's
calls (``incoming``) and our own calls to the peer (``outgoing``), the way ASGI
middleware wraps an application or a gRPC interceptor wraps a method. The
protocol hands a call to a chain (:class:`Chain`) only when a middleware is
installed for its direction; without one, it never comes here.

How a call goes through the chain:

* **Incoming.** The protocol finds the responder and decodes the arguments as
  usual, then runs the chain as the responder's task (``AMPProtocol._run_task``).
  Whatever the chain returns is encoded as the answer, and whatever it raises is
  answered as if the responder had raised it. So the chain holds the
  responder's place under ``max_responders``, lends it while it calls the peer
  back, runs in a fresh copy of the connection's context, and is cancelled (and
  answers ``UNKNOWN``) like any responder: the flow control guarantees of
  ``_flow`` hold unchanged. Plain responders run in that task too. The
  connection still decodes calls straight from the bytes: it does so only for
  boxes without extra keys, and gives the others as boxes, whose extra keys the
  chain reads.
* **Outgoing.** ``call_remote`` (and ``call_remote_box``) check the call's
  arguments first (so a bad call raises at once, as without middleware), then
  start the chain as a task in the caller's context and return it; the
  innermost step encodes the call (with the arguments as the middleware left
  them, checked again, and the extra keys it added) and hands it to the
  protocol, which queues, sends and lends exactly as without middleware.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

from ._arguments import DescriptorExchange, descriptor_exchange
from ._commands import Command, RawCommand
from ._errors import RemoteAmpError
from ._locators import _error_answer, is_default_hook
from ._wire import ASK, BOX_END, COMMAND, RESERVED_KEYS, encode_items

# The protocol is typed Any here: _protocol imports this module, not the reverse
# (a Call's ``protocol`` is the AMPProtocol of the connection).
AMPProtocol = Any

__all__ = ["AccessLog", "Call", "CallNext", "Middleware"]

logger = logging.getLogger("asyncio_amp")

# Error codes that this library itself answers with, whatever the command: an
# outcome may name them even when the Command does not declare them.
WELL_KNOWN_CODES = frozenset({"UNHANDLED", "UNKNOWN", "SHUTDOWN", "TLS_ERROR"})


class Call:
    """
    One call, as a [`Middleware`][asyncio_amp.Middleware] sees it.

    A middleware may change ``arguments`` and ``extra`` before passing the call
    on; the other attributes describe the call and should be left alone.

    Attributes:
        command: The [`Command`][asyncio_amp.Command] class, or ``None`` for a
            call without one: [`call_remote_box`][asyncio_amp.AMPProtocol.call_remote_box]
            going out, and a call answered by
            [`unhandled_command`][asyncio_amp.AMPProtocol.unhandled_command]
            coming in (which includes commands nobody answers: those end in
            ``UNHANDLED``).
        name: The command's name, as text (its wire name).
        arguments: The decoded arguments, by their Python names. For a call
            without a Command class, the raw box: argument keys to wire values
            (bytes coming in; as given to ``call_remote_box`` going out).
        protocol: The [`AMPProtocol`][asyncio_amp.AMPProtocol] of the connection.
        tag: The call's ``_ask`` tag; ``None`` for a command that requires no
            answer. Going out, the tag is taken when the call is sent: it is
            ``None`` until the innermost ``call_next`` has sent it (and stays
            ``None`` for StartTLS and protocol switch calls).
        direction: ``"incoming"`` (the peer calls a responder of ours) or
            ``"outgoing"`` (we call the peer).
        requires_answer: Whether the caller waits for an answer (``False`` for
            ``requires_answer = False`` commands: no tag, and the answer
            is dropped).
        extra: Wire keys besides the command's own arguments. Going out, a
            middleware may add keys (bytes to bytes) and they are sent in the
            call's box: a tracing middleware puts its trace context here.
            Coming in, the keys of the received box that are not arguments of the
            command (AMP peers, Twisted included, ignore keys they do not know).
            They are not sent for ``StartTLS`` and protocol switch calls.
    """

    __slots__ = (
        "_responder",
        "_stand_in",
        "arguments",
        "command",
        "direction",
        "extra",
        "name",
        "protocol",
        "requires_answer",
        "tag",
    )

    def __init__(
        self,
        command: type[Command] | None,
        name: str,
        arguments: dict[Any, Any],
        protocol: AMPProtocol,
        tag: bytes | None,
        direction: Literal["incoming", "outgoing"],
        requires_answer: bool,
        extra: dict[bytes, bytes] | None = None,
    ) -> None:
        self.command = command
        self.name = name
        self.arguments = arguments
        self.protocol = protocol
        self.tag = tag
        self.direction = direction
        self.requires_answer = requires_answer
        self.extra: dict[bytes, bytes] = {} if extra is None else extra
        # What stands for the Command of an incoming call without one (see _locators).
        self._stand_in: Any = None
        # The responder an incoming call goes to at the end of the chain.
        self._responder: Callable[..., Any] | None = None

    def __repr__(self) -> str:
        return f"<Call {self.direction} {self.name} tag={self.tag!r} peer={self.protocol.peer}>"

    def outcome(self, error: BaseException | None) -> str:
        """
        Name how the call ended, in a word from a small set: for logs and metrics.

        Args:
            error: What ``call_next`` raised, or ``None`` if it returned.

        Returns:
            ``"ok"`` if ``error`` is ``None``; else the error code the call is
            answered with (coming in) or was answered with (going out), when it
            is one of the command's ``errors`` or ``fatal_errors`` or one of the
            codes this library answers with (``UNHANDLED``, ``UNKNOWN``,
            ``SHUTDOWN``, ``TLS_ERROR``); ``"UNKNOWN"`` for any other error
            answer. An outgoing call that got no answer at all (the connection
            closed, a timeout, a cancellation, bad arguments) gives the name of
            the exception's class, such as ``"ConnectionLostError"``. So the
            values stay bounded whatever the peer sends.
        """
        if error is None:
            return "ok"
        command = self.command
        if command is not None:
            mapped = command._error_code_for(error)
            if mapped is not None:
                return mapped[0].decode("utf-8", "backslashreplace")
        if isinstance(error, RemoteAmpError):
            code = error.error_code
            text = code.decode("utf-8", "replace") if isinstance(code, bytes) else str(code)
            if text in WELL_KNOWN_CODES:
                return text
            if command is None and self.direction == "incoming":
                # unhandled_command's own codes: the application chose them.
                return text
            return "UNKNOWN"
        if self.direction == "incoming":
            return "UNKNOWN"  # what the caller is answered
        return type(error).__name__


class CallNext(Protocol):
    """
    What a middleware awaits to pass a call on: ``await call_next(call)``.

    It runs the next middleware, and at the end of the chain the responder
    (incoming) or the call to the peer (outgoing), and returns the answer.
    """

    def __call__(self, call: Call, /) -> Awaitable[dict[Any, Any]]: ...


class Middleware:
    """
    Code that runs around calls: subclass it and override either method or both.

    Install instances with ``AMPProtocol(middleware=[...])``, or the
    ``middleware`` keyword of [`serve`][asyncio_amp.serve] and
    [`connect`][asyncio_amp.connect]. They run in list order: the first is the
    outermost, as with ASGI middleware and gRPC interceptors. The same
    instances serve every connection of a server, so keep the state of one
    connection by ``call.protocol`` (a ``weakref.WeakKeyDictionary``, say).

    A middleware may time or log a call, change ``call.arguments`` or
    ``call.extra`` before calling ``call_next``, answer by itself without calling
    it, or refuse a call by raising. Coming in, an exception it raises is answered
    exactly as if the responder had raised it: the command's ``errors`` and
    ``fatal_errors`` map it to its code, and anything else is answered
    ``UNKNOWN`` (and logged). Going out, the caller of ``call_remote`` gets it.
    """

    async def incoming(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """
        Run around the responder of a call from the peer.

        Args:
            call: The call: its command, arguments and connection.
            call_next: Await it with the call to run the rest of the chain and
                the responder.

        Returns:
            The answer: a dict keyed like the command's ``response`` (raw bytes
            keys and values for a call without a Command class). It is dropped
            for a command that requires no answer.
        """
        return await call_next(call)

    async def outgoing(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """
        Run around a call of ours to the peer.

        Args:
            call: The call: its command, arguments and connection.
            call_next: Await it with the call to run the rest of the chain and
                send the call.

        Returns:
            The answer, as ``call_remote`` returns it (``{}`` for a command that
            requires no answer; ``call_remote``'s future still gives ``None``).
        """
        return await call_next(call)


def overrides(middleware: Middleware, method: str) -> bool:
    """Whether ``middleware``'s class overrides ``method`` of Middleware."""
    return getattr(type(middleware), method) is not getattr(Middleware, method)


def build(
    middleware: Iterable[Middleware],
) -> tuple[tuple[Middleware, ...], Chain | None, Chain | None]:
    """
    Check ``middleware`` and build the chains of both directions.

    Returns:
        The middleware as a tuple, the incoming chain and the outgoing chain
        (``None`` for a direction no middleware overrides).
    """
    if isinstance(middleware, str | bytes) or not isinstance(middleware, Iterable):
        raise TypeError(f"middleware must be an iterable of Middleware, not {middleware!r}")
    items = tuple(middleware)
    for item in items:
        if not isinstance(item, Middleware):
            raise TypeError(f"middleware must be Middleware instances, not {item!r}")
    incoming = [item.incoming for item in items if overrides(item, "incoming")]
    outgoing = [item.outgoing for item in items if overrides(item, "outgoing")]
    return (
        items,
        Chain(incoming, _respond) if incoming else None,
        Chain(outgoing, _send) if outgoing else None,
    )


Step = Callable[[Call, CallNext], Awaitable[dict[Any, Any]]]


class Chain:
    """The middleware of one direction, composed once around the innermost step."""

    __slots__ = ("run", "tags")

    def __init__(self, steps: Sequence[Step], innermost: CallNext) -> None:
        run = innermost
        for step in reversed(steps):
            run = _link(step, run)
        self.run = run
        # Outgoing calls waiting for their tag: their futures to their Calls.
        self.tags: dict[asyncio.Future[Any], Call] = {}

    # Incoming

    def dispatch(
        self,
        protocol: AMPProtocol,
        command: Any,
        attribute: Any,
        tag: bytes | None,
        arguments: dict[str, Any],
        event: Any,
    ) -> None:
        """
        Run a call from the peer through the chain, as its responder's task.

        ``event`` is the call as the connection gave it: decoded straight to
        its arguments (a tuple, which it does only for boxes without extra keys),
        or an ``Ask`` with its box.
        """
        box: Mapping[bytes, bytes] = {} if type(event) is tuple else event.box
        if isinstance(command, type) and issubclass(command, Command):
            responder = getattr(protocol, attribute) if type(attribute) is str else attribute
            call = Call(
                command,
                command.wire_name.decode("utf-8", "backslashreplace"),
                arguments,
                protocol,
                tag,
                "incoming",
                tag is not None,
                _extra_keys(command, box) if box else None,
            )
            call._responder = responder
            protocol._run_task(command, tag, functools.partial(self.run, call), None)
            return
        # unhandled_command answers it (see _locators): the raw box goes through.
        call = Call(
            None,
            command.name.decode("utf-8", "backslashreplace"),
            {key: value for key, value in box.items() if key not in (ASK, COMMAND)},
            protocol,
            tag,
            "incoming",
            tag is not None,
        )
        call._stand_in = command
        protocol._run_task(command, tag, functools.partial(self._incoming_raw, call), None)

    async def _incoming_raw(self, call: Call) -> Any:
        try:
            return await self.run(call)
        except RemoteAmpError as exc:
            if call._stand_in is None:
                raise
            # As for unhandled_command: its RemoteAmpError is the answer.
            answer = _error_answer(exc)
            if answer is None:
                raise
            raise answer from exc

    # Outgoing

    def call(
        self,
        protocol: AMPProtocol,
        command: type[Command] | None,
        name: bytes,
        arguments: Mapping[Any, Any] | None,
        raw: RawCommand | None = None,
    ) -> asyncio.Future[Any]:
        """Run one of our calls through the chain: a task, in the caller's context."""
        call = Call(
            command,
            name.decode("utf-8", "backslashreplace"),
            dict(arguments or {}),
            protocol,
            None,
            "outgoing",
            raw.requires_answer if raw is not None else command.requires_answer,  # type: ignore[union-attr]
        )
        loop: asyncio.AbstractEventLoop = protocol._loop
        if call.requires_answer:
            return loop.create_task(self.run(call))  # type: ignore[arg-type]
        return loop.create_task(self._outgoing_unanswered(call))

    async def _outgoing_unanswered(self, call: Call) -> None:
        await self.run(call)

    def sent(self, future: asyncio.Future[Any], tag: bytes) -> None:
        """The protocol sent the call of ``future`` with ``tag``."""
        call = self.tags.pop(future, None)
        if call is not None:
            call.tag = tag


def check_arguments(protocol: AMPProtocol, command: type[Command], arguments: Any) -> None:
    """
    Encode an outgoing call's arguments once, for its errors only, before the chain runs.

    So a bad call raises at once, as it does without middleware; ``_send``
    encodes (and so checks) the arguments again, as the middleware left them.
    StartTLS and protocol switch calls are checked their own way, when sent.
    """
    if getattr(command, "_upgrade_call", None) is not None:
        return
    if not (command._uses_descriptors and protocol._fds is not None):
        command._encode_ask(arguments)
        return
    # A throwaway exchange: the descriptors are duplicated, and closed again.
    exchange = DescriptorExchange()
    token = descriptor_exchange.set(exchange)
    try:
        command._encode_ask(arguments)
    finally:
        descriptor_exchange.reset(token)
        exchange.rollback(0)


def _link(step: Step, after: CallNext) -> CallNext:
    # A plain function that returns the step's coroutine: no frame of its own.
    def run(call: Call) -> Awaitable[dict[Any, Any]]:
        return step(call, after)

    return run


async def _respond(call: Call) -> dict[Any, Any]:
    """The innermost incoming step: run the responder with the call's arguments."""
    protocol = call.protocol
    if call._stand_in is not None:
        unhandled = protocol.unhandled_command
        if is_default_hook(type(protocol).unhandled_command):
            logger.warning(
                "%s called %r, which has no responder%s",
                protocol.peer,
                call._stand_in.name,
                "; answering UNHANDLED" if call.tag is not None else "",
            )
        result: Any = unhandled(call._stand_in.name, call.arguments)
    else:
        assert call._responder is not None
        result = call._responder(**call.arguments)
    if inspect.isawaitable(result):
        result = await result
    return {} if result is None else result


async def _send(call: Call) -> dict[Any, Any]:
    """The innermost outgoing step: encode the call, send it and await its answer."""
    protocol = call.protocol
    command = call.command
    if not protocol._accepting:
        raise protocol._refusal(call.name)
    sending: Any
    if command is None:
        sending = RawCommand(call.name, {**call.arguments, **call.extra}, call.requires_answer)
        parts, slot = sending._encode_ask({})
    elif (upgrade := getattr(command, "_upgrade_call", None)) is not None:
        # StartTLS and protocol switches: they send their own way, without extra keys.
        result = await upgrade(protocol, command, call.arguments)
        return {} if result is None else result
    else:
        sending = command
        if command._uses_descriptors and protocol._fds is not None:
            parts, slot = protocol._fds.encode(command._encode_ask, call.arguments)
        else:
            parts, slot = command._encode_ask(call.arguments)
        if call.extra:
            parts = _with_extra(command, parts, call.extra)
    chain = protocol._outgoing
    assert chain is not None
    future: asyncio.Future[Any] = protocol._loop.create_future()
    chain.tags[future] = call
    try:
        protocol._submit(future, sending, parts, slot)
        answer = await future
    finally:
        chain.tags.pop(future, None)
    return {} if answer is None else answer


_argument_keys_cache: dict[type[Command], tuple[frozenset[bytes], tuple[bytes, ...]]] = {}


def _argument_keys(command: type[Command]) -> tuple[frozenset[bytes], tuple[bytes, ...]]:
    """The wire keys of ``command``'s arguments, and the prefixes of its chunked ones."""
    try:
        return _argument_keys_cache[command]
    except KeyError:
        pass
    fields = command._arguments_schema.fields
    keys = frozenset(field.key for field in fields)
    chunked = tuple(field.key + b"." for field in fields if field.argument.multi_key)
    _argument_keys_cache[command] = keys, chunked
    return keys, chunked


def _extra_keys(command: type[Command], box: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The keys of a received box that are not ``command``'s arguments."""
    keys, chunked = _argument_keys(command)
    return {
        key: value
        for key, value in box.items()
        if key not in keys
        and key not in RESERVED_KEYS
        and not (chunked and key.startswith(chunked))
    }


def _with_extra(
    command: type[Command], parts: list[bytes], extra: Mapping[bytes, bytes]
) -> list[bytes]:
    """The encoded parts of a call with ``extra`` keys added before its end."""
    keys, chunked = _argument_keys(command)
    items: list[tuple[bytes, bytes]] = []
    for key, value in extra.items():
        if type(key) is not bytes or type(value) is not bytes:
            raise TypeError(f"extra keys and values of a call are bytes, not {key!r}: {value!r}")
        if key in RESERVED_KEYS or key in keys or (chunked and key.startswith(chunked)):
            raise ValueError(
                f"the extra key {key!r} of a {command.__qualname__} call is reserved or "
                "one of its arguments"
            )
        items.append((key, value))
    added: list[bytes] = []
    encode_items(sorted(items), added)  # checks every length
    last = parts[-1]
    assert last.endswith(BOX_END)
    return [*parts[:-1], last[: -len(BOX_END)], *added, BOX_END]


class AccessLog(Middleware):
    """
    Log one line per call: time, peer, direction, command, tag, outcome, duration.

    Each line is one INFO record on ``logger`` (``asyncio_amp.access`` by
    default), logged when the call ends, so that the application decides where
    it goes with the usual logging handlers. ``asyncio-amp serve --access-log``
    installs it and writes the lines to standard output.

    The text format reads::

        2026-12-06T10:08:46.123Z 127.0.0.1:50432 < Sum 1 ok 0.412ms

    with ``<`` for a call from the peer and ``>`` for a call of ours, ``-`` for
    the tag of a command that requires no answer, and the outcome of
    [`Call.outcome`][asyncio_amp.Call.outcome]. The JSON format gives one object
    per line, for log shippers: ``{"time": ..., "peer": ..., "direction":
    "incoming", "command": "Sum", "tag": "1", "outcome": "ok", "duration_ms":
    0.412}``.

    Args:
        format: ``"text"`` (the default) or ``"json"``.
        logger: Where the records go; ``logging.getLogger("asyncio_amp.access")``
            by default.
        incoming: Log the peer's calls to our responders.
        outgoing: Log our calls to the peer.
    """

    def __init__(
        self,
        format: Literal["text", "json"] = "text",
        *,
        logger: logging.Logger | None = None,
        incoming: bool = True,
        outgoing: bool = True,
    ) -> None:
        if format not in ("text", "json"):
            raise ValueError(f"format is 'text' or 'json', not {format!r}")
        self.format = format
        self.logger = logging.getLogger("asyncio_amp.access") if logger is None else logger
        self._incoming = incoming
        self._outgoing = outgoing

    async def incoming(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Time the call and log its line when it ends."""
        if not self._incoming:
            return await call_next(call)
        return await self._timed(call, call_next)

    async def outgoing(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Time the call and log its line when it ends."""
        if not self._outgoing:
            return await call_next(call)
        return await self._timed(call, call_next)

    async def _timed(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call_next(call)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                duration = time.perf_counter() - start
                self.logger.info("%s", self.line(call, call.outcome(error), duration))

    def line(self, call: Call, outcome: str, duration: float) -> str:
        """
        The log line of a call that ended with ``outcome`` after ``duration`` seconds.

        Override it for another format.
        """
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        now = now.replace("+00:00", "Z")
        tag = "-" if call.tag is None else call.tag.decode("utf-8", "backslashreplace")
        if self.format == "json":
            return json.dumps(
                {
                    "time": now,
                    "peer": call.protocol.peer,
                    "direction": call.direction,
                    "command": call.name,
                    "tag": None if call.tag is None else tag,
                    "outcome": outcome,
                    "duration_ms": round(duration * 1000, 3),
                },
                ensure_ascii=False,
            )
        arrow = "<" if call.direction == "incoming" else ">"
        return (
            f"{now} {call.protocol.peer} {arrow} {call.name} {tag} {outcome} "
            f"{duration * 1000:.3f}ms"
        )
