"""
A server process for the tests of Client: each answer names the server that gave it.

    python client_server.py HOST PORT

It listens on HOST:PORT (PORT 0 picks one), prints ``listening HOST PORT`` on
standard output once it does, and serves until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

import asyncio_amp as amp


class Where(amp.Command):
    """An idempotent call: the client may send it again on another connection."""

    arguments = [("n", amp.Integer()), ("delay", amp.Float())]
    response = [("server", amp.String()), ("n", amp.Integer())]
    idempotent = True


class Record(amp.Command):
    """The same call, not idempotent: lost with its connection, it fails."""

    arguments = [("n", amp.Integer()), ("delay", amp.Float())]
    response = [("server", amp.String()), ("n", amp.Integer())]


class Named(amp.AMPProtocol):
    """Answers with the address the connection came in on."""

    def name(self) -> str:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        if isinstance(sockname, str):
            return sockname  # a UNIX socket's path
        host, port = sockname[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @Where.responder
    async def where(self, n: int, delay: float) -> dict[str, object]:
        await asyncio.sleep(delay)
        return {"server": self.name(), "n": n}

    @Record.responder
    async def record(self, n: int, delay: float) -> dict[str, object]:
        await asyncio.sleep(delay)
        return {"server": self.name(), "n": n}


async def main(host: str, port: int) -> None:
    server = await amp.serve(Named, host, port)
    bound = server.sockets[0].getsockname()
    print("listening", bound[0], bound[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
