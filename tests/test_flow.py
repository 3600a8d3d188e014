"""
FlowControl, on its own: no loop, no transport.

Besides the unit tests, every sequence of events up to a depth is explored over
small limits, checking at each step the bounds the module's theory of
operation gives, and that from every state reached, the calls that wait all
start once working responders end and writing resumes (nothing waits forever).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from asyncio_amp._flow import DEFAULT_MAX_QUEUED_CALLS, FlowControl, Verdict, shared_flow


def test_defaults_and_repr() -> None:
    flow = FlowControl(3)
    assert flow.max_queued_calls == DEFAULT_MAX_QUEUED_CALLS
    assert (flow.working, flow.lending, flow.deferred, flow.writing_paused) == (0, 0, (), False)
    assert repr(flow) == "<FlowControl working=0/3 lending=0 deferred=0>"
    flow.pause_writing()
    assert repr(flow).endswith("writing-paused>")


def test_shared_flow_is_read_only_and_owned_as_a_fresh_copy() -> None:
    flow = shared_flow(3, 7, 5)
    assert flow is shared_flow(3, 7, 5) and flow is not shared_flow(3, 7, 6)
    assert flow.shared and not FlowControl(3).shared
    with pytest.raises(RuntimeError, match="read-only"):
        flow.pause_writing()
    with pytest.raises(RuntimeError, match="read-only"):
        flow.arrive("a")
    assert (flow.working, flow.lending, flow.deferred, flow.writing_paused) == (0, 0, (), False)
    own = flow.own()
    assert type(own) is FlowControl and own.own() is own
    assert (own.max_responders, own.max_queued_calls, own.max_pending_calls) == (3, 7, 5)
    assert own.arrive("a") is Verdict.START and flow.working == 0


def test_calls_start_up_to_max_responders_then_wait_in_order() -> None:
    flow = FlowControl(2)
    assert flow.arrive("a") is Verdict.START
    assert flow.arrive("b") is Verdict.START
    assert flow.arrive("c") is Verdict.DEFER
    assert flow.arrive("d") is Verdict.DEFER
    assert flow.working == 2
    assert list(flow.deferred) == ["c", "d"]
    assert flow.next_call() is None  # no place yet
    flow.ended()
    assert flow.next_call() == "c"
    assert flow.next_call() is None
    flow.ended()
    assert flow.next_call() == "d"
    assert flow.working == 2
    assert not flow.deferred


def test_a_call_behind_waiting_calls_waits_even_with_a_free_place() -> None:
    flow = FlowControl(1)
    flow.arrive("a")
    flow.arrive("b")
    flow.ended()
    # A place is free, but "b" waits: "c" goes behind it.
    assert flow.arrive("c") is Verdict.DEFER
    assert [flow.next_call(), flow.next_call()] == ["b", None]


def test_no_call_starts_while_writing_is_paused() -> None:
    flow = FlowControl(5)
    flow.pause_writing()
    assert flow.arrive("a") is Verdict.DEFER
    assert flow.next_call() is None
    flow.resume_writing()
    assert flow.next_call() == "a"


def test_a_lending_responder_frees_its_place_and_takes_it_back() -> None:
    flow = FlowControl(1)
    flow.arrive("a")
    flow.arrive("b")
    flow.lend()  # "a" waits for the peer
    assert (flow.working, flow.lending) == (0, 1)
    assert flow.next_call() == "b"
    flow.reclaim()  # "a" has its answer: over the limit for a while
    assert (flow.working, flow.lending) == (2, 0)
    assert flow.arrive("c") is Verdict.DEFER
    flow.ended()
    assert flow.next_call() is None  # still at the limit
    flow.ended()
    assert flow.next_call() == "c"


def test_a_responder_that_ends_while_lending() -> None:
    flow = FlowControl(1)
    flow.arrive("a")
    flow.lend()
    flow.ended(lending=True)
    assert (flow.working, flow.lending) == (0, 0)


def test_the_calls_in_hand_are_bounded() -> None:
    flow = FlowControl(1, max_queued_calls=2)
    assert flow.arrive("a") is Verdict.START
    assert flow.arrive("b") is Verdict.DEFER
    assert flow.arrive("c") is Verdict.DEFER
    assert flow.arrive("d") is Verdict.FLOOD
    assert list(flow.deferred) == ["b", "c"]


def test_lending_responders_count_in_hand() -> None:
    flow = FlowControl(1, max_queued_calls=1)
    flow.arrive("a")
    flow.lend()
    assert flow.arrive("b") is Verdict.START
    flow.lend()
    assert flow.arrive("c") is Verdict.FLOOD  # two lending: 1 + 1 in hand


def test_drop_waiting() -> None:
    flow = FlowControl(1)
    for call in "abc":
        flow.arrive(call)
    assert flow.drop_waiting() == ["b", "c"]
    assert flow.deferred == ()
    assert flow.drop_waiting() == []


@pytest.mark.parametrize(
    ("deferred", "writing_paused", "awaiting", "reading"),
    [
        (False, False, False, True),
        (True, False, False, False),
        (False, True, False, False),
        (True, True, False, False),
        # An answer is expected: reading never stops.
        (False, False, True, True),
        (True, False, True, True),
        (False, True, True, True),
        (True, True, True, True),
    ],
)
def test_wants_reading(deferred: bool, writing_paused: bool, awaiting: bool, reading: bool) -> None:
    flow = FlowControl(1)
    flow.arrive("a")
    if deferred:
        flow.arrive("b")
    if writing_paused:
        flow.pause_writing()
    assert flow.wants_reading(awaiting) is reading


# Exhaustive exploration over small limits.

Step = Callable[[FlowControl, list[str], list[str]], None]


def _arrive(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    call = f"c{len(running) + len(lending) + len(flow.deferred)}-{id(flow) % 7}"
    verdict = flow.arrive(call)
    if verdict is Verdict.START:
        running.append(call)


def _end_working(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    if running:
        running.pop(0)
        flow.ended()


def _end_lending(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    if lending:
        lending.pop(0)
        flow.ended(lending=True)


def _lend(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    if running:
        lending.append(running.pop(0))
        flow.lend()


def _reclaim(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    if lending:
        running.append(lending.pop(0))
        flow.reclaim()


def _pause(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    flow.pause_writing()


def _resume(flow: FlowControl, running: list[str], lending: list[str]) -> None:
    flow.resume_writing()


STEPS: list[Step] = [_arrive, _end_working, _end_lending, _lend, _reclaim, _pause, _resume]


def _release(flow: FlowControl, running: list[str]) -> None:
    """What the protocol does after each change: start what may start."""
    for _ in range(100):
        call = flow.next_call()
        if call is None:
            return
        running.append(call)
    raise AssertionError("next_call never stopped")


@pytest.mark.parametrize(("max_responders", "max_queued"), [(1, 1), (1, 2), (2, 1), (2, 3)])
def test_every_sequence_of_events_keeps_the_bounds_and_drains(
    max_responders: int, max_queued: int
) -> None:
    depth = 6
    checked = 0
    for sequence in itertools.product(STEPS, repeat=depth):
        flow = FlowControl(max_responders, max_queued)
        running: list[str] = []
        lending: list[str] = []
        for step in sequence:
            step(flow, running, lending)
            _release(flow, running)
            # The counts match what really runs and lends.
            assert flow.working == len(running)
            assert flow.lending == len(lending)
            # Bounded: in hand, at most max_responders + max_queued_calls.
            assert flow.working + flow.lending + len(flow.deferred) <= max_responders + max_queued
            # A call waits only if it has to.
            if flow.deferred:
                assert flow.writing_paused or flow.working >= max_responders
            # Reading stops only to hold back calls, never while answers are due.
            assert flow.wants_reading(True)
            assert flow.wants_reading(False) is (not flow.deferred and not flow.writing_paused)
        # From here, working responders end (they wait on nothing of this
        # connection) and the peer reads: every waiting call starts.
        waiting = len(flow.deferred)
        started = 0
        flow.resume_writing()
        for _ in range(waiting + len(running) + 1):
            while running:
                running.pop()
                flow.ended()
            before = len(flow.deferred)
            _release(flow, running)
            started += before - len(flow.deferred)
        assert not flow.deferred
        assert started == waiting
        checked += 1
    assert checked == len(STEPS) ** depth


# Our calls


def test_the_applications_calls_wait_for_max_pending_calls_in_order() -> None:
    flow = FlowControl(1, max_pending_calls=2)
    assert flow.max_pending_calls == 2
    assert flow.may_send(0, nested=False, behind=False)
    assert flow.may_send(1, nested=False, behind=False)
    assert not flow.may_send(2, nested=False, behind=False)
    # Behind other waiting calls: it waits its turn, even with a free place.
    assert not flow.may_send(0, nested=False, behind=True)


def test_nested_calls_wait_only_for_writing() -> None:
    flow = FlowControl(1, max_pending_calls=1)
    assert flow.may_send(5, nested=True, behind=True)
    flow.pause_writing()
    assert not flow.may_send(0, nested=True, behind=False)
    assert not flow.may_send(0, nested=False, behind=False)
    flow.resume_writing()
    assert flow.may_send(0, nested=True, behind=False)


@pytest.mark.parametrize("max_pending", [1, 2, 3])
def test_may_send_keeps_the_applications_calls_under_the_limit(max_pending: int) -> None:
    # Every combination: the application's calls never exceed the limit, and
    # nested ones go whenever writing is not paused.
    flow = FlowControl(1, max_pending_calls=max_pending)
    for paused, pending, nested, behind in itertools.product(
        (False, True), range(max_pending + 2), (False, True), (False, True)
    ):
        if paused:
            flow.pause_writing()
        else:
            flow.resume_writing()
        allowed = flow.may_send(pending, nested=nested, behind=behind)
        if paused:
            assert not allowed
        elif nested:
            assert allowed
        else:
            assert allowed is (not behind and pending < max_pending)
