"""
The chaos test of ProcessPool, short and seeded, for CI (the harness is pool_chaos.py).

Each test runs one seed's scenario (a small pool of real workers; callers with
random calls, cancelled at random moments; workers that crash or are killed by
pid; close() at a random moment) and checks every invariant of pool_chaos.py.
A failing seed prints its scenario and what broke. Longer runs, from the
command line::

    python tests/pool_chaos.py --seconds 600 --seed 1000 --loop uvloop

or here, with ``AMP_CHAOS_SEEDS=N`` for N more seeds from 1000 on.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import pool_chaos
from helpers import TIME

#: The most one seed may take, whatever goes wrong in it.
SEED_BOUND = pool_chaos.CALL_DEADLINE + 3 * pool_chaos.PHASE_DEADLINE

#: A few seeds of each shape: with and without min_workers, timeouts, recycling,
#: kills, close() during the calls or after them, close() cancelled and called again.
SEEDS = [1, 5, 11, 104]

EXTRA = int(os.environ.get("AMP_CHAOS_SEEDS", "0"))


@pytest.mark.parametrize("seed", SEEDS + list(range(1000, 1000 + EXTRA)))
async def test_pool_chaos_seed(seed: int) -> None:
    async with asyncio.timeout(SEED_BOUND):
        report = await pool_chaos.run_seed(seed)
    assert report.ok, report.describe()


def test_scenarios_follow_from_their_seed() -> None:
    first = pool_chaos.make_scenario(17)
    assert first.summary() == pool_chaos.make_scenario(17).summary()
    assert [p.describe() for p in first.plans] == [
        p.describe() for p in pool_chaos.make_scenario(17).plans
    ]
    assert pool_chaos.make_scenario(18).summary() != first.summary()


def test_scenarios_cover_every_kind_of_trouble() -> None:
    scenarios = [pool_chaos.make_scenario(seed) for seed in SEEDS]
    kinds = {plan.kind for scenario in scenarios for plan in scenario.plans}
    assert kinds >= {"quick", "note", "idempotent", "hang", "exit", "kill", "fail"}
    assert any(plan.cancel_after for s in scenarios for plan in s.plans)
    assert any(s.kills for s in scenarios)
    assert any(s.close_at is None for s in scenarios)
    assert any(s.close_at is not None for s in scenarios)
    assert {s.options["min_workers"] for s in scenarios} == {0, 1}
    assert any(s.cancel_close is not None for s in scenarios)
    assert TIME > 0
