"""
Prometheus metrics for AMP connections and calls: ``pip install 'asyncio-amp[prometheus]'``.

[`Metrics`][asyncio_amp.prometheus.Metrics] is a
[`Middleware`][asyncio_amp.Middleware] that counts and times every call in both
directions and also observes the connections it is installed on (opened and
closed, bytes read and written, protocol failures, flow-control limits hit). It
registers its metrics in a ``prometheus_client`` registry (the global one by
default), which ``prometheus_client.start_http_server`` or ``asyncio-amp serve
--metrics-port`` serves at ``/metrics``.

Label values stay bounded whatever the peer sends: ``command`` is the name of a
Command class this process knows (at most ``max_commands`` of them, then
``"other"``), and calls without one (commands nobody answers, ``call_remote_box``)
count as ``"other"``; ``outcome`` is ``"ok"`` or an error code the command
declares or this library uses (see [`Call.outcome`][asyncio_amp.Call.outcome]);
``reason`` and ``limit`` come from fixed lists.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from ._commands import Command
from ._errors import ProtocolError
from ._middleware import Call, CallNext, Middleware
from ._observe import Observer

__all__ = ["DEFAULT_BUCKETS", "Metrics", "failure_reason", "serve_http"]

# The ``command`` label of calls without a known Command class.
_OTHER = "other"

#: The latency histogram's buckets, in seconds: from 100 µs (a call on a local
#: connection) to 10 s (a slow responder).
DEFAULT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# How a protocol failure is named in the ``reason`` label: the first of these
# phrases found in its message (the library's own messages, in an order where
# none is mistaken for another), else "malformed".
_FAILURE_REASONS = (
    ("max_responders + max_queued_calls", "flood"),
    ("plaintext", "starttls"),
    ("file descriptors", "too_many_descriptors"),
    ("has more than", "too_many_keys"),
    ("is over the limit of", "box_too_large"),
    ("is over the AMP limit", "key_too_long"),
    ("empty box", "empty_box"),
    ("which was never sent", "unknown_tag"),
    ("error answer for tag", "bad_error_answer"),
    ("answer to", "bad_answer"),
    ("has none of", "no_command"),
)


def failure_reason(error: ProtocolError) -> str:
    """The ``reason`` label of a protocol failure: a word from a fixed list."""
    message = str(error)
    for phrase, reason in _FAILURE_REASONS:
        if phrase in message:
            return reason
    return "malformed"


class Metrics(Middleware, Observer):
    """
    Count and time calls, and watch connections, into Prometheus metrics.

    Install one instance as middleware wherever calls should be counted
    (``serve(..., middleware=[metrics])``, ``connect(...)``, or
    ``AMPProtocol(middleware=[...])``); every connection it is installed on
    adds to the same metrics. The metrics, with ``namespace`` ``amp``:

    * ``amp_calls_total{direction, command, outcome}``: calls that ended;
      ``direction`` is ``incoming`` (the peer's calls to our responders) or
      ``outgoing`` (ours).
    * ``amp_call_duration_seconds{direction, command}``: a histogram of how long
      calls took (incoming: the responder and the middleware after this one;
      outgoing: until the answer came).
    * ``amp_calls_in_flight{direction, command}``: calls started and not ended.
    * ``amp_connections_open`` and ``amp_connections_total``: connections open
      now, and made since the start.
    * ``amp_received_bytes_total`` and ``amp_sent_bytes_total``: bytes read from
      and written to the peers.
    * ``amp_protocol_failures_total{reason}``: connections closed because the
      peer broke the protocol.
    * ``amp_limit_hits_total{limit}``: calls that waited for a limit:
      ``max_responders`` (a peer's call waited for a place) or
      ``max_pending_calls`` (a call of ours waited to be sent).

    Args:
        registry: Where the metrics are registered; ``prometheus_client``'s
            global ``REGISTRY`` by default. A registry takes one set of them:
            share one ``Metrics`` between servers and clients.
        namespace: The prefix of the metrics' names.
        buckets: The histogram's buckets, in seconds.
        max_commands: The most distinct ``command`` label values; calls of
            further Command classes count as ``"other"``.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        namespace: str = "amp",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_commands: int = 1000,
    ) -> None:
        self.registry = registry
        self.max_commands = max_commands
        common: dict[str, Any] = {"namespace": namespace, "registry": registry}
        self.calls = Counter(
            "calls", "AMP calls that ended", ["direction", "command", "outcome"], **common
        )
        self.duration = Histogram(
            "call_duration_seconds",
            "How long AMP calls took",
            ["direction", "command"],
            buckets=tuple(buckets),
            **common,
        )
        self.in_flight = Gauge(
            "calls_in_flight", "AMP calls started and not ended", ["direction", "command"], **common
        )
        self.connections_open = Gauge("connections_open", "AMP connections open", **common)
        self.connections = Counter("connections", "AMP connections made", **common)
        self.received_bytes = Counter("received_bytes", "Bytes read from AMP peers", **common)
        self.sent_bytes = Counter("sent_bytes", "Bytes written to AMP peers", **common)
        self.protocol_failures = Counter(
            "protocol_failures",
            "AMP connections closed because the peer broke the protocol",
            ["reason"],
            **common,
        )
        self.limit_hits = Counter(
            "limit_hits", "AMP calls that waited for a flow-control limit", ["limit"], **common
        )
        # Command class -> its label; (direction, label) -> its children.
        self._labels: dict[type[Command], str] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}

    # Calls

    async def incoming(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Count and time a call of the peer."""
        return await self._measured(call, call_next)

    async def outgoing(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        """Count and time a call of ours."""
        return await self._measured(call, call_next)

    def command_label(self, command: type[Command] | None) -> str:
        """The ``command`` label of calls of ``command``: its name, or ``"other"``."""
        if command is None:
            return _OTHER
        label = self._labels.get(command)
        if label is None:
            if len(self._labels) >= self.max_commands:
                return _OTHER
            label = self._labels[command] = command.wire_name.decode("utf-8", "backslashreplace")
        return label

    async def _measured(self, call: Call, call_next: CallNext) -> dict[Any, Any]:
        key = (call.direction, self.command_label(call.command))
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.duration.labels(*key),
                self.in_flight.labels(*key),
                {},
            )
        duration, in_flight, outcomes = children
        in_flight.inc()
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call_next(call)
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration.observe(time.perf_counter() - start)
            in_flight.dec()
            outcome = call.outcome(error)
            counter = outcomes.get(outcome)
            if counter is None:
                counter = outcomes[outcome] = self.calls.labels(*key, outcome)
            counter.inc()

    # Connections (Observer)

    def connection_made(self, protocol: Any) -> None:
        """Count a connection made."""
        self.connections.inc()
        self.connections_open.inc()

    def connection_lost(self, protocol: Any) -> None:
        """Count a connection closed."""
        self.connections_open.dec()

    def bytes_received(self, protocol: Any, count: int) -> None:
        """Count bytes read."""
        self.received_bytes.inc(count)

    def bytes_sent(self, protocol: Any, count: int) -> None:
        """Count bytes written."""
        self.sent_bytes.inc(count)

    def protocol_failure(self, protocol: Any, error: ProtocolError) -> None:
        """Count a protocol failure by its reason."""
        self.protocol_failures.labels(failure_reason(error)).inc()

    def limit_hit(self, protocol: Any, limit: str) -> None:
        """Count a call that waited for ``limit``."""
        self.limit_hits.labels(limit).inc()


def serve_http(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> Any:
    """
    Serve ``registry`` at ``http://host:port/metrics``, in a thread (``asyncio-amp serve``'s way).

    Returns:
        The HTTP server: its ``server_port`` is the port (for ``port`` 0), and
        ``shutdown()`` then ``server_close()`` stop it.
    """
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
