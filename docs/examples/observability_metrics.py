"""Prometheus metrics of a server, read from its registry."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# --8<-- [start:metrics]
from prometheus_client import CollectorRegistry, generate_latest

import asyncio_amp as amp
from asyncio_amp.prometheus import Metrics

# One Metrics per registry; the default is prometheus_client's global REGISTRY,
# which prometheus_client.start_http_server() serves at /metrics.
registry = CollectorRegistry()
metrics = Metrics(registry)
# --8<-- [end:metrics]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: b"ZERO_DIVISION"}


class Calculator(amp.AMPProtocol):
    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}


async def main() -> None:
    # --8<-- [start:serve]
    server = await amp.serve(Calculator, "127.0.0.1", 0, middleware=[metrics])
    # --8<-- [end:serve]
    port = server.sockets[0].getsockname()[1]
    async with server, await amp.connect("127.0.0.1", port) as proto:
        for denominator in (1, 2, 0, 4):
            with contextlib.suppress(ZeroDivisionError):
                await proto.call_remote(Divide, numerator=1, denominator=denominator)
        # A command the server has no Command class for: counted as "other".
        with contextlib.suppress(amp.UnhandledCommandError):
            await proto.call_remote_box("NoSuchCommand", {})
        text = generate_latest(registry).decode()
    for line in text.splitlines():
        wanted = ("amp_calls_total", "amp_connections_", "amp_call_duration_seconds_count")
        if line.startswith(wanted) and "_created" not in line:
            print(line)


asyncio.run(main())
