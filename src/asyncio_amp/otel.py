"""
OpenTelemetry tracing for AMP calls: ``pip install 'asyncio-amp[otel]'``.

[`Tracing`][asyncio_amp.otel.Tracing] is a [`Middleware`][asyncio_amp.Middleware]
that makes a client span around each of our calls and a server span around each
responder, and carries the trace context from one to the other in one extra key
of the call's box ([`TRACE_KEY`][asyncio_amp.otel.TRACE_KEY]), so that a trace
follows a call across processes and hosts. It uses only ``opentelemetry-api``:
the application chooses the SDK, the exporter and the propagator (the global
one by default: W3C trace context and baggage).

The spans follow OpenTelemetry's semantic conventions for RPC: their name is the
command's, ``rpc.system`` (and its newer spelling ``rpc.system.name``) is
``"amp"``, ``rpc.method`` is the command's name, and the peer's address is in
``server.address``/``server.port`` (client spans) or
``client.address``/``client.port`` (server spans) and
``network.peer.address``/``network.peer.port``. A call that fails sets the span's
status to error, ``error.type`` to its outcome (see
[`Call.outcome`][asyncio_amp.Call.outcome]), and ``rpc.response.status_code`` to
the AMP error code when there was an error answer.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ._errors import RemoteAmpError
from ._middleware import Call, CallNext, Middleware

__all__ = ["TRACE_KEY", "Tracing", "decode_context", "encode_context"]

#: The key of the call box that carries the trace context. AMP's own keys start
#: with an underscore (``_ask``, ``_command``), so no argument of a Command
#: written for Twisted or for us is likely to take it; a peer that does not
#: trace, Twisted's included, ignores keys that are not arguments.
TRACE_KEY = b"_trace"

# What ``rpc.system`` says: the protocol, whoever implements it (Twisted's AMP
# and ours speak the same one).
_RPC_SYSTEM = "amp"

# The ``rpc.method`` of an incoming call whose name no Command of ours has
# (semantic conventions: unrecognized methods are ``_OTHER``).
_OTHER_METHOD = "_OTHER"

# A trace context this long or with this many entries is ignored: the peer
# does not get to make us parse more than a few headers' worth.
_MAX_CONTEXT_BYTES = 8192
_MAX_CONTEXT_ENTRIES = 16

# The longest ``rpc.method_original`` recorded for an unrecognized command.
_MAX_ORIGINAL_NAME = 255

try:
    _VERSION: str | None = importlib.metadata.version("asyncio-amp")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover (run from a source tree)
    _VERSION = None


class Tracing(Middleware):
    """
    Trace every call: a client span per call of ours, a server span per responder.

    Install it like any middleware, on both sides of a connection, as the first
    (outermost) item so that its spans cover the other middleware too::

        tracing = Tracing()
        server = await serve(Calculator, "127.0.0.1", 7000, middleware=[tracing])
        client = await connect(AMPProtocol, "127.0.0.1", 7000, middleware=[tracing])

    A responder runs with its server span as the current span, so the calls it
    makes to other services are children of it; a call of ours is a child of
    the span current where ``call_remote`` was called.

    Args:
        tracer_provider: Where the spans go; the global tracer provider by
            default (with no SDK configured, spans cost little and go nowhere).
        propagator: How the trace context is written into the call and read
            from it; the global propagator by default (looked up on each call,
            so ``opentelemetry.propagate.set_global_textmap`` applies).
        incoming: Make server spans for the peer's calls.
        outgoing: Make client spans for our calls.
        propagate: Send our trace context with our calls, and continue the
            peer's trace in our server spans. With ``False``, every server span
            starts a trace of its own.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        incoming: bool = True,
        outgoing: bool = True,
        propagate: bool = True,
    ) -> None:
        self.tracer = trace.get_tracer(__name__, _VERSION, tracer_provider=tracer_provider)
        self.propagator = propagator
        self._incoming = incoming
        self._outgoing = outgoing
        self._propagate = propagate

    async def outgoing(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Run the call in a client span, with the trace context in its box."""
        if not self._outgoing:
            return await call_next(call)
        attributes = _attributes(call.name, call, "server")
        with self.tracer.start_as_current_span(
            call.name,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if self._propagate:
                carrier: dict[str, str] = {}
                (self.propagator or propagate.get_global_textmap()).inject(carrier)
                if carrier:
                    call.extra[TRACE_KEY] = encode_context(carrier)
            try:
                return await call_next(call)
            except BaseException as exc:
                _failed(span, call, exc)
                raise

    async def incoming(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Run the responder in a server span, a child of the caller's span."""
        if not self._incoming:
            return await call_next(call)
        method = call.name if call.command is not None else _OTHER_METHOD
        attributes = _attributes(method, call, "client")
        if call.command is None:
            attributes["rpc.method_original"] = call.name[:_MAX_ORIGINAL_NAME]
        parent = None
        if self._propagate:
            value = call.extra.get(TRACE_KEY)
            if value is None and call.command is None:
                # A call without a Command class: its whole box is in arguments.
                value = call.arguments.get(TRACE_KEY)
            if value is not None:
                carrier = decode_context(value)
                if carrier:
                    parent = (self.propagator or propagate.get_global_textmap()).extract(carrier)
        with self.tracer.start_as_current_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next(call)
            except BaseException as exc:
                _failed(span, call, exc)
                raise


def encode_context(carrier: Mapping[str, str]) -> bytes:
    """
    The value of [`TRACE_KEY`][asyncio_amp.otel.TRACE_KEY] for a propagator's carrier.

    One ``name: value`` line per entry, as HTTP headers would carry them
    (``traceparent``, ``tracestate``, ``baggage``).
    """
    return "\n".join(f"{name}: {value}" for name, value in carrier.items()).encode()


def decode_context(value: bytes) -> dict[str, str]:
    """
    The carrier in a value of [`TRACE_KEY`][asyncio_amp.otel.TRACE_KEY].

    Whatever does not parse is left out (the propagator ignores what is not a
    valid context): a peer's junk starts a new trace, never an error.
    """
    if len(value) > _MAX_CONTEXT_BYTES:
        return {}
    carrier: dict[str, str] = {}
    for line in value.decode("utf-8", "replace").split("\n")[:_MAX_CONTEXT_ENTRIES]:
        name, sep, text = line.partition(":")
        if sep and name:
            carrier[name.strip().lower()] = text.strip()
    return carrier


def _attributes(method: str, call: Call, peer_role: str) -> dict[str, AttributeValue]:
    """The semantic-convention attributes of a span; ``peer_role`` is "server" or "client"."""
    attributes: dict[str, AttributeValue] = {
        "rpc.system": _RPC_SYSTEM,
        "rpc.system.name": _RPC_SYSTEM,
        "rpc.method": method,
    }
    transport = call.protocol.transport
    peername = None if transport is None else transport.get_extra_info("peername")
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), int(peername[1])
        attributes[f"{peer_role}.address"] = host
        attributes[f"{peer_role}.port"] = port
        attributes["network.peer.address"] = host
        attributes["network.peer.port"] = port
        attributes["network.transport"] = "tcp"
        attributes["network.type"] = "ipv6" if ":" in host else "ipv4"
    elif isinstance(peername, str | bytes) and transport is not None:
        attributes["network.transport"] = "unix"
        if peername:
            path = peername if isinstance(peername, str) else peername.decode(errors="replace")
            attributes[f"{peer_role}.address"] = path
            attributes["network.peer.address"] = path
    return attributes


def _failed(span: trace.Span, call: Call, error: BaseException) -> None:
    """Mark ``span`` as failed with ``error``: its outcome, code and exception."""
    outcome = call.outcome(error)
    span.set_attribute("error.type", outcome)
    # An error answer's code: every failure coming in is answered with one; going
    # out, the peer's code came back as a RemoteAmpError or a mapped exception.
    answered = (
        call.direction == "incoming"
        or isinstance(error, RemoteAmpError)
        or (call.command is not None and call.command._error_code_for(error) is not None)
    )
    if answered:
        span.set_attribute("rpc.response.status_code", outcome)
    if isinstance(error, Exception):
        span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
