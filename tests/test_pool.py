"""asyncio_amp.pool: a process pool on real child processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp import pool as amp_pool
from asyncio_amp.pool import PoolClosedError, ProcessPool, WorkerCrashedError
from helpers import LONG, SHORT, TIME, eventually
from pool_worker import (
    AskParent,
    BrokenAtStart,
    Die,
    DiesAfterReady,
    Echo,
    Env,
    Fail,
    FailsOnce,
    Hooks,
    IdempotentSleep,
    IgnoresTerm,
    Pid,
    ReadFd,
    Say,
    Sleep,
    SlowStart,
    Spin,
    Sum,
    Worker,
)

HERE = pathlib.Path(__file__).parent
STATS_KEYS = {
    "workers",
    "busy",
    "idle",
    "queued",
    "completed",
    "failed",
    "crashed",
    "recycled",
    "timed_out",
}


class Recorder(logging.Handler):
    """Keeps the pool's log lines, and the pid of every worker it started."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.started: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if line.startswith("started worker "):
            self.started.append(int(line.split()[2]))

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


@pytest.fixture
def log() -> Iterator[Recorder]:
    """The pool's log; at the end, every worker it started must have been reaped."""
    recorder = Recorder()
    logger = logging.getLogger("asyncio_amp.pool")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)
        left = []
        for pid in recorder.started:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # reaped by the pool: good
            # Still running, or a zombie nobody reaped: stop it, and fail.
            if done == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            left.append(pid)
        assert not left, f"workers left behind: {left}"


@contextlib.asynccontextmanager
async def running(worker: Any = Worker, **kwargs: Any) -> AsyncIterator[ProcessPool]:
    """A started pool (output to the log), closed at the end within LONG."""
    kwargs.setdefault("output", "log")
    pool = ProcessPool(worker, **kwargs)
    async with asyncio.timeout(LONG):
        await pool.start()
    try:
        yield pool
    finally:
        async with asyncio.timeout(LONG):
            await pool.close(grace=0)


def gone(pid: int) -> bool:
    """True once ``pid`` (not our child) has exited: no such process, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def start_parent() -> subprocess.Popen[bytes]:
    """A parent process with a pool of two workers (see pool_parent.py)."""
    return subprocess.Popen(
        [sys.executable, str(HERE / "pool_parent.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def reaped(pool: ProcessPool, pid: int) -> None:
    await eventually(lambda: pid not in pool.pids, f"worker {pid} reaped")


# Calls, stats, options


async def test_call_and_stats(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1) as pool:
        assert await pool.call_remote(Sum, a=2, b=3) == {"total": 5}
        assert await pool.call_remote(Sum(a=1, b=1)) == {"total": 2}
        with pytest.raises(ValueError, match="nope"):
            await pool.call_remote(Fail)
        with pytest.raises(TypeError):
            await pool.call_remote(Sum, a=1)  # a missing argument: nothing is sent
        stats = pool.stats()
        assert set(stats) == STATS_KEYS
        assert stats == {
            "workers": 1,
            "busy": 0,
            "idle": 1,
            "queued": 0,
            "completed": 2,
            "failed": 2,
            "crashed": 0,
            "recycled": 0,
            "timed_out": 0,
        }
        (pid,) = pool.pids
    assert log.has(f"started worker {pid}")
    assert log.has(f"worker {pid} exited with status 0")


async def test_worker_class_as_a_string(log: Recorder) -> None:
    async with running("pool_worker:Worker", min_workers=1) as pool:
        assert await pool.call_remote(Sum, a=1, b=2) == {"total": 3}


def test_worker_class_must_be_importable() -> None:
    class Local(amp.AMPProtocol):
        pass

    with pytest.raises(ValueError, match="importable"):
        ProcessPool(Local)
    with pytest.raises(ValueError, match="module:Class"):
        ProcessPool("pool_worker.Worker")
    with pytest.raises(TypeError):
        ProcessPool(object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_workers"):
        ProcessPool(Worker, min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="concurrency"):
        ProcessPool(Worker, concurrency=0)


async def test_calls_before_start_and_after_close(log: Recorder) -> None:
    pool = ProcessPool(Worker, min_workers=0, output="log")
    with pytest.raises(RuntimeError, match="not started"):
        await pool.call_remote(Sum, a=1, b=2)
    async with pool:
        pass
    with pytest.raises(PoolClosedError, match="closed"):
        await pool.call_remote(Sum, a=1, b=2)
    with pytest.raises(RuntimeError):
        await pool.start()


async def test_output_goes_to_the_parent_never_into_the_stream(
    log: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    err: list[str] = []

    def has_both() -> bool:
        err.append(capsys.readouterr().err)
        return "err: hello" in "".join(err) and "out: hello" in "".join(err)

    async with running(min_workers=1, output="stderr") as pool:
        (pid,) = pool.pids
        assert await pool.call_remote(Say, text="hello") == {}
        assert await pool.call_remote(Sum, a=1, b=2) == {"total": 3}
        await eventually(has_both, "both lines on stderr")
    assert f"[worker {pid}] out: hello\n" in "".join(err)
    assert f"[worker {pid}] err: hello\n" in "".join(err)


async def test_output_to_logging(log: Recorder) -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    worker_log = logging.getLogger("asyncio_amp.pool.worker")
    worker_log.addHandler(handler)
    worker_log.setLevel(logging.INFO)
    try:
        async with running(min_workers=1, output="log") as pool:
            (pid,) = pool.pids
            await pool.call_remote(Say, text="logged")
            await eventually(lambda: len(records) >= 2, "two lines logged")
    finally:
        worker_log.removeHandler(handler)
        worker_log.setLevel(logging.NOTSET)
    assert f"[worker {pid}] out: logged" in records
    assert f"[worker {pid}] err: logged" in records


async def test_env_cwd_and_sys_path(log: Recorder, tmp_path: pathlib.Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    async with running(
        min_workers=1, env={"POOL_TEST_VALUE": "42"}, cwd=tmp_path, sys_path=[extra]
    ) as pool:
        answer = await pool.call_remote(Env, name="POOL_TEST_VALUE")
    assert answer["value"] == "42"
    assert answer["cwd"] == str(tmp_path)
    path = answer["path"].split(os.pathsep)
    assert path.index(str(extra)) < path.index(str(HERE))


async def test_hooks_run_in_the_worker(log: Recorder, tmp_path: pathlib.Path) -> None:
    stopped = tmp_path / "stopped"
    async with running(min_workers=1, env={"POOL_TEST_STOPPED": str(stopped)}) as pool:
        assert await pool.call_remote(Hooks) == {"started": True}
        (pid,) = pool.pids
    assert stopped.read_text() == f"{pid}\n"  # worker_stopping ran before it exited


# Sizing


async def test_grows_on_demand_and_shrinks_when_idle(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=3, max_idle=0.3 * TIME) as pool:
        calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.5)) for _ in range(3)]
        await eventually(lambda: pool.stats()["queued"] == 2, "two calls queued")
        assert pool.stats()["workers"] == 3  # two more started for them
        await asyncio.gather(*calls)
        await eventually(lambda: pool.stats()["workers"] == 1, "idle workers stopped")
        assert pool.stats()["idle"] == 1
        assert log.has("idle for")
        assert await pool.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_never_more_than_max_workers(log: Recorder) -> None:
    async with running(min_workers=0, max_workers=2) as pool:
        calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.3)) for _ in range(6)]
        await eventually(lambda: pool.stats()["busy"] == 2, "two busy workers")
        assert pool.stats()["workers"] == 2
        assert pool.stats()["queued"] == 4
        answers = await asyncio.gather(*calls)
        assert len({answer["pid"] for answer in answers}) == 2


async def test_recycle_after_with_calls_queued(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1, recycle_after=2) as pool:
        answers = await asyncio.gather(*(pool.call_remote(Pid) for _ in range(7)))
        per_worker = collections.Counter(answer["pid"] for answer in answers)
        assert max(per_worker.values()) <= 2
        assert len(per_worker) == 4
        assert pool.stats()["recycled"] >= 3
        assert pool.stats()["crashed"] == 0
    assert log.has("recycled after 2 calls")


async def test_concurrency_pipelines_calls_to_a_worker(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1, concurrency=4) as pool:
        started = time.monotonic()
        answers = await asyncio.gather(*(pool.call_remote(Sleep, seconds=0.5) for _ in range(4)))
        elapsed = time.monotonic() - started
    assert len({answer["pid"] for answer in answers}) == 1
    assert elapsed < 1.5 * TIME  # one after the other would take 2 s


async def test_max_queue_makes_callers_wait(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1, max_queue=2) as pool:
        calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.2)) for _ in range(6)]
        await eventually(lambda: pool.stats()["busy"] == 1, "a call runs")
        await asyncio.sleep(SHORT)
        assert pool.stats()["queued"] == 2  # the other three wait for room
        answers = await asyncio.gather(*calls)
        assert len(answers) == 6
        assert pool.stats()["completed"] == 6


async def test_callers_waiting_for_room_count_as_demand(log: Recorder) -> None:
    # A small queue must not hide the demand: the callers waiting for room get
    # workers started for them too, at once, not one start after another.
    async with running(min_workers=0, max_workers=3, max_queue=1) as pool:
        calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.2)) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)  # every caller has queued or is waiting for room
        stats = pool.stats()
        assert (stats["queued"], stats["busy"], stats["idle"]) == (1, 0, 0)  # none ready yet
        assert stats["workers"] == 3
        # (Which worker runs which call depends on how fast each starts.)
        assert len(await asyncio.gather(*calls)) == 3


async def test_a_waiter_cancelled_as_it_gets_room_passes_its_turn(log: Recorder) -> None:
    tasks: dict[str, asyncio.Task[Any]] = {}

    class Canceller(amp.AMPProtocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if "c" in tasks:
                # Runs after the pool woke "c" for the room that this answer made.
                asyncio.get_running_loop().call_soon(tasks.pop("c").cancel)

    async with running(
        min_workers=1, max_workers=1, max_queue=1, parent_protocol=Canceller
    ) as pool:
        a = asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.3))
        await eventually(lambda: pool.stats()["busy"] == 1, "a runs")
        b = asyncio.ensure_future(pool.call_remote(Sleep, seconds=30.0))
        await eventually(lambda: pool.stats()["queued"] == 1, "b is queued")
        tasks["c"] = c = asyncio.ensure_future(pool.call_remote(Sum, a=1, b=1))
        d = asyncio.ensure_future(pool.call_remote(Sum, a=2, b=2))
        await asyncio.sleep(SHORT)
        await a
        with pytest.raises(asyncio.CancelledError):
            await c
        # d takes the room c had, at once (not when b ends, 30 s later).
        await eventually(lambda: pool.stats()["queued"] == 1, "d is queued")
        b.cancel()
        assert await d == {"total": 4}
        with contextlib.suppress(asyncio.CancelledError):
            await b


async def test_a_call_waiting_for_room_when_the_pool_closes_counts_as_failed(
    log: Recorder,
) -> None:
    async with running(min_workers=1, max_workers=1, max_queue=1) as pool:
        calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=30.0)) for _ in range(3)]
        await eventually(lambda: pool.stats()["busy"] == 1, "a call runs")
        await eventually(lambda: pool.stats()["queued"] == 1, "a call is queued")
        await asyncio.sleep(SHORT)  # the third waits for room
        async with asyncio.timeout(LONG):
            await pool.close(grace=0)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, PoolClosedError) for outcome in outcomes)
        # Each of the three went in and raised: each one is counted.
        assert pool.stats()["failed"] == 3


# Cancellation and timeouts


async def test_pool_timeout_kills_the_worker(log: Recorder) -> None:
    async with running(min_workers=2, max_workers=2, timeout=0.5 * TIME) as pool:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.call_remote(Spin, seconds=60.0)
        assert time.monotonic() - started < LONG
        (killing,) = [line for line in log.lines if line.startswith("killing worker ")]
        pid = int(killing.split()[2].rstrip(":"))
        # The very next call never lands on the worker that is being killed.
        answer = await pool.call_remote(Pid)
        assert answer["pid"] != pid
        await reaped(pool, pid)
        stats = pool.stats()
        assert stats["timed_out"] == 1
        assert stats["failed"] == 1
        assert stats["crashed"] == 0
    assert log.has(f"killing worker {pid}")


@pytest.mark.parametrize("how", ["asyncio.timeout", "wait_for", "cancel"])
async def test_cancelled_call_kills_its_worker(log: Recorder, how: str) -> None:
    async with running(min_workers=1, max_workers=1) as pool:
        (pid,) = pool.pids
        if how == "asyncio.timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3 * TIME):
                    await pool.call_remote(Spin, seconds=60.0)
        elif how == "wait_for":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.call_remote(Spin, seconds=60.0), 0.3 * TIME)
        else:
            task = asyncio.ensure_future(pool.call_remote(Spin, seconds=60.0))
            await eventually(lambda: pool.stats()["busy"] == 1, "the call runs")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (await pool.call_remote(Pid))["pid"] != pid
        await reaped(pool, pid)
        assert pool.stats()["timed_out"] == 0  # not the pool's own timeout
        assert pool.stats()["failed"] == 1


async def test_sigkill_after_kill_grace_when_sigterm_is_ignored(log: Recorder) -> None:
    async with running(IgnoresTerm, min_workers=1, max_workers=1, kill_grace=0.3) as pool:
        (pid,) = pool.pids
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2 * TIME):
                await pool.call_remote(Spin, seconds=60.0)
        assert (await pool.call_remote(Pid))["pid"] != pid
        await reaped(pool, pid)
    assert log.has(f"worker {pid} was killed by SIGKILL")


async def test_a_cancelled_queued_call_just_leaves_the_queue(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1) as pool:
        (pid,) = pool.pids
        running_call = asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.5))
        queued = asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.5))
        await eventually(lambda: pool.stats()["queued"] == 1, "a call is queued")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.stats()["queued"] == 0
        assert (await running_call)["pid"] == pid
        assert pool.pids == [pid]
        assert not log.has("killing")


async def test_other_calls_of_a_killed_worker_fail_or_are_retried(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1, concurrency=3) as pool:
        (pid,) = pool.pids
        plain = asyncio.ensure_future(pool.call_remote(Sleep, seconds=30.0))
        idempotent = asyncio.ensure_future(pool.call_remote(IdempotentSleep, seconds=0.2))
        doomed = asyncio.ensure_future(pool.call_remote(Sleep, seconds=30.0))
        await eventually(lambda: pool.stats()["busy"] == 1, "the calls run")
        await asyncio.sleep(SHORT)
        doomed.cancel()
        with pytest.raises(WorkerCrashedError, match=f"worker {pid} was killed"):
            await plain
        answer = await idempotent  # sent again, to the new worker
        assert answer["pid"] != pid
        with pytest.raises(asyncio.CancelledError):
            await doomed


async def test_a_cancel_racing_the_answer_kills_nothing(log: Recorder) -> None:
    # The parent side cancels the caller in the very read that brings its answer.
    victims: list[asyncio.Task[Any]] = []

    class Canceller(amp.AMPProtocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            for task in victims:
                task.cancel()
            victims.clear()

    async with running(min_workers=1, max_workers=1, parent_protocol=Canceller) as pool:
        (pid,) = pool.pids
        task = asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.2))
        await eventually(lambda: pool.stats()["busy"] == 1, "the call runs")
        victims.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await pool.call_remote(Pid))["pid"] == pid  # the same worker
        assert not log.has("killing")
        assert pool.stats()["failed"] == 1


# Crashes


@pytest.mark.parametrize(
    ("how", "status", "returncode"),
    [
        ("exit", "exited with status 3", 3),
        ("kill", "was killed by SIGKILL", -signal.SIGKILL),
        ("segv", "was killed by SIGSEGV", -signal.SIGSEGV),
    ],
)
async def test_a_crash_fails_only_its_calls(
    log: Recorder, how: str, status: str, returncode: int
) -> None:
    async with running(min_workers=1, max_workers=1) as pool:
        (pid,) = pool.pids
        crash = asyncio.ensure_future(pool.call_remote(Die, how=how))
        queued = [asyncio.ensure_future(pool.call_remote(Sum, a=i, b=1)) for i in range(3)]
        with pytest.raises(WorkerCrashedError) as caught:
            await crash
        error = caught.value
        assert f"worker {pid} {status} while running Die" in str(error)
        assert error.pid == pid
        assert error.returncode == returncode
        assert f"dying by {how}" in error.output
        # The queued calls go on, on a new worker.
        assert [(await call)["total"] for call in queued] == [1, 2, 3]
        stats = pool.stats()
        assert stats["crashed"] == 1
        assert stats["failed"] == 1
        assert stats["completed"] == 3
    assert log.has(f"worker {pid} crashed")


async def test_oom_kill_is_a_crash(log: Recorder) -> None:
    # The OOM killer sends SIGKILL, from outside the worker.
    async with running(min_workers=1, max_workers=1) as pool:
        (pid,) = pool.pids
        call = asyncio.ensure_future(pool.call_remote(Sleep, seconds=30.0))
        await eventually(lambda: pool.stats()["busy"] == 1, "the call runs")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="was killed by SIGKILL"):
            await call
        assert (await pool.call_remote(Pid))["pid"] != pid


async def test_a_worker_dead_before_its_call_is_handed_over(log: Recorder) -> None:
    async with running(min_workers=1, max_workers=1) as pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGKILL)  # the pool has not heard of it yet
        try:
            answer = await pool.call_remote(Pid)
        except WorkerCrashedError as error:
            assert error.pid == pid
        else:
            assert answer["pid"] != pid
        assert (await pool.call_remote(Pid))["pid"] != pid


async def test_a_crash_loop_fails_the_waiting_calls_and_does_not_spin(log: Recorder) -> None:
    async with running(BrokenAtStart, min_workers=0, max_workers=2) as pool:
        started = time.monotonic()
        with pytest.raises(WorkerCrashedError, match="keep failing to start") as caught:
            await pool.call_remote(Sum, a=1, b=2)
        assert "this worker cannot start" in caught.value.output
        assert "about to fail" in caught.value.output
        assert len(log.started) == 5
        await asyncio.sleep(0.3 * TIME)
        assert len(log.started) == 5  # it stopped trying
        assert pool.stats()["workers"] == 0
        # A new call tries once more, and fails alike.
        with pytest.raises(WorkerCrashedError, match="keep failing"):
            await pool.call_remote(Sum, a=1, b=2)
        assert len(log.started) == 6
        assert time.monotonic() - started < LONG


async def test_workers_dying_just_after_ready_are_a_crash_loop_too(log: Recorder) -> None:
    async with running(DiesAfterReady, min_workers=1, max_workers=1) as pool:
        await eventually(lambda: len(log.started) == 5 and not pool.pids, "five tries")
        await asyncio.sleep(0.5 * TIME)
        assert len(log.started) == 5  # then it stopped trying
        # A new call tries one more (which may well answer it before dying).
        with contextlib.suppress(WorkerCrashedError):
            await pool.call_remote(Sum, a=1, b=2)
        assert len(log.started) == 6


async def test_start_raises_when_workers_cannot_start(log: Recorder) -> None:
    pool = ProcessPool(BrokenAtStart, min_workers=1, output="log")
    with pytest.raises(WorkerCrashedError, match="this worker cannot start"):
        async with asyncio.timeout(LONG):
            await pool.start()
    assert pool.closed
    with pytest.raises(PoolClosedError):
        await pool.call_remote(Sum, a=1, b=2)


async def test_a_worker_that_dies_while_starting_is_replaced(
    log: Recorder, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "marker"
    async with running(FailsOnce, min_workers=1, env={"POOL_TEST_MARKER": str(marker)}) as pool:
        assert await pool.call_remote(Sum, a=1, b=2) == {"total": 3}
        assert len(log.started) == 2
    assert log.has("failed to start: it exited with status 7")


async def test_start_timeout(log: Recorder) -> None:
    pool = ProcessPool(SlowStart, min_workers=1, start_timeout=0.2, output="log")
    with pytest.raises(WorkerCrashedError, match="keep failing to start"):
        async with asyncio.timeout(LONG):
            await pool.start()
    assert log.has("was not ready within start_timeout")


# Both directions, every argument type


async def test_workers_call_the_parent(log: Recorder) -> None:
    class Parent(amp.AMPProtocol):
        @Sum.responder
        def sum(self, a: int, b: int) -> dict[str, int]:
            return {"total": a + b + 1000}

    async with running(min_workers=1, parent_protocol=Parent) as pool:
        assert await pool.call_remote(AskParent, a=1, b=2) == {"total": 1003}


async def test_big_values(log: Recorder) -> None:
    data = os.urandom(1_000_000)
    async with running(min_workers=1) as pool:
        answer = await pool.call_remote(Echo, data=data)
    assert answer == {"data": data, "length": len(data)}


@pytest.mark.asyncio_loop_only  # uvloop cannot pass descriptors
async def test_descriptors(log: Recorder) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"through the pool")
    os.close(write_end)
    async with running(min_workers=1) as pool:
        (pid,) = pool.pids
        answer = await pool.call_remote(ReadFd, fd=read_end)
    os.close(read_end)
    assert answer["data"] == b"through the pool"
    with os.fdopen(answer["reply"], "rb") as reply:
        assert reply.read() == f"from {pid}".encode()


# No orphans


@pytest.mark.asyncio_loop_only
async def test_workers_exit_when_the_parent_is_killed(log: Recorder) -> None:
    parent = start_parent()
    try:
        assert parent.stdout is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(LONG):
            line = await loop.run_in_executor(None, parent.stdout.readline)
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2
        assert not any(gone(pid) for pid in pids)
        os.kill(parent.pid, signal.SIGKILL)
        killed = time.monotonic()
        await eventually(lambda: all(gone(pid) for pid in pids), "the workers exited")
        # One worker was busy (PR_SET_PDEATHSIG), one idle (EOF on its socket).
        assert time.monotonic() - killed < 1.0 * TIME
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(timeout=LONG)
        if parent.stdout is not None:
            parent.stdout.close()


async def test_close_under_load(log: Recorder) -> None:
    pool = ProcessPool(Worker, min_workers=2, max_workers=2, output="log")
    await pool.start()
    calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=0.3)) for _ in range(10)]
    await eventually(lambda: pool.stats()["busy"] == 2, "two calls run")
    async with asyncio.timeout(LONG):
        closing = asyncio.ensure_future(pool.close(grace=LONG))
        await asyncio.sleep(0)
        with pytest.raises(PoolClosedError, match="closing"):
            await pool.call_remote(Sum, a=1, b=1)
        await closing
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    answered = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, PoolClosedError)]
    assert len(answered) == 2  # the running calls finished
    assert len(refused) == 8  # the queued ones failed at once
    assert pool.stats()["workers"] == 0
    assert log.lines.count("stopping worker") == 0
    assert sum("exited with status 0" in line for line in log.lines) == 2


async def test_close_kills_calls_still_running_after_grace(log: Recorder) -> None:
    pool = ProcessPool(Worker, min_workers=1, max_workers=1, output="log")
    await pool.start()
    (pid,) = pool.pids
    call = asyncio.ensure_future(pool.call_remote(Spin, seconds=60.0))
    await eventually(lambda: pool.stats()["busy"] == 1, "the call runs")
    started = time.monotonic()
    async with asyncio.timeout(LONG):
        await pool.close(grace=0.2)
    assert time.monotonic() - started < 0.2 + 2 * pool.kill_grace + 1.0 * TIME
    with pytest.raises(PoolClosedError, match=f"worker {pid}"):
        await call
    assert pool.pids == []


async def test_close_while_a_worker_starts(log: Recorder) -> None:
    pool = ProcessPool(SlowStart, min_workers=0, output="log")
    await pool.start()
    call = asyncio.ensure_future(pool.call_remote(Sum, a=1, b=1))
    await eventually(lambda: bool(log.started), "a worker started")
    async with asyncio.timeout(LONG):
        await pool.close()
    with pytest.raises(PoolClosedError):
        await call
    assert pool.stats()["workers"] == 0


async def test_close_right_after_a_kill_starts_a_replacement(log: Recorder) -> None:
    # The replacement's task has not run yet when close() kills it: it must not
    # spawn a worker that nobody stops.
    pool = ProcessPool(Worker, min_workers=1, max_workers=1, output="log")
    await pool.start()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3 * TIME):
            await pool.call_remote(Spin, seconds=60.0)
    async with asyncio.timeout(LONG):
        await pool.close(grace=0)
    assert pool.stats()["workers"] == 0


async def test_close_while_start_waits_for_workers(log: Recorder) -> None:
    pool = ProcessPool(SlowStart, min_workers=1, output="log")
    starting = asyncio.ensure_future(pool.start())
    await eventually(lambda: bool(log.started), "a worker started")
    async with asyncio.timeout(LONG):
        await pool.close()
        with pytest.raises(PoolClosedError):
            await starting


async def test_close_twice_and_concurrently(log: Recorder) -> None:
    pool = ProcessPool(Worker, min_workers=1, output="log")
    await pool.start()
    async with asyncio.timeout(LONG):
        await asyncio.gather(pool.close(), pool.close())
        await pool.close()
    assert pool.closed


async def test_close_again_after_a_cancelled_close_waits_for_the_workers(log: Recorder) -> None:
    pool = ProcessPool(Worker, min_workers=2, max_workers=2, output="log")
    await pool.start()
    pids = pool.pids
    calls = [asyncio.ensure_future(pool.call_remote(Sleep, seconds=LONG)) for _ in range(2)]
    await eventually(lambda: pool.stats()["busy"] == 2, "two calls run")
    closing = asyncio.ensure_future(pool.close(grace=LONG))
    await asyncio.sleep(SHORT)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    # The cancelled close() killed the workers; close() again returns once they
    # are reaped, as any close() does.
    async with asyncio.timeout(LONG):
        await pool.close()
    assert pool.stats()["workers"] == 0
    assert pool.pids == []
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  (WNOHANG: it never blocks)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(outcome, WorkerCrashedError) for outcome in outcomes), outcomes


def test_public_names_are_documented() -> None:
    for name in amp_pool.__all__:
        assert getattr(amp_pool, name).__doc__, name
    assert set(amp_pool.__all__) == {"PoolClosedError", "ProcessPool", "WorkerCrashedError"}


def resources() -> dict[str, int]:
    """What a pool could leak: open descriptors, tasks, threads, child processes (zombies too)."""
    parent = str(os.getpid())
    children = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            children += fields[1] == parent
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "children": children,
    }


async def test_no_leak_across_real_worker_cycles(log: Recorder) -> None:
    # Spawning an interpreter takes about half a second on a loaded 2-core
    # machine, so 1,000 real cycles would take minutes: a dozen real ones, with
    # calls, kills and crashes, must leave exactly what was there before.
    async with running(min_workers=1):
        pass  # the first cycle loads what stays loaded (modules, the loop's own fds)
    before = resources()
    for cycle in range(12):
        async with running(min_workers=1, max_workers=2, timeout=0.3 * TIME) as pool:
            assert await pool.call_remote(Sum, a=cycle, b=1) == {"total": cycle + 1}
            if cycle % 3 == 1:
                with pytest.raises(TimeoutError):
                    await pool.call_remote(Spin, seconds=60.0)
            elif cycle % 3 == 2:
                with pytest.raises(WorkerCrashedError):
                    await pool.call_remote(Die, how="exit")
        assert resources() == before, f"cycle {cycle}"
    assert len(log.started) >= 13


async def test_a_thousand_start_close_cycles_leave_nothing(log: Recorder) -> None:
    # The pool's own machinery (its futures, handles, tasks) across 1,000
    # cycles; real workers are counted by the test above.
    pool = ProcessPool(Worker, min_workers=0, output="log")
    async with pool:
        pass
    before = resources()
    for _ in range(1000):
        pool = ProcessPool(Worker, min_workers=0, output="log")
        async with pool:
            assert pool.stats()["workers"] == 0
        with pytest.raises(PoolClosedError):
            await pool.call_remote(Sum, a=1, b=1)
    assert resources() == before


def test_the_cycles_script_runs_and_finds_nothing_left() -> None:
    # tests/pool_cycles.py runs the real cycles above a thousand times by hand;
    # here, a few, so that it keeps working.
    script = pathlib.Path(__file__).with_name("pool_cycles.py")
    result = subprocess.run(
        [sys.executable, str(script), "--cycles", "3"],
        capture_output=True,
        text=True,
        timeout=60 * TIME,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 cycles in" in result.stdout
    assert "nothing left" in result.stdout
