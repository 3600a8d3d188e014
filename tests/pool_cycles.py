"""
Start and close a process pool with real workers again and again, and check that nothing leaks.

The test suite runs a dozen real cycles (``test_pool.py``); this runs as many as
asked, for a longer check by hand:

    python tests/pool_cycles.py --cycles 1000 [--loop asyncio|uvloop]

Each cycle starts a pool whose worker is a fresh interpreter, makes one call,
and closes it; every tenth cycle also times a call out (the worker is killed)
and makes a worker crash. After every cycle the open descriptors, tasks, threads
and child processes (zombies included) must be exactly what they were before
the first. It prints the figures and exits 1 at the first difference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asyncio_amp.pool import ProcessPool, WorkerCrashedError
from pool_worker import Die, Spin, Sum, Worker


def resources() -> dict[str, int]:
    """Open descriptors, tasks, threads and child processes (zombies too) of this process."""
    parent = str(os.getpid())
    children = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children += fields[1] == parent
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "children": children,
    }


async def cycle(number: int) -> None:
    async with asyncio.timeout(60):
        async with ProcessPool(Worker, min_workers=1, timeout=0.5, output="log") as pool:
            assert await pool.call_remote(Sum, a=number, b=1) == {"total": number + 1}
            if number % 10 == 5:
                try:
                    await pool.call_remote(Spin, seconds=60.0)
                except TimeoutError:
                    pass
                else:
                    raise AssertionError("the hung call did not time out")
            if number % 10 == 7:
                try:
                    await pool.call_remote(Die, how="exit")
                except WorkerCrashedError:
                    pass
                else:
                    raise AssertionError("the crash was not reported")


async def main(cycles: int) -> int:
    await cycle(0)  # what stays loaded after the first (modules, the loop's own fds)
    before = resources()
    began = time.monotonic()
    for number in range(1, cycles + 1):
        await cycle(number)
        now = resources()
        if now != before:
            print(f"cycle {number}: {now} after, {before} before", flush=True)
            return 1
        if number % 100 == 0:
            print(f"{number} cycles in {time.monotonic() - began:.0f} s: {now}", flush=True)
    print(f"{cycles} cycles in {time.monotonic() - began:.0f} s; nothing left: {before}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    options = parser.parse_args()
    if options.loop == "uvloop":
        import uvloop

        sys.exit(uvloop.run(main(options.cycles)))
    sys.exit(asyncio.run(main(options.cycles)))
