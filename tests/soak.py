"""
A randomized soak test of AMPProtocol's flow control: two real protocols on a real socket.

Each seed gives one scenario: two ``AMPProtocol`` subclasses (A and B), each with
responders, connected over TCP on 127.0.0.1 or a UNIX socket pair, with tiny random
limits (``max_responders``, ``max_pending_calls``, transport high-water marks,
sometimes a small ``max_box_size``). Both sides call each other with random plans:
responders that answer at once or later, call the peer back (nested up to three
deep), raise mapped or unmapped errors, end in ``CancelledError``, return answers
that are too long or of the wrong shape. Callers time out or cancel some calls.

The outcome of every call follows from its plan, so each one is checked exactly
(an answer or an exception type; ``ConnectionLostError`` only where the scenario
closes the connection, ``TimeoutError``/``CancelledError`` only where the caller
gave up). Then the invariants: every call resolves before a deadline (else: a
deadlock, reported with the state of both protocols), no responder sees another
one's context variables, the write buffer stays near its high-water mark, the
process is idle while calls wait on a slow responder and when nothing happens, no
responder slot leaks (a burst of ``max_responders + 1`` calls each way completes),
and no task, file descriptor or protocol outlives the run.

Nested calls can deadlock by themselves, whatever the protocol does (a responder
holding the last slot waits for a call that needs that slot). So the harness only
starts a call whose plan nests when the slots its plan may hold at once, added to
those of the nested calls already running, fit in every limit; calls that do not
nest may start at any time. Under that rule a correct protocol completes every
call.

Run long soaks from the command line::

    python tests/soak.py --seconds 600 --seed 1 --loop uvloop

Every wait here is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import gc
import json
import logging
import os
import random
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import asyncio_amp as amp

#: Multiply every time bound by this (AMP_TEST_TIME_SCALE) on a slow machine.
TIME = float(os.environ.get("AMP_TEST_TIME_SCALE", "1"))

HOST = "127.0.0.1"

#: How long a scenario's calls may take before the ones left are called stuck.
CALL_DEADLINE = 4.0 * TIME
#: Past CALL_DEADLINE, calls that still resolve get this much longer at most, a
#: PROGRESS_STEP at a time: one step with none resolved is a deadlock.
EXTRA_DEADLINE = 8.0 * TIME
PROGRESS_STEP = 1.0 * TIME
#: The bound on each of the other phases (slot check, closing, cleanup).
PHASE_DEADLINE = 3.0 * TIME
#: The idle periods over which CPU use is measured, and the share allowed.
IDLE_PERIOD = 0.3
IDLE_CPU_SHARE = 0.2
#: Above the high-water mark, the write buffer may hold this many of the
#: scenario's biggest boxes, plus one per responder and per pending call.
SPARE_BOXES = 4
#: How many messages each broken invariant reports (the rest are counted).
MESSAGES_PER_INVARIANT = 12

# The context variable each responder sets: another responder must never see it.
REQUEST: contextvars.ContextVar[int | None] = contextvars.ContextVar("soak_request", default=None)


# Commands and errors


class MappedError(Exception):
    """An error the commands map to a code: the caller gets this type back."""


class BadStrError(Exception):
    """A mapped error whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this error cannot be shown")


_ERRORS: dict[type[BaseException], str] = {MappedError: "MAPPED", BadStrError: "BAD_STR"}


class WorkNow(amp.Command):
    """Answered by a plain function."""

    arguments = [("plan", amp.String()), ("payload", amp.BigBytes())]
    response = [("echo", amp.BigBytes()), ("tag", amp.Bytes())]
    errors = _ERRORS


class WorkLater(amp.Command):
    """Answered by a coroutine."""

    arguments = [("plan", amp.String()), ("payload", amp.BigBytes())]
    response = [("echo", amp.BigBytes()), ("tag", amp.Bytes())]
    errors = _ERRORS


# What any responder may do (a plain function or a coroutine). A coroutine may also
# call the peer back ("nested") or end in CancelledError ("cancelled").
PLAIN_KINDS = ["ok", "ok", "ok", "mapped", "unmapped", "too_long", "wrong_shape"]
# The fault families a seed may turn on (each with some chance):
#   nested     responders call the peer back, up to three deep
#   cancelled  responders that end in CancelledError
#   bad_str    a mapped error whose __str__ raises
#   give_up    callers time out or cancel some calls
#   closing    a box over the peer's max_box_size closes the connection
#   burst      a burst of calls to a peer that reads slowly (write backpressure)
#   ctx_plain  plain responders set the context variable too (async ones always do)
#   cpu        measure CPU while calls wait at max_pending_calls, and when idle
FAMILIES = ["nested", "cancelled", "bad_str", "give_up", "closing", "burst", "ctx_plain", "cpu"]
# Kinds the harness uses by itself.
GATE = "gate"  # waits until the harness opens the gate
BARRIER = "barrier"  # waits until max_responders responders run at once on its side

_PATTERN = bytes(range(256)) * 4


def blob(key: int, size: int) -> bytes:
    """Deterministic bytes of ``size`` for ``key`` (cheap, and different per key)."""
    if size <= 0:
        return b""
    head = key.to_bytes(8, "big", signed=False)
    unit = head + _PATTERN[key % 251 :] + _PATTERN[: key % 251]
    reps = size // len(unit) + 1
    return (unit * reps)[:size]


@dataclasses.dataclass
class Node:
    """What one call asks its responder to do."""

    id: int
    kind: str
    later: bool  # answered by WorkLater (a coroutine) rather than WorkNow
    in_size: int
    out_size: int
    delay: float
    children: list[Node] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "i": self.id,
            "k": self.kind,
            "l": self.later,
            "n": self.in_size,
            "o": self.out_size,
            "d": self.delay,
            "c": [child.to_json() for child in self.children],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        return cls(
            data["i"],
            data["k"],
            data["l"],
            data["n"],
            data["o"],
            data["d"],
            [cls.from_json(c) for c in data["c"]],
        )

    @property
    def command(self) -> type[amp.Command]:
        return WorkLater if self.later else WorkNow

    def summary(self) -> str:
        text = f"#{self.id}:{self.kind}{'~' if self.later else ''}"
        if self.children:
            text += "[" + ",".join(c.summary() for c in self.children) + "]"
        return text

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


def expected_answer(node: Node) -> dict[str, Any] | type[BaseException] | tuple[type, ...]:
    """What a call with this plan resolves to: the answer, or the exception type(s)."""
    kind = node.kind
    if kind in ("ok", "nested", GATE, BARRIER):
        return {"echo": blob(node.id + 1, node.out_size), "tag": b"%d" % node.id}
    if kind == "mapped":
        return MappedError
    if kind == "bad_str":
        # The code with a description of its own, or UNKNOWN: either is fine.
        return (BadStrError, amp.UnknownRemoteError)
    return amp.UnknownRemoteError  # unmapped, cancelled, too_long, wrong_shape


# The slots a plan may hold at once, per resource: (side, "R") for responders,
# (side, "P") for pending calls. The caller's side is "A" or "B".


def _other(side: str) -> str:
    return "B" if side == "A" else "A"


def demand(node: Node, caller: str) -> dict[tuple[str, str], int]:
    """The slots a call holds at its deepest point (children run one after another)."""
    callee = _other(caller)
    own = {(caller, "P"): 1, (callee, "R"): 1}
    deepest: dict[tuple[str, str], int] = {}
    for child in node.children:
        sub = demand(child, callee)
        for key, value in sub.items():
            deepest[key] = max(deepest.get(key, 0), value)
    for key, value in deepest.items():
        own[key] = own.get(key, 0) + value
    return own


# Scenarios


@dataclasses.dataclass
class SideLimits:
    max_responders: int
    max_pending_calls: int
    max_box_size: int
    high: int
    low: int

    def check(self) -> None:
        """Fail early on limits the transport would refuse."""
        assert 0 <= self.low <= self.high, self
        assert self.max_responders >= 1 and self.max_pending_calls >= 1, self


@dataclasses.dataclass
class CallSpec:
    """One top-level call of the scenario, and what became of it."""

    caller: str
    node: Node
    start: float
    action: str  # "wait", "timeout" or "cancel"
    action_after: float
    trigger: bool = False  # the box too big for the peer: closes the connection
    outcome: Any = None
    state: str = "not started"

    def describe(self) -> str:
        extra = f" {self.action}@{self.action_after:.3f}" if self.action != "wait" else ""
        big = " TOO-BIG" if self.trigger else ""
        return (
            f"{self.caller}->{_other(self.caller)} {self.node.summary()} "
            f"in={self.node.in_size} out={self.node.out_size}{extra}{big}"
        )


@dataclasses.dataclass
class Scenario:
    seed: int
    transport: str  # "tcp" or "unix"
    limits: dict[str, SideLimits]
    calls: list[CallSpec]
    closing: bool  # a box over the peer's max_box_size closes the connection
    ctx_plain: bool  # plain responders set the context variable too
    burst: bool  # a burst of calls to a slow reader checks write backpressure
    check_cpu: bool
    families: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for side in "AB":
            lim = self.limits[side]
            box = f" max_box={lim.max_box_size}" if lim.max_box_size < 1 << 24 else ""
            parts.append(
                f"{side}(responders={lim.max_responders} pending={lim.max_pending_calls} "
                f"high={lim.high}{box})"
            )
        kinds: dict[str, int] = {}
        for call in self.calls:
            for node in call.node.walk():
                kinds[node.kind] = kinds.get(node.kind, 0) + 1
        flags = ",".join(self.families) or "none"
        actions = sum(call.action != "wait" for call in self.calls)
        return (
            f"seed {self.seed}: {self.transport} {' '.join(parts)} calls={len(self.calls)} "
            f"kinds={kinds} caller-cancels={actions} families={flags}"
        )

    def biggest_box(self) -> int:
        """A bound on the size of any box in the scenario (values plus overhead)."""
        size = 4096
        for call in self.calls:
            for node in call.node.walk():
                plan = len(json.dumps(call.node.to_json()))
                size = max(size, node.in_size + plan + 1024, node.out_size + 1024)
        return size


def make_scenario(
    seed: int, *, generous: bool = False, families: set[str] | None = None
) -> Scenario:
    """
    The scenario of ``seed``.

    ``generous``: big limits and no fault family (the harness must pass on any
    protocol that works at all). ``families``: these fault families, rather than
    the seed's choice.
    """
    rng = random.Random(seed)
    ids = iter(range(1, 1_000_000))
    # Each seed turns on a few fault families, so that a failing seed points at few causes.
    chosen = {f for f in FAMILIES if rng.random() < 0.35}
    if generous:
        chosen = set()
    if families is not None:
        chosen = families
    families = chosen
    closing = "closing" in families
    burst = "burst" in families and not closing
    transport = "unix" if rng.random() < 0.3 else "tcp"
    limits: dict[str, SideLimits] = {}
    for side in "AB":
        if generous:
            limits[side] = SideLimits(100, 1000, 1 << 24, 64 * 1024, 16 * 1024)
            continue
        high = rng.choice([1, 2, 4, 8, 16, 32, 64]) * 1024
        limits[side] = SideLimits(
            max_responders=rng.randint(1, 4),
            max_pending_calls=rng.randint(1, 4),
            max_box_size=1 << 24,
            high=high,
            low=rng.choice([0, high // 4, high // 2]),
        )
    if closing:
        limits["B"].max_box_size = rng.choice([8, 16, 32]) * 1024
    if burst:
        limits["A"].max_pending_calls = rng.choice([64, 128, 256])
        limits["A"].high = 16 * 1024
        limits["A"].low = 4 * 1024
        limits["B"].max_responders = 1
    kinds_now = [*PLAIN_KINDS, *(["bad_str"] if "bad_str" in families else [])]
    kinds_later = [
        *kinds_now,
        *(["cancelled"] if "cancelled" in families else []),
        *(["nested"] * (2 if generous or "nested" in families else 0)),
    ]
    size_cap = min(limits["A"].max_box_size, limits["B"].max_box_size) // 8
    if burst:
        # Small boxes only, so that the bound on the write buffer is tight.
        size_cap = 24 * 1024

    def size() -> int:
        roll = rng.random()
        if roll < 0.4:
            value = rng.randint(0, 64)
        elif roll < 0.8:
            value = rng.randint(0, 8 * 1024)
        elif roll < 0.95:
            value = rng.randint(8 * 1024, 80 * 1024)
        else:
            value = rng.randint(80 * 1024, 400 * 1024)
        return min(value, size_cap)

    def node(depth: int) -> Node:
        later = rng.random() < 0.6
        kind = rng.choice(kinds_later if later else kinds_now)
        if kind == "nested" and depth >= 3:
            kind = "ok"
        children = []
        if kind == "nested":
            children = [node(depth + 1) for _ in range(rng.randint(1, 2))]
        return Node(
            next(ids), kind, later, size(), size(), rng.choice([0, 0, 0.001, 0.005, 0.02]), children
        )

    for lim in limits.values():
        lim.check()
    capacity = {
        (side, kind): (lim.max_responders if kind == "R" else lim.max_pending_calls)
        for side, lim in limits.items()
        for kind in "RP"
    }
    calls: list[CallSpec] = []
    for side in "AB":
        for _ in range(rng.randint(8, 30 if generous else 24)):
            root = node(1)
            if any(v > capacity[k] for k, v in demand(root, side).items()):
                # A plan that needs more slots at once than there are can never run.
                root.kind, root.children = "ok", []
            action = "wait"
            if not root.children and "give_up" in families and rng.random() < 0.3:
                action = rng.choice(["timeout", "cancel"])
            calls.append(
                CallSpec(side, root, rng.uniform(0, 0.25), action, rng.choice([0, 0.001, 0.01]))
            )
    if closing:
        trigger = Node(next(ids), "ok", rng.random() < 0.5, limits["B"].max_box_size * 2, 0, 0)
        calls.append(CallSpec("A", trigger, rng.uniform(0, 0.2), "wait", 0, trigger=True))
    if burst:
        # Some 8 MB, more than the kernel's socket buffers take in on loopback.
        for _ in range(rng.randint(300, 400)):
            leaf = Node(next(ids), "ok", True, rng.randint(16, 32) * 1024, 16, 0)
            calls.append(CallSpec("A", leaf, 0.05, "wait", 0))
    return Scenario(
        seed=seed,
        transport=transport,
        limits=limits,
        calls=calls,
        closing=closing,
        ctx_plain="ctx_plain" in families,
        burst=burst,
        check_cpu=generous or "cpu" in families,
        families=sorted(families),
    )


# The two protocols


class SoakRun:
    """The shared state of one run: what failed, what runs, the slot budget."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.failures: list[str] = []
        self.failure_counts: dict[str, int] = {}
        self.responders = 0  # responders running, on both sides
        self.running = {"A": 0, "B": 0}  # the same, per side
        # Per side: the responders that ended in CancelledError or in an error
        # whose str() fails (each must still be answered and free its slot).
        self.faulted: dict[str, list[str]] = {"A": [], "B": []}
        # The barrier calls of the slot check, per side: how many run, the most
        # that ran at once, and the event set once max_responders of them run.
        self.barrier_count = {"A": 0, "B": 0}
        self.barrier_most = {"A": 0, "B": 0}
        self.barrier = {"A": asyncio.Event(), "B": asyncio.Event()}
        self.barrier_need = {"A": 1, "B": 1}
        self.gate = asyncio.Event()
        self.closed = False
        self.budget: dict[tuple[str, str], int] = {}
        self.budget_changed = asyncio.Condition()
        self.max_write_buffer = {"A": 0, "B": 0}
        self.protocols: dict[str, SoakProtocol] = {}
        self.lost_unexpectedly = False

    def fail(self, invariant: str, message: str) -> None:
        """Note a broken invariant (the first few messages of each, and how many)."""
        count = self.failure_counts[invariant] = self.failure_counts.get(invariant, 0) + 1
        if count <= MESSAGES_PER_INVARIANT:
            self.failures.append(f"[{invariant}] {message}")

    def close_failures(self) -> None:
        """Say how many messages of each invariant were left out."""
        for invariant, count in self.failure_counts.items():
            if count > MESSAGES_PER_INVARIANT:
                more = count - MESSAGES_PER_INVARIANT
                self.failures.append(f"[{invariant}] ... and {more} more like these")

    def capacity(self, key: tuple[str, str]) -> int:
        limits = self.scenario.limits[key[0]]
        return limits.max_responders if key[1] == "R" else limits.max_pending_calls

    def fits(self, need: dict[tuple[str, str], int]) -> bool:
        return all(self.budget.get(k, 0) + v <= self.capacity(k) for k, v in need.items())

    @contextlib.asynccontextmanager
    async def slots(self, need: dict[tuple[str, str], int]) -> Any:
        """Hold ``need`` out of the budget of nested calls (see the module docstring)."""
        async with self.budget_changed:
            await self.budget_changed.wait_for(lambda: self.closed or self.fits(need))
            for key, value in need.items():
                self.budget[key] = self.budget.get(key, 0) + value
        try:
            yield
        finally:
            async with self.budget_changed:
                for key, value in need.items():
                    self.budget[key] -= value
                self.budget_changed.notify_all()

    async def mark_closed(self) -> None:
        self.closed = True
        async with self.budget_changed:
            self.budget_changed.notify_all()


#: Every protocol the soak built and that is still alive (a leak check).
LIVE_PROTOCOLS: weakref.WeakSet[SoakProtocol] = weakref.WeakSet()


class SoakProtocol(amp.AMPProtocol):
    """Both sides of the soak: the same responders, driven by each call's plan."""

    def __init__(self, run: SoakRun, side: str) -> None:
        limits = run.scenario.limits[side]
        super().__init__(
            max_responders=limits.max_responders,
            max_pending_calls=limits.max_pending_calls,
            max_box_size=limits.max_box_size,
            close_timeout=1.0,
        )
        self.run = run
        self.side = side
        self.lost = asyncio.get_running_loop().create_future()
        self.lost_cause = ""
        LIVE_PROTOCOLS.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        limits = self.run.scenario.limits[self.side]
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=limits.high, low=limits.low)

    def connection_lost(self, exc: Exception | None) -> None:
        # Text only: the exception's traceback would keep this protocol alive.
        self.lost_cause = f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.note_write_buffer()
        super().pause_writing()

    def note_write_buffer(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            size = transport.get_write_buffer_size()
            most = self.run.max_write_buffer
            most[self.side] = max(most[self.side], size)

    # Responders

    def _enter(self, node: Node, payload: bytes, *, sets_context: bool) -> None:
        seen = REQUEST.get()
        if seen is not None:
            self.run.fail(
                "contextvar",
                f"the responder of #{node.id} on {self.side} started with the context "
                f"variable of #{seen} set (responders share a context)",
            )
        if sets_context:
            REQUEST.set(node.id)
        if payload != blob(node.id, node.in_size):
            self.run.fail("payload", f"#{node.id} on {self.side} got the wrong payload")

    def _finish(self, node: Node) -> dict[str, Any]:
        kind = node.kind
        if kind == "mapped":
            raise MappedError(f"mapped error of #{node.id}")
        if kind == "bad_str":
            raise BadStrError(node.id)
        if kind == "unmapped":
            raise LookupError(f"unmapped error of #{node.id}")
        if kind == "too_long":
            return {"echo": b"", "tag": b"x" * 70_000}
        if kind == "wrong_shape":
            return {"echo": b"", "bogus": 1}
        return {"echo": blob(node.id + 1, node.out_size), "tag": b"%d" % node.id}

    @WorkNow.responder
    def work_now(self, plan: str, payload: bytes) -> dict[str, Any]:
        node = Node.from_json(json.loads(plan))
        self.run.responders += 1
        self.run.running[self.side] += 1
        try:
            self._enter(node, payload, sets_context=self.run.scenario.ctx_plain)
            return self._finish(node)
        except BadStrError:
            self.run.faulted[self.side].append(f"#{node.id} raised BadStrError")
            raise
        finally:
            self.run.responders -= 1
            self.run.running[self.side] -= 1

    @WorkLater.responder
    async def work_later(self, plan: str, payload: bytes) -> dict[str, Any]:
        node = Node.from_json(json.loads(plan))
        self.run.responders += 1
        self.run.running[self.side] += 1
        try:
            # The slot check's calls leave the context alone: they check slots only.
            sets_context = node.kind != BARRIER
            self._enter(node, payload, sets_context=sets_context)
            if node.delay:
                await asyncio.sleep(node.delay)
            if node.kind == GATE:
                async with asyncio.timeout(PHASE_DEADLINE):
                    await self.run.gate.wait()
            elif node.kind == BARRIER:
                await self._barrier(node)
            elif node.kind == "cancelled":
                # A future that other code cancels: the responder ends in CancelledError.
                future = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_later(0.001, future.cancel)
                await future
            for child in node.children:
                await self._call_child(node, child)
            if sets_context and REQUEST.get() != node.id:
                self.run.fail(
                    "contextvar",
                    f"the responder of #{node.id} on {self.side} lost its context variable "
                    f"(now {REQUEST.get()})",
                )
            return self._finish(node)
        except asyncio.CancelledError:
            self.run.faulted[self.side].append(f"#{node.id} ended in CancelledError")
            raise
        except BadStrError:
            self.run.faulted[self.side].append(f"#{node.id} raised BadStrError")
            raise
        finally:
            self.run.responders -= 1
            self.run.running[self.side] -= 1

    async def _barrier(self, node: Node) -> None:
        """Wait until every responder slot of this side is taken by a barrier call."""
        run, side = self.run, self.side
        run.barrier_count[side] += 1
        run.barrier_most[side] = max(run.barrier_most[side], run.barrier_count[side])
        event = run.barrier[side]
        if run.barrier_count[side] >= run.barrier_need[side]:
            event.set()
        # A slot leaked if no more barrier calls arrive for a whole period while
        # the event is not set; arrivals that are merely slow (a loaded machine)
        # extend the wait. Bounded: the count only grows until it is set.
        try:
            seen = -1
            while not event.is_set() and run.barrier_count[side] != seen:
                seen = run.barrier_count[side]
                try:
                    async with asyncio.timeout(PHASE_DEADLINE / 2):
                        await event.wait()
                except TimeoutError:
                    pass
            if not event.is_set():
                run.fail(
                    "slot-leak",
                    f"#{node.id}: at most {run.barrier_most[side]} responders ever ran at once "
                    f"on {side} after every call had resolved, not {run.barrier_need[side]} "
                    f"(max_responders={self.max_responders}, the caller's max_pending_calls="
                    f"{run.scenario.limits[_other(side)].max_pending_calls}): a responder slot "
                    f"leaked; {protocol_state(self)}",
                )
                event.set()
        finally:
            run.barrier_count[side] -= 1

    async def _call_child(self, parent: Node, child: Node) -> None:
        expected = expected_answer(child)
        try:
            result: Any = await self.call_remote(
                child.command,
                plan=json.dumps(child.to_json()),
                payload=blob(child.id, child.in_size),
            )
        except amp.ConnectionLostError:
            if not self.run.scenario.closing:
                self.run.fail(
                    "connection-lost", f"nested #{child.id} (in #{parent.id}) lost its connection"
                )
            raise
        except Exception as exc:
            result = exc
        if not outcome_matches(result, expected):
            self.run.fail(
                "outcome",
                f"nested #{child.id} ({child.kind}, called by #{parent.id} on {self.side}) "
                f"gave {show(result)}, expected {show_expected(expected)}",
            )


def outcome_matches(result: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(result, dict) and result == expected
    types = expected if isinstance(expected, tuple) else (expected,)
    return type(result) in types


def show(result: Any) -> str:
    if isinstance(result, dict):
        return "{" + ", ".join(f"{k}: {len(v)} bytes" for k, v in result.items()) + "}"
    if isinstance(result, BaseException):
        return f"{type(result).__name__}{result.args!r:.80}"
    return repr(result)[:80]


def show_expected(expected: Any) -> str:
    if isinstance(expected, dict):
        return show(expected)
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(t.__name__ for t in types)


def protocol_state(protocol: amp.AMPProtocol | None) -> str:
    """The protocol's repr and, where they can be read, its private counters."""
    if protocol is None:
        return "no protocol"
    parts = [repr(protocol)]
    for name in (
        "_busy",
        "_held",
        "_deferred",
        "_flow",
        "_waiting",
        "_waiting_nested",
        "_watching",
        "_pending",
        "_reading_paused",
        "_writing_paused",
        "_release_handle",
        "_tasks",
    ):
        try:
            value = getattr(protocol, name)
        except AttributeError:
            continue
        if name == "_tasks" and value:
            # Where each responder task is: not started, or at which await.
            value = "; ".join(f"{len(value)}: {task!r}" for task in value)
        elif isinstance(value, tuple | list | dict | set | type(None)) or hasattr(value, "__len__"):
            value = "-" if value is None else f"{len(value)}"
        parts.append(f"{name}={value}")
    transport = protocol.transport
    if transport is not None:
        with contextlib.suppress(Exception):
            parts.append(f"write_buffer={transport.get_write_buffer_size()}")
            parts.append(f"closing={transport.is_closing()}")
            parts.append(f"transport_reading={transport.is_reading()}")
    return " ".join(parts)


def deadlock_hints(run: SoakRun) -> list[str]:
    """Guesses at the cause of a deadlock, from the private counters where they exist."""
    hints = []
    paused = []
    for side, protocol in run.protocols.items():
        busy = getattr(protocol, "_busy", None)
        held = getattr(protocol, "_held", 0)
        if isinstance(busy, int) and isinstance(held, int) and busy - held > run.running[side]:
            hints.append(
                f"hint: {side} counts {busy} responders busy but only {run.running[side]} run: "
                "a responder slot leaked"
            )
        if getattr(protocol, "_reading_paused", False) and getattr(protocol, "_pending", None):
            paused.append(side)
    for side, notes in run.faulted.items():
        if notes:
            hints.append(
                f"hint: responders on {side} that must still be answered and free their "
                f"slot: {', '.join(notes[:8])}{' ...' if len(notes) > 8 else ''}"
            )
    if len(paused) == 2:
        hints.append(
            "hint: both sides stopped reading while waiting for answers to their own calls: "
            "answers are held back behind calls over max_responders"
        )
    elif paused:
        hints.append(f"hint: {paused[0]} stopped reading while its own calls wait for answers")
    return hints


# Running a scenario


@dataclasses.dataclass
class Report:
    scenario: Scenario
    failures: list[str]
    counts: dict[str, int]
    seconds: float
    loop: str = "asyncio"
    generous: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        head = self.scenario.summary()
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        if self.ok:
            return f"{head}\n  ok in {self.seconds:.2f} s: {counts}"
        lines = [head, f"  FAILED in {self.seconds:.2f} s: {counts}"]
        lines += [f"  {failure}" for failure in self.failures]
        lines.append(f"  to run it again: {self.command}")
        return "\n".join(lines)

    @property
    def command(self) -> str:
        """The command line that runs this scenario again."""
        families = ",".join(self.scenario.families)
        return (
            f"python tests/soak.py --seed {self.scenario.seed} --count 1 --loop {self.loop} "
            + ("--generous " if self.generous else "")
            + f"--families '{families}'"
        )

    @property
    def invariants(self) -> list[str]:
        """The invariants that failed, without repeats."""
        names = [f[1 : f.index("]")] for f in self.failures]
        return sorted(set(names))


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


async def _bounded_poll(predicate: Callable[[], bool], seconds: float) -> bool:
    """Wait, bounded in time and count, until ``predicate()``; return whether it came true."""
    deadline = time.monotonic() + seconds
    for _ in range(100_000):
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return predicate()


async def _connect(run: SoakRun) -> tuple[SoakProtocol, SoakProtocol, list[Any]]:
    """Connect A (the client) and B (the server); return them and what to close later."""
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    made: asyncio.Future[SoakProtocol] = loop.create_future()

    def server_side() -> SoakProtocol:
        protocol = SoakProtocol(run, "B")
        if not made.done():
            made.set_result(protocol)
        return protocol

    if run.scenario.transport == "unix":
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _, proto_b = await loop.connect_accepted_socket(server_side, right)
            _, proto_a = await loop.create_connection(lambda: SoakProtocol(run, "A"), sock=left)
        except BaseException:
            left.close()
            right.close()
            raise
        return proto_a, proto_b, closers
    server = await loop.create_server(server_side, HOST, 0)
    closers.append(server)
    port = server.sockets[0].getsockname()[1]
    _, proto_a = await loop.create_connection(lambda: SoakProtocol(run, "A"), HOST, port)
    proto_b = await made
    server.close()
    return proto_a, proto_b, closers


async def _drive(run: SoakRun, spec: CallSpec) -> None:
    """Make one top-level call at its time, as its plan says, and keep its outcome."""
    protocol = run.protocols[spec.caller]
    await asyncio.sleep(spec.start)
    need = demand(spec.node, spec.caller) if spec.node.children else {}
    spec.state = "waiting for nested-call budget"
    async with run.slots(need):
        spec.state = "calling"
        try:
            future = _retrieved(
                protocol.call_remote(
                    spec.node.command,
                    plan=json.dumps(spec.node.to_json()),
                    payload=blob(spec.node.id, spec.node.in_size),
                )
            )
        except Exception as exc:
            spec.outcome = exc
            spec.state = "done"
            return
        spec.state = "awaiting the answer"
        try:
            if spec.action == "timeout":
                async with asyncio.timeout(spec.action_after):
                    spec.outcome = await future
            elif spec.action == "cancel":
                waiter = asyncio.ensure_future(_await(future))
                handle = asyncio.get_running_loop().call_later(spec.action_after, waiter.cancel)
                try:
                    spec.outcome = await waiter
                finally:
                    handle.cancel()
            else:
                spec.outcome = await future
        except asyncio.CancelledError as exc:
            if spec.action != "cancel":
                raise
            spec.outcome = exc
        except Exception as exc:
            spec.outcome = exc
        spec.state = "done"


def _retrieved(future: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """
    Mark the future's exception as seen once it is done.

    A task cancelled in the very turn its call fails (a caller's timeout) never
    looks at the exception, and asyncio would log it as never retrieved.
    """
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


async def _await(future: asyncio.Future[Any]) -> Any:
    return await future


def _check_outcome(run: SoakRun, spec: CallSpec) -> str:
    """Check one call's outcome; return its kind for the counts."""
    result = spec.outcome
    expected: Any = expected_answer(spec.node)
    allowed: list[type[BaseException]] = []
    if spec.action == "timeout":
        allowed.append(TimeoutError)
    if spec.action == "cancel":
        allowed.append(asyncio.CancelledError)
    if run.scenario.closing or run.lost_unexpectedly:
        # Where the connection closed when it should not have, that is reported once.
        allowed.append(amp.ConnectionLostError)
    if spec.trigger:
        expected = amp.ConnectionLostError
    if type(result) in allowed:
        return type(result).__name__
    if not outcome_matches(result, expected):
        run.fail(
            "outcome",
            f"{spec.describe()} gave {show(result)}, expected {show_expected(expected)}"
            + (f" or {'/'.join(t.__name__ for t in allowed)}" if allowed else ""),
        )
        return "wrong"
    return "answer" if isinstance(result, dict) else type(result).__name__


async def _cpu_phase(run: SoakRun) -> None:
    """CPU stays idle while calls wait for a slow responder, and when nothing happens."""
    loop = asyncio.get_running_loop()
    a = run.protocols["A"]
    count = min(run.scenario.limits["A"].max_pending_calls + 1, 8)
    gates = [Node(900_000 + i, GATE, True, 0, 8, 0) for i in range(count)]
    futures = [
        _retrieved(a.call_remote(WorkLater, plan=json.dumps(g.to_json()), payload=b""))
        for g in gates
    ]
    await asyncio.sleep(0.02)
    for label in ("calls waiting at max_pending_calls on a slow responder", "nothing in flight"):
        wall, cpu = loop.time(), time.process_time()
        await asyncio.sleep(IDLE_PERIOD)
        wall, cpu = loop.time() - wall, time.process_time() - cpu
        if cpu > IDLE_CPU_SHARE * wall:
            run.fail(
                "cpu",
                f"{cpu / wall:.0%} CPU over {wall:.2f} s with {label}; A: {protocol_state(a)}",
            )
        if label.startswith("calls"):
            run.gate.set()
            try:
                async with asyncio.timeout(PHASE_DEADLINE):
                    results = await asyncio.gather(*futures, return_exceptions=True)
            except TimeoutError:
                run.fail("deadlock", f"the gated calls never completed; A: {protocol_state(a)}")
                for future in futures:
                    future.cancel()
                return
            for gate, result in zip(gates, results, strict=True):
                if not outcome_matches(result, expected_answer(gate)):
                    run.fail("outcome", f"gated call #{gate.id} gave {show(result)}")
    run.gate.clear()


async def _slot_phase(run: SoakRun) -> None:
    """
    After everything resolved, max_responders + 1 calls each way must all complete.

    Each side's responders wait until as many of them run at once as can (a
    barrier): max_responders, or fewer if the caller's max_pending_calls is lower.
    So one leaked slot is enough to stop them.
    """
    futures = []
    ids = iter(range(800_000, 900_000))
    limits = run.scenario.limits
    for caller in "AB":
        callee = _other(caller)
        count = limits[callee].max_responders + 1
        run.barrier_need[callee] = min(
            limits[callee].max_responders, limits[caller].max_pending_calls
        )
        for _ in range(count):
            node = Node(next(ids), BARRIER, True, 16, 16, 0)
            plan = json.dumps(node.to_json())
            futures.append(
                (
                    caller,
                    node,
                    _retrieved(
                        run.protocols[caller].call_remote(
                            node.command, plan=plan, payload=blob(node.id, 16)
                        )
                    ),
                )
            )
    # Stuck only if a whole period passes with no call completing (a loaded
    # machine may be slow, not stuck). Bounded: each period completes one more.
    pending = {f for _, _, f in futures}
    for _ in range(len(futures)):
        done, pending = await asyncio.wait(pending, timeout=PHASE_DEADLINE)
        if not pending or not done:
            break
    if pending:
        stuck = [f"{c}->{_other(c)} #{n.id}" for c, n, f in futures if f in pending]
        run.fail(
            "slot-leak",
            f"{len(stuck)} of {len(futures)} fresh calls never completed ({', '.join(stuck)}): "
            f"a responder slot leaked; A: {protocol_state(run.protocols['A'])}; "
            f"B: {protocol_state(run.protocols['B'])}",
        )
        for _, _, f in futures:
            f.cancel()
        return
    for caller, node, f in futures:
        result = f.exception() or f.result()
        if not outcome_matches(result, expected_answer(node)):
            run.fail("outcome", f"fresh call {caller} #{node.id} gave {show(result)}")


async def _sample_write_buffers(run: SoakRun) -> None:
    """Note the transports' write buffer sizes once per turn of the event loop."""
    for _ in range(10_000_000):
        for protocol in run.protocols.values():
            protocol.note_write_buffer()
        await asyncio.sleep(0)


_warm_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


async def _warm_up() -> None:
    """
    Make one TCP and one UNIX connection on this loop, once.

    Some loops open descriptors of their own on first use (uvloop keeps one on
    /dev/null); they must be in the baseline, not counted as leaked.
    """
    loop = asyncio.get_running_loop()
    if loop in _warm_loops:
        return
    _warm_loops.add(loop)
    async with asyncio.timeout(PHASE_DEADLINE):
        server = await loop.create_server(asyncio.Protocol, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, HOST, port)
        transport.close()
        server.close()
        await server.wait_closed()
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t_right, _ = await loop.connect_accepted_socket(asyncio.Protocol, right)
        t_left, _ = await loop.create_connection(asyncio.Protocol, sock=left)
        t_left.close()
        t_right.close()
        await asyncio.sleep(0.01)


async def run_scenario(scenario: Scenario) -> Report:
    """Run one scenario on the running loop and check every invariant; never hangs."""
    began = time.monotonic()
    await _warm_up()
    gc.collect()
    fds_before = open_fds()
    tasks_before = asyncio.all_tasks()
    run = SoakRun(scenario)
    counts: dict[str, int] = {}
    closers: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    sampler: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(PHASE_DEADLINE):
            proto_a, proto_b, closers = await _connect(run)
        run.protocols = {"A": proto_a, "B": proto_b}

        if scenario.check_cpu:
            await _cpu_phase(run)

        sampler = asyncio.create_task(_sample_write_buffers(run))
        tasks = [asyncio.create_task(_drive(run, spec)) for spec in scenario.calls]
        specs = dict(zip(tasks, scenario.calls, strict=True))
        lost_watch = asyncio.gather(proto_a.lost, proto_b.lost)
        lost_watch.add_done_callback(lambda _: asyncio.ensure_future(run.mark_closed()))
        _, pending = await asyncio.wait(tasks, timeout=CALL_DEADLINE)
        # A loaded machine may be slow, not stuck: while calls still resolve,
        # give them a little longer (bounded); a deadlock resolves none.
        waited = CALL_DEADLINE
        for _ in range(int(EXTRA_DEADLINE / PROGRESS_STEP)):
            if not pending:
                break
            before = len(pending)
            _, pending = await asyncio.wait(pending, timeout=PROGRESS_STEP)
            waited += PROGRESS_STEP
            if len(pending) == before:
                break
        if pending:
            stuck = [specs[t] for t in tasks if t in pending]
            run.fail(
                "deadlock",
                f"{len(stuck)} of {len(tasks)} calls still unresolved after {waited:g} s "
                f"(none resolved in the last {PROGRESS_STEP:g} s); "
                f"responders running: {run.responders}; A: {protocol_state(proto_a)}; "
                f"B: {protocol_state(proto_b)}",
            )
            for hint in deadlock_hints(run):
                run.fail("deadlock", hint)
            for spec in stuck[:12]:
                run.fail("deadlock", f"stuck ({spec.state}): {spec.describe()}")
        if not scenario.closing:
            for side, protocol in run.protocols.items():
                if protocol.closed:
                    run.lost_unexpectedly = True
                    run.fail(
                        "connection-lost",
                        f"{side}'s connection closed during a run that never closes it "
                        f"({protocol.lost_cause}); its calls failed with ConnectionLostError",
                    )
        for task, spec in specs.items():
            if task in pending:
                continue
            if task.cancelled():
                run.fail("harness", f"{spec.describe()} was cancelled")
                continue
            if task.exception() is not None:
                run.fail("harness", f"{spec.describe()} raised {task.exception()!r}")
                continue
            kind = _check_outcome(run, spec)
            counts[kind] = counts.get(kind, 0) + 1
            # Only a summary is kept: an exception's traceback would keep the protocols.
            spec.outcome = show(spec.outcome)
        sampler.cancel()
        if not pending and not await _bounded_poll(lambda: run.responders == 0, PHASE_DEADLINE):
            run.fail(
                "deadlock",
                f"{run.responders} responders still running after all calls resolved; "
                f"A: {protocol_state(proto_a)}; B: {protocol_state(proto_b)}",
            )
        bound_boxes = {
            side: SPARE_BOXES
            + scenario.limits[side].max_responders
            + min(scenario.limits[side].max_pending_calls, SPARE_BOXES)
            for side in "AB"
        }
        for side in "AB":
            bound = scenario.limits[side].high + bound_boxes[side] * scenario.biggest_box()
            if run.max_write_buffer[side] > bound:
                run.fail(
                    "write-buffer",
                    f"{side}'s write buffer reached {run.max_write_buffer[side]} bytes, over "
                    f"{bound} (high-water mark {scenario.limits[side].high} + "
                    f"{bound_boxes[side]} boxes of {scenario.biggest_box()})",
                )
        for side in "AB":
            counts[f"write_buffer_max_{side}"] = run.max_write_buffer[side]
        connected = not (proto_a.closed or proto_b.closed)
        if scenario.closing and connected and not pending:
            run.fail("outcome", "the box over max_box_size did not close the connection")
        if not pending and connected:
            await _slot_phase(run)
    except Exception as exc:
        run.fail("harness", f"the run raised {exc!r}")
    finally:
        await _cleanup(run, tasks, sampler, closers)
    # What must be gone once both sides closed.
    if not await _bounded_poll(lambda: asyncio.all_tasks() <= tasks_before, PHASE_DEADLINE):
        left = asyncio.all_tasks() - tasks_before
        run.fail("task-leak", f"{len(left)} tasks left: {sorted(map(repr, left))[:5]}")
    if fds_before >= 0 and not await _bounded_poll(
        lambda: open_fds() <= fds_before, PHASE_DEADLINE
    ):
        run.fail("fd-leak", f"{open_fds() - fds_before} file descriptors left open")
    run.protocols = {}
    run.close_failures()
    counts["calls"] = len(scenario.calls)
    return Report(scenario, run.failures, counts, time.monotonic() - began)


async def _cleanup(
    run: SoakRun,
    tasks: list[asyncio.Task[None]],
    sampler: asyncio.Task[None] | None,
    closers: list[Any],
) -> None:
    """Close both sides and stop every task of the run, within bounds."""
    if sampler is not None:
        sampler.cancel()
    for task in tasks:
        task.cancel()
    await run.mark_closed()
    run.gate.set()
    protocols = list(run.protocols.values())
    for protocol in protocols:
        protocol.close()
    try:
        async with asyncio.timeout(PHASE_DEADLINE):
            await asyncio.gather(*(p.wait_closed() for p in protocols))
    except TimeoutError:
        run.fail("close", "a protocol did not close: " + "; ".join(map(protocol_state, protocols)))
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.abort()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(PHASE_DEADLINE):
            await asyncio.gather(*tasks, *([sampler] if sampler else []), return_exceptions=True)
    for closer in closers:
        closer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PHASE_DEADLINE):
                await closer.wait_closed()


async def run_seed(
    seed: int, *, generous: bool = False, families: set[str] | None = None
) -> Report:
    """Run the scenario of ``seed`` and check that its protocols are freed."""
    with quiet_logs() as logged:
        report = await run_scenario(make_scenario(seed, generous=generous, families=families))
    report.generous = generous
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        report.loop = "uvloop"
    report.failures += [f"[asyncio-log] {message}" for message in logged.messages]

    def freed() -> bool:
        gc.collect()
        return not LIVE_PROTOCOLS

    if not await _bounded_poll(freed, PHASE_DEADLINE):
        report.failures.append(
            f"[memory] {len(LIVE_PROTOCOLS)} protocols of the run are still alive after it"
        )
    return report


class _Collect(logging.Handler):
    """Keep the text of asyncio's warnings and errors (never the records themselves)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().split("\n", 1)[0]
        if message.startswith("Executing "):
            return  # debug mode's slow-callback notes: timing, not a fault
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({exc!r:.200})"
        elif "exception" in record.__dict__:
            message += f" ({record.__dict__['exception']!r:.200})"
        if len(self.messages) < 20:
            self.messages.append(message[:400])


@contextlib.contextmanager
def quiet_logs() -> Iterator[_Collect]:
    """
    Silence the protocol's log (a run makes it log errors on purpose), and collect asyncio's.

    Records are not passed on: their tracebacks would keep the protocols alive.
    """
    ours = logging.getLogger("asyncio_amp")
    theirs = logging.getLogger("asyncio")
    level, propagate = ours.level, theirs.propagate
    collect = _Collect()
    ours.setLevel(logging.CRITICAL + 1)
    theirs.addHandler(collect)
    theirs.propagate = False
    try:
        yield collect
    finally:
        ours.setLevel(level)
        theirs.removeHandler(collect)
        theirs.propagate = propagate


# Command line


def _rss() -> int:
    """The resident set size of this process, in bytes (0 where unknown)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


#: The seeds that failed once: tests/test_soak.py runs every one of them.
REGRESSIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak_regressions.txt")


def record_regression(seed: int, families: set[str] | None, note: str) -> None:
    """Add a failing seed to the regressions file, unless it is there already."""
    entry = str(seed) if families is None else f"{seed} families={','.join(sorted(families))}"
    try:
        with open(REGRESSIONS) as file:
            known = {line.split("#", 1)[0].strip() for line in file}
    except FileNotFoundError:
        known = set()
    if entry not in known:
        with open(REGRESSIONS, "a") as file:
            file.write(f"{entry:<40} # {note}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="run seeds for this long")
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--count", type=int, default=0, help="run at most this many seeds")
    parser.add_argument("--generous", action="store_true", help="big limits, no new faults")
    parser.add_argument(
        "--families",
        help=f"comma-separated fault families to turn on, instead of each seed's choice "
        f"({', '.join(FAMILIES)}; '' for none)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="add each failing seed to soak_regressions.txt, which CI runs",
    )
    parser.add_argument("--verbose", action="store_true", help="describe passing seeds too")
    args = parser.parse_args(argv)
    families = None
    if args.families is not None:
        families = {f for f in args.families.split(",") if f}
        if families - set(FAMILIES):
            parser.error(f"unknown fault families: {', '.join(sorted(families - set(FAMILIES)))}")
    deadline = time.monotonic() + args.seconds
    failed: list[tuple[int, list[str]]] = []
    seed = args.seed
    ran = 0
    rss: list[int] = []
    while time.monotonic() < deadline and (not args.count or ran < args.count):
        with asyncio.Runner(debug=True, loop_factory=_loop_factory(args.loop)) as runner:
            report = runner.run(run_seed(seed, generous=args.generous, families=families))
        gc.collect()
        rss.append(_rss())
        ran += 1
        if report.ok:
            line = report.describe() if args.verbose else f"seed {seed}: ok {report.counts}"
            print(line, flush=True)
        else:
            print(report.describe(), flush=True)
            failed.append((seed, report.invariants))
            if args.record:
                record_regression(seed, families, f"{args.loop}: {' '.join(report.invariants)}")
        seed += 1
    growth = rss[-1] - rss[min(5, len(rss) - 1)] if rss else 0
    print(
        f"{ran} seeds on {args.loop}: {ran - len(failed)} passed, {len(failed)} failed; "
        f"RSS {rss[-1] // 2**20 if rss else 0} MiB, grew {growth // 2**20} MiB after warm-up"
    )
    for seed, invariants in failed:
        print(f"  failed: {seed} {args.loop} {' '.join(invariants)}")
    if ran > 20 and growth > 64 * 2**20:
        print("  FAILED: memory grew by more than 64 MiB over the runs")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
