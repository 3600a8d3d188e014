"""
Client: one AMP client over many connections, which reconnects and balances calls.

Theory of operation
-------------------

A client has *endpoints* ("host:port", (host, port), "unix:/path"). Each
endpoint resolves to *addresses*: a host name to every address the resolver
gives, an IP address or a UNIX path to itself. Each address has
``connections_per_address`` *slots*, and each slot keeps one connection:

* A slot runs one task: connect, wait until the connection is lost, wait a
  backoff, resolve its endpoint again, connect again. The backoff is
  exponential with full jitter (a random delay between 0 and
  ``min(backoff_max, backoff_initial * backoff_multiplier ** failures)``), where
  ``failures`` counts the attempts that failed since the slot last had a
  *healthy* connection: one that stayed open for ``healthy_after`` seconds. So
  a server that accepts and closes at once is retried ever more slowly, never
  in a loop, and one that served for a while is reconnected to at once.
* With ``keepalive`` on, a connection is ready only once its server has
  answered a heartbeat within ``keepalive_timeout``: the kernel completes TCP
  connections to a stopped or wedged process, which would take calls and
  never answer them. A connection that gets no answer is a failed attempt.
* An endpoint with a host name is resolved again every ``resolve_interval``
  seconds and whenever one of its slots reconnects (both share one resolution
  at a time). Addresses that appear get new slots; the slots of addresses that
  are gone stop, and their connections are drained (``shutdown(grace)``). A
  resolution that fails or returns nothing changes nothing: the client keeps
  the addresses it has and tries again after a backoff.

A call goes to the *ready* slot (connected, and its protocol still accepting
calls) with the fewest calls of this client in flight; ties go round-robin, so
calls made one at a time spread too. With no ready slot, the call waits for one
for up to ``connect_timeout`` seconds and then fails with
[`NoConnectionError`][]: it was never sent. A call whose connection is lost
fails with [`ConnectionLostError`][], unless its command is ``idempotent``:
then it is sent again, on another connection, up to ``max_retries`` times. A
call that a server refuses with ``SHUTDOWN`` (it is shutting down, and did not
run the call) is sent again whatever its command, and that connection is
drained: it takes no more calls, and closes once its calls in flight end.

Every call therefore ends: answered, failed by its connection, or refused after
a bounded wait; ``close()`` refuses the calls that wait for a connection and
gives the ones in flight ``grace`` seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeGuard, overload

from ._commands import Command, RawArguments, RawCommand
from ._errors import ConnectionLostError, NoConnectionError, RemoteAmpError
from ._keepalive import probe
from ._middleware import Middleware, build
from ._network import connect
from ._protocol import AMPProtocol
from ._wire import Box

__all__ = ["Client"]

logger = logging.getLogger("asyncio_amp.client")

#: An async callable from a host name to its addresses, for ``Client(resolver=...)``.
Resolver = Callable[[str], Awaitable[Iterable[str]]]

# The error code of a server that refuses a call because it is shutting down
# (AMPProtocol.shutdown): the call did not run.
SHUTDOWN_CODE = "SHUTDOWN"

# The states of a slot, as stats() counts them.
CONNECTING = "connecting"  # connecting, or waiting its backoff to connect again
READY = "ready"
RETIRED = "retired"  # its address is gone, or the client is closed


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _takes_calls(protocol: AMPProtocol | None) -> TypeGuard[AMPProtocol]:
    """Whether a connection takes calls: connected, and not closing or shutting down."""
    return protocol is not None and protocol._accepting


def _abort(protocol: AMPProtocol) -> None:
    if protocol.transport is not None:
        protocol.transport.abort()


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _port(text: object, spec: object) -> int:
    try:
        port: int = int(text)  # type: ignore[call-overload]  # checked below
    except (TypeError, ValueError):
        raise ValueError(f"bad port in endpoint {spec!r}") from None
    if isinstance(text, bool) or not 0 < port < 65536:
        raise ValueError(f"bad port in endpoint {spec!r}")
    return port


class _Endpoint:
    """One endpoint: what it resolves to, and the slots of its addresses."""

    __slots__ = ("first", "host", "label", "path", "port", "resolving", "slots", "static", "task")

    def __init__(self, spec: str | tuple[str, int]) -> None:
        self.host: str | None = None
        self.port = 0
        self.path: str | None = None
        if isinstance(spec, tuple):
            if len(spec) != 2 or not isinstance(spec[0], str) or not spec[0]:
                raise ValueError(f"an endpoint tuple is (host, port), not {spec!r}")
            self.host, self.port = spec[0], _port(spec[1], spec)
        elif isinstance(spec, str):
            if spec.startswith("unix:"):
                self.path = spec[len("unix:") :]
                if not self.path:
                    raise ValueError(f"no path in endpoint {spec!r}")
            elif spec.startswith("["):
                host, bracket, port = spec[1:].partition("]:")
                if not bracket or not host:
                    raise ValueError(f"an IPv6 endpoint is '[address]:port', not {spec!r}")
                self.host, self.port = host, _port(port, spec)
            else:
                host, colon, port = spec.rpartition(":")
                if not colon or not host or ":" in host:
                    raise ValueError(
                        f"an endpoint is 'host:port', '[ipv6]:port' or 'unix:/path', not {spec!r}"
                    )
                self.host, self.port = host, _port(port, spec)
        else:
            raise TypeError(f"an endpoint is a str or a (host, port) tuple, not {spec!r}")
        self.label = (
            f"unix:{self.path}" if self.host is None else _format_address(self.host, self.port)
        )
        # Nothing to resolve again: a UNIX path, or an IP address.
        self.static = self.host is None or _is_ip(self.host)
        self.slots: dict[str, list[_Slot]] = {}
        self.resolving: asyncio.Task[bool] | None = None
        self.task: asyncio.Task[None] | None = None
        # Done when the first resolution has ended, whatever its outcome.
        self.first: asyncio.Future[None] | None = None


class _Slot:
    """One connection the client keeps to one address, and its reconnecting task."""

    __slots__ = (
        "address",
        "endpoint",
        "failures",
        "first",
        "label",
        "pending",
        "protocol",
        "state",
        "task",
    )

    def __init__(self, endpoint: _Endpoint, address: str) -> None:
        self.endpoint = endpoint
        self.address = address
        if endpoint.host is None:
            self.label = endpoint.label
        elif address == endpoint.host:
            self.label = _format_address(address, endpoint.port)
        else:
            self.label = f"{endpoint.label} ({address})"
        self.protocol: AMPProtocol | None = None
        self.state = CONNECTING
        # This client's calls in flight on the slot's connection.
        self.pending = 0
        # Connection attempts that failed since the last healthy connection.
        self.failures = 0
        self.task: asyncio.Task[None] | None = None
        # Done when the first connection attempt has ended, whatever its outcome.
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(self, future: asyncio.Future[Any]) -> None:
        self.pending -= 1

    def tried(self) -> None:
        if not self.first.done():
            self.first.set_result(None)


class Client:
    """
    An AMP client over many connections, which reconnects and balances calls.

    It has the [`call_remote`][asyncio_amp.Client.call_remote] and
    [`call_remote_box`][asyncio_amp.Client.call_remote_box] of a protocol, and
    keeps connections to every address of its endpoints:

        client = Client(["amp-a:7000", "amp-b:7000"], protocol_factory=MyClient)
        async with client:
            await client.call_remote(Sum, a=1, b=2)

    A call goes to the ready connection with the fewest of the client's calls in
    flight. Lost connections are made again with exponential backoff and full
    jitter; a connection that stayed open for ``healthy_after`` seconds was
    healthy, and resets the backoff. Calls lost with their connection fail with
    [`ConnectionLostError`][], except those of commands marked
    ``idempotent = True``, which are sent again on another connection; calls
    a server refuses because it is shutting down (error code ``SHUTDOWN``) did
    not run, and are sent again on another connection whatever their command. Each
    connection made, lost or failed to make, and each call sent again, is
    logged to the ``asyncio_amp.client`` logger.

    Args:
        endpoints: Where the servers are: ``"host:port"``, ``"[ipv6]:port"``,
            ``(host, port)`` or ``"unix:/path"`` (one, or a list). A host name
            stands for every address it resolves to.
        protocol_factory: Builds the protocol of each connection;
            [`AMPProtocol`][] by default, or a subclass with responders for the
            servers' calls.
        ssl: An ``ssl.SSLContext`` (or ``True`` for the default one) to speak
            TLS. Certificates are checked against the endpoint's host name, not
            the address it resolved to, unless ``server_hostname`` is given.
        keepalive: The keepalive interval of each connection, in seconds
            (``None``: none). With keepalive on, a new connection also takes
            calls only once its server has answered a heartbeat (within
            ``keepalive_timeout``), so that a server that is stopped or
            wedged, whose kernel still completes connections, gets none.
        keepalive_timeout: How long a keepalive waits for any answer before
            the connection is dropped (``None``: the protocol's default).
        middleware: [`Middleware`][asyncio_amp.Middleware] to run around the
            calls of every connection the client makes, both ways, as
            [`connect`][asyncio_amp.connect]'s ``middleware``. The same
            instances serve every connection; ``call.protocol`` says which
            one. A call sent again goes through them again, on its new
            connection.
        connect_timeout: How long one connection attempt (or one resolution)
            may take, and how long a call waits for a ready connection before
            [`NoConnectionError`][] (10 seconds).
        resolve_interval: How often host names are resolved again, in seconds
            (30; ``None``: only when a connection is made again).
        resolver: An async callable from a host name to a list of its addresses,
            for service discovery and tests; the event loop's ``getaddrinfo``
            by default. IP addresses and UNIX paths are not looked up.
        connections_per_address: How many connections to keep to each address (1).
        backoff_initial: The first reconnect delay's upper bound, in seconds (0.1).
        backoff_max: The largest reconnect delay, in seconds (30).
        backoff_multiplier: How much the delay's bound grows with each failed
            attempt (2).
        healthy_after: How long a connection must stay open, in seconds, to
            count as healthy and reset its backoff (2).
        max_retries: How many times a call of an idempotent command is sent
            again after losing its connection (3).
        grace: How long [`close`][asyncio_amp.Client.close] and the draining of
            an address that left the resolution let calls in flight finish, as
            ``AMPProtocol.shutdown(grace)`` (30 seconds; ``None``: no limit).
        **kwargs: Passed on to [`connect`][asyncio_amp.connect] for each
            connection: the limits of [`AMPProtocol`][] (``max_pending_calls``,
            ...), ``server_hostname``, and the rest of
            ``loop.create_connection``'s keywords.

    Raises:
        ValueError: An endpoint or a number is not valid.
        TypeError: An endpoint is neither a str nor a tuple, or ``middleware``
            is not an iterable of [`Middleware`][asyncio_amp.Middleware].
    """

    def __init__(
        self,
        endpoints: str | tuple[str, int] | Iterable[str | tuple[str, int]],
        *,
        protocol_factory: Callable[[], AMPProtocol] = AMPProtocol,
        ssl: _ssl.SSLContext | bool | None = None,
        keepalive: float | None = None,
        keepalive_timeout: float | None = None,
        middleware: Iterable[Middleware] = (),
        connect_timeout: float = 10.0,
        resolve_interval: float | None = 30.0,
        resolver: Resolver | None = None,
        connections_per_address: int = 1,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        backoff_multiplier: float = 2.0,
        healthy_after: float = 2.0,
        max_retries: int = 3,
        grace: float | None = 30.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(endpoints, str | tuple):
            endpoints = [endpoints]
        self._endpoints = [_Endpoint(spec) for spec in endpoints]
        if not self._endpoints:
            raise ValueError("a Client needs at least one endpoint")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
            ("resolve_interval", resolve_interval),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if not backoff_multiplier >= 1:
            raise ValueError(f"backoff_multiplier must be at least 1, not {backoff_multiplier!r}")
        if not healthy_after >= 0:
            raise ValueError(f"healthy_after must be 0 or more seconds, not {healthy_after!r}")
        if grace is not None and not grace >= 0:
            raise ValueError(f"grace must be 0 or more seconds, or None, not {grace!r}")
        for name, number, least in (
            ("connections_per_address", connections_per_address, 1),
            ("max_retries", max_retries, 0),
        ):
            if not isinstance(number, int) or isinstance(number, bool) or number < least:
                raise ValueError(f"{name} must be an int of at least {least}, not {number!r}")
        self._protocol_factory = protocol_factory
        # Checked now, not at the first connection; an iterator is read once.
        self._middleware = build(middleware)[0]
        self._ssl = ssl
        self._keepalive = keepalive
        self._keepalive_timeout = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._resolve_interval = resolve_interval
        self._resolver = resolver
        self._per_address = connections_per_address
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff_multiplier = backoff_multiplier
        self._healthy_after = healthy_after
        self._max_retries = max_retries
        self._grace = grace
        self._connect_kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        # The slots whose connections may take calls, in the order they became ready.
        self._ready: list[_Slot] = []
        # Set when a slot becomes ready (or the client closes): wakes waiting calls.
        self._ready_event: asyncio.Event | None = None
        self._turn = 0
        self._drains: set[asyncio.Task[None]] = set()
        self._last_error = "no connection attempt has finished yet"
        # Counters for stats().
        self._calls = 0
        self._retries = 0
        self._losses = 0
        self._failures = 0
        self._waiting = 0

    def __repr__(self) -> str:
        endpoints = ", ".join(endpoint.label for endpoint in self._endpoints)
        state = "closed" if self._closing else "open" if self._loop else "unstarted"
        return f"<Client {state} [{endpoints}] connected={len(self._ready)}>"

    # Public methods

    async def __aenter__(self) -> Self:
        """
        Start connecting, and wait for the first attempt to every address to end.

        It returns once each endpoint has been resolved and each of its
        addresses connected or failed to (within ``connect_timeout`` in all),
        so that the first calls spread over every server that is up. It never
        raises for a server that is down: calls wait for it, or fail.
        """
        self._start()
        assert self._loop is not None
        deadline = self._loop.time() + self._connect_timeout
        for endpoint in self._endpoints:
            assert endpoint.first is not None
            await asyncio.wait([endpoint.first], timeout=max(0, deadline - self._loop.time()))
        slots = [slot for e in self._endpoints for s in e.slots.values() for slot in s]
        if slots:
            await asyncio.wait(
                [slot.first for slot in slots], timeout=max(0, deadline - self._loop.time())
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def call_remote(
        self, command: type[Command] | Command, /, **arguments: Any
    ) -> asyncio.Future[Any]:
        """
        Call ``command`` on one of the servers and return a future of its answer.

        It takes what [`AMPProtocol.call_remote`][asyncio_amp.AMPProtocol.call_remote]
        takes, and its future ends the same way, except that:

        * with no connection ready, the call waits for one for up to
          ``connect_timeout`` seconds, then fails with [`NoConnectionError`][];
        * a call of a command with ``idempotent = True`` whose connection is lost
          is sent again on another connection, up to ``max_retries`` times,
          before it fails with [`ConnectionLostError`][];
        * a call that a server refuses with ``SHUTDOWN`` (it is shutting down)
          is sent again on another connection, whatever its command, up to
          ``max_retries`` times, before it fails with that error.

        Cancelling the future forgets the call, wherever it is.

        Returns:
            A future of the answer: a dict keyed like ``command.response``.

        Raises:
            TypeError: An argument is unknown, missing or of the wrong type, or
                the command changes the connection (StartTLS, protocol
                switches), which a client of many connections cannot do.
            ValueError: An argument's type cannot represent its value.
            TooLongError: A value is over 65,535 bytes; nothing was sent.
            NoConnectionError: The client is closed (at once), or no connection
                became ready in time (raised by the future).
            ConnectionLostError: The connection closed before the answer came
                (raised by the future).
        """
        if isinstance(command, Command):
            if arguments:
                raise TypeError(
                    "call_remote() takes a Command instance or a Command class with keyword "
                    "arguments, not both"
                )
            cmd: type[Command] = type(command)
            arguments = dict(command.values)
        elif isinstance(command, type) and issubclass(command, Command):
            cmd = command
        else:
            raise TypeError(f"call_remote() needs a Command class or instance, not {command!r}")
        if getattr(cmd, "_upgrade_call", None) is not None:
            raise TypeError(
                f"a Client cannot send {cmd.__qualname__}: it changes one connection "
                "(use ssl= for TLS, or a protocol of your own for a switch)"
            )

        def send(protocol: AMPProtocol) -> asyncio.Future[Any]:
            return protocol.call_remote(cmd, **arguments)

        def check() -> None:
            cmd._encode_ask(arguments)

        return self._call(send, check, cmd.idempotent, cmd.__qualname__)

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: Literal[True] = True,
        idempotent: bool = False,
    ) -> asyncio.Future[Box]: ...

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: Literal[False],
        idempotent: bool = False,
    ) -> asyncio.Future[None]: ...

    @overload
    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: bool,
        idempotent: bool = False,
    ) -> asyncio.Future[Box | None]: ...

    def call_remote_box(
        self,
        command: str | bytes,
        arguments: RawArguments | None = None,
        /,
        *,
        requires_answer: bool = True,
        idempotent: bool = False,
    ) -> asyncio.Future[Any]:
        """
        Call a command by name with raw wire values, on one of the servers.

        It takes what [`AMPProtocol.call_remote_box`][asyncio_amp.AMPProtocol.call_remote_box]
        takes, and waits, retries and fails like [`call_remote`][asyncio_amp.Client.call_remote].

        Args:
            command: The command name on the wire.
            arguments: Argument keys to wire values.
            requires_answer: If false, no ``_ask`` is sent and the future is done
                with ``None`` once the call is handed to a connection.
            idempotent: If true, the call is sent again on another connection
                when its connection is lost, as for a command with
                ``idempotent = True``.

        Returns:
            A future of the answer box (wire keys to wire values, without the
            ``_answer`` key).

        Raises:
            TypeError: A key or value is neither ``str`` nor bytes.
            ValueError: A key is empty or reserved (``_ask``, ``_command``...).
            TooLongError: A key is over 255 bytes or a value over 65,535 bytes.
            NoConnectionError: The client is closed (at once), or no connection
                became ready in time (raised by the future).
            ConnectionLostError: The connection closed before the answer came
                (raised by the future).
        """
        raw = RawCommand(command, arguments, requires_answer)  # checks keys and values now

        def send(protocol: AMPProtocol) -> asyncio.Future[Any]:
            return protocol.call_remote_box(command, arguments, requires_answer=requires_answer)

        return self._call(send, lambda: None, bool(idempotent), raw.label)

    async def close(self) -> None:
        """
        Close the client: refuse new calls, drain the calls in flight, close every connection.

        Calls waiting for a connection fail with [`NoConnectionError`][] at
        once. Each connection shuts down as with
        [`AMPProtocol.shutdown(grace)`][asyncio_amp.AMPProtocol.shutdown] with
        the client's ``grace``: the calls in flight get their answers for up
        to ``grace`` seconds, then fail with [`ConnectionLostError`][] (and are
        not sent again). Returns once every connection is closed; calling it
        again waits for the same. If it is cancelled, the connections are
        aborted at once (their calls in flight fail with
        [`ConnectionLostError`][]).
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        loop = asyncio.get_running_loop()
        closed = self._closed = loop.create_future()
        self._closing = True
        tasks: list[asyncio.Task[Any]] = []
        protocols: list[AMPProtocol] = []
        try:
            if self._ready_event is not None:
                self._ready_event.set()  # the waiting calls see the client closing
            self._ready.clear()
            for endpoint in self._endpoints:
                for task in (endpoint.task, endpoint.resolving):
                    if task is not None:
                        task.cancel()
                        tasks.append(task)
                for slots in endpoint.slots.values():
                    for slot in slots:
                        protocol = self._retire(slot)
                        if protocol is not None:
                            protocols.append(protocol)
                        if slot.task is not None:
                            tasks.append(slot.task)
                endpoint.slots.clear()
            await asyncio.gather(
                *(protocol.shutdown(self._grace) for protocol in protocols),
                *self._drains,
                *tasks,
                return_exceptions=True,
            )
            logger.info("client of %s closed", self._describe())
        except BaseException:
            # Cancelled: abort the connections at once rather than leave them
            # open; close() called again returns once they are closed.
            for protocol in protocols:
                _abort(protocol)
            ends = [asyncio.ensure_future(protocol.wait_closed()) for protocol in protocols]

            def settle(_: object) -> None:
                if not closed.done():
                    closed.set_result(None)

            asyncio.gather(*ends, *tasks, *self._drains, return_exceptions=True).add_done_callback(
                settle
            )
            raise
        else:
            closed.set_result(None)

    @property
    def closed(self) -> bool:
        """``True`` once [`close`][asyncio_amp.Client.close] was called."""
        return self._closing

    @property
    def connections(self) -> tuple[AMPProtocol, ...]:
        """The protocols of the connections ready to take calls now."""
        return tuple(slot.protocol for slot in self._ready if _takes_calls(slot.protocol))

    def stats(self) -> dict[str, int]:
        """
        Counters of the client's connections and calls.

        Returns:
            A dict with ``connected`` (connections ready now), ``connecting``
            (connections being made, or waiting their backoff), ``addresses``
            (the addresses the endpoints resolve to now), ``pending`` (calls in
            flight), ``waiting`` (calls waiting for a connection), and, since the
            client started, ``calls`` (calls made), ``retries`` (calls sent
            again), ``losses`` (connections lost) and ``failures`` (connection
            attempts that failed).
        """
        slots = [
            slot for endpoint in self._endpoints for s in endpoint.slots.values() for slot in s
        ]
        return {
            "connected": sum(1 for slot in self._ready if _takes_calls(slot.protocol)),
            "connecting": sum(1 for slot in slots if slot.state == CONNECTING),
            "addresses": sum(len(endpoint.slots) for endpoint in self._endpoints),
            "pending": sum(slot.pending for slot in slots),
            "waiting": self._waiting,
            "calls": self._calls,
            "retries": self._retries,
            "losses": self._losses,
            "failures": self._failures,
        }

    # Private methods: calls

    def _call(
        self,
        send: Callable[[AMPProtocol], asyncio.Future[Any]],
        check: Callable[[], None],
        idempotent: bool,
        label: str,
    ) -> asyncio.Future[Any]:
        """Route a call now if a connection is ready, else in a task that waits for one."""
        if self._closing:
            raise NoConnectionError(f"cannot call {label}: the client is closed")
        self._start()
        assert self._loop is not None
        slot = self._pick()
        future: asyncio.Future[Any] | None = None
        if slot is not None:
            try:
                future = send(slot.protocol)  # type: ignore[arg-type]  # ready slots have one
            except ConnectionLostError:
                future = None  # refused: the connection is closing; nothing was sent
        if future is None:
            check()  # the errors in the arguments are raised now, not by the future
            self._calls += 1
            return self._loop.create_task(self._follow(send, idempotent, label, None, None))
        assert slot is not None
        self._calls += 1
        slot.pending += 1
        future.add_done_callback(slot.done)
        task = self._loop.create_task(self._follow(send, idempotent, label, slot, future))
        sent = future
        # A task cancelled before it first runs never awaits the call: forget it here.
        task.add_done_callback(lambda _: sent.cancel())
        return task

    async def _follow(
        self,
        send: Callable[[AMPProtocol], asyncio.Future[Any]],
        idempotent: bool,
        label: str,
        slot: _Slot | None,
        future: asyncio.Future[Any] | None,
    ) -> Any:
        """Wait for a connection if needed, then the answer; send the call again if it may be."""
        retries = 0
        lost: BaseException | None = None
        while True:
            if slot is None or future is None:
                slot = await self._route(label, lost)
                try:
                    future = send(slot.protocol)  # type: ignore[arg-type]  # ready slots have one
                except ConnectionLostError:
                    # Lost since it was picked, in this very step: route again.
                    slot = None
                    await asyncio.sleep(0)
                    continue
                slot.pending += 1
                future.add_done_callback(slot.done)
            try:
                return await future
            except ConnectionLostError as error:
                if not idempotent or retries >= self._max_retries or self._closing:
                    raise
                lost = error
                why = f"the connection to {slot.label} was lost"
            except RemoteAmpError as error:
                # The server is shutting down: it did not run the call, so the
                # call goes elsewhere whatever its command, and the connection
                # takes no more calls.
                if error.error_code != SHUTDOWN_CODE:
                    raise
                self._drain(slot, "it is shutting down")
                if retries >= self._max_retries or self._closing:
                    raise
                lost = error
                why = f"{slot.label} is shutting down"
            retries += 1
            self._retries += 1
            logger.info(
                "sending %s again: %s (retry %d of %d)",
                label,
                why,
                retries,
                self._max_retries,
            )
            slot = future = None

    async def _route(self, label: str, lost: BaseException | None) -> _Slot:
        """The ready slot to send a call on, waiting up to connect_timeout for one."""
        assert self._loop is not None and self._ready_event is not None
        deadline = self._loop.time() + self._connect_timeout
        self._waiting += 1
        try:
            while True:
                if self._closing:
                    raise NoConnectionError(f"cannot call {label}: the client is closed") from lost
                slot = self._pick()
                if slot is not None:
                    return slot
                self._ready_event.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._ready_event.wait()
                except TimeoutError:
                    raise NoConnectionError(
                        f"cannot call {label}: no connection to {self._describe()} was ready "
                        f"within {self._connect_timeout} s (last: {self._last_error})"
                    ) from lost
        finally:
            self._waiting -= 1

    def _pick(self) -> _Slot | None:
        """The ready slot with the fewest calls in flight; ties go round-robin."""
        ready = self._ready
        count = len(ready)
        if not count:
            return None
        start = self._turn % count
        self._turn += 1
        best: _Slot | None = None
        for index in range(count):
            slot = ready[(start + index) % count]
            # The slot leaves the list a step after its connection is lost.
            if _takes_calls(slot.protocol) and (best is None or slot.pending < best.pending):
                best = slot
                if not slot.pending:
                    break
        return best

    # Private methods: connections

    def _start(self) -> None:
        """Start resolving and connecting (once), on the running loop."""
        if self._loop is not None or self._closing:
            return
        self._loop = asyncio.get_running_loop()
        self._ready_event = asyncio.Event()
        for endpoint in self._endpoints:
            endpoint.first = self._loop.create_future()
            endpoint.task = self._loop.create_task(self._run_endpoint(endpoint))

    def _describe(self) -> str:
        return ", ".join(endpoint.label for endpoint in self._endpoints)

    def _backoff(self, failures: int) -> float:
        """A delay before the next attempt: exponential, with full jitter."""
        bound = self._backoff_initial * self._backoff_multiplier ** min(failures, 64)
        return random.uniform(0, min(self._backoff_max, bound))

    async def _run_endpoint(self, endpoint: _Endpoint) -> None:
        """Resolve an endpoint now, then every resolve_interval (or after a backoff)."""
        failures = 0
        while True:
            if await self._refresh(endpoint):
                failures = 0
                if endpoint.static or self._resolve_interval is None:
                    return  # its slots ask for a resolution when they reconnect
                await asyncio.sleep(self._resolve_interval)
            else:
                delay = self._backoff(failures)
                failures += 1
                logger.info("resolving %s again in %.2f s", endpoint.label, delay)
                await asyncio.sleep(delay)

    async def _refresh(self, endpoint: _Endpoint) -> bool:
        """Resolve an endpoint and update its slots; one resolution at a time."""
        if endpoint.resolving is None:
            assert self._loop is not None
            endpoint.resolving = self._loop.create_task(self._resolve(endpoint))
        return await asyncio.shield(endpoint.resolving)

    async def _resolve(self, endpoint: _Endpoint) -> bool:
        """Resolve an endpoint and update its slots; false if it resolved to nothing."""
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    addresses = await self._addresses(endpoint)
            except Exception as error:
                self._last_error = (
                    f"cannot resolve {endpoint.label}: {error or type(error).__name__}"
                )
                logger.warning(
                    "%s; keeping its %d addresses", self._last_error, len(endpoint.slots)
                )
                return False
            if not addresses:
                self._last_error = f"{endpoint.label} resolved to no address"
                logger.warning(
                    "%s; keeping its %d addresses", self._last_error, len(endpoint.slots)
                )
                return False
            if not self._closing:
                self._update(endpoint, addresses)
            return True
        finally:
            endpoint.resolving = None
            if endpoint.first is not None and not endpoint.first.done():
                endpoint.first.set_result(None)

    async def _addresses(self, endpoint: _Endpoint) -> list[str]:
        """The addresses of an endpoint, each once, in the resolver's order."""
        if endpoint.path is not None:
            return [endpoint.path]
        host = endpoint.host
        assert host is not None and self._loop is not None
        if endpoint.static:
            return [host]
        if self._resolver is not None:
            found: Iterable[Any] = await self._resolver(host)
            if isinstance(found, str | bytes):
                raise TypeError(f"the resolver returned {found!r}, not a list of addresses")
        else:
            infos = await self._loop.getaddrinfo(host, endpoint.port, type=socket.SOCK_STREAM)
            found = [str(info[4][0]) for info in infos]
        addresses: list[str] = []
        for address in found:
            if not isinstance(address, str) or not address:
                raise TypeError(f"the resolver gave {address!r}, not an address")
            if address not in addresses:
                addresses.append(address)
        return addresses

    def _update(self, endpoint: _Endpoint, addresses: Sequence[str]) -> None:
        """Give new addresses their slots, and retire the slots of the addresses gone."""
        assert self._loop is not None
        gone = [address for address in endpoint.slots if address not in addresses]
        new = [address for address in addresses if address not in endpoint.slots]
        if gone or new:
            logger.info(
                "%s resolves to %s%s",
                endpoint.label,
                ", ".join(addresses),
                f" (gone: {', '.join(gone)})" if gone else "",
            )
        for address in gone:
            for slot in endpoint.slots.pop(address):
                protocol = self._retire(slot)
                if protocol is not None:
                    logger.info("draining the connection to %s: it left the resolution", slot.label)
                    drain = self._loop.create_task(protocol.shutdown(self._grace))
                    self._drains.add(drain)
                    drain.add_done_callback(self._drains.discard)
        for address in new:
            slots = endpoint.slots[address] = []
            for _ in range(self._per_address):
                slot = _Slot(endpoint, address)
                slot.task = self._loop.create_task(self._run_slot(slot))
                slots.append(slot)

    def _drain(self, slot: _Slot, why: str) -> None:
        """Take no more calls on a slot's connection, and close it once its calls end."""
        protocol = slot.protocol
        if slot not in self._ready or protocol is None:
            return  # already done
        assert self._loop is not None
        self._ready.remove(slot)
        logger.info("draining the connection to %s: %s", slot.label, why)
        drain = self._loop.create_task(protocol.shutdown(self._grace))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)

    def _retire(self, slot: _Slot) -> AMPProtocol | None:
        """Stop a slot: no more calls, no reconnection. Return its open protocol, to drain."""
        slot.state = RETIRED
        slot.tried()
        if slot in self._ready:
            self._ready.remove(slot)
        if slot.task is not None:
            slot.task.cancel()
        protocol = slot.protocol
        return protocol if protocol is not None and not protocol.closed else None

    async def _open(self, slot: _Slot) -> AMPProtocol:
        """Make one connection for a slot."""
        kwargs = dict(self._connect_kwargs)
        if self._middleware:
            kwargs["middleware"] = self._middleware
        # Keepalive: given to connect() only when set, so that connect()'s own
        # defaults hold otherwise.
        if self._keepalive is not None:
            kwargs["keepalive"] = self._keepalive
        if self._keepalive_timeout is not None:
            kwargs["keepalive_timeout"] = self._keepalive_timeout
        endpoint = slot.endpoint
        if endpoint.path is not None:
            return await connect(
                path=endpoint.path,
                protocol_factory=self._protocol_factory,
                ssl=self._ssl,
                **kwargs,
            )
        if self._ssl and "server_hostname" not in kwargs:
            kwargs["server_hostname"] = endpoint.host  # check the name, not the address
        return await connect(
            slot.address,
            endpoint.port,
            protocol_factory=self._protocol_factory,
            ssl=self._ssl,
            **kwargs,
        )

    async def _probe(self, protocol: AMPProtocol) -> None:
        """
        Wait for the answer to a heartbeat on a new connection; abort it if none comes.

        The kernel completes a TCP connection to a live socket whatever its
        process does: one stopped or wedged still "accepts". Calls would go
        to it and hang until the keepalive drops it again, so with keepalive
        on, a connection takes calls only once its server has answered.
        """
        timeout = protocol.keepalive_timeout
        try:
            heartbeat = probe(protocol)
            await asyncio.wait([heartbeat], timeout=timeout)
        except BaseException:
            _abort(protocol)
            raise
        if not heartbeat.done():
            _abort(protocol)
            raise TimeoutError(f"no answer to a heartbeat within {timeout:g} s")
        if heartbeat.cancelled():
            raise ConnectionLostError(f"the connection to {protocol.peer} closed at once")
        error = heartbeat.exception()
        if isinstance(error, ConnectionLostError):
            raise error  # any answer counts, an error too; the connection closing does not

    async def _run_slot(self, slot: _Slot) -> None:
        """Keep one connection: connect, wait for its loss, back off, resolve, again."""
        assert self._loop is not None and self._ready_event is not None
        loop = self._loop
        first = True
        while slot.state != RETIRED:
            if not first:
                delay = self._backoff(slot.failures)
                logger.info(
                    "connecting to %s again in %.2f s (attempt %d)",
                    slot.label,
                    delay,
                    slot.failures + 1,
                )
                await asyncio.sleep(delay)
                if not slot.endpoint.static:
                    await self._refresh(slot.endpoint)  # may retire this slot
                    if slot.state == RETIRED:
                        return
            first = False
            slot.state = CONNECTING
            try:
                async with asyncio.timeout(self._connect_timeout):
                    protocol = await self._open(slot)
                    if self._keepalive is not None:
                        await self._probe(protocol)
            except Exception as error:
                slot.tried()
                slot.failures += 1
                self._failures += 1
                self._last_error = f"cannot connect to {slot.label}: {_reason(error)}"
                logger.warning("%s", self._last_error)
                continue
            if slot.state == RETIRED:  # retired as the connection was made
                protocol.close()
                return
            slot.protocol = protocol
            slot.state = READY
            made = loop.time()
            self._ready.append(slot)
            self._ready_event.set()
            slot.tried()
            logger.info("connected to %s", slot.label)
            try:
                await protocol.wait_closed()
            finally:
                if slot in self._ready:
                    self._ready.remove(slot)
            lasted = loop.time() - made
            if lasted >= self._healthy_after:
                slot.failures = 0
            else:
                slot.failures += 1
            if slot.state == RETIRED:
                return
            slot.state = CONNECTING
            self._losses += 1
            self._last_error = f"the connection to {slot.label} was lost"
            logger.warning("connection to %s lost after %.3f s", slot.label, lasted)
