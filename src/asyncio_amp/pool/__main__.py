"""``python -m asyncio_amp.pool MODULE:CLASS --fd N --parent PID``: a pool's worker process."""

from __future__ import annotations

from ._child import main

main()
