"""
A randomized soak of middleware, keepalive and cancellation: two real protocols on a socket.

The sibling of soak.py (which drives bare protocols). Each seed gives one
scenario: two ``AMPProtocol`` subclasses (A and B) connected over TCP on
127.0.0.1 or a UNIX socket pair, each with a random stack of incoming and
outgoing middleware, tiny random ``max_responders`` and ``max_pending_calls``,
and keepalive with short intervals on both sides (or on one, or none). Both
sides then call each other in rounds of concurrent calls, more than the limits
let through at once.

Every call carries its plan: what each middleware layer does with it on its way
out of the caller and into the callee (pass it on, sleep first, raise a mapped
or an unmapped error, raise ``CancelledError``, cancel its own task, call the
peer back, change the arguments, change the answer, answer by itself, or put a
bad value in the arguments), and what the responder does. So the outcome of
each call follows from its plan and is checked exactly. Some callers are
cancelled at a random moment: their outcome is then the answer or
``CancelledError``.

At the end of each round (a barrier), the invariants: every call resolved
exactly once, with the right answer or exception; both protocols come back to
idle (no pending call but a heartbeat, no responder place taken or lent, no
call waiting, no task of theirs); no task of the run is left; a fresh call each
way succeeds; and the connection is still open (above all, never dropped by a
keepalive timeout while both peers are live). The last round of some seeds
closes the connection on purpose while calls are in flight: then every call
still resolves exactly once, and nothing is left behind.

Run long soaks from the command line::

    python tests/soak_middleware.py --seconds 600 --seed 1 --loop uvloop

Every wait here is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import gc
import json
import random
import socket
import sys
import termios
import time
import weakref
from typing import Any

import asyncio_amp as amp
from soak import HOST, TIME, _bounded_poll, _loop_factory, protocol_state, quiet_logs

#: How long a round's calls may take before the ones left are called stuck.
CALL_DEADLINE = 6.0 * TIME
#: The bound on each of the other phases (idle, fresh calls, closing).
PHASE_DEADLINE = 3.0 * TIME
#: How long the Client of "client" scenarios waits for a connection.
CONNECT_TIMEOUT = 1.0 * TIME
#: The keepalive timeout of both sides: far above any pause of a live peer here.
KEEPALIVE_TIMEOUT = 1.5 * TIME


class MappedError(Exception):
    """An error the commands map to a code: the caller gets this type back."""


class Work(amp.Command):
    """The soak's call: its plan says what each middleware layer and the responder do."""

    arguments = [("plan", amp.String()), ("n", amp.Integer()), ("payload", amp.BigBytes())]
    response = [("n", amp.Integer())]
    errors = {MappedError: "MAPPED"}


class Note(amp.Command):
    """A call without an answer: its plan says what the layers do, as for Work."""

    arguments = [("plan", amp.String()), ("n", amp.Integer()), ("payload", amp.BigBytes())]
    requires_answer = False


class Echo(amp.Command):
    """What a middleware calls the peer back with (middleware lets it through)."""

    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


# What a layer may do with a call: [kind] or [kind, number].
#   pass, sleep s, mapped, unmapped, cancelled (raise CancelledError),
#   self_cancel (cancel its own task, then await), callback (call the peer's Echo
#   first), args k (add k to n), answer k (add k to the answer's n), own k
#   (answer {"n": k} without passing the call on), timeout s (pass the call on
#   under asyncio.timeout(s); if it expires, answer {"n": 0}), bad_args
#   (outgoing only: n becomes a str, which the encoding refuses), extra (going
#   out, add a key to the box: the peer then decodes the call from its box).
OUT_KINDS = ["pass", "pass", "sleep", "sleep", "mapped", "unmapped", "cancelled", "self_cancel"]
OUT_KINDS += ["callback", "args", "answer", "own", "timeout", "extra", "bad_args"]
IN_KINDS = [kind for kind in OUT_KINDS if kind != "bad_args"]
RESPONDER_KINDS = ["ok", "ok", "later", "mapped", "nested"]
# What the layers do with a responder's call back to the caller.
NESTED_KINDS = ["pass", "pass", "sleep", "mapped", "args", "answer", "own", "callback", "timeout"]

# What a call may resolve to when the scenario closes the connection under it: it
# closes at the caller, or under the peer's responder (UNKNOWN), or the Client
# finds no connection to send it on, or the peer refuses it while it shuts down.
CLOSING_OUTCOMES = {
    amp.ConnectionLostError,
    amp.UnknownRemoteError,
    amp.NoConnectionError,
    amp.RemoteAmpError,
}

# What a call resolved to: an int (the answer's n) or an exception type.
Outcome = int | type[BaseException]


# The value a bad_args layer puts in a call's n: a TypeError where it is used.
BAD: Any = "not a number"


def blob(size: int) -> bytes:
    """The payload of ``size`` bytes that a call carries."""
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


def _other(side: str) -> str:
    return "B" if side == "A" else "A"


def simulate(plan: dict[str, Any], n: int) -> tuple[Outcome | None, bool]:
    """
    What a call with ``plan`` and ``n`` resolves to, following every layer.

    Returns:
        The outcome (``None`` for a Note that went out), and whether the
        responder runs.
    """
    answered = plan.get("c", "work") == "work"
    ran = False

    def wire(n: Any) -> Outcome | None:
        if n is BAD:
            return TypeError  # the encoding refuses it
        result = inward(0, n)
        if not answered:
            return None  # whatever happens there, the caller is not told
        if isinstance(result, int) or result is MappedError:
            return result
        return amp.UnknownRemoteError  # any other error of the peer's chain

    def inward(i: int, n: int) -> Outcome | None:
        nonlocal ran
        if i == len(plan["i"]):
            ran = True
            return MappedError if plan["r"] == "mapped" else n + 1
        return layer(plan["i"][i], n, lambda m: inward(i + 1, m))

    def outward(i: int, n: int) -> Outcome | None:
        if i == len(plan["o"]):
            return wire(n)
        result = layer(plan["o"][i], n, lambda m: outward(i + 1, m))
        return None if not answered and isinstance(result, int) else result

    return outward(0, n), ran


def expected(plan: dict[str, Any], n: int) -> Outcome | None:
    """What a call with ``plan`` and ``n`` resolves to, if no timeout layer expires."""
    return simulate(plan, n)[0]


def possible(plan: dict[str, Any], n: int) -> tuple[set[Any], set[bool]]:
    """
    What a call may resolve to, and whether its responder may run.

    Each timeout layer either lets the call through or expires and answers
    ``{"n": 0}``; expiring after the responder started, it may leave it run.
    """
    slots = [(way, i) for way in ("o", "i") for i, a in enumerate(plan[way]) if a[0] == "timeout"]
    results, runs = set(), set()
    for mask in range(2 ** len(slots)):
        variant = {**plan, "o": list(plan["o"]), "i": list(plan["i"])}
        for bit, (way, i) in enumerate(slots):
            variant[way][i] = ["own", 0] if mask >> bit & 1 else ["pass"]
        result, ran = simulate(variant, n)
        results.add(result)
        runs.add(ran)
    if slots and True in runs:
        runs.add(False)  # a timeout may expire before the responder starts
    return results, runs


def layer(action: list[Any], n: Any, rest: Any) -> Outcome | None:
    """What one layer makes of the call, ``rest`` being the layers after it."""
    kind = action[0]
    if kind in ("pass", "sleep", "callback", "timeout", "extra"):
        return rest(n)  # type: ignore[no-any-return]
    if kind == "mapped":
        return MappedError
    if kind == "unmapped":
        return RuntimeError
    if kind in ("cancelled", "self_cancel"):
        return asyncio.CancelledError
    if kind == "bad_args":
        return rest(BAD)  # type: ignore[no-any-return]
    if kind == "args":
        return TypeError if n is BAD else rest(n + action[1])
    if kind == "own":
        return int(action[1])
    assert kind == "answer", kind
    result = rest(n)
    return result + action[1] if isinstance(result, int) else result


@dataclasses.dataclass
class CallSpec:
    """One call of a round: who calls, with what plan, and whether it is cancelled."""

    id: int
    caller: str
    n: int
    plan: dict[str, Any]
    start: float  # seconds after the round starts
    cancel: float | None  # the caller is cancelled this long after it calls

    def expected(self) -> Outcome | None:
        return expected(self.plan, self.n)

    def describe(self) -> str:
        cancel = "" if self.cancel is None else f" cancel@{self.cancel:.3f}"
        return f"#{self.id} {self.caller}->{_other(self.caller)} n={self.n} {self.plan}{cancel}"


@dataclasses.dataclass
class Scenario:
    """Everything a seed decides."""

    seed: int
    transport: str
    layers: dict[str, int]  # middleware layers per side
    max_responders: dict[str, int]
    max_pending_calls: dict[str, int]
    keepalive: dict[str, float | None]
    high: dict[str, int | None]  # the transport's high-water mark, if set
    rounds: list[list[CallSpec]]
    # Per round: (seconds after it starts, side, attribute, value) set on a live peer.
    changes: list[list[tuple[float, str, str, Any]]]
    close_at_end: str | None  # the side that closes the connection in the last round
    # How: "close", or "shutdown" with this grace period (seconds).
    close_how: tuple[str, float]

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.transport}, layers {self.layers}, "
            f"max_responders {self.max_responders}, max_pending_calls {self.max_pending_calls}, "
            f"keepalive {self.keepalive}, high {self.high}, rounds {[len(r) for r in self.rounds]}, "
            f"close {self.close_at_end} {self.close_how if self.close_at_end else ''}"
        )


def make_scenario(seed: int) -> Scenario:
    """The scenario of ``seed`` (the same seed gives the same scenario)."""
    rng = random.Random(seed)
    layers = {side: rng.randint(0, 3) for side in "AB"}
    scenario = Scenario(
        seed=seed,
        transport=rng.choice(["tcp", "unix", "client"]),
        layers=layers,
        max_responders={side: rng.randint(1, 4) for side in "AB"},
        max_pending_calls={side: rng.randint(1, 4) for side in "AB"},
        high={side: rng.choice([None, None, 0, 1024, 16384]) for side in "AB"},
        keepalive={
            side: rng.choice([None, 0.002, 0.01, 0.03, 0.1]) if rng.random() < 0.3 else 0.005
            for side in "AB"
        },
        rounds=[],
        changes=[],
        close_at_end=rng.choice(["A", "B"]) if rng.random() < 0.3 else None,
        close_how=(rng.choice(["close", "shutdown"]), rng.choice([0.0, 0.01, 0.1])),
    )
    ids = 0
    for _ in range(rng.randint(2, 4)):
        calls = []
        for _ in range(rng.randint(4, 40)):
            caller = rng.choice("AB")
            callee = _other(caller)
            plan = {
                "c": "note" if rng.random() < 0.15 else "work",
                "o": [_action(rng, OUT_KINDS) for _ in range(layers[caller])],
                "i": [_action(rng, IN_KINDS) for _ in range(layers[callee])],
                "r": rng.choice(RESPONDER_KINDS),
                "d": round(rng.choice([0, 0, 0.001, 0.01]), 3),
                "p": rng.choice([0, 0, 0, 100, 20_000, 200_000]),
            }
            if plan["r"] == "nested":
                # The responder calls the caller back: out of the callee's layers,
                # into the caller's.
                plan["nest"] = {
                    "o": [_action(rng, NESTED_KINDS) for _ in range(layers[callee])],
                    "i": [_action(rng, NESTED_KINDS) for _ in range(layers[caller])],
                    "r": rng.choice(["ok", "ok", "mapped"]),
                    "d": 0,
                    "p": rng.choice([0, 50_000]),
                    "n": rng.randint(0, 1000),
                }
            ids += 1
            plan["id"] = ids
            calls.append(
                CallSpec(
                    id=ids,
                    caller=caller,
                    n=rng.randint(0, 1000),
                    plan=plan,
                    start=rng.choice([0.0, 0.0, rng.uniform(0, 0.05)]),
                    cancel=rng.choice([0.0, rng.uniform(0, 0.03)]) if rng.random() < 0.2 else None,
                )
            )
        scenario.rounds.append(calls)
        changes = []
        for _ in range(rng.choice([0, 0, 1, 3])):
            attribute = rng.choice(["max_pending_calls", "max_responders", "keepalive"])
            value: Any = rng.randint(1, 4)
            if attribute == "keepalive":
                value = rng.choice([None, 0.002, 0.01, 0.05])
            changes.append((rng.uniform(0, 0.05), rng.choice("AB"), attribute, value))
        scenario.changes.append(changes)
    return scenario


def _action(rng: random.Random, kinds: list[str]) -> list[Any]:
    kind = rng.choice(kinds)
    if kind in ("sleep", "timeout"):
        return [kind, round(rng.choice([0, 0.001, 0.005, 0.02, 0.05]), 3)]
    if kind in ("args", "answer", "own"):
        return [kind, rng.randint(1, 99)]
    return [kind]


class PlanLayer(amp.Middleware):
    """One layer of middleware: it does with a ``Work`` call what the call's plan says."""

    def __init__(self, index: int) -> None:
        self.index = index

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[Any, Any]:
        return await self._act(call, call_next, "o")

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[Any, Any]:
        return await self._act(call, call_next, "i")

    async def _act(self, call: amp.Call, call_next: amp.CallNext, way: str) -> dict[Any, Any]:
        if call.command is not Work and call.command is not Note:
            return await call_next(call)
        action = json.loads(call.arguments["plan"])[way][self.index]
        kind = action[0]
        if kind == "sleep":
            await asyncio.sleep(action[1])
        elif kind == "mapped":
            raise MappedError(f"layer {self.index} refuses the call")
        elif kind == "unmapped":
            raise RuntimeError(f"layer {self.index} fails")
        elif kind == "cancelled":
            raise asyncio.CancelledError
        elif kind == "self_cancel":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
            raise AssertionError("a cancelled task went on")
        elif kind == "callback":
            n = self.index * 1000 + 7
            answer = await call.protocol.call_remote(Echo, n=n)
            if answer != {"n": n + 1}:
                raise AssertionError(f"Echo answered {answer} to {n}")
        elif kind == "args":
            call.arguments["n"] += action[1]
        elif kind == "bad_args":
            call.arguments["n"] = BAD
        elif kind == "extra" and call.direction == "outgoing":
            call.extra[b"soak-layer-%d" % self.index] = b"%d" % self.index
        elif kind == "extra":
            # Coming in: the keys the caller's layers added, and no other.
            caller = json.loads(call.arguments["plan"])["o"]
            added = {b"soak-layer-%d" % i: b"%d" % i for i, a in enumerate(caller) if a[0] == kind}
            if call.extra != added:
                raise AssertionError(f"extra keys {call.extra}, expected {added}")
        elif kind == "own":
            return {"n": action[1]}
        elif kind == "timeout":
            try:
                async with asyncio.timeout(action[1]):
                    return await call_next(call)
            except TimeoutError:
                return {"n": 0}
        answer = await call_next(call)
        if kind == "answer" and call.requires_answer:
            answer = {**answer, "n": answer["n"] + action[1]}
        return answer


#: The protocols of the runs: none may outlive its run.
LIVE: weakref.WeakSet[Peer] = weakref.WeakSet()


class Peer(amp.AMPProtocol):
    """A side of the soak: answers Work as its plan says, and Echo at once."""

    def __init__(self, high: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.high = high
        LIVE.add(self)
        # How many times the responder ran, by call id.
        self.ran: dict[int, int] = {}
        # What went wrong inside the responders.
        self.errors: list[str] = []
        # What went wrong in a way that closing the connection explains.
        self.closing_errors: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.high is not None and self.transport is not None:
            # Small buffers, in the transport and the kernel: writing pauses often.
            self.transport.set_write_buffer_limits(high=self.high)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
                if sock.family == socket.AF_UNIX:
                    # Not on TCP: a receive window shrunk after the handshake
                    # stalls loopback TCP for seconds (retransmission backoff).
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)

    def _enter(self, steps: dict[str, Any], payload: bytes) -> None:
        if len(payload) != steps["p"] or payload != blob(steps["p"]):
            self.errors.append(f"[payload] {steps} came with {len(payload)} bytes")
        if "id" in steps:
            self.ran[steps["id"]] = self.ran.get(steps["id"], 0) + 1

    @Work.responder
    async def work(self, plan: str, n: int, payload: bytes) -> dict[str, int]:
        steps = json.loads(plan)
        self._enter(steps, payload)
        if steps["d"]:
            await asyncio.sleep(steps["d"])
        if steps["r"] == "mapped":
            raise MappedError("the responder refuses the call")
        if steps["r"] == "nested":
            nest = steps["nest"]
            want = possible(nest, nest["n"])[0]
            try:
                answer = await self.call_remote(
                    Work, plan=json.dumps(nest), n=nest["n"], payload=blob(nest["p"])
                )
                got: Any = answer["n"]
            except Exception as exc:
                got = type(exc)
            if got not in want:
                # Kept apart when the scenario closes the connection (see _round).
                (self.closing_errors if got in CLOSING_OUTCOMES else self.errors).append(
                    f"[nested] #{steps['id']}'s call back {nest}: got {_show(got)}, "
                    f"expected one of {', '.join(map(_show, want))}"
                )
        return {"n": n + 1}

    @Note.responder
    async def note(self, plan: str, n: int, payload: bytes) -> None:
        steps = json.loads(plan)
        self._enter(steps, payload)
        if steps["d"]:
            await asyncio.sleep(steps["d"])

    @Echo.responder
    def echo(self, n: int) -> dict[str, int]:
        return {"n": n + 1}


def make_peer(scenario: Scenario, side: str) -> Peer:
    return Peer(
        high=scenario.high[side],
        max_responders=scenario.max_responders[side],
        max_pending_calls=scenario.max_pending_calls[side],
        keepalive=scenario.keepalive[side],
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        middleware=[PlanLayer(i) for i in range(scenario.layers[side])],
    )


@dataclasses.dataclass
class Report:
    """What one seed found."""

    scenario: Scenario
    failures: list[str] = dataclasses.field(default_factory=list)
    calls: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        head = f"{self.scenario.summary()}: {self.calls} calls"
        if self.ok:
            return head + ", ok"
        lines = [head + f", FAILED (reproduce: --seed {self.scenario.seed} --count 1)"]
        lines += [f"  {failure}" for failure in self.failures[:30]]
        if len(self.failures) > 30:
            lines.append(f"  ... and {len(self.failures) - 30} more")
        return "\n".join(lines)


async def _connect(scenario: Scenario) -> tuple[Peer, Peer, amp.Client | None, list[Any]]:
    """
    Connect A (the client) and B (the server).

    Returns:
        A, B, the ``Client`` that A's calls go through (in "client" scenarios),
        and the servers to close later.
    """
    loop = asyncio.get_running_loop()
    made: asyncio.Future[Peer] = loop.create_future()

    def server_side() -> Peer:
        protocol = make_peer(scenario, "B")
        if not made.done():
            made.set_result(protocol)
        return protocol

    if scenario.transport == "unix":
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _, b = await loop.connect_accepted_socket(server_side, right)
            _, a = await loop.create_connection(lambda: make_peer(scenario, "A"), sock=left)
        except BaseException:
            left.close()
            right.close()
            raise
        return a, b, None, []
    server = await loop.create_server(server_side, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    if scenario.transport == "client":
        keepalive = scenario.keepalive["A"]
        client = amp.Client(
            f"{HOST}:{port}",
            protocol_factory=functools.partial(Peer, high=scenario.high["A"]),
            middleware=[PlanLayer(i) for i in range(scenario.layers["A"])],
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_responders=scenario.max_responders["A"],
            max_pending_calls=scenario.max_pending_calls["A"],
            resolve_interval=None,
            # When the scenario closes the connection, calls that wait for a new
            # one (the server is closed) fail after this.
            connect_timeout=CONNECT_TIMEOUT,
            **({} if keepalive is None else {"keepalive": keepalive}),
        )
        # Its first call opens its connection.
        await client.call_remote(Echo, n=0)
        (a,) = client.connections
        assert isinstance(a, Peer)
        b = await made
        server.close()
        return a, b, client, [server]
    _, a = await loop.create_connection(lambda: make_peer(scenario, "A"), HOST, port)
    b = await made
    server.close()
    return a, b, None, [server]


def kernel_state(protocol: amp.AMPProtocol) -> str:
    """The bytes in the socket's queues: sent and not acknowledged, received and not read."""
    transport = protocol.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return "no socket"
    try:
        unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return "socket closed"
    return (
        f"kernel unsent={int.from_bytes(unsent, sys.byteorder)} "
        f"unread={int.from_bytes(unread, sys.byteorder)}"
    )


def idle_state(protocol: amp.AMPProtocol) -> list[str]:
    """What keeps ``protocol`` from being idle (empty when it is)."""
    busy = []
    keepalive = protocol._keepalive
    heartbeat = None if keepalive is None else keepalive.heartbeat
    pending = [f for f in protocol._pending.values() if f is not heartbeat]
    if pending:
        busy.append(f"{len(pending)} pending")
    flow = protocol._flow
    if flow.working or flow.lending or flow.deferred:
        busy.append(repr(flow))
    expected_max = protocol.max_pending_calls + (heartbeat is not None)
    if flow.max_pending_calls != expected_max:
        busy.append(f"flow max_pending_calls {flow.max_pending_calls} != {expected_max}")
    for name in ("_waiting", "_waiting_nested", "_tasks"):
        value = getattr(protocol, name)
        if value:
            busy.append(f"{name}={len(value)}")
    chain = protocol._outgoing
    if chain is not None and chain.tags:
        busy.append(f"outgoing tags={len(chain.tags)}")
    return busy


async def _drive(
    protocol: Any, spec: CallSpec, outcomes: dict[int, list[Any]], cancelled: set[int]
) -> None:
    """Make one call and record what it resolved to."""
    if spec.start:
        await asyncio.sleep(spec.start)
    me = asyncio.current_task()
    assert me is not None
    loop = asyncio.get_running_loop()
    handle = None
    try:
        command = Note if spec.plan["c"] == "note" else Work
        future = protocol.call_remote(
            command, plan=json.dumps(spec.plan), n=spec.n, payload=blob(spec.plan["p"])
        )
        if spec.cancel is not None:
            cancelled.add(spec.id)
            handle = loop.call_later(spec.cancel, me.cancel)
        answer = await future
        result: Any = answer
        if isinstance(answer, dict) and set(answer) == {"n"}:
            result = answer["n"]
    except asyncio.CancelledError:
        result = asyncio.CancelledError
    except Exception as exc:
        result = type(exc)
        if isinstance(exc, amp.ConnectionLostError) and "keepalive" in str(exc):
            result = f"keepalive timeout: {exc}"
    finally:
        if handle is not None:
            handle.cancel()
    outcomes.setdefault(spec.id, []).append(result)


def _show(outcome: Any) -> str:
    return outcome.__name__ if isinstance(outcome, type) else repr(outcome)


async def _round(
    report: Report,
    peers: dict[str, Peer],
    callers: dict[str, Any],
    calls: list[CallSpec],
    changes: list[tuple[float, str, str, Any]],
    *,
    closing: str | None,
) -> None:
    """Run one round's calls, then check every invariant at its barrier."""
    fail = report.failures.append
    outcomes: dict[int, list[Any]] = {}
    cancelled: set[int] = set()
    loop = asyncio.get_running_loop()
    handles = [
        loop.call_later(delay, setattr, peers[side], attribute, value)
        for delay, side, attribute, value in changes
    ]
    tasks = [
        asyncio.create_task(_drive(callers[spec.caller], spec, outcomes, cancelled))
        for spec in calls
    ]
    report.calls += len(calls)
    if closing is not None:
        await asyncio.sleep(random.Random(report.scenario.seed).uniform(0, 0.02))
        how, grace = report.scenario.close_how
        if how == "close":
            peers[closing].close()
        else:
            tasks.append(asyncio.create_task(peers[closing].shutdown(grace)))
    _, stuck = await asyncio.wait(tasks, timeout=CALL_DEADLINE)
    for handle in handles:
        handle.cancel()
    for task in stuck:
        task.cancel()
    if stuck:
        fail(
            f"[stuck] {len(stuck)} calls unresolved after {CALL_DEADLINE} s: "
            + "; ".join(f"{protocol_state(p)} {kernel_state(p)}" for p in peers.values())
        )
    await asyncio.gather(*tasks, return_exceptions=True)
    # Every call resolved exactly once, with its outcome.
    for task in tasks[len(calls) :]:
        if not task.cancelled() and task.exception() is not None:
            fail(f"[shutdown] shutdown() raised {task.exception()!r}")
    for spec in calls:
        got = outcomes.get(spec.id, [])
        if len(got) != 1:
            fail(f"[once] {spec.describe()} resolved {len(got)} times: {got}")
            continue
        result, want = got[0], spec.expected()
        allowed = possible(spec.plan, spec.n)[0]
        if spec.id in cancelled:
            allowed.add(asyncio.CancelledError)
        if closing is not None:
            allowed |= CLOSING_OUTCOMES
        if result not in allowed:
            fail(f"[outcome] {spec.describe()}: got {_show(result)}, expected {_show(want)}")

    # Both sides come back to idle, and no task is left.
    if closing is None and not await _bounded_poll(
        lambda: not any(idle_state(p) for p in peers.values()), PHASE_DEADLINE
    ):
        for side, protocol in peers.items():
            if idle_state(protocol):
                fail(f"[idle] {side}: {', '.join(idle_state(protocol))}")
    me = asyncio.current_task()

    def left() -> list[asyncio.Task[Any]]:
        # The tasks of the run's Client that keep its connection are not the calls'.
        return [
            t
            for t in asyncio.all_tasks()
            if t is not me
            and not t.done()
            and not getattr(t.get_coro(), "__qualname__", "").startswith("Client._run")
        ]

    def no_tasks() -> bool:
        return not left()

    if not await _bounded_poll(no_tasks, PHASE_DEADLINE):
        tasks = left()
        fail(f"[tasks] {len(tasks)} tasks left: " + "; ".join(repr(t)[:200] for t in tasks[:5]))
    client = callers["A"] if isinstance(callers["A"], amp.Client) else None
    if client is not None and closing is None:
        busy = [slot.pending for slot in client._ready if slot.pending]
        if busy:
            fail(f"[idle] the Client still counts calls in flight: {busy}")

    # Each responder ran at most once, and exactly once where it had to (a Note
    # may still be on its way: its caller is done when it is handed to the transport).
    def must_run(spec: CallSpec) -> bool:
        return False not in possible(spec.plan, spec.n)[1] and spec.id not in cancelled

    def all_ran() -> bool:
        return all(
            any(peer.ran.get(spec.id) for peer in peers.values())
            for spec in calls
            if must_run(spec)
        )

    if closing is None:
        await _bounded_poll(all_ran, PHASE_DEADLINE)
    for spec in calls:
        runs = sum(peer.ran.pop(spec.id, 0) for peer in peers.values())
        may_run = possible(spec.plan, spec.n)[1]
        if (
            runs > 1
            or (True not in may_run and runs)
            or (must_run(spec) and runs != 1 and not closing)
        ):
            fail(f"[ran] {spec.describe()}: the responder ran {runs} times")
    for peer in peers.values():
        report.failures += peer.errors
        if closing is None:
            report.failures += peer.closing_errors
        peer.errors.clear()
        peer.closing_errors.clear()

    if closing is not None:
        return
    # The connection is still open, and a fresh call each way succeeds.
    for side, protocol in peers.items():
        cause = protocol._close_cause
        if protocol._lost or protocol.transport is None or protocol.transport.is_closing():
            fail(f"[open] {side} closed: {cause!r}")
            return
    for side, caller in callers.items():
        try:
            async with asyncio.timeout(PHASE_DEADLINE):
                echo = await caller.call_remote(Echo, n=41)
                plan = {"o": [["pass"]] * report.scenario.layers[side], "d": 0, "r": "ok", "p": 0}
                plan["i"] = [["pass"]] * report.scenario.layers[_other(side)]
                work = await caller.call_remote(Work, plan=json.dumps(plan), n=1, payload=b"")
        except Exception as exc:
            fail(f"[fresh] a fresh call from {side} failed: {exc!r}")
        else:
            if echo != {"n": 42} or work != {"n": 2}:
                fail(f"[fresh] a fresh call from {side} got {echo}, {work}")


async def run_scenario(scenario: Scenario) -> Report:
    """Run every round of ``scenario`` and check its invariants."""
    report = Report(scenario)
    a, b, client, closers = await _connect(scenario)
    peers = {"A": a, "B": b}
    callers: dict[str, Any] = {"A": a if client is None else client, "B": b}
    try:
        for index, calls in enumerate(scenario.rounds):
            last = index == len(scenario.rounds) - 1
            closing = scenario.close_at_end if last else None
            await _round(report, peers, callers, calls, scenario.changes[index], closing=closing)
            if report.failures:
                break
    finally:
        if client is not None:
            try:
                async with asyncio.timeout(PHASE_DEADLINE):
                    await client.close()
            except TimeoutError:
                report.failures.append("[close] the Client did not close")
        for protocol in peers.values():
            protocol.close()
        try:
            async with asyncio.timeout(PHASE_DEADLINE):
                await asyncio.gather(*(p.wait_closed() for p in peers.values()))
        except TimeoutError:
            report.failures.append("[close] a protocol did not close")
            for protocol in peers.values():
                if protocol.transport is not None:
                    protocol.transport.abort()
        for closer in closers:
            closer.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PHASE_DEADLINE):
                    await closer.wait_closed()
    return report


async def run_seed(seed: int) -> Report:
    """Run the scenario of ``seed``; asyncio's own warnings count as failures."""
    with quiet_logs() as logged:
        report = await run_scenario(make_scenario(seed))
    report.failures += [f"[asyncio-log] {message}" for message in logged.messages]

    def freed() -> bool:
        gc.collect()
        return not LIVE

    if not await _bounded_poll(freed, PHASE_DEADLINE):
        report.failures.append(f"[memory] {len(LIVE)} protocols of the run are still alive")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="run seeds for this long")
    parser.add_argument("--seed", type=int, default=1, help="the first seed")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--count", type=int, default=0, help="run at most this many seeds")
    parser.add_argument("--verbose", action="store_true", help="describe passing seeds too")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.seconds
    failed: list[int] = []
    seed, ran = args.seed, 0
    while time.monotonic() < deadline and (not args.count or ran < args.count):
        with asyncio.Runner(debug=True, loop_factory=_loop_factory(args.loop)) as runner:
            report = runner.run(run_seed(seed))
        gc.collect()
        ran += 1
        if report.ok:
            print(report.describe() if args.verbose else f"seed {seed}: ok", flush=True)
        else:
            print(report.describe(), flush=True)
            failed.append(seed)
        seed += 1
    print(f"{ran} seeds on {args.loop}: {ran - len(failed)} passed, {len(failed)} failed")
    if failed:
        print(f"  failed seeds: {' '.join(map(str, failed))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
