"""
One worker process, seen from the parent: its process, its AMP link, its output.

Theory of operation
-------------------

A worker goes through these states, and only forward:

    STARTING ──ready──> READY ──(recycle, idle, close)──> RETIRING ──no call left──> STOPPING
        │                 │                                  │                           │
        └─────────────────┴──(cancel, timeout, link lost)────┴─────> KILLING             │
                                                                        │                │
                     every state ──the process exits (reaped)──>  DEAD <┴────────────────┘

* **STARTING**: the process is spawned and its link connected; it takes no call
  until it sends ``Ready`` (after its ``worker_started()`` hook). Dying here, or
  not being ready within ``start_timeout``, is a *start failure*, which the pool
  counts to detect a crash loop.
* **READY**: it takes calls, up to ``concurrency`` in flight. It is in the
  pool's list of ready workers in this state only: the pool never hands a call
  to a worker in any other state.
* **RETIRING**: it takes no new call and finishes those in flight; then it is
  stopped gracefully.
* **STOPPING**: its link is closed; the child sees EOF, runs
  ``worker_stopping()`` and exits. If it has not exited within ``kill_grace``,
  it is killed.
* **KILLING**: SIGTERM is sent, then SIGKILL after ``kill_grace``. Its link is
  dropped at once, so no late answer from it is taken.
* **DEAD**: the process has exited and been reaped (only then: a pid is never
  signalled after it was reaped, so it can never hit a recycled pid).

The exit of the process is the one authority for death: it is watched with a
pidfd (Linux) or by polling, whatever the link or the output pipe say. A link
that breaks while the process lives leads to a kill after ``kill_grace``, and
the death that follows is a crash. The worker's stdout and stderr are one pipe:
each line goes to the parent's stderr or logging, and the last lines are kept
for crash reports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._middleware import Call as MiddlewareCall
from .._middleware import CallNext, Middleware, build, overrides
from .._protocol import AMPProtocol
from ._child import Ready

if TYPE_CHECKING:
    from ._calls import Call
    from ._pool import ProcessPool

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp.pool")
output_logger = logging.getLogger("asyncio_amp.pool.worker")

# How many lines of a worker's output are kept for its crash report.
TAIL_LINES = 50
# A line of output longer than this is cut there, so one endless line cannot
# take the parent's memory.
MAX_LINE = 8192
# After a worker's process has exited, how long its output pipe may take to reach
# EOF (a grandchild may hold it open) before the crash report goes without the rest.
OUTPUT_DRAIN = 0.5
# How often the exit of a worker is polled where there is no pidfd.
POLL_INTERVAL = 0.02


class State(enum.Enum):
    """The states of a worker (see the theory of operation)."""

    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    STOPPING = "stopping"
    KILLING = "killing"
    DEAD = "dead"


def describe(returncode: int | None) -> str:
    """How a process ended, in words: "exited with status 3", "was killed by SIGKILL"."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class Link(AMPProtocol):
    """
    The parent's end of a worker's AMP connection.

    The pool builds a subclass of this and of its ``parent_protocol``, so the
    parent's responders answer the worker's calls, and the pool hears each read
    at once: the answers a read completes are handed to their callers, and the
    worker gets its next calls, in the same callback (see ``ProcessPool``).
    """

    _pool_worker: Worker | None = None

    def data_received(self, data: bytes) -> None:
        """Read as usual, then let the pool take the answers the read completed."""
        super().data_received(data)
        worker = self._pool_worker
        if worker is not None and worker.inflight:
            worker.pool._answered(worker)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the link's own calls as usual, and tell the pool."""
        super().connection_lost(exc)
        worker = self._pool_worker
        if worker is not None:
            worker.link_lost()

    @Ready.responder
    def _pool_worker_ready(self, pid: int) -> dict[str, Any]:
        worker = self._pool_worker
        if worker is not None:
            worker.ready_received()
        return {}


_link_classes: dict[type[AMPProtocol], type[Link]] = {}


def link_class(parent_protocol: type[AMPProtocol]) -> type[Link]:
    """The link class for a pool whose parent side answers with ``parent_protocol``."""
    if not (isinstance(parent_protocol, type) and issubclass(parent_protocol, AMPProtocol)):
        raise TypeError(f"parent_protocol must be an AMPProtocol subclass, not {parent_protocol!r}")
    if issubclass(parent_protocol, Link):
        return parent_protocol
    if parent_protocol is AMPProtocol:
        return Link
    found = _link_classes.get(parent_protocol)
    if found is None:
        found = _link_classes[parent_protocol] = type(
            parent_protocol.__name__, (Link, parent_protocol), {"__module__": __name__}
        )
    return found


class _Incoming(Middleware):
    """A middleware's ``incoming``, for every call of a worker but its ``Ready``."""

    def __init__(self, middleware: Middleware) -> None:
        self.middleware = middleware

    async def incoming(self, call: MiddlewareCall, call_next: CallNext) -> dict[Any, Any]:
        if call.command is Ready:
            return await call_next(call)  # the pool's own business
        return await self.middleware.incoming(call, call_next)


class _Outgoing(Middleware):
    """A middleware's ``outgoing`` alone."""

    def __init__(self, middleware: Middleware) -> None:
        self.middleware = middleware

    async def outgoing(self, call: MiddlewareCall, call_next: CallNext) -> dict[Any, Any]:
        return await self.middleware.outgoing(call, call_next)


def link_middleware(middleware: Iterable[Middleware]) -> tuple[Middleware, ...]:
    """
    The middleware a pool's links run: the user's, in order, each direction
    kept apart, so that the worker's ``Ready`` (the pool's own call) skips them.

    Raises:
        TypeError: ``middleware`` is not an iterable of Middleware.
    """
    items, _, _ = build(middleware)  # checks them
    out: list[Middleware] = []
    for item in items:
        if overrides(item, "incoming"):
            out.append(_Incoming(item))
        if overrides(item, "outgoing"):
            out.append(_Outgoing(item))
    return tuple(out)


class Output(asyncio.Protocol):
    """Reads a worker's stdout and stderr: forwards each line and keeps the last ones."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.buffer = bytearray()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            self.line(bytes(buffer[start:end]))
            start = end + 1
        del buffer[:start]
        while len(buffer) > MAX_LINE:
            self.line(bytes(buffer[:MAX_LINE]))
            del buffer[:MAX_LINE]

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer:
            self.line(bytes(self.buffer))
            self.buffer.clear()
        if not self.done.done():
            self.done.set_result(None)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        pid = self.worker.pid
        if self.worker.pool._output == "log":
            output_logger.info("[worker %s] %s", pid, text)
        else:
            with contextlib.suppress(Exception):  # a closed or broken stderr
                sys.stderr.write(f"[worker {pid}] {text}\n")
                sys.stderr.flush()


class Worker:
    """A worker process and everything the parent holds for it."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.state = State.STARTING
        self.pid: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None
        self.output = Output(self)
        self.output_transport: asyncio.BaseTransport | None = None
        # The calls sent to it and not answered yet, in the order they were sent.
        self.inflight: list[Call] = []
        # How many calls it was given in all (recycle_after).
        self.assigned = 0
        self.idle_since = 0.0
        self.ready_at = 0.0
        self.was_ready = False
        # Set when the pool ends it on purpose: its death is then no crash.
        self.expected = False
        self.reason = ""
        self.error: str | None = None  # why it could not be spawned
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.exited: asyncio.Future[int] = self.loop.create_future()
        self.signal_handle: asyncio.TimerHandle | None = None
        self.poll_handle: asyncio.TimerHandle | None = None
        self.pidfd: int | None = None
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<worker {self.pid} {self.state.value} inflight={len(self.inflight)}>"

    # Public methods (for the pool)

    def start(self) -> None:
        """Start the worker's life: spawn, connect, wait for it to be ready, then for its end."""
        self.task = self.loop.create_task(self.run())

    def ready_received(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def link_lost(self) -> None:
        """The link closed: unless the pool ended it, the worker is broken."""
        if self.state in (State.KILLING, State.STOPPING, State.DEAD):
            return
        self.pool._link_lost(self)
        # Give it the time to exit by itself (its death says why), then make sure.
        self.schedule_signal(self.pool.kill_grace, signal.SIGTERM)

    def stop(self, reason: str) -> None:
        """Stop gracefully: close the link; the child exits when it sees EOF."""
        if self.state in (State.STOPPING, State.KILLING, State.DEAD):
            return
        self.state = State.STOPPING
        self.expected = True
        self.reason = reason
        logger.info("stopping worker %s: %s", self.pid, reason)
        if self.link is not None:
            self.link.close()
        if self.exited.done():
            return
        self.schedule_signal(self.pool.kill_grace, signal.SIGTERM)

    def kill(self, reason: str, *, expected: bool = True) -> None:
        """SIGTERM now, SIGKILL after ``kill_grace``; drop the link so that nothing more is read."""
        if self.state in (State.KILLING, State.DEAD):
            return
        self.state = State.KILLING
        self.expected = self.expected or expected
        self.reason = reason
        if self.link is not None and self.link.transport is not None:
            self.link.transport.abort()
        if self.process is None or self.exited.done():
            return
        logger.warning("killing worker %s: %s", self.pid, reason)
        self.send_signal(signal.SIGTERM)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process, unless it has been reaped; SIGTERM leads to SIGKILL later."""
        if self.signal_handle is not None:
            self.signal_handle.cancel()
            self.signal_handle = None
        process = self.process
        if process is None or process.returncode is not None:
            return  # reaped: its pid may belong to another process now
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        if sig != signal.SIGKILL:
            self.schedule_signal(self.pool.kill_grace, signal.SIGKILL)

    def schedule_signal(self, delay: float, sig: signal.Signals) -> None:
        if self.signal_handle is None and not self.exited.done():
            self.signal_handle = self.loop.call_later(delay, self.send_signal, sig)

    # Private methods

    async def run(self) -> None:
        pool = self.pool
        returncode: int | None = None
        try:
            if self.state is not State.STARTING:
                pass  # killed before it was spawned: nothing to start
            else:
                try:
                    await self.spawn()
                except Exception as exc:  # the interpreter cannot be started or connected
                    self.error = f"{type(exc).__name__}: {exc}"
                    logger.error("cannot start a worker: %s", self.error)
                    self.kill("it could not be connected", expected=False)
                else:
                    await self.wait_ready()
            if self.process is not None:
                returncode = await asyncio.shield(self.exited)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(OUTPUT_DRAIN):
                        await asyncio.shield(self.output.done)
        except asyncio.CancelledError:
            # The event loop is ending without the pool having been closed: leave
            # no process behind.
            self.reap_now()
            raise
        finally:
            self.cleanup()
        self.state = State.DEAD
        pool._worker_dead(self, returncode)

    async def spawn(self) -> None:
        parent_sock, read_end = self.spawn_process()
        self.watch_exit()
        try:
            pipe = os.fdopen(read_end, "rb", buffering=0)
        except BaseException:
            os.close(read_end)
            parent_sock.close()
            raise
        try:
            self.output_transport, _ = await self.loop.connect_read_pipe(lambda: self.output, pipe)
        except BaseException:
            pipe.close()
            parent_sock.close()
            raise
        pool = self.pool
        link = pool._link_class()
        link._pool_worker = self
        if pool._link_middleware:
            link.middleware = pool._link_middleware
        link.max_pending_calls = max(link.max_pending_calls, pool.concurrency)
        self.link = link
        try:
            await self.loop.create_unix_connection(lambda: link, sock=parent_sock)
        except BaseException:
            parent_sock.close()
            raise

    def spawn_process(self) -> tuple[socket.socket, int]:
        """
        Start the interpreter on one end of a new socketpair; return the other
        end and the read end of its output pipe.
        """
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                self.pool._argv(child_sock.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                pass_fds=(child_sock.fileno(),),
                cwd=self.pool._cwd,
                env=self.pool._env,
            )
        except BaseException:
            parent_sock.close()
            os.close(read_end)
            raise
        finally:
            child_sock.close()
            os.close(write_end)
        self.pid = self.process.pid
        logger.info("started worker %s", self.pid)
        if self.state is State.KILLING:  # killed while it was being spawned
            logger.warning("killing worker %s: %s", self.pid, self.reason)
            self.send_signal(signal.SIGTERM)
        return parent_sock, read_end

    async def wait_ready(self) -> None:
        done, _ = await asyncio.wait(
            (self.ready, self.exited),
            timeout=self.pool.start_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self.ready in done and self.state is State.STARTING:
            self.was_ready = True
            self.pool._worker_ready(self)
        elif not done:
            self.kill(
                f"it was not ready within start_timeout ({self.pool.start_timeout} s)",
                expected=False,
            )

    def watch_exit(self) -> None:
        assert self.process is not None
        try:
            self.pidfd = os.pidfd_open(self.process.pid)
            self.loop.add_reader(self.pidfd, self.check_exit)
        except (AttributeError, OSError, NotImplementedError):
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            self.poll_handle = self.loop.call_later(POLL_INTERVAL, self.check_exit)
        self.check_exit()

    def check_exit(self) -> None:
        """Reap the process if it has exited; else keep watching."""
        if self.poll_handle is not None:
            self.poll_handle.cancel()
            self.poll_handle = None
        assert self.process is not None
        returncode = self.process.poll()
        if returncode is None:
            if self.pidfd is None:
                self.poll_handle = self.loop.call_later(POLL_INTERVAL, self.check_exit)
            return
        self.stop_watching()
        if self.signal_handle is not None:
            self.signal_handle.cancel()
            self.signal_handle = None
        if not self.exited.done():
            self.exited.set_result(returncode)

    def stop_watching(self) -> None:
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self.poll_handle is not None:
            self.poll_handle.cancel()
            self.poll_handle = None

    def reap_now(self) -> None:
        """Kill and reap the process at once, blocking (only when the loop is going away)."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def cleanup(self) -> None:
        self.stop_watching()
        if self.signal_handle is not None:
            self.signal_handle.cancel()
            self.signal_handle = None
        link = self.link
        if link is not None and link.transport is not None and not link.closed:
            link.transport.abort()
        if self.output_transport is not None:
            self.output_transport.close()
