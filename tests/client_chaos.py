"""
A randomized chaos test of Client, seeded and reproducible, against real server processes.

Each seed gives one scenario: three server processes (client_chaos_server.py) on
127.0.0.1, 127.0.0.2 and 127.0.0.3, one port, behind one name; a client with
short backoffs and a random ``connect_timeout`` and ``grace``; a few dozen
callers, each starting at a random moment with an idempotent call (``Where``)
or not (``Record``) of a random length, some of them cancelled after a random
delay (which lands at whatever await the call is at: waiting for a connection,
sent, racing its answer); servers SIGKILLed and started again, or SIGSTOPped and
SIGCONTinued, by pid, at random moments (one server always stays up), or, in
some scenarios, every server killed at once for a moment (a blackout); and
``close()`` at a random moment, or after every call ended, sometimes cancelled
and called again.

The invariants, checked for every scenario:

* every call ends, once, within a deadline: with its answer; ``CancelledError``
  only if cancelled; ``NoConnectionError`` only once ``close()`` was called, or
  for a call that lived through a blackout; ``ConnectionLostError`` for an
  idempotent call only once ``close()`` was called;
  ``ConnectionLostError`` for a non-idempotent call only when a server was
  killed during the call, or ``close()`` was called;
* a non-idempotent call never runs twice, and an answered call ran (each server
  writes the calls it starts to a file);
* ``stats()`` adds up: ``calls`` counts the calls made, ``pending`` and
  ``waiting`` come back to 0 once the calls end, and once every server is up
  again the client is connected to all three;
* no callback raised in the event loop; once ``close()`` returns every
  connection is closed, and no task is left.

Run long from the command line, many seeds, bounded in time::

    python tests/client_chaos.py --seconds 600 --seed 1000 [--loop uvloop]

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
from chaos import Report, command_line
from client_server import Record, Where

#: Multiply every time bound by this (AMP_TEST_TIME_SCALE) on a slow machine.
TIME = float(os.environ.get("AMP_TEST_TIME_SCALE", "1"))
#: How long the calls of one scenario may take to end, all of them.
CALL_DEADLINE = 15.0 * TIME
#: The bound on close(), on starting a server and on the checks of a quiet client.
PHASE_DEADLINE = 10.0 * TIME
#: How long a killed server may take to listen again, in the scenarios' plans.
RESTART = 1.0
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
SERVER = pathlib.Path(__file__).parent / "client_chaos_server.py"


@dataclasses.dataclass
class Plan:
    """One caller: what it calls, when, and whether it is cancelled."""

    n: int
    idempotent: bool
    start: float
    delay: float
    cancel_after: float | None = None
    outcome: tuple[str, Any] | None = None
    outcomes: int = 0
    began: float = 0.0
    ended: float = 0.0
    refused_at_entry: bool = False

    def describe(self) -> str:
        kind = "Where" if self.idempotent else "Record"
        cancel = "" if self.cancel_after is None else f" cancel@+{self.cancel_after:.3f}"
        return f"#{self.n} {kind}({self.delay:.2f}) @{self.start:.3f}{cancel}"


@dataclasses.dataclass
class Event:
    at: float
    action: str  # "kill", "stop", or "blackout" (every server killed at once)
    server: int  # (-1 for a blackout)
    back_after: float  # restart, or SIGCONT, after this long


@dataclasses.dataclass
class Scenario:
    seed: int
    options: dict[str, Any]
    plans: list[Plan]
    events: list[Event]
    close_at: float | None
    cancel_close: float | None  # cancel close() after this long, and call it again

    def summary(self) -> str:
        close = "after the calls" if self.close_at is None else f"at {self.close_at:.3f}"
        events = ", ".join(
            f"{e.action} {e.server}@{e.at:.2f}+{e.back_after:.2f}" for e in self.events
        )
        return (
            f"seed {self.seed}: {self.options}, {len(self.plans)} calls, [{events}], close {close}"
            f"{'' if self.cancel_close is None else f' cancelled after {self.cancel_close:.3f}'}"
        )


def out_with(events: list[Event], event: Event) -> set[int]:
    """The servers out (killed or stopped) at some moment of ``event``, its own included."""
    return {
        e.server
        for e in events
        if e.at <= event.at + event.back_after + RESTART
        and event.at <= e.at + e.back_after + RESTART
    }


def make_scenario(seed: int) -> Scenario:
    """The scenario of ``seed``: everything random in a run comes from here."""
    rng = random.Random(seed)
    options: dict[str, Any] = {
        "connect_timeout": rng.choice([0.5, 1.0, 2.0]) * TIME,
        "grace": rng.choice([0.0, 0.1, 0.5, 2.0]),
        "backoff_initial": 0.02,
        "backoff_max": rng.choice([0.05, 0.2]),
        "healthy_after": rng.choice([0.1, 0.5]),
        "max_retries": 20,
    }
    plans = []
    for n in range(rng.randint(20, 50)):
        plan = Plan(n, rng.random() < 0.5, start=rng.uniform(0, 2.0), delay=rng.uniform(0, 0.3))
        roll = rng.random()
        if roll < 0.05:
            plan.cancel_after = 0.0  # before its task ever runs
        elif roll < 0.3:
            plan.cancel_after = rng.uniform(0, 0.4)
        plans.append(plan)
    # Never more than two servers out at once: one is always up.
    events: list[Event] = []
    for _ in range(rng.randint(0, 5)):
        at = rng.uniform(0.1, 2.2)
        event = Event(at, rng.choice(["kill", "stop"]), rng.randrange(3), rng.uniform(0.05, 0.8))
        candidate = [*events, event]
        if all(len(out_with(candidate, e)) <= 2 for e in candidate):
            events.append(event)
    if rng.random() < 0.2:
        # A blackout instead: every server killed at once, and started again.
        events = [Event(rng.uniform(0.2, 1.5), "blackout", -1, rng.uniform(0.05, 0.6))]
    events.sort(key=lambda e: e.at)
    close_at = None if rng.random() < 0.4 else rng.uniform(0.3, 2.5)
    cancel_close = rng.uniform(0, 0.05) if rng.random() < 0.2 else None
    if cancel_close is not None:
        options["grace"] = 2.0  # so that the cancellation lands in the drain
    options["connections_per_address"] = rng.choice([1, 1, 2])
    return Scenario(seed, options, plans, events, close_at, cancel_close)


class Server:
    """A client_chaos_server.py process on one address, started again on demand."""

    def __init__(self, host: str, log: pathlib.Path, errors: pathlib.Path) -> None:
        self.host = host
        self.port = 0
        self.log = log
        self.errors = errors
        self.process: asyncio.subprocess.Process | None = None
        # (killed at, running again at) for each kill
        self.deaths: list[tuple[float, float]] = []
        self.lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        with open(self.errors, "ab") as errors:  # noqa: ASYNC230  (a local file)
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SERVER),
                self.host,
                str(self.port),
                str(self.log),
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
            )
        assert self.process.stdout is not None
        async with asyncio.timeout(PHASE_DEADLINE):
            line = await self.process.stdout.readline()
        assert line.split()[:1] == [b"listening"], line
        self.port = int(line.split()[2])

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.returncode is None:
            os.kill(self.process.pid, number)

    async def kill(self) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        async with asyncio.timeout(PHASE_DEADLINE):
            await self.process.wait()
        self.process = None


async def run_seed(seed: int) -> Report:
    """Run the scenario of ``seed`` against three server processes and check every invariant."""
    scenario = make_scenario(seed)
    report = Report(scenario, [], script="client_chaos.py")
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []
    old_handler = loop.get_exception_handler()

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    with tempfile.TemporaryDirectory(prefix="client-chaos-") as name:
        directory = pathlib.Path(name)
        servers = [
            Server(host, directory / f"calls-{i}.log", directory / f"server-{i}.err")
            for i, host in enumerate(HOSTS)
        ]
        try:
            for server in servers:
                server.port = servers[0].port
                await server.start()
            tasks_before = asyncio.all_tasks()
            loop.set_exception_handler(on_error)
            try:
                await _play(scenario, servers, report.problems)
            finally:
                loop.set_exception_handler(old_handler)
            left = asyncio.all_tasks() - tasks_before
            if left:
                report.problems.append(f"tasks left after close(): {left}")
            _check_traces(scenario, servers, report.problems)
        finally:
            for server in servers:
                await server.kill()
    report.problems.extend(f"an event loop callback failed: {e}" for e in loop_errors)
    report.calls = len(scenario.plans)
    return report


def _resolver(*addresses: str) -> Any:
    async def resolve(host: str) -> list[str]:
        return list(addresses)

    return resolve


async def _play(scenario: Scenario, servers: list[Server], problems: list[str]) -> None:
    loop = asyncio.get_running_loop()
    client = amp.Client(
        f"amp.test:{servers[0].port}", resolver=_resolver(*HOSTS), **scenario.options
    )
    closed_at: list[float] = []
    # While a server is stopped, the client may take the addresses it has as they are.
    async with asyncio.timeout(PHASE_DEADLINE):
        await client.__aenter__()

    async def caller(plan: Plan) -> None:
        await asyncio.sleep(plan.start)
        plan.began = loop.time()
        command = Where if plan.idempotent else Record
        if client.closed:
            plan.refused_at_entry = True
        try:
            future = client.call_remote(command, n=plan.n, delay=plan.delay)
            if plan.cancel_after == 0.0:
                future.cancel()
            answer = await future
        except BaseException as error:
            plan.outcomes += 1
            plan.outcome = ("error", error)
            if not isinstance(error, Exception | asyncio.CancelledError):
                raise
        else:
            plan.outcomes += 1
            plan.outcome = ("answer", answer)
        plan.ended = loop.time()

    tasks = {plan.n: asyncio.create_task(caller(plan)) for plan in scenario.plans}

    async def canceller(plan: Plan) -> None:
        assert plan.cancel_after is not None
        await asyncio.sleep(plan.start + plan.cancel_after)
        tasks[plan.n].cancel()

    # (from the first kill to the last server listening again)
    blackouts: list[tuple[float, float]] = []

    async def chaos(event: Event) -> None:
        await asyncio.sleep(event.at)
        if event.action == "blackout":
            blackouts.append((loop.time(), float("inf")))
            for server in servers:
                server.deaths.append((loop.time(), float("inf")))
                await server.kill()
            await asyncio.sleep(event.back_after)
            for server in servers:
                await server.start()
                server.deaths[-1] = (server.deaths[-1][0], loop.time())
            blackouts[-1] = (blackouts[-1][0], loop.time())
            return
        server = servers[event.server]
        async with server.lock:  # one event at a time on each server
            if event.action == "kill":
                server.deaths.append((loop.time(), float("inf")))
                await server.kill()
                await asyncio.sleep(event.back_after)
                await server.start()
                server.deaths[-1] = (server.deaths[-1][0], loop.time())
            else:
                server.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(event.back_after)
                finally:
                    server.signal(signal.SIGCONT)

    async def closer() -> None:
        if scenario.close_at is not None:
            await asyncio.sleep(scenario.close_at)
        else:
            await asyncio.wait(tasks.values())
            await asyncio.wait(chaotic)
            await _check_quiet(client, scenario.options["connections_per_address"], problems)
        closed_at.append(loop.time())
        protocols = set(client.connections)
        if scenario.cancel_close is not None:
            # close() cancelled (as by a timeout around it), then called again.
            first = asyncio.create_task(client.close())
            await asyncio.sleep(scenario.cancel_close)
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
        await client.close()
        # Right as close() returns: every connection closed.
        still = [protocol for protocol in protocols if not protocol.closed]
        if still or client.connections:
            problems.append(f"close() returned with connections open: {still}, {client.stats()}")

    helpers = [asyncio.create_task(canceller(p)) for p in scenario.plans if p.cancel_after]
    chaotic = [asyncio.create_task(chaos(e)) for e in scenario.events] or [
        asyncio.create_task(asyncio.sleep(0))
    ]
    closing = asyncio.create_task(closer())
    try:
        async with asyncio.timeout(CALL_DEADLINE):
            await asyncio.wait(tasks.values())
    except TimeoutError:
        stuck = [p.describe() for p in scenario.plans if not tasks[p.n].done()]
        problems.append(f"calls that never ended: {stuck}; {client.stats()}")
    try:
        async with asyncio.timeout(PHASE_DEADLINE):
            await asyncio.wait(chaotic)
            await closing
    except TimeoutError:
        problems.append(f"close() did not return; {client.stats()}")
    for task in [*tasks.values(), *helpers, *chaotic, closing]:
        task.cancel()
    await asyncio.gather(*tasks.values(), *helpers, *chaotic, closing, return_exceptions=True)
    stats = client.stats()
    if stats["connected"] or stats["pending"] or stats["waiting"]:
        problems.append(f"after close(): {stats}")
    entered = sum(1 for plan in scenario.plans if not plan.refused_at_entry)
    if stats["calls"] != entered:
        problems.append(f"calls = {stats['calls']}, but {entered} calls were made")
    _check_outcomes(scenario, servers, closed_at, blackouts, problems)


async def _check_quiet(client: amp.Client, per_address: int, problems: list[str]) -> None:
    """Every call ended and every server is up: nothing pending, every connection back."""
    deadline = asyncio.get_running_loop().time() + PHASE_DEADLINE
    while True:
        stats = client.stats()
        if (
            stats["pending"] == 0
            and stats["waiting"] == 0
            and stats["connected"] == 3 * per_address
            and len(client.connections) == 3 * per_address
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            problems.append(f"the client never came back to three quiet connections: {stats}")
            return
        await asyncio.sleep(0.01)


def _check_outcomes(
    scenario: Scenario,
    servers: list[Server],
    closed_at: list[float],
    blackouts: list[tuple[float, float]],
    problems: list[str],
) -> None:
    for plan in scenario.plans:
        where = plan.describe()
        if plan.outcomes != 1:
            problems.append(f"{where} ended {plan.outcomes} times")
            continue
        assert plan.outcome is not None
        what, value = plan.outcome
        if what == "answer":
            if value["n"] != plan.n:
                problems.append(f"{where}: wrong answer {value!r}")
            continue
        after_close = bool(closed_at) and plan.ended >= closed_at[0]
        if isinstance(value, asyncio.CancelledError):
            if plan.cancel_after is None:
                problems.append(f"{where}: cancelled, but nobody cancelled it")
        elif isinstance(value, amp.NoConnectionError):
            # Only when every server was down during the call, or the client closed.
            dark = any(start <= plan.ended and plan.began <= end for start, end in blackouts)
            if not (after_close or dark):
                problems.append(f"{where}: NoConnectionError with a server up: {value}")
        elif isinstance(value, amp.ConnectionLostError):
            if after_close:
                continue
            if plan.idempotent:
                problems.append(f"{where}: idempotent, and lost: {value}")
                continue
            # (killed during the call, or just before it, before the client saw it)
            killed = [
                server
                for server in servers
                for dead, back in server.deaths
                if dead <= plan.ended and plan.began <= back
            ]
            if not any(server.host in str(value) for server in killed):
                deaths = {server.host: server.deaths for server in servers}
                problems.append(
                    f"{where}: lost, but no server was killed under it: {value} "
                    f"(from {plan.began:.3f} to {plan.ended:.3f}; deaths {deaths})"
                )
        else:
            problems.append(f"{where}: unexpected {type(value).__name__}: {value}")


def _check_traces(scenario: Scenario, servers: list[Server], problems: list[str]) -> None:
    ran: dict[tuple[str, int], int] = {}
    for server in servers:
        if server.log.exists():
            for line in server.log.read_text().splitlines():
                kind, n = line.split()
                ran[kind, int(n)] = ran.get((kind, int(n)), 0) + 1
    for plan in scenario.plans:
        kind = "where" if plan.idempotent else "record"
        runs = ran.get((kind, plan.n), 0)
        if not plan.idempotent and runs > 1:
            problems.append(f"{plan.describe()}: not idempotent, and ran {runs} times")
        if plan.outcome is not None and plan.outcome[0] == "answer" and runs < 1:
            problems.append(f"{plan.describe()}: answered, but never ran")


if __name__ == "__main__":
    command_line(__doc__, run_seed, CALL_DEADLINE + 4 * PHASE_DEADLINE)
