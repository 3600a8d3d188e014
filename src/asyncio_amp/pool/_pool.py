"""
ProcessPool: calls to AMP workers in child processes, queued, timed and supervised.

Theory of operation
-------------------

A call (``Call``) goes through these states:

    NEW ──> QUEUED ──> RUNNING ──> DONE
     │        │           │
     └────────┴───────────┴──> CANCELLED

* **NEW**: waiting for room in the queue (``max_queue``), in its caller's task.
* **QUEUED**: in the queue, waiting for a worker with a free place. Cancelled
  here, it just leaves the queue (lazily: it is skipped when its turn comes).
* **RUNNING**: sent to one worker, in that worker's ``inflight`` list. Cancelled
  or timed out here, its worker is killed (the work stops) and replaced, and the
  worker's other calls fail with ``WorkerCrashedError`` or, for an idempotent
  command, go back to the front of the queue.
* **DONE**: its answer (or error answer) was read and handed to its caller.

Invariant: while calls wait in the queue, no READY worker has a free place.
Every event that frees a place (an answer read, a worker ready, a call
requeued) hands out queued calls at once, so the queue only holds calls that
must wait.

Speed. A call costs its caller no task of its own: the caller awaits a plain
future. The link's ``data_received`` hands the answers of each read to their
callers and, in the same callback, sends the worker its next queued calls: the
worker never waits for a task of the parent to wake up before it gets more
work, which hides the round trip even with ``concurrency=1``; with more, calls
are pipelined on each worker's connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from .._commands import Command
from .._errors import ConnectionLostError
from .._middleware import Middleware
from .._protocol import AMPProtocol
from ._calls import Call, Phase, drop
from ._errors import PoolClosedError, WorkerCrashedError
from ._options import argv, environment, positive, seconds, worker_target
from ._supervisor import HEALTHY, Supervisor
from ._worker import Link, State, Worker, describe, link_class, link_middleware

__all__ = ["ProcessPool"]

logger = logging.getLogger("asyncio_amp.pool")


class ProcessPool:
    """
    A pool of worker processes that answer AMP calls: CPU work off the event loop.

    Each worker is a fresh interpreter (``python -m asyncio_amp.pool``, no fork)
    running an instance of ``worker``, an [`AMPProtocol`][asyncio_amp.AMPProtocol]
    subclass whose responders do the work. The parent talks to it over a UNIX
    socketpair; the worker's stdout and stderr go to the parent's stderr (or its
    logging), never into the AMP stream. A worker class may define
    ``async def worker_started(self)`` and ``async def worker_stopping(self)``:
    they run in the worker, after it connects and before it exits.

    Use it as an async context manager, or call [`start`][asyncio_amp.pool.ProcessPool.start] and
    [`close`][asyncio_amp.pool.ProcessPool.close]:

        async with ProcessPool(MathWorker, max_workers=4) as pool:
            answer = await pool.call_remote(Fib, n=30)

    Args:
        worker: The worker class, or its ``"module:Class"`` name. It must be
            importable in a new interpreter; a class of the main script is found
            by running that script as ``__mp_main__``, as ``multiprocessing`` does.
        min_workers: Workers started by
            [`start`][asyncio_amp.pool.ProcessPool.start] and kept running.
        max_workers: The most workers running at once (default: the CPU count,
            at least ``min_workers``). More start as calls queue up or wait for
            room in the queue. Workers that
            are being stopped or killed do not count.
        concurrency: Calls in flight at once on each worker (pipelined on its
            connection). With more than 1, a worker's responders run concurrently
            (async responders interleave; plain ones run one after the other).
        max_queue: The most calls that may wait for a worker; past it,
            [`call_remote`][asyncio_amp.pool.ProcessPool.call_remote] waits for
            room, so memory stays bounded.
        max_idle: Seconds a worker may stay idle before it is stopped, down to
            ``min_workers``; ``None``: never.
        recycle_after: Replace a worker after it was given this many calls (it
            never gets more); ``None``: never.
        timeout: The default limit, in seconds, on each call, from
            [`call_remote`][asyncio_amp.pool.ProcessPool.call_remote] to its
            answer (queue time included). It raises ``TimeoutError``, and the
            worker running the call is killed.
        kill_grace: Seconds between SIGTERM and SIGKILL when a worker is killed,
            and how long a stopping worker may take to exit.
        start_timeout: Seconds a worker may take to start (import, connect, run
            ``worker_started``) before it is killed, which counts as a failed start.
        parent_protocol: The [`AMPProtocol`][asyncio_amp.AMPProtocol] subclass
            whose responders answer the calls the workers make to the parent.
        env: Environment variables for the workers, on top of the parent's.
        cwd: The workers' working directory (default: the parent's).
        sys_path: Directories put at the front of the workers' ``sys.path``. The
            parent's own ``sys.path`` entries are added at its end.
        output: Where the workers' stdout and stderr lines go: ``"stderr"``, the
            parent's stderr, each line tagged ``[worker PID]``; or ``"log"``, the
            ``asyncio_amp.pool.worker`` logger at INFO level.
        middleware: [`Middleware`][asyncio_amp.Middleware] that runs on the
            parent's side of every worker's connection, in list order: its
            ``outgoing`` around the pool's calls to the workers, its
            ``incoming`` around the workers' calls to the parent (the
            ``parent_protocol``'s responders). An exception it raises fails the
            call as usual; the worker that was to run the call goes on. The
            pool's own start-up message from each worker skips it.

    Workers that keep dying at start (an import error, a failing
    ``worker_started``) are retried with a growing delay; after five in a row,
    the calls that wait fail with [`WorkerCrashedError`][asyncio_amp.pool.WorkerCrashedError],
    which carries the last worker's output, and the next start is tried only when
    a new call comes.

    Each worker start, stop, crash and kill is logged on the ``asyncio_amp.pool``
    logger, with its pid.
    """

    def __init__(
        self,
        worker: type[AMPProtocol] | str,
        *,
        min_workers: int = 1,
        max_workers: int | None = None,
        concurrency: int = 1,
        max_queue: int = 10_000,
        max_idle: float | None = 60.0,
        recycle_after: int | None = None,
        timeout: float | None = None,
        kill_grace: float = 1.0,
        start_timeout: float = 30.0,
        parent_protocol: type[AMPProtocol] = AMPProtocol,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        sys_path: Iterable[str | os.PathLike[str]] = (),
        output: Literal["stderr", "log"] = "stderr",
        middleware: Iterable[Middleware] = (),
    ) -> None:
        self._target, self._main = worker_target(worker)
        if isinstance(min_workers, bool) or not isinstance(min_workers, int) or min_workers < 0:
            raise ValueError(f"min_workers must be an int >= 0, not {min_workers!r}")
        if max_workers is None:
            max_workers = max(min_workers, os.cpu_count() or 1, 1)
        positive("max_workers", max_workers)
        if max_workers < min_workers:
            raise ValueError(f"max_workers ({max_workers}) is below min_workers ({min_workers})")
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.concurrency = positive("concurrency", concurrency)
        self.max_queue = positive("max_queue", max_queue)
        self.recycle_after = (
            None if recycle_after is None else positive("recycle_after", recycle_after)
        )
        self.max_idle = seconds("max_idle", max_idle)
        self.timeout = seconds("timeout", timeout)
        self.kill_grace = seconds("kill_grace", kill_grace) or 0.0
        self.start_timeout = seconds("start_timeout", start_timeout) or 0.0
        self._link_class: type[Link] = link_class(parent_protocol)
        self._link_middleware = link_middleware(middleware)
        if output not in ("stderr", "log"):
            raise ValueError(f"output must be 'stderr' or 'log', not {output!r}")
        self._output = output
        self._cwd = None if cwd is None else os.fspath(cwd)
        self._env = environment(env)
        self._sys_path = [os.path.abspath(os.fspath(entry)) for entry in sys_path]
        self._phase = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[Worker] = []  # every worker not DEAD
        self._ready: list[Worker] = []  # READY workers: the only ones given calls
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: collections.deque[Call] = collections.deque()
        self._queued = 0  # live calls in the queue (cancelled ones are skipped)
        self._room: collections.deque[asyncio.Future[None]] = collections.deque()
        self._changed: asyncio.Future[None] | None = None
        self._supervisor = Supervisor(self)
        self._closed: asyncio.Future[None] | None = None
        self._counts = dict.fromkeys(("completed", "failed", "crashed", "recycled", "timed_out"), 0)

    def __repr__(self) -> str:
        return f"<ProcessPool {self._target} {self._phase} workers={len(self._workers)}>"

    # Public methods

    async def start(self) -> None:
        """
        Start ``min_workers`` workers and wait until they are ready.

        Raises:
            RuntimeError: The pool was started already.
            WorkerCrashedError: The workers keep dying at start (the pool is
                then closed); its ``output`` holds the last one's output.
            PoolClosedError: [`close`][asyncio_amp.pool.ProcessPool.close] was
                called meanwhile.
        """
        if self._phase != "new":
            raise RuntimeError(f"the pool was started already ({self._phase})")
        self._loop = asyncio.get_running_loop()
        self._phase = "running"
        self._supervisor.ensure_workers()
        try:
            while len(self._ready) < self.min_workers:
                if self._phase != "running":
                    raise PoolClosedError("the pool was closed while it started")
                if self._supervisor.gave_up:
                    assert self._supervisor.last_failure is not None
                    raise self._supervisor.last_failure
                await self._wait_change()
        except BaseException:
            await self.close(grace=0)
            raise

    async def call_remote(self, command: type[Command] | Command, /, **arguments: Any) -> Any:
        """
        Call ``command`` on a worker and return its answer.

        It takes the arguments of
        [`AMPProtocol.call_remote`][asyncio_amp.AMPProtocol.call_remote]: a Command
        class and its arguments as keywords, or a Command instance. It works with
        ``asyncio.timeout`` and ``wait_for``: a call cancelled while a worker runs
        it kills that worker (SIGTERM, then SIGKILL after ``kill_grace``), and a
        new one starts; a call cancelled while it waits in the queue just leaves it.

        Returns:
            The answer, a dict keyed like ``command.response``.

        Raises:
            TimeoutError: The pool's ``timeout`` passed before the answer came.
            WorkerCrashedError: The worker died or was killed before answering.
            PoolClosedError: The pool is closing or closed.
            RuntimeError: The pool was not started.

        Errors that the worker's responder raises come back as they do over any
        AMP connection (the command's mapped exception, or `UnknownRemoteError`).
        """
        if self._phase != "running":
            raise self._refusal(command)
        loop = self._loop
        assert loop is not None
        call = Call(command, arguments, loop.create_future())
        if self.timeout is None:
            # _run, inline: one coroutine less for each call.
            try:
                if self._room or self._queued >= self.max_queue:
                    await self._wait_room(call)
                self._submit(call)
                return await call.future
            except asyncio.CancelledError:
                self._abandon(call)
                raise
        scope = asyncio.timeout(self.timeout)
        try:
            async with scope:
                return await self._run(call)
        except TimeoutError:
            if scope.expired():
                self._counts["timed_out"] += 1
            raise

    async def close(self, grace: float | None = 30.0) -> None:
        """
        Close the pool: refuse new calls, let running ones finish, stop every worker.

        Calls still waiting in the queue fail at once with
        [`PoolClosedError`][asyncio_amp.pool.PoolClosedError]. Running calls may finish for
        ``grace`` seconds (``None``: no limit); then their workers are killed and
        they fail with [`PoolClosedError`][asyncio_amp.pool.PoolClosedError]. It returns once
        every worker process has exited and been reaped; calling it again waits
        for the same. If it is cancelled, the workers are killed at once (their
        calls in flight fail with
        [`WorkerCrashedError`][asyncio_amp.pool.WorkerCrashedError]).
        """
        if self._phase == "new":
            self._phase = "closed"
            return
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        assert self._loop is not None
        self._closed = self._loop.create_future()
        self._phase = "closing"
        self._notify()
        try:
            await self._close(grace)
        except BaseException:
            # Cancelled: leave no process behind anyway.
            for worker in list(self._workers):
                worker.kill("the pool's close() was cancelled")
                worker.send_signal(signal.SIGKILL)
            raise
        finally:
            self._phase = "closed"
            closed = self._closed
            pending = [task for task in self._tasks if not task.done()]
            if pending:
                # Cancelled: the workers' tasks still reap them, and close()
                # called again must wait for that too.
                def settle(_: object) -> None:
                    if not closed.done():
                        closed.set_result(None)

                asyncio.gather(*pending, return_exceptions=True).add_done_callback(settle)
            elif not closed.done():
                closed.set_result(None)
            self._notify()  # start() may wait for workers

    def stats(self) -> dict[str, int]:
        """
        A snapshot of the pool.

        Returns:
            A dict with ``workers`` (processes running: starting, ready, or being
            stopped), ``busy`` and ``idle`` (ready workers with and without calls
            in flight), ``queued`` (calls waiting for a worker), ``completed``
            (calls answered with a result), ``failed`` (calls that raised: error
            answers, crashes, cancellations and timeouts), ``crashed`` (workers
            that died without being asked to), ``recycled`` (workers replaced
            after ``recycle_after`` calls) and ``timed_out`` (calls that hit the
            pool's ``timeout``; they count as failed too).
        """
        busy = sum(1 for worker in self._ready if worker.inflight)
        return {
            "workers": len(self._workers),
            "busy": busy,
            "idle": len(self._ready) - busy,
            "queued": self._queued,
            **self._counts,
        }

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now (starting, ready or stopping)."""
        return [worker.pid for worker in self._workers if worker.pid is not None]

    @property
    def closed(self) -> bool:
        """``True`` once [`close`][asyncio_amp.pool.ProcessPool.close] was called."""
        return self._phase in ("closing", "closed")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # Private methods: calls

    def _refusal(self, command: type[Command] | Command) -> Exception:
        kind = command if isinstance(command, type) else type(command)
        name = getattr(kind, "__qualname__", repr(kind))
        if self._phase == "new":
            return RuntimeError(f"cannot call {name}: the pool is not started (use start())")
        return PoolClosedError(f"cannot call {name}: the pool is {self._phase}")

    async def _run(self, call: Call) -> Any:
        try:
            if self._room or self._queued >= self.max_queue:
                await self._wait_room(call)
            self._submit(call)
            return await call.future
        except asyncio.CancelledError:
            self._abandon(call)
            raise

    async def _wait_room(self, call: Call) -> None:
        """Wait, in order, for room in the queue; a free worker needs none."""
        loop = self._loop
        assert loop is not None
        while self._queued >= self.max_queue and not self._has_room_now():
            waiter = loop.create_future()
            self._room.append(waiter)
            self._supervisor.ensure_workers()  # a caller waiting for room is demand too
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._room.remove(waiter)
                self._wake_room()  # it may have been woken: the next one takes its turn
                raise
            with contextlib.suppress(ValueError):
                self._room.remove(waiter)
            if self._phase != "running":
                # It went in and raises: counted, like a call failed in the queue.
                call.phase = Phase.DONE
                self._counts["failed"] += 1
                raise self._refusal(call.command)
        # Let the next one check too: there may be room for more than one.
        self._wake_room()

    def _has_room_now(self) -> bool:
        return not self._queue_live() and any(
            len(worker.inflight) < self.concurrency for worker in self._ready
        )

    def _wake_room(self) -> None:
        if self._room and self._queued < self.max_queue:
            waiter = self._room[0]
            if not waiter.done():
                waiter.set_result(None)

    def _submit(self, call: Call) -> None:
        """Send a new call to a worker with a free place, or queue it."""
        if self._supervisor.gave_up:
            self._supervisor.gave_up = False  # a new call: one more start is tried
        if not self._queued:
            worker = self._free_worker()
            if worker is not None:
                self._send(worker, call)
                return
        call.phase = Phase.QUEUED
        self._queue.append(call)
        self._queued += 1
        if len(self._ready) < self.max_workers:  # else no worker can be added
            self._supervisor.ensure_workers()

    def _free_worker(self) -> Worker | None:
        """The ready worker with the fewest calls in flight, if it has a free place."""
        best: Worker | None = None
        limit = self.concurrency
        for worker in self._ready:
            n = len(worker.inflight)
            if n < limit:
                if n == 0:
                    return worker
                best, limit = worker, n
        return best

    def _send(self, worker: Worker, call: Call) -> None:
        link = worker.link
        assert link is not None
        try:
            inner = link.call_remote(call.command, **call.arguments)
        except ConnectionLostError:
            # The link broke before the pool heard of it: the call never went.
            call.phase = Phase.QUEUED
            self._queue.appendleft(call)
            self._queued += 1
            worker.kill("its connection broke", expected=False)
            self._unready(worker)
            self._supervisor.ensure_workers()
            return
        except Exception as exc:  # bad arguments: nothing was sent
            call.phase = Phase.DONE
            call.future.set_exception(exc)
            self._counts["failed"] += 1
            return
        call.phase = Phase.RUNNING
        call.worker = worker
        call.inner = inner
        worker.inflight.append(call)
        worker.assigned += 1
        recycle = self.recycle_after
        if recycle is not None and worker.assigned >= recycle:
            self._counts["recycled"] += 1
            self._retire(worker, f"recycled after {worker.assigned} calls")
        if (
            inner.done()
            or not getattr(call.command, "requires_answer", True)
            or link._outgoing is not None
        ):
            # No answer to read (requires_answer = False): done when sent. Or
            # middleware runs around the call: its task ends after the read.
            inner.add_done_callback(lambda _: self._answered(worker))

    def _answered(self, worker: Worker) -> None:
        """
        Hand the answers just read to their callers, and the worker its next calls.

        Called from the link's data_received, in the same callback as the read.
        """
        counts = self._counts
        still: list[Call] = []
        for call in worker.inflight:
            inner = call.inner
            assert inner is not None
            if not inner.done():
                still.append(call)
                continue
            if inner.cancelled():
                exc: BaseException | None = ConnectionLostError("the call was dropped")
            else:
                exc = inner.exception()
            if isinstance(exc, ConnectionLostError):
                # The link broke: the worker's death (and its status) will say why.
                still.append(call)
                continue
            call.phase = Phase.DONE
            call.worker = None
            future = call.future
            if future.done():
                continue  # cancelled as its answer came: _abandon counts it
            if exc is None:
                future.set_result(inner.result())
                counts["completed"] += 1
            else:
                future.set_exception(exc)
                counts["failed"] += 1
        worker.inflight = still
        state = worker.state
        if state is State.READY:
            queue = self._queue
            while self._queued and len(still) < self.concurrency:
                call = queue.popleft()
                if call.phase is Phase.QUEUED:
                    self._queued -= 1
                    self._send(worker, call)
                    if worker.state is not State.READY:
                        break
            if self._room:
                self._wake_room()
            if not worker.inflight:
                self._supervisor.went_idle(worker)
        elif state is State.RETIRING and not still:
            worker.stop(worker.reason)
        if self._phase == "closing":
            self._notify()

    def _abandon(self, call: Call) -> None:
        """The caller of ``call`` was cancelled (or its timeout expired)."""
        phase = call.phase
        call.phase = Phase.CANCELLED
        if phase is Phase.DONE:
            if not call.future.cancelled():
                return  # answered before the cancellation: counted already
        elif phase is Phase.QUEUED:
            self._queued -= 1
            self._compact()
            self._wake_room()
        elif phase is Phase.RUNNING:
            worker = call.worker
            assert worker is not None
            call.worker = None
            drop(call)
            with contextlib.suppress(ValueError):
                worker.inflight.remove(call)
            self._kill(worker, f"its call {call.label} was cancelled or timed out")
        self._counts["failed"] += 1

    def _compact(self) -> None:
        """Drop the cancelled calls from the queue once they are most of it."""
        queue = self._queue
        if len(queue) > 64 and len(queue) > 2 * self._queued:
            self._queue = collections.deque(c for c in queue if c.phase is Phase.QUEUED)

    def _queue_live(self) -> bool:
        return self._queued > 0

    # Private methods: workers

    def _kill(self, worker: Worker, reason: str) -> None:
        """Kill ``worker`` (its work must stop); its other calls fail or go back in the queue."""
        self._unready(worker)
        worker.kill(reason)
        others, worker.inflight = worker.inflight, []
        for call in reversed(others):
            call.worker = None
            drop(call)
            if call.idempotent:
                call.phase = Phase.QUEUED
                self._queue.appendleft(call)
                self._queued += 1
            else:
                call.phase = Phase.DONE
                if not call.future.done():
                    call.future.set_exception(
                        WorkerCrashedError(
                            f"worker {worker.pid} was killed while running {call.label}, "
                            f"because {reason}",
                            pid=worker.pid,
                        )
                    )
                    self._counts["failed"] += 1
        self._supervisor.ensure_workers()
        self._pump()

    def _retire(self, worker: Worker, reason: str) -> None:
        """No more calls for ``worker``; it stops once those in flight are answered."""
        self._unready(worker)
        if worker.state in (State.STARTING, State.READY):
            worker.state = State.RETIRING
            worker.reason = reason
            if not worker.inflight:
                worker.stop(reason)
        self._supervisor.ensure_workers()

    def _unready(self, worker: Worker) -> None:
        with contextlib.suppress(ValueError):
            self._ready.remove(worker)

    def _link_lost(self, worker: Worker) -> None:
        """A worker's link closed without the pool asking: it takes no more calls."""
        self._unready(worker)
        if worker.state in (State.READY, State.RETIRING):
            worker.state = State.KILLING  # its death is a crash: expected stays False
        # Its replacement starts once it is dead, when the pool knows whether it
        # failed to start (and so whether to wait before the next start).

    def _worker_ready(self, worker: Worker) -> None:
        worker.state = State.READY
        assert self._loop is not None
        worker.ready_at = self._loop.time()
        self._supervisor.gave_up = False
        if self._phase != "running":
            self._retire(worker, "the pool is closing")
            return
        logger.debug("worker %s is ready", worker.pid)
        self._ready.append(worker)
        self._pump()
        if not worker.inflight:
            self._supervisor.went_idle(worker)
        self._notify()

    def _worker_dead(self, worker: Worker, returncode: int | None) -> None:
        """A worker's process exited and was reaped: its calls fail, a new one may start."""
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        self._unready(worker)
        status = worker.error or describe(returncode)
        tail = "\n".join(worker.output.tail)
        shown = f"; its last output:\n{tail}" if tail else ""
        calls, worker.inflight = worker.inflight, []
        for call in calls:
            call.phase = Phase.DONE
            call.worker = None
            drop(call)
            if not call.future.done():
                call.future.set_exception(
                    WorkerCrashedError(
                        f"worker {worker.pid} {status} while running {call.label}{shown}",
                        pid=worker.pid,
                        returncode=returncode,
                        output=tail,
                    )
                )
                self._counts["failed"] += 1
        assert self._loop is not None
        lived = self._loop.time() - worker.ready_at
        if worker.expected:
            logger.info("worker %s %s (%s)", worker.pid, status, worker.reason)
        elif not worker.was_ready or (not worker.assigned and lived < HEALTHY):
            self._supervisor.start_failed(worker, status, returncode, tail)
        else:
            self._counts["crashed"] += 1
            logger.warning(
                "worker %s crashed: it %s with %d calls in flight%s",
                worker.pid,
                status,
                len(calls),
                shown,
            )
        self._supervisor.ensure_workers()
        self._pump()
        self._notify()

    def _fail_queue(self, error: Exception) -> None:
        queue, self._queue = self._queue, collections.deque()
        self._queued = 0
        for call in queue:
            if call.phase is Phase.QUEUED:
                call.phase = Phase.DONE
                if not call.future.done():
                    call.future.set_exception(error)
                    self._counts["failed"] += 1
        for waiter in self._room:
            if not waiter.done():
                waiter.set_result(None)

    def _pump(self) -> None:
        """Hand queued calls to the ready workers' free places."""
        queue = self._queue
        while self._queued:
            worker = self._free_worker()
            if worker is None:
                break
            call = queue.popleft()
            if call.phase is Phase.QUEUED:
                self._queued -= 1
                self._send(worker, call)
        if self._room:
            self._wake_room()

    # Private methods: starting and closing

    def _argv(self, fd: int) -> list[str]:
        """The command line of a worker whose end of the socketpair is ``fd``."""
        return argv(self._target, self._main, self._sys_path, fd)

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def _wait_change(self) -> None:
        assert self._loop is not None
        if self._changed is None or self._changed.done():
            self._changed = self._loop.create_future()
        await self._changed

    async def _close(self, grace: float | None) -> None:
        loop = self._loop
        assert loop is not None
        self._fail_queue(PoolClosedError("the pool closed before the call was sent to a worker"))
        self._supervisor.cancel()
        for worker in list(self._workers):
            if worker.state is State.STARTING:
                worker.kill("the pool is closing")
            else:
                self._retire(worker, "the pool is closing")
        deadline = None if grace is None else loop.time() + grace
        while any(worker.inflight for worker in self._workers):
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wait_change()
        for worker in list(self._workers):
            calls, worker.inflight = worker.inflight, []
            if calls:
                worker.kill(f"the pool's close() grace ({grace} s) is over")
            for call in calls:
                call.phase = Phase.DONE
                drop(call)
                if not call.future.done():
                    call.future.set_exception(
                        PoolClosedError(
                            f"the pool closed before worker {worker.pid} answered {call.label}"
                        )
                    )
                    self._counts["failed"] += 1
        if self._tasks:
            await asyncio.wait(set(self._tasks))
