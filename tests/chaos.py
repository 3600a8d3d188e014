"""
What the chaos harnesses of ProcessPool and Client share (pool_chaos.py,
client_chaos.py): a seed's report, the loop that runs many seeds bounded in
time, and the command line.

Each harness provides ``run_seed(seed) -> Report``, whose scenario has a
``seed`` and a one-line ``summary()``; everything else is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


@dataclasses.dataclass
class Report:
    """What one seed's run found: nothing (``ok``), or problems to print."""

    scenario: Any  # a harness's Scenario: its seed and summary() are used here
    problems: list[str]
    calls: int = 0
    #: The harness's file under tests/, for the line that reproduces the seed.
    script: str = "chaos.py"

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        lines = [self.scenario.summary(), *self.problems[:30]]
        if len(self.problems) > 30:
            lines.append(f"... and {len(self.problems) - 30} more")
        lines.append(
            f"(reproduce: python tests/{self.script} --seed {self.scenario.seed} --runs 1)"
        )
        return "\n".join(lines)


async def run_many(
    run_seed: Callable[[int], Awaitable[Report]],
    seed: int,
    runs: int,
    seconds: float,
    bound: float,
) -> int:
    """Run seeds from ``seed`` on, each within ``bound`` seconds, until ``runs`` or ``seconds``."""
    logging.getLogger("asyncio_amp").addHandler(logging.NullHandler())
    logging.getLogger("asyncio_amp").propagate = False
    began = time.monotonic()
    failures = calls = done = 0
    while done < runs and time.monotonic() - began < seconds:
        async with asyncio.timeout(bound):
            report = await run_seed(seed + done)
        done += 1
        calls += report.calls
        if not report.ok:
            failures += 1
            print(report.describe(), flush=True)
        if done % 20 == 0:
            print(f"{done} seeds, {calls} calls, {failures} failed", flush=True)
    print(f"seeds {seed}..{seed + done - 1}: {done} run, {calls} calls, {failures} failed")
    return 1 if failures else 0


def command_line(doc: str, run_seed: Callable[[int], Awaitable[Report]], bound: float) -> None:
    """The harnesses' ``--seed``, ``--runs``, ``--seconds`` and ``--loop``; exits."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()
    main = run_many(run_seed, options.seed, options.runs, options.seconds, bound)
    if options.loop == "uvloop":
        import uvloop

        sys.exit(uvloop.run(main))
    sys.exit(asyncio.run(main))
