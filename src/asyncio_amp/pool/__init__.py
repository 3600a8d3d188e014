"""
asyncio_amp.pool: a process pool whose workers answer AMP calls.

CPU-bound work runs in worker processes, each a fresh interpreter that answers
the pool's calls with an [`AMPProtocol`][asyncio_amp.AMPProtocol] subclass.
Cancelled and timed-out calls stop their work (their worker is killed and
replaced), a crashed worker fails only its own calls, and workers may call their
parent back.
"""

from __future__ import annotations

from ._errors import PoolClosedError, WorkerCrashedError
from ._pool import ProcessPool

__all__ = ["PoolClosedError", "ProcessPool", "WorkerCrashedError"]
