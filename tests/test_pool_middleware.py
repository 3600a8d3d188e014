"""ProcessPool(middleware=...): middleware on the parent's side of every worker connection."""

from __future__ import annotations

from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp.pool import ProcessPool
from pool_worker import AskParent, Sleep, Sum
from test_pool import Recorder, log, running

__all__ = ["log"]  # the fixture, used by name


class Counter(amp.Middleware):
    """Counts the calls it sees, by direction and command name."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.answers: list[dict[str, Any]] = []

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.seen.append(("incoming", call.name))
        return await call_next(call)

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        self.seen.append(("outgoing", call.name))
        answer = await call_next(call)
        self.answers.append(answer)
        return answer


class Refused(Exception):
    pass


class RefuseSleep(amp.Middleware):
    """Refuses every Sleep call before it reaches a worker."""

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.command is Sleep:
            raise Refused(f"{call.name} is not allowed")
        return await call_next(call)


class Parent(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b + 1000}


async def test_middleware_sees_every_call_both_ways(log: Recorder) -> None:
    counter = Counter()
    async with running(
        min_workers=2, max_workers=2, concurrency=4, parent_protocol=Parent, middleware=[counter]
    ) as pool:
        for i in range(20):
            assert await pool.call_remote(Sum, a=i, b=1) == {"total": i + 1}
        assert await pool.call_remote(AskParent, a=1, b=2) == {"total": 1003}
        stats = pool.stats()
    outgoing = [name for direction, name in counter.seen if direction == "outgoing"]
    incoming = [name for direction, name in counter.seen if direction == "incoming"]
    # The workers' Ready is the pool's own: the middleware never sees it.
    assert outgoing == ["Sum"] * 20 + ["AskParent"]
    assert incoming == ["Sum"]
    assert counter.answers[:3] == [{"total": 1}, {"total": 2}, {"total": 3}]
    assert stats["completed"] == 21
    assert stats["failed"] == 0


async def test_a_refused_call_fails_and_the_pool_goes_on(log: Recorder) -> None:
    counter = Counter()
    async with running(min_workers=1, max_workers=1, middleware=[counter, RefuseSleep()]) as pool:
        pid = pool.pids[0]
        with pytest.raises(Refused, match="Sleep is not allowed"):
            await pool.call_remote(Sleep, seconds=0.0)
        assert await pool.call_remote(Sum, a=2, b=3) == {"total": 5}
        assert pool.pids == [pid]  # the worker was not killed
        stats = pool.stats()
    # The outer middleware saw the refused call, and the refusal.
    assert [name for _, name in counter.seen] == ["Sleep", "Sum"]
    assert stats["failed"] == 1
    assert stats["completed"] == 1
    assert stats["crashed"] == 0


async def test_middleware_is_checked_at_once() -> None:
    with pytest.raises(TypeError, match="Middleware"):
        ProcessPool("pool_worker:Worker", middleware=[object()])  # type: ignore[list-item]
