"""A client's figures in Prometheus metrics, read from the registry at each scrape."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

import asyncio_amp as amp
from asyncio_amp.prometheus import Metrics


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Adder(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}


async def main() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    server = await amp.serve(Adder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        # --8<-- [start:watch]
        async with amp.Client(f"127.0.0.1:{port}", middleware=[metrics]) as client:
            metrics.watch(client, name="adder")  # a ProcessPool the same way
            for a in range(3):
                await client.call_remote(Sum, a=a, b=1)
            text = generate_latest(registry).decode()  # what /metrics would say
        # --8<-- [end:watch]
        # Closed, the client is forgotten: its figures leave the registry.
        assert "amp_client_calls_total" not in generate_latest(registry).decode()
    for line in text.splitlines():
        if line.startswith("amp_client_") and "_created" not in line:
            print(line)


asyncio.run(main())
