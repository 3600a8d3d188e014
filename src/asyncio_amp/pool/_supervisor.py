"""
Worker supervision for ProcessPool: how many workers run, failed starts, idle ones.

The pool decides which call goes where (``_pool``); this module decides when a
worker starts and when an idle one stops:

* **Sizing.** ``ensure_workers`` starts workers for ``min_workers`` and for the
  calls waiting in the queue or for room in it (each starting worker will take
  ``concurrency`` of them), never above ``max_workers``. The pool calls it after
  every event that may change the need: a call queued or waiting for room, a
  worker killed, retired or dead.
* **Failed starts and crash loops.** A worker that dies before it is ready, or
  soon after without having been given a call, failed to start. After a failed
  start the next one waits (doubling from ``BACKOFF_FIRST`` up to
  ``BACKOFF_MAX``) and workers start one at a time; after
  ``MAX_START_FAILURES`` in a row, the supervisor gives up: the calls waiting
  fail with the last worker's output, and a new start is tried only when a new
  call comes (the pool clears ``gave_up``). A worker that proves healthy resets
  the count.
* **Idle shrink.** A worker with no call in flight for ``max_idle`` seconds is
  retired, down to ``min_workers``; one timer covers every idle worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ._errors import WorkerCrashedError
from ._worker import State, Worker

if TYPE_CHECKING:
    from ._pool import ProcessPool

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp.pool")

# Workers that die at start this many times in a row are a crash loop: the calls
# that wait fail, and a new start is tried only when a new call comes.
MAX_START_FAILURES = 5
# The wait before the n-th start after n-1 failed ones: doubling from
# BACKOFF_FIRST up to BACKOFF_MAX, so a crash loop never spins.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
# A worker that dies within this many seconds of being ready, before it was given
# any call, failed to start too; and failed starts are forgotten once a worker
# has been ready this long (or got calls).
HEALTHY = 1.0


class Supervisor:
    """Starts a pool's workers as needed, backs off failed starts, stops idle workers."""

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.start_failures = 0  # failed starts in a row
        self.last_failure: WorkerCrashedError | None = None
        self.gave_up = False  # a crash loop: no start until a new call comes
        self.spawn_after = 0.0  # loop time before which no start is tried (backoff)
        self.spawn_handle: asyncio.TimerHandle | None = None
        self.idle_handle: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """Cancel the timers (the pool is closing)."""
        for handle in (self.spawn_handle, self.idle_handle):
            if handle is not None:
                handle.cancel()
        self.spawn_handle = self.idle_handle = None

    def start_failed(self, worker: Worker, status: str, returncode: int | None, tail: str) -> None:
        pool = self.pool
        self.start_failures += 1
        failures = self.start_failures
        reason = worker.reason or f"it {status}"
        shown = f"; its last output:\n{tail}" if tail else ""
        logger.warning("worker %s failed to start: %s%s", worker.pid, reason, shown)
        assert pool._loop is not None
        self.spawn_after = pool._loop.time() + min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
        if failures < MAX_START_FAILURES or pool._phase != "running":
            return
        error = WorkerCrashedError(
            f"workers of {pool._target} keep failing to start ({failures} in a row): "
            f"the last one {status}{shown}",
            pid=worker.pid,
            returncode=returncode,
            output=tail,
        )
        self.last_failure = error
        self.gave_up = True
        if not pool._ready:  # else the workers still running take the queued calls
            pool._fail_queue(error)

    def ensure_workers(self) -> None:
        """Start workers for min_workers and for the waiting calls, up to max_workers."""
        pool = self.pool
        if pool._phase != "running" or self.gave_up:
            return
        live = [w for w in pool._workers if w.state in (State.STARTING, State.READY)]
        starting = sum(1 for w in live if w.state is State.STARTING)
        wanted = pool.min_workers - len(live)
        # The callers waiting for room in a full queue are demand too.
        waiting = pool._queued + len(pool._room)
        if waiting:
            # Each starting worker will take `concurrency` of the waiting calls.
            extra = waiting - starting * pool.concurrency
            wanted = max(wanted, -(-extra // pool.concurrency))
        wanted = min(wanted, pool.max_workers - len(live))
        if wanted <= 0:
            return
        assert pool._loop is not None
        now = pool._loop.time()
        if self.start_failures and any(
            worker.assigned or now - worker.ready_at >= HEALTHY for worker in pool._ready
        ):
            self.start_failures = 0  # workers start fine again
        delay = self.spawn_after - now
        if self.start_failures and delay > 0:
            if self.spawn_handle is None:
                self.spawn_handle = pool._loop.call_later(delay, self.spawn_later)
            return
        if self.start_failures:
            wanted = 1  # after a failed start, one at a time
        for _ in range(wanted):
            worker = Worker(pool)
            pool._workers.append(worker)
            worker.start()
            assert worker.task is not None
            pool._tasks.add(worker.task)
            worker.task.add_done_callback(pool._tasks.discard)

    def spawn_later(self) -> None:
        self.spawn_handle = None
        self.ensure_workers()

    def went_idle(self, worker: Worker) -> None:
        pool = self.pool
        if pool.max_idle is None or len(pool._ready) <= pool.min_workers:
            return
        assert pool._loop is not None
        worker.idle_since = now = pool._loop.time()
        if self.idle_handle is None:
            self.idle_handle = pool._loop.call_at(now + pool.max_idle, self.stop_idle)

    def stop_idle(self) -> None:
        """Stop the workers idle for max_idle, down to min_workers."""
        pool = self.pool
        self.idle_handle = None
        assert pool._loop is not None and pool.max_idle is not None
        now = pool._loop.time()
        ready = len(pool._ready)
        soonest: float | None = None
        for worker in list(pool._ready):
            if worker.inflight or ready <= pool.min_workers:
                continue
            deadline = worker.idle_since + pool.max_idle
            if deadline <= now:
                pool._retire(worker, f"idle for {pool.max_idle} s")
                ready -= 1
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if soonest is not None and ready > pool.min_workers:
            self.idle_handle = pool._loop.call_at(soonest, self.stop_idle)
