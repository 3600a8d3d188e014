"""A child process for the tests: serves NestedServer on 127.0.0.1 with tiny limits.

It prints ``port N`` once it listens, then serves until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

import asyncio_amp as amp
from test_limits import NestedServer


async def main() -> None:
    server = await amp.serve(NestedServer, "127.0.0.1", 0, max_responders=1, max_pending_calls=1)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
