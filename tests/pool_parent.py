"""
A parent process for the pool's tests: it starts a pool of two workers, keeps
one busy, prints their pids, and waits to be killed.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from asyncio_amp.pool import ProcessPool
from pool_worker import Spin, Worker


async def main() -> None:
    async with ProcessPool(Worker, min_workers=2, max_workers=2, output="log") as pool:
        busy = asyncio.ensure_future(pool.call_remote(Spin, seconds=120.0))
        await asyncio.sleep(0.2)  # the call reaches a worker, which then holds the CPU
        print(" ".join(str(pid) for pid in pool.pids), flush=True)
        await busy


asyncio.run(main())
