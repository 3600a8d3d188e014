"""
A server process for the Client's chaos test: client_server.py's, with a trace of its calls.

    python client_chaos_server.py HOST PORT LOG

It serves like client_server.py, and appends ``where N`` or ``record N`` to the
file LOG as each call starts (before it answers), so that the test can tell
which calls ran, and how many times.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncio_amp as amp
from client_server import Named, Record, Where

LOG = ""


def trace(kind: str, n: int) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{kind} {n}\n".encode())
    finally:
        os.close(fd)


class Traced(Named):
    """Answers like Named, and leaves a trace of each call it starts."""

    @Where.responder
    async def where(self, n: int, delay: float) -> dict[str, object]:
        trace("where", n)
        await asyncio.sleep(delay)
        return {"server": self.name(), "n": n}

    @Record.responder
    async def record(self, n: int, delay: float) -> dict[str, object]:
        trace("record", n)
        await asyncio.sleep(delay)
        return {"server": self.name(), "n": n}


async def main(host: str, port: int) -> None:
    server = await amp.serve(Traced, host, port)
    bound = server.sockets[0].getsockname()
    print("listening", bound[0], bound[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    LOG = sys.argv[3]
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
