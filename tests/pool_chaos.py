"""
A randomized chaos test of ProcessPool, seeded and reproducible, with real workers.

Each seed gives one scenario: a small pool (``min_workers`` 0 or 1, ``max_workers``
2, ``concurrency`` 1 to 3, a tiny ``max_queue``, sometimes ``recycle_after``, a
short ``timeout`` and ``max_idle``) and a few dozen callers, each starting at a
random moment with a random call: quick ones, slow ones, calls that end their
worker (``os._exit``, SIGKILL of itself), calls that hang past the timeout, calls
whose responder raises a mapped error, idempotent and non-idempotent ones. Some
callers are cancelled after a random delay (which lands at whatever await the
call is at); workers are SIGKILLed from outside by pid; and ``close()`` comes at
a random moment with a random grace (or after every call ended), sometimes
cancelled and called again.

The invariants, checked for every scenario:

* every call ends, once, within a deadline, with its answer or one of the
  documented exceptions: ``WorkerCrashedError``, ``TimeoutError`` (only with a
  timeout), ``CancelledError`` (only if cancelled), ``PoolClosedError`` (only
  once ``close()`` was called), the command's mapped error;
* the calls that return an answer ran; a non-idempotent call never runs twice
  (each worker writes the id of every call it starts to a log file);
* ``stats()`` adds up: ``busy + idle == workers`` once quiet, ``queued`` back to
  0, ``completed + failed`` equal to the calls that went in;
* no callback raised in the event loop, and after ``close()``: no worker process
  left (by pid, zombies included), no descriptor and no task left.

Run long from the command line, many seeds, bounded in time::

    python tests/pool_chaos.py --seconds 600 --seed 1000 [--loop uvloop]

Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import random
import signal
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncio_amp as amp
from asyncio_amp.pool import PoolClosedError, ProcessPool, WorkerCrashedError
from chaos import Report, command_line
from pool_worker import Die, Fail, Sleep, Sum, Worker

#: Multiply every time bound by this (AMP_TEST_TIME_SCALE) on a slow machine.
TIME = float(os.environ.get("AMP_TEST_TIME_SCALE", "1"))
#: How long the calls of one scenario may take to end, all of them.
CALL_DEADLINE = 25.0 * TIME
#: The bound on close() and on the quiet-pool checks.
PHASE_DEADLINE = 8.0 * TIME
HERE = pathlib.Path(__file__).parent
#: The environment variable that names a worker's log of the calls it starts.
LOG_VARIABLE = "POOL_CHAOS_LOG"


class Note(amp.Command):
    """Write the call's id to the log, wait, answer. Not idempotent."""

    arguments = [("id", amp.Integer()), ("seconds", amp.Float())]
    response = [("id", amp.Integer()), ("pid", amp.Integer())]


class IdempotentNote(amp.Command):
    """The same call, idempotent: the pool may run it again elsewhere."""

    arguments = [("id", amp.Integer()), ("seconds", amp.Float())]
    response = [("id", amp.Integer()), ("pid", amp.Integer())]
    idempotent = True


class ChaosWorker(Worker):
    """The tests' usual worker, plus the two calls that leave a trace."""

    @Note.responder
    @IdempotentNote.responder
    async def note(self, id: int, seconds: float) -> dict[str, int]:
        fd = os.open(os.environ[LOG_VARIABLE], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{id} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        await asyncio.sleep(seconds)
        return {"id": id, "pid": os.getpid()}


@dataclasses.dataclass
class Plan:
    """One caller: what it calls, when, and whether it is cancelled."""

    id: int
    kind: str
    start: float
    seconds: float = 0.0
    cancel_after: float | None = None
    # What happened: ("answer", value) or ("error", exception), and when.
    outcome: tuple[str, Any] | None = None
    outcomes: int = 0
    refused_at_entry: bool = False

    def describe(self) -> str:
        cancel = "" if self.cancel_after is None else f" cancel@{self.cancel_after:.3f}"
        return f"#{self.id} {self.kind}({self.seconds:.2f}) @{self.start:.3f}{cancel}"


KINDS = {
    # kind: weight
    "quick": 5,
    "note": 4,
    "idempotent": 4,
    "slow": 2,
    "hang": 1,
    "exit": 1,
    "kill": 1,
    "fail": 1,
}


@dataclasses.dataclass
class Scenario:
    seed: int
    options: dict[str, Any]
    plans: list[Plan]
    kills: list[float]
    close_at: float | None  # None: after every call ended
    grace: float
    cancel_close: float | None  # cancel close() after this long, and call it again

    def summary(self) -> str:
        close = "after the calls" if self.close_at is None else f"at {self.close_at:.3f}"
        return (
            f"seed {self.seed}: {self.options}, {len(self.plans)} calls, "
            f"kills at {[round(k, 3) for k in self.kills]}, close {close} grace {self.grace}"
            f"{'' if self.cancel_close is None else f' cancelled after {self.cancel_close:.3f}'}"
        )


def make_scenario(seed: int) -> Scenario:
    """The scenario of ``seed``: everything random in a run comes from here."""
    rng = random.Random(seed)
    options: dict[str, Any] = {
        "min_workers": rng.choice([0, 1]),
        "max_workers": 2,
        "concurrency": rng.randint(1, 3),
        "max_queue": rng.randint(1, 4),
        "recycle_after": rng.choice([None, None, 2, 3, 5]),
        "timeout": rng.choice([None, 0.5, 1.0]),
        "max_idle": rng.choice([None, 0.2, 1.0]),
        "kill_grace": rng.choice([0.05, 0.2]),
        "start_timeout": 10.0 * TIME,
    }
    kinds, weights = zip(*KINDS.items(), strict=True)
    plans = []
    for id in range(rng.randint(15, 35)):
        kind = rng.choices(kinds, weights)[0]
        plan = Plan(id, kind, start=rng.uniform(0, 1.2))
        if kind in ("note", "idempotent"):
            plan.seconds = rng.uniform(0, 0.15)
        elif kind == "slow":
            plan.kind = rng.choice(["note", "idempotent"])
            plan.seconds = rng.uniform(0.3, 1.2)
        elif kind == "hang":
            plan.seconds = 30.0
        if rng.random() < 0.25:
            plan.cancel_after = rng.uniform(0, 0.6)
        elif kind == "hang" and options["timeout"] is None:
            plan.cancel_after = rng.uniform(0.2, 1.0)  # else only close() ends it
        plans.append(plan)
    kills = sorted(rng.uniform(0.1, 1.8) for _ in range(rng.choice([0, 0, 1, 2, 3])))
    close_at = None if rng.random() < 0.35 else rng.uniform(0.2, 2.2)
    grace = rng.choice([0.0, 0.05, 0.3, 1.0])
    cancel_close = rng.uniform(0, 0.3) if rng.random() < 0.15 else None
    return Scenario(seed, options, plans, kills, close_at, grace, cancel_close)


def children() -> set[int]:
    """The pids of this process's children, zombies included."""
    parent = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == parent:
                found.add(int(entry))
    return found


def descriptors() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def expected(plan: Plan) -> Any:
    if plan.kind == "quick":
        return {"total": plan.id + 1}
    if plan.kind in ("note", "idempotent"):
        return plan.id
    return None


async def run_seed(seed: int) -> Report:
    """Run the scenario of ``seed`` and check every invariant."""
    scenario = make_scenario(seed)
    report = Report(scenario, [], script="pool_chaos.py")
    problems = report.problems
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    old_handler = loop.get_exception_handler()

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    with tempfile.TemporaryDirectory(prefix="pool-chaos-") as directory:
        log_path = pathlib.Path(directory) / "calls.log"
        children_before = children()
        fds_before = descriptors()
        tasks_before = asyncio.all_tasks()
        loop.set_exception_handler(on_error)
        pool = ProcessPool(
            "pool_chaos:ChaosWorker",
            sys_path=[HERE],
            env={LOG_VARIABLE: str(log_path)},
            output="log",
            **scenario.options,
        )
        began = loop.time()
        closed_at: list[float] = []
        pids_seen: set[int] = set()
        killed: list[int] = []
        try:
            # The calls start with start(): they queue while the first workers start.
            starting = asyncio.create_task(pool.start())
            await asyncio.sleep(0)
            await _play(scenario, pool, began, closed_at, pids_seen, killed, problems)
            try:
                async with asyncio.timeout(PHASE_DEADLINE):
                    await starting
            except PoolClosedError:
                if not closed_at:
                    problems.append("start() raised PoolClosedError before close()")
            except Exception as error:
                problems.append(f"start() raised {error!r}")
        finally:
            try:
                async with asyncio.timeout(PHASE_DEADLINE):
                    await pool.close(grace=0)
            except TimeoutError:
                problems.append("close() did not return")
            loop.set_exception_handler(old_handler)
        report.calls = len(scenario.plans)
        _check_outcomes(scenario, pool, closed_at, killed, log_path, problems)
        problems.extend(f"an event loop callback failed: {error}" for error in loop_errors)
        # Nothing left behind.
        stats = pool.stats()
        if (stats["workers"], stats["busy"], stats["idle"], stats["queued"]) != (0, 0, 0, 0):
            problems.append(f"after close(): {stats}")
        left = children() - children_before
        if left:
            problems.append(f"child processes left after close(): {sorted(left)}")
        if pids_seen & children():
            problems.append(f"workers not reaped: {sorted(pids_seen & children())}")
        tasks = asyncio.all_tasks() - tasks_before
        if tasks:
            problems.append(f"tasks left after close(): {tasks}")
        links = {}
        for fd in descriptors() - fds_before:
            try:
                links[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                links[fd] = "?"
        if "uvloop" in type(loop).__module__:
            # uvloop opens /dev/null once, at its first use, and keeps it for the
            # loop's life: that one is not ours (a second run on the loop adds none).
            devnull = [fd for fd, target in links.items() if target == os.devnull]
            if len(devnull) == 1:
                del links[devnull[0]]
        if links:
            problems.append(f"descriptors left after close(): {links}")
    return report


async def _play(
    scenario: Scenario,
    pool: ProcessPool,
    began: float,
    closed_at: list[float],
    pids_seen: set[int],
    killed: list[int],
    problems: list[str],
) -> None:
    loop = asyncio.get_running_loop()

    async def caller(plan: Plan) -> None:
        await asyncio.sleep(plan.start)
        if pool.closed:
            plan.refused_at_entry = True
        try:
            if plan.kind == "quick":
                answer: Any = await pool.call_remote(Sum, a=plan.id, b=1)
            elif plan.kind == "note":
                answer = (await pool.call_remote(Note, id=plan.id, seconds=plan.seconds))["id"]
            elif plan.kind == "idempotent":
                answer = await pool.call_remote(IdempotentNote, id=plan.id, seconds=plan.seconds)
                answer = answer["id"]
            elif plan.kind == "hang":
                answer = await pool.call_remote(Sleep, seconds=plan.seconds)
            elif plan.kind in ("exit", "kill"):
                answer = await pool.call_remote(Die, how=plan.kind)
            else:
                answer = await pool.call_remote(Fail)
        except BaseException as error:
            plan.outcomes += 1
            plan.outcome = ("error", error)
            if not isinstance(error, Exception | asyncio.CancelledError):
                raise
        else:
            plan.outcomes += 1
            plan.outcome = ("answer", answer)
        finally:
            pids_seen.update(pool.pids)

    tasks = {plan.id: asyncio.create_task(caller(plan)) for plan in scenario.plans}

    async def canceller(plan: Plan) -> None:
        assert plan.cancel_after is not None
        await asyncio.sleep(plan.start + plan.cancel_after)
        tasks[plan.id].cancel()

    async def killer() -> None:
        rng = random.Random(scenario.seed + 1)  # which pid: from the seed too
        for at in scenario.kills:
            await asyncio.sleep(max(0.0, began + at - loop.time()))
            pids = pool.pids
            pids_seen.update(pids)
            if pids:
                pid = rng.choice(sorted(pids))
                os.kill(pid, signal.SIGKILL)  # listed: not reaped yet, so not recycled
                killed.append(pid)

    async def closer() -> None:
        if scenario.close_at is not None:
            await asyncio.sleep(scenario.close_at)
        else:
            await asyncio.wait(tasks.values())
            await _check_quiet(pool, scenario, problems)
        closed_at.append(loop.time())
        if scenario.cancel_close is not None:
            # close() cancelled (as by a timeout around it), then called again.
            first = asyncio.create_task(pool.close(grace=scenario.grace))
            await asyncio.sleep(scenario.cancel_close)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
        await pool.close(grace=scenario.grace)
        # Right as close() returns: every worker reaped.
        pids_seen.update(pool.pids)
        if pool.stats()["workers"] or pids_seen & children():
            problems.append(
                f"close() returned with workers left: {pool.stats()}, "
                f"children {sorted(pids_seen & children())}"
            )

    helpers = [asyncio.create_task(canceller(p)) for p in scenario.plans if p.cancel_after]
    helpers.append(asyncio.create_task(killer()))
    closing = asyncio.create_task(closer())
    try:
        async with asyncio.timeout(CALL_DEADLINE):
            await asyncio.wait(tasks.values())
    except TimeoutError:
        stuck = [p.describe() for p in scenario.plans if not tasks[p.id].done()]
        problems.append(f"calls that never ended: {stuck}; {pool.stats()}; {_state(pool)}")
    for task in helpers:
        task.cancel()
    try:
        async with asyncio.timeout(PHASE_DEADLINE):
            await closing
    except TimeoutError:
        problems.append(f"close(grace={scenario.grace}) did not return; {pool.stats()}")
    for task in [*tasks.values(), *helpers, closing]:
        task.cancel()
    await asyncio.gather(*tasks.values(), *helpers, closing, return_exceptions=True)


def _process_state(pid: int | None) -> str:
    """A process's state and where it waits in the kernel, as /proc says."""
    if pid is None:
        return "none"
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/wchan") as file:
            wchan = file.read()
    except OSError:
        return "gone"
    return f"{state} ({wchan})"


def _state(pool: ProcessPool) -> str:
    """What the pool holds, for the report of a stuck scenario."""
    supervisor = pool._supervisor
    workers = [
        f"{worker!r} expected={worker.expected} reason={worker.reason!r} "
        f"process {_process_state(worker.pid)}"
        for worker in pool._workers
    ]
    return (
        f"workers {workers}, ready {pool._ready}, queue {len(pool._queue)}, "
        f"room waiters {len(pool._room)}, start failures {supervisor.start_failures}, "
        f"gave up {supervisor.gave_up}, spawn timer {supervisor.spawn_handle is not None}"
    )


async def _check_quiet(pool: ProcessPool, scenario: Scenario, problems: list[str]) -> None:
    """Once every call ended: nothing queued, nothing busy, and busy + idle == workers."""
    deadline = asyncio.get_running_loop().time() + PHASE_DEADLINE
    while True:
        stats = pool.stats()
        if (
            stats["queued"] == 0
            and stats["busy"] == 0
            and stats["idle"] == stats["workers"]
            and stats["workers"] >= scenario.options["min_workers"]
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            problems.append(f"the pool never came back to quiet: {stats}; {_state(pool)}")
            return
        await asyncio.sleep(0.01)


def _check_outcomes(
    scenario: Scenario,
    pool: ProcessPool,
    closed_at: list[float],
    killed: list[int],
    log_path: pathlib.Path,
    problems: list[str],
) -> None:
    timeout = scenario.options["timeout"]
    answers = errors = entered = timed_out = cancelled = 0
    kinds: dict[str, int] = {}
    for plan in scenario.plans:
        where = plan.describe()
        if plan.outcomes != 1:
            problems.append(f"{where} ended {plan.outcomes} times")
            continue
        assert plan.outcome is not None
        what, value = plan.outcome
        if not plan.refused_at_entry:
            entered += 1
        if what == "answer":
            answers += 1
            if plan.kind in ("exit", "kill", "fail", "hang") or value != expected(plan):
                problems.append(f"{where}: wrong answer {value!r}")
            continue
        errors += not plan.refused_at_entry
        if not plan.refused_at_entry:
            kinds[type(value).__name__] = kinds.get(type(value).__name__, 0) + 1
        if isinstance(value, asyncio.CancelledError):
            cancelled += 1
            if plan.cancel_after is None and not (closed_at and plan.refused_at_entry):
                problems.append(f"{where}: cancelled, but nobody cancelled it")
        elif isinstance(value, TimeoutError):
            timed_out += 1
            if timeout is None:
                problems.append(f"{where}: TimeoutError without a timeout")
        elif isinstance(value, PoolClosedError):
            if not closed_at:
                problems.append(f"{where}: PoolClosedError before close()")
        elif isinstance(value, WorkerCrashedError):
            pass  # its worker died: any call may share a worker with a crash or a kill
        elif isinstance(value, ValueError) and plan.kind == "fail":
            pass
        else:
            problems.append(f"{where}: unexpected {type(value).__name__}: {value}")
    # Non-idempotent calls never ran twice; answered calls ran.
    ran: dict[int, int] = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            id = int(line.split()[0])
            ran[id] = ran.get(id, 0) + 1
    for plan in scenario.plans:
        runs = ran.get(plan.id, 0)
        if plan.kind == "note" and runs > 1:
            problems.append(f"{plan.describe()}: not idempotent, and ran {runs} times")
        answered = plan.outcome is not None and plan.outcome[0] == "answer"
        if answered and plan.kind in ("note", "idempotent") and runs < 1:
            problems.append(f"{plan.describe()}: answered, but never ran")
    # The counters add up with what the callers saw.
    stats = pool.stats()
    if stats["completed"] + stats["failed"] != entered:
        problems.append(
            f"completed + failed = {stats['completed']} + {stats['failed']}, but {entered} calls "
            f"went in ({answers} answered, {errors} raised: {kinds}): {stats}"
        )
    # A call cancelled (or timed out) just as its answer came is counted
    # completed, though its caller saw the cancellation.
    if not answers <= stats["completed"] <= answers + cancelled + timed_out:
        problems.append(f"completed = {stats['completed']}, but {answers} calls were answered")
    # Crashes are workers that died unasked: killed from outside, or by a Die call.
    dies = sum(1 for plan in scenario.plans if plan.kind in ("exit", "kill"))
    if stats["crashed"] > len(killed) + dies:
        problems.append(f"crashed = {stats['crashed']}, but {len(killed)} kills and {dies} Die")
    if timed_out and stats["timed_out"] > timed_out:
        problems.append(f"timed_out = {stats['timed_out']}, but {timed_out} calls timed out")


if __name__ == "__main__":
    command_line(__doc__, run_seed, CALL_DEADLINE + 3 * PHASE_DEADLINE)
