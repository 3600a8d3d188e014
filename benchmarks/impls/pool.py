"""
The pool workloads: tiny calls and a CPU-bound batch through a process pool.

``_child.py`` calls :func:`run` in one fresh, unpinned process (its workers must
be free to use every CPU). The implementations map onto the table's columns:

* ``amp`` / ``amp-uvloop``: ``asyncio_amp.pool.ProcessPool`` on that loop;
* ``raw`` / ``raw-uvloop``: ``loop.run_in_executor(ProcessPoolExecutor(n), ...)``
  of the same plain function, the asyncio floor a pool is compared with;
* ``twisted``: ampoule's ``ProcessPool`` (AMP to its children) on Twisted's
  default reactor.

Every implementation's workers run the functions of ``poolwork.py``.

* ``pool-c1`` and ``pool-c16``: 2 workers and 100 tiny ``Sum`` calls in flight,
  each slot issuing its next call when its answer comes; asyncio-amp's pool with
  ``concurrency`` 1 or 16 (the executor and ampoule have no such setting: they
  run the same way in both rows). Every answer is checked.
* ``pool-cpu``: a batch of pure-Python ``fib`` calls, all submitted at once,
  run on 1 worker and then on ``os.cpu_count()`` workers (each pool started and
  warmed up before the clock starts); the result is the speed-up and its ratio
  to the ideal (the CPU count). This machine's speed drifts by a fifth from one
  second to the next, so one pair of batches says little: the pair is repeated
  ``rounds`` times, each round timing the same batch on plain processes that
  share it out with no pool at all (``bare``: what the machine offers then),
  and the figures are the medians of the rounds. ``busy`` is the noise-free
  figure: the CPU time the workers spent during the timed batch on all cores,
  over the batch's wall time times the worker count (1.0: no worker ever
  waited for work).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asyncio_amp.pool import ProcessPool
from impls import common
from impls.poolwork import Fib, Sum, fib, tiny

BENCHMARKS = str(Path(__file__).resolve().parent.parent)
WORKER = "impls.poolwork:Worker"


# asyncio: the executor and asyncio-amp's pool behind one small interface


class _Executor:
    def __init__(self, workers: int) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(workers)
        self.loop = asyncio.get_running_loop()

    async def start(self, workers: int) -> None:
        # The executor starts its processes on demand: make them all start now.
        await asyncio.gather(*(self.fib(12) for _ in range(4 * workers)))

    async def sum(self, a: int, b: int) -> int:
        return await self.loop.run_in_executor(self.executor, tiny, a, b)

    async def fib(self, n: int) -> int:
        return await self.loop.run_in_executor(self.executor, fib, n)

    async def close(self) -> None:
        await self.loop.run_in_executor(None, self.executor.shutdown)


class _AMPPool:
    def __init__(self, workers: int, concurrency: int) -> None:
        self.pool = ProcessPool(
            WORKER,
            min_workers=workers,
            max_workers=workers,
            concurrency=concurrency,
            sys_path=[BENCHMARKS],
        )

    async def start(self, workers: int) -> None:
        await self.pool.start()
        await asyncio.gather(*(self.fib(12) for _ in range(4 * workers)))

    async def sum(self, a: int, b: int) -> int:
        answer = await self.pool.call_remote(Sum, a=a, b=b)
        return int(answer["total"])

    async def fib(self, n: int) -> int:
        answer = await self.pool.call_remote(Fib, n=n)
        return int(answer["value"])

    async def close(self) -> None:
        await self.pool.close()


def _new_pool(impl: str, workers: int, concurrency: int) -> _Executor | _AMPPool:
    if impl.startswith("raw"):
        return _Executor(workers)
    return _AMPPool(workers, concurrency)


async def _slot(pool: _Executor | _AMPPool, meter: common.Meter, base: int) -> None:
    i = 0
    while not meter.done:
        a, b = base + i, i
        total = await pool.sum(a, b)
        if total != a + b:
            raise AssertionError(f"Sum({a}, {b}) answered {total}")
        meter.tick()
        i += 1


async def _tiny(impl: str, params: dict[str, Any]) -> dict[str, Any]:
    warnings = common.capture_warnings("asyncio_amp", "asyncio")
    loop = asyncio.get_running_loop()
    workers = params["workers"]
    pool = _new_pool(impl, workers, params["concurrency"])
    errors: list[str] = []
    try:
        await pool.start(workers)
        meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
        finished = loop.create_future()
        meter.on_done = lambda: finished.done() or finished.set_result(None)

        def check(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                errors.append(repr(task.exception()))
                meter.stop_early()

        tasks = []
        for k in range(params["inflight"]):
            task = loop.create_task(_slot(pool, meter, k * 1_000_000_000))
            task.add_done_callback(check)
            tasks.append(task)
        try:
            await asyncio.wait_for(finished, params["warmup"] + params["cap"])
        except TimeoutError:
            errors.append("time cap reached before the measurement ended")
            meter.stop_early()
        _, late = await asyncio.wait(tasks, timeout=10)
        if late:
            errors.append(f"{len(late)} slots still waiting for an answer 10 s after the end")
            for task in late:
                task.cancel()
    finally:
        await asyncio.wait_for(pool.close(), 30)
    return meter.result(errors=errors + warnings, workers=workers)


# The same batch on plain processes that share it out, with no pool at all: the
# speed-up that this machine offers at this moment. It is far from the CPU count
# when other work takes a CPU; the pools are compared with it too.
BARE = """
import sys
from impls.poolwork import fib
n, calls = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
for _ in range(calls):
    fib(n)
print("done", flush=True)
"""


def _bare_batch(workers: int, params: dict[str, Any]) -> float:
    """Seconds for the fib batch shared out over ``workers`` plain processes, once they run."""
    n, calls = params["fib"], params["calls"]
    shares = [calls // workers + (1 if i < calls % workers else 0) for i in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BARE, str(n), str(share)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=BENCHMARKS,
        )
        for share in shares
    ]
    try:
        time.sleep(0.3)  # let them import
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "done":
                raise RuntimeError("a bare process did not finish its share")
        return time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


TICKS = os.sysconf("SC_CLK_TCK")


def children_cpu() -> dict[int, float]:
    """CPU seconds used so far by each live child of this process (from ``/proc``).

    Every pool here starts its workers as direct children, so this is the same
    measurement for all of them.
    """
    me = os.getpid()
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: fields count from the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me:  # ppid
            used[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return used


def busy(before: dict[int, float], after: dict[int, float], seconds: float, workers: int) -> float:
    """The workers' CPU time between two :func:`children_cpu` readings, per worker-second."""
    spent = sum(after[pid] - before.get(pid, 0.0) for pid in after)
    return spent / (seconds * workers)


async def _batch(impl: str, workers: int, params: dict[str, Any]) -> tuple[float, float]:
    """Seconds for the fib batch on ``workers`` workers once they are all up, and their ``busy``."""
    pool = _new_pool(impl, workers, 1)
    try:
        await pool.start(workers)
        n, calls = params["fib"], params["calls"]
        expected = fib(n)
        before = children_cpu()
        started = time.perf_counter()
        async with asyncio.timeout(params["cap"]):
            values = await asyncio.gather(*(pool.fib(n) for _ in range(calls)))
        seconds = time.perf_counter() - started
        after = children_cpu()
        if any(value != expected for value in values):
            raise AssertionError(f"fib({n}) answered a wrong value")
        return seconds, busy(before, after, seconds, workers)
    finally:
        await asyncio.wait_for(pool.close(), 30)


class Rounds:
    """The timed batches of every round of ``pool-cpu``, and their medians."""

    def __init__(self, cores: int, params: dict[str, Any]) -> None:
        self.cores = cores
        self.params = params
        self.rounds: list[dict[str, float]] = []

    def bare(self) -> dict[str, float]:
        """Time the bare batch on 1 process, then on one per CPU: the start of a round."""
        one = _bare_batch(1, self.params)
        return {"bare_seconds_1": one, "bare_seconds_all": _bare_batch(self.cores, self.params)}

    def add(self, bare: dict[str, float], one: float, all_cores: float, busy_all: float) -> None:
        """Record a round: its bare figures, and the pool's two batches."""
        self.rounds.append(
            {
                **bare,
                "bare_speedup": bare["bare_seconds_1"] / bare["bare_seconds_all"],
                "seconds_1_worker": one,
                "seconds_all_workers": all_cores,
                "speedup": one / all_cores,
                "busy": busy_all,
            }
        )

    def result(self, errors: list[str]) -> dict[str, Any]:
        """The medians over the rounds, and every round."""
        if not self.rounds:
            return {"complete": False, "errors": [*errors, "no round finished"]}

        def median(key: str) -> float:
            return statistics.median(r[key] for r in self.rounds)

        speedup = median("speedup")
        return {
            "complete": not errors,
            "errors": errors,
            "cores": self.cores,
            "calls": self.params["calls"],
            "fib": self.params["fib"],
            "seconds_1_worker": median("seconds_1_worker"),
            "seconds_all_workers": median("seconds_all_workers"),
            "speedup": speedup,
            "of_ideal": speedup / self.cores,
            "bare_speedup": median("bare_speedup"),
            "of_bare": statistics.median(r["speedup"] / r["bare_speedup"] for r in self.rounds),
            "busy": median("busy"),
            "rounds": self.rounds,
        }


async def _cpu(impl: str, params: dict[str, Any]) -> dict[str, Any]:
    warnings = common.capture_warnings("asyncio_amp", "asyncio")
    rounds = Rounds(os.cpu_count() or 1, params)
    for _ in range(params["rounds"]):
        bare = rounds.bare()
        one, _ = await _batch(impl, 1, params)
        all_cores, busy_all = await _batch(impl, rounds.cores, params)
        rounds.add(bare, one, all_cores, busy_all)
    return rounds.result(warnings)


# Twisted: ampoule


def _ampoule(workload: str, params: dict[str, Any]) -> dict[str, Any]:
    # Imported here: the asyncio implementations' processes load no Twisted.
    from ampoule import main as ampoule_main  # noqa: PLC0415
    from ampoule.pool import ProcessPool as AmpoulePool  # noqa: PLC0415
    from twisted.internet import defer, reactor  # noqa: PLC0415

    from impls import ampoulework  # noqa: PLC0415

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (BENCHMARKS, env.get("PYTHONPATH", "")) if p)
    errors: list[str] = []
    out: dict[str, Any] = {}

    def new_pool(workers: int) -> Any:
        # No recycling (ampoule recycles after 500 calls by default; the others never).
        return AmpoulePool(
            ampoulework.Child,
            min=workers,
            max=workers,
            recycleAfter=0,
            starter=ampoule_main.ProcessStarter(env=env, packages=("twisted",)),
        )

    @defer.inlineCallbacks
    def warm(pool: Any, workers: int) -> Any:
        yield pool.start()
        yield defer.gatherResults([pool.doWork(ampoulework.Fib, n=12) for _ in range(4 * workers)])

    @defer.inlineCallbacks
    def tiny_calls() -> Any:
        workers = params["workers"]
        pool = new_pool(workers)
        yield warm(pool, workers)
        meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
        finished: defer.Deferred[None] = defer.Deferred()
        meter.on_done = lambda: finished.called or finished.callback(None)

        outstanding: set[Any] = set()

        def issue(a: int, b: int) -> None:
            d = pool.doWork(ampoulework.Sum, a=a, b=b)
            outstanding.add(d)
            d.addBoth(lambda result: outstanding.discard(d) or result)
            d.addCallbacks(answered, failed, callbackArgs=(a, b))

        def answered(answer: dict[str, Any], a: int, b: int) -> None:
            if answer["total"] != a + b:
                errors.append(f"Sum({a}, {b}) answered {answer['total']}")
                meter.stop_early()
                return
            meter.tick()
            if not meter.done:
                issue(a + 1, b + 1)

        def failed(failure: Any) -> None:
            errors.append(failure.getErrorMessage())
            meter.stop_early()

        for k in range(params["inflight"]):
            issue(k * 1_000_000_000, 0)
        cap = reactor.callLater(params["warmup"] + params["cap"], meter.stop_early)
        yield finished
        if cap.active():
            cap.cancel()
        out.update(meter.result(workers=workers))
        # The calls in flight finish (bounded), then the pool stops; its stop() is
        # not awaited: it can take ampoule many seconds, and its children exit
        # when this process does.
        drained: defer.Deferred[Any] = defer.DeferredList(list(outstanding), consumeErrors=True)
        late = reactor.callLater(10, drained.cancel)
        yield drained
        if late.active():
            late.cancel()
        if outstanding:
            errors.append(f"{len(outstanding)} calls unanswered 10 s after the end")
        pool.stop()

    @defer.inlineCallbacks
    def batch(workers: int) -> Any:
        pool = new_pool(workers)
        yield warm(pool, workers)
        n, calls = params["fib"], params["calls"]
        before = children_cpu()
        started = time.perf_counter()
        answers = yield defer.gatherResults(
            [pool.doWork(ampoulework.Fib, n=n) for _ in range(calls)]
        )
        seconds = time.perf_counter() - started
        after = children_cpu()
        if any(answer["value"] != fib(n) for answer in answers):
            errors.append(f"fib({n}) answered a wrong value")
        pool.stop()  # as above: not awaited (an idle child uses no CPU meanwhile)
        return seconds, busy(before, after, seconds, workers)

    @defer.inlineCallbacks
    def cpu() -> Any:
        rounds = Rounds(os.cpu_count() or 1, params)
        for _ in range(params["rounds"]):
            bare = rounds.bare()
            one, _ = yield batch(1)
            all_cores, busy_all = yield batch(rounds.cores)
            rounds.add(bare, one, all_cores, busy_all)
        out.update(rounds.result([]))

    def main() -> None:
        d = cpu() if workload == "pool-cpu" else tiny_calls()
        d.addErrback(lambda failure: errors.append(failure.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.callLater(params["lifetime"], reactor.stop)
    reactor.run(installSignalHandlers=False)
    if not out:
        out["complete"] = False
    if errors:
        out["complete"] = False
    out["errors"] = list(out.get("errors") or []) + errors
    return out


def run(impl: str, workload: str, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run one pool workload on ``impl`` in this process."""
    if impl == "twisted":
        return _ampoule(workload, params)
    if workload == "pool-cpu":
        result: dict[str, Any] = common.run_on_loop(loop or "asyncio", lambda: _cpu(impl, params))
    else:
        result = common.run_on_loop(loop or "asyncio", lambda: _tiny(impl, params))
    return result
