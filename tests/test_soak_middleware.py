"""
The soak of middleware, keepalive and cancellation, short and seeded, for CI.

The harness is soak_middleware.py: two real protocols over a real socket, with
random middleware stacks, keepalive on both sides, tiny limits and callers
cancelled at random. Each test runs one seed's scenario and checks every
invariant; a failing seed says which calls went wrong and how to run it again.
Longer soaks run from the command line::

    python tests/soak_middleware.py --seconds 600 --seed 1000 --loop uvloop
"""

from __future__ import annotations

import asyncio

import pytest

import asyncio_amp as amp
import soak_middleware as soak
from helpers import TIME

#: The most one seed may take, whatever goes wrong in it.
SEED_BOUND = 30 * TIME

#: Seeds run on every test run: between them, every layer action, notes, calls
#: back from responders, live changes of the limits, closing on purpose, big
#: payloads over small buffers, and each transport (TCP, UNIX, a Client).
SEEDS = [2, 18, 19, 23, 47, 73]

#: Seeds that failed a long soak, with what failed (each has its own regression test).
REGRESSIONS = [
    90397,  # pure Python: connection_lost twice, a write from resume_writing() failing
]


async def _run(seed: int) -> None:
    async with asyncio.timeout(SEED_BOUND):
        report = await soak.run_seed(seed)
    assert report.ok, report.describe()


@pytest.mark.parametrize("seed", SEEDS + REGRESSIONS)
async def test_soak_seed(seed: int) -> None:
    await _run(seed)


def test_the_seeds_cover_every_kind() -> None:
    scenarios = [soak.make_scenario(seed) for seed in SEEDS]
    actions = {
        action[0]
        for scenario in scenarios
        for calls in scenario.rounds
        for call in calls
        for action in call.plan["o"] + call.plan["i"]
    }
    assert actions == set(soak.OUT_KINDS)
    responders = {call.plan["r"] for s in scenarios for calls in s.rounds for call in calls}
    assert responders == set(soak.RESPONDER_KINDS)
    assert any(s.close_at_end for s in scenarios)
    assert any(changes for s in scenarios for changes in s.changes)
    assert any(call.cancel is not None for s in scenarios for r in s.rounds for call in r)
    assert any(call.plan["c"] == "note" for s in scenarios for r in s.rounds for call in r)
    assert {s.transport for s in scenarios} == {"tcp", "unix", "client"}
    assert any(high is not None for s in scenarios for high in s.high.values())
    assert any(call.plan["p"] for s in scenarios for r in s.rounds for call in r)


def test_scenarios_follow_from_their_seed() -> None:
    first, again = soak.make_scenario(17), soak.make_scenario(17)
    assert first.summary() == again.summary()
    assert [c.describe() for r in first.rounds for c in r] == [
        c.describe() for r in again.rounds for c in r
    ]
    assert soak.make_scenario(18).summary() != first.summary()


@pytest.mark.parametrize(
    ("out", "into", "responder", "outcome", "ran"),
    [
        ([], [], "ok", 11, True),
        ([], [], "mapped", soak.MappedError, True),
        ([["args", 5], ["answer", 100]], [["answer", 1000]], "ok", 1116, True),
        ([["own", 3]], [], "ok", 3, False),
        ([], [["own", 3], ["args", 1]], "ok", 3, False),
        ([["answer", 1]], [["own", 3]], "ok", 4, False),
        ([["mapped"]], [], "ok", soak.MappedError, False),
        ([], [["mapped"]], "ok", soak.MappedError, False),
        ([], [["unmapped"]], "ok", amp.UnknownRemoteError, False),
        ([], [["self_cancel"]], "ok", amp.UnknownRemoteError, False),
        ([["unmapped"]], [], "ok", RuntimeError, False),
        ([["cancelled"]], [], "ok", asyncio.CancelledError, False),
        ([["bad_args"], ["pass"]], [], "ok", TypeError, False),
        ([["bad_args"], ["own", 2]], [], "ok", 2, False),
        ([["bad_args"], ["args", 1]], [], "ok", TypeError, False),
        ([["sleep", 0.01], ["callback"]], [["callback"]], "later", 11, True),
    ],
)
def test_the_model_of_a_call(
    out: list[list[object]], into: list[list[object]], responder: str, outcome: object, ran: bool
) -> None:
    # The soak checks the protocols against this model: it must be right.
    plan = {"o": out, "i": into, "r": responder, "d": 0}
    assert soak.simulate(plan, 10) == (outcome, ran)


@pytest.mark.parametrize(
    ("out", "into", "outcome", "ran"),
    [
        ([], [], None, True),
        ([["answer", 1]], [["args", 1]], None, True),
        ([["own", 3]], [], None, False),
        ([["mapped"]], [], soak.MappedError, False),
        ([], [["mapped"]], None, False),
        ([["bad_args"]], [], TypeError, False),
    ],
)
def test_the_model_of_a_note(
    out: list[list[object]], into: list[list[object]], outcome: object, ran: bool
) -> None:
    # The caller of a call without an answer learns only what happens before it goes out.
    plan = {"c": "note", "o": out, "i": into, "r": "ok", "d": 0}
    assert soak.simulate(plan, 10) == (outcome, ran)


def test_the_model_of_timeouts() -> None:
    # A timeout layer lets the call through, or expires and answers {"n": 0}.
    plan = {"o": [["answer", 5], ["timeout", 0.01]], "i": [], "r": "ok", "d": 0}
    assert soak.possible(plan, 10) == ({16, 5}, {True, False})
    # The model allows both, even where one cannot happen (the error comes first).
    plan = {"o": [], "i": [["timeout", 0.01], ["mapped"]], "r": "ok", "d": 0}
    assert soak.possible(plan, 10) == ({soak.MappedError, 0}, {False})
