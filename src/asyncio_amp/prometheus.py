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

[`Metrics.watch`][asyncio_amp.prometheus.Metrics.watch] also exports the
``stats()`` of a [`Client`][asyncio_amp.Client] or a
[`ProcessPool`][asyncio_amp.pool.ProcessPool], read when the registry is
scraped, labelled with a name you choose.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._commands import Command
from ._errors import ProtocolError
from ._middleware import Call, CallNext, Middleware
from ._observe import Observer

__all__ = ["DEFAULT_BUCKETS", "Metrics", "failure_reason", "serve_http"]

logger = logging.getLogger("asyncio_amp.prometheus")

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


# The figures of what Metrics.watch() takes, by kind (which is also the name of
# the label, and the second word of the metrics' names): each key of stats(),
# whether it only grows (a counter) or goes up and down (a gauge), and its help.
# A source's kind is the one whose keys its stats() has.
_FIGURES: dict[str, dict[str, tuple[bool, str]]] = {
    "pool": {
        "workers": (False, "Worker processes running: starting, ready or being stopped"),
        "busy": (False, "Ready workers with calls in flight"),
        "idle": (False, "Ready workers without calls in flight"),
        "queued": (False, "Calls waiting for a worker"),
        "completed": (True, "Calls answered with a result"),
        "failed": (True, "Calls that raised: error answers, crashes, cancellations, timeouts"),
        "crashed": (True, "Workers that died without being asked to"),
        "recycled": (True, "Workers replaced after recycle_after calls"),
        "timed_out": (True, "Calls that hit the pool's timeout"),
    },
    "client": {
        "connected": (False, "Connections ready to take calls"),
        "connecting": (False, "Connections being made, or waiting their backoff"),
        "addresses": (False, "Addresses the endpoints resolve to"),
        "pending": (False, "Calls in flight"),
        "waiting": (False, "Calls waiting for a connection"),
        "calls": (True, "Calls made"),
        "retries": (True, "Calls sent again"),
        "losses": (True, "Connections lost"),
        "failures": (True, "Connection attempts that failed"),
    },
}

# How long a scrape from another thread waits for the event loop of a watched
# source to read its figures (a busy loop), before leaving them out.
_READ_TIMEOUT = 5.0


class _HasStats(Protocol):
    def stats(self) -> Mapping[str, int]: ...


class _Watched:
    """A source of figures: a weak reference to it, its kind and name, and its loop."""

    __slots__ = ("kind", "loop", "name", "ref", "thread")

    def __init__(
        self,
        source: _HasStats,
        kind: str,
        name: str,
        forget: Any,
    ) -> None:
        self.ref = weakref.ref(source, forget)
        self.kind = kind
        self.name = name
        # Figures are read on the thread of the loop the source runs in (its
        # dicts change there), or directly if it has none.
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.thread = threading.get_ident()


def _alive(source: object) -> bool:
    """Whether a watched source is still there and not closed."""
    return source is not None and not getattr(source, "closed", False)


class _Figures:
    """The collector of the watched sources' figures, read at each scrape."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.lock = threading.Lock()  # scrapes come from other threads
        self.watched: dict[int, _Watched] = {}  # by id() of the source

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may yield (the registry checks for clashes)."""
        for kind in _FIGURES:
            yield from self._families(kind, [])

    def collect(self) -> Iterator[Metric]:
        """The figures of the watched sources that are alive and not closed."""
        with self.lock:
            watched = list(self.watched.values())
        read = self._read(watched)
        for kind in _FIGURES:
            rows = [(w.name, read[id(w)]) for w in watched if w.kind == kind and id(w) in read]
            if rows:
                yield from self._families(kind, rows)

    def _families(self, kind: str, rows: list[tuple[str, Mapping[str, int]]]) -> Iterator[Metric]:
        for key, (monotonic, help_text) in _FIGURES[kind].items():
            name = f"{self.namespace}_{kind}_{key}"
            family: CounterMetricFamily | GaugeMetricFamily
            if monotonic:
                family = CounterMetricFamily(name, help_text, labels=[kind])
            else:
                family = GaugeMetricFamily(name, help_text, labels=[kind])
            for label, stats in rows:
                family.add_metric([label], stats[key])
            yield family

    def _read(self, watched: list[_Watched]) -> dict[int, Mapping[str, int]]:
        """The stats() of each live, open source, keyed by id() of its _Watched."""
        here = threading.get_ident()
        direct: list[_Watched] = []
        by_loop: dict[asyncio.AbstractEventLoop, list[_Watched]] = {}
        for w in watched:
            if w.loop is None or w.thread == here or not w.loop.is_running():
                direct.append(w)
            else:
                by_loop.setdefault(w.loop, []).append(w)
        read = self._snapshot(direct)
        waits: list[tuple[concurrent.futures.Future[Any], list[_Watched]]] = []
        for loop, group in by_loop.items():
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()

            def snapshot(
                group: list[_Watched] = group, future: concurrent.futures.Future[Any] = future
            ) -> None:
                if future.set_running_or_notify_cancel():
                    future.set_result(self._snapshot(group))

            try:
                loop.call_soon_threadsafe(snapshot)
            except RuntimeError:  # the loop closed meanwhile: nothing changes the source now
                read.update(self._snapshot(group))
                continue
            waits.append((future, group))
        for future, group in waits:
            try:
                read.update(future.result(timeout=_READ_TIMEOUT))
            except concurrent.futures.TimeoutError:
                future.cancel()
                logger.warning(
                    "scrape left out %s: their event loop did not answer in %s seconds",
                    ", ".join(f"{w.kind} {w.name!r}" for w in group),
                    _READ_TIMEOUT,
                )
        return read

    def _snapshot(self, watched: list[_Watched]) -> dict[int, Mapping[str, int]]:
        read: dict[int, Mapping[str, int]] = {}
        for w in watched:
            source = w.ref()
            if source is None or not _alive(source):
                self.forget(w)
                continue
            read[id(w)] = source.stats()
        return read

    def forget(self, watched: _Watched) -> None:
        with self.lock:
            for key, w in list(self.watched.items()):
                if w is watched:
                    del self.watched[key]


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
    * ``amp_pool_*{pool}`` and ``amp_client_*{client}``: the figures of the
      pools and clients given to [`watch`][asyncio_amp.prometheus.Metrics.watch].

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
        self._figures = _Figures(namespace)
        registry.register(self._figures)
        # Command class -> its label; (direction, label) -> its children.
        self._labels: dict[type[Command], str] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}

    # Pools and clients

    def watch(self, source: Any, name: str) -> None:
        """
        Export the ``stats()`` of a pool or a client, read at each scrape.

        ``source`` is a [`ProcessPool`][asyncio_amp.pool.ProcessPool] or a
        [`Client`][asyncio_amp.Client]. Each key of its ``stats()`` becomes a
        metric, labelled ``pool="name"`` or ``client="name"``:
        ``amp_pool_workers``, ``amp_pool_completed_total``, ...,
        ``amp_client_connected``, ``amp_client_calls_total``, ... (gauges for
        what goes up and down, counters for what only grows). Call it from the
        event loop the source runs in: a scrape from another thread (the
        ``/metrics`` server's) reads the figures on that loop.

        The source is forgotten once it is closed or garbage-collected, or by
        [`unwatch`][asyncio_amp.prometheus.Metrics.unwatch]; a new source can
        then take its name.

        Args:
            source: The pool or client.
            name: Its label value: a name of your choosing, such as
                ``"images"``, unique among the watched sources of its kind.

        Raises:
            TypeError: ``source`` has no ``stats()`` with the figures of a pool
                or a client.
            ValueError: ``name`` is empty or taken, or ``source`` is watched
                already.
        """
        stats = getattr(source, "stats", None)
        figures = stats() if callable(stats) else None
        kind = next(
            (
                kind
                for kind, keys in _FIGURES.items()
                if isinstance(figures, Mapping) and keys.keys() <= figures.keys()
            ),
            None,
        )
        if kind is None:
            raise TypeError(
                f"cannot watch {type(source).__name__}: its stats() has not the figures "
                "of a pool or a client"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"the name of a watched {kind} must be a non-empty str: {name!r}")
        figures_ = self._figures
        watched: _Watched | None = None

        def forget(_: object) -> None:
            if watched is not None:
                figures_.forget(watched)

        watched = _Watched(source, kind, name, forget)
        with figures_.lock:
            # Sources closed since the last scrape are gone already: their
            # names are free.
            for key, other in list(figures_.watched.items()):
                if not _alive(other.ref()):
                    del figures_.watched[key]
            if id(source) in figures_.watched:
                raise ValueError(
                    f"this {kind} is watched already, as {figures_.watched[id(source)].name!r}"
                )
            if any(
                other.kind == kind and other.name == name for other in figures_.watched.values()
            ):
                raise ValueError(f"a {kind} named {name!r} is watched already")
            figures_.watched[id(source)] = watched

    def unwatch(self, source: Any) -> None:
        """
        Stop exporting the figures of ``source``.

        Does nothing if [`watch`][asyncio_amp.prometheus.Metrics.watch] was not
        given it, or if it was forgotten already (closed, or collected).
        """
        with self._figures.lock:
            watched = self._figures.watched.get(id(source))
            if watched is not None and watched.ref() is source:
                del self._figures.watched[id(source)]

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
