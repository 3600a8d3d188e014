"""
The chaos test of Client, short and seeded, for CI (the harness is client_chaos.py).

Each test runs one seed's scenario (three real server processes on 127.0.0.1,
127.0.0.2 and 127.0.0.3, killed and started again or stopped and continued by
pid; callers cancelled at random moments; close() at a random moment) and checks
every invariant of client_chaos.py. Longer runs, from the command line::

    python tests/client_chaos.py --seconds 600 --seed 1000 --loop uvloop

or here, with ``AMP_CHAOS_SEEDS=N`` for N more seeds from 1000 on.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import client_chaos

#: The most one seed may take, whatever goes wrong in it.
SEED_BOUND = client_chaos.CALL_DEADLINE + 4 * client_chaos.PHASE_DEADLINE

#: Seeds with kills and stops, a blackout, close() during the calls and after them,
#: close() cancelled and called again.
SEEDS = [13, 42]

EXTRA = int(os.environ.get("AMP_CHAOS_SEEDS", "0"))


@pytest.mark.parametrize("seed", SEEDS + list(range(1000, 1000 + EXTRA)))
async def test_client_chaos_seed(seed: int) -> None:
    async with asyncio.timeout(SEED_BOUND):
        report = await client_chaos.run_seed(seed)
    assert report.ok, report.describe()


def test_scenarios_follow_from_their_seed() -> None:
    first = client_chaos.make_scenario(17)
    assert first.summary() == client_chaos.make_scenario(17).summary()
    assert [p.describe() for p in first.plans] == [
        p.describe() for p in client_chaos.make_scenario(17).plans
    ]
    assert client_chaos.make_scenario(18).summary() != first.summary()


def test_scenarios_cover_every_kind_of_trouble() -> None:
    scenarios = [client_chaos.make_scenario(seed) for seed in SEEDS]
    actions = {event.action for s in scenarios for event in s.events}
    assert actions == {"kill", "stop", "blackout"}
    assert {plan.idempotent for s in scenarios for plan in s.plans} == {True, False}
    assert any(plan.cancel_after == 0.0 for s in scenarios for plan in s.plans)
    assert any(plan.cancel_after for s in scenarios for plan in s.plans)
    assert any(s.close_at is None for s in scenarios)
    assert any(s.close_at is not None for s in scenarios)
    assert any(s.cancel_close is not None for s in scenarios)


def test_one_server_is_always_up() -> None:
    for seed in range(300):
        events = client_chaos.make_scenario(seed).events
        if [event.action for event in events] == ["blackout"]:
            continue  # the one kind of scenario where none is
        for event in events:
            assert len(client_chaos.out_with(events, event)) <= 2, (seed, events)
