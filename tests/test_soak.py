"""
The soak of AMPProtocol's flow control, short and seeded, for CI (the harness is soak.py).

Each test runs one seed's scenario (two real protocols over a real socket, tiny
limits, random responders and faults) and checks every invariant of soak.py; a
failing seed says which calls are stuck and what state both protocols are in.
The seeds are a fixed list plus every seed that ever failed a long soak
(soak_regressions.txt). Longer soaks run from the command line::

    python tests/soak.py --seconds 600 --seed 1000 --loop uvloop
"""

from __future__ import annotations

import asyncio
import gc
import pathlib
import tracemalloc

import pytest

import soak
from helpers import TIME

#: The most one seed may take, whatever goes wrong in it (a deadlocked seed takes
#: soak.CALL_DEADLINE and a few seconds of cleanup).
SEED_BOUND = 25 * TIME

#: Seeds whose scenario uses big limits and no fault family: these check the harness
#: itself, and pass on any protocol that works at all.
GENEROUS_SEEDS = [1, 2, 3]

#: Seeds that passed on the first protocol; the regressions file holds those that
#: failed. (seed, None): the seed chooses its fault families; (seed, {...}): these.
SEEDS: list[tuple[int, frozenset[str] | None]] = [
    (12, None),
    (14, None),
    (200, frozenset({"nested"})),
    (205, frozenset({"nested"})),
]

REGRESSIONS = pathlib.Path(soak.REGRESSIONS)


def regression_seeds() -> list[tuple[int, frozenset[str] | None]]:
    """
    The seeds of soak_regressions.txt, with the fault families they were run with.

    Each line is ``SEED [families=a,b,...]``, then anything after ``#`` is a comment.
    """
    found = []
    for line in REGRESSIONS.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        families = None
        for word in words[1:]:
            if word.startswith("families="):
                families = frozenset(f for f in word.removeprefix("families=").split(",") if f)
        found.append((int(words[0]), families))
    return found


def _cases() -> list[tuple[int, frozenset[str] | None]]:
    cases = list(SEEDS)
    for case in regression_seeds():
        if case not in cases:
            cases.append(case)
    return cases


def _case_id(case: tuple[int, frozenset[str] | None]) -> str:
    seed, families = case
    return str(seed) if families is None else f"{seed}-{'+'.join(sorted(families)) or 'none'}"


async def _run(seed: int, *, generous: bool = False, families: set[str] | None = None) -> None:
    async with asyncio.timeout(SEED_BOUND):
        report = await soak.run_seed(seed, generous=generous, families=families)
    assert report.ok, report.describe()


def test_regressions_file_parses() -> None:
    for seed, families in regression_seeds():
        assert seed >= 0
        assert families is None or families <= set(soak.FAMILIES)


@pytest.mark.parametrize("seed", GENEROUS_SEEDS)
async def test_generous_scenario(seed: int) -> None:
    await _run(seed, generous=True)


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
async def test_soak_seed(case: tuple[int, frozenset[str] | None]) -> None:
    seed, families = case
    await _run(seed, families=None if families is None else set(families))


def test_scenarios_follow_from_their_seed() -> None:
    first = soak.make_scenario(17)
    again = soak.make_scenario(17)
    assert first.summary() == again.summary()
    assert [c.describe() for c in first.calls] == [c.describe() for c in again.calls]
    assert soak.make_scenario(18).summary() != first.summary()


def test_nested_plans_fit_the_limits() -> None:
    # A plan that needs more slots at once than a side has would deadlock on any
    # protocol: the harness never makes one.
    for seed in range(200):
        scenario = soak.make_scenario(seed)
        for call in scenario.calls:
            for (side, kind), need in soak.demand(call.node, call.caller).items():
                limits = scenario.limits[side]
                have = limits.max_responders if kind == "R" else limits.max_pending_calls
                assert need <= have, (seed, call.describe())


async def test_memory_stays_bounded() -> None:
    # The same scenario, run again and again, leaves no memory behind.
    await _run(1, generous=True)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            await _run(2, generous=True)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 512 * 1024, f"{after - before} bytes more after 3 runs"
