"""
A calculator service for the command-line tool's examples.

Serve it with the command-line tool, from this directory::

    asyncio-amp serve calculator:Calculator --port 7000

and call it::

    asyncio-amp call 127.0.0.1:7000 Sum a=13 b=81
    asyncio-amp call 127.0.0.1:7000 Divide numerator=1 denominator=4 --commands calculator

Run as a program (``python examples/calculator.py``), it serves on a free port
of 127.0.0.1, calls itself once and exits.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Stats(amp.Command):
    """Summary statistics of a list of numbers."""

    arguments = [("values", amp.ListOf(amp.Float()))]
    response = [("count", amp.Integer()), ("mean", amp.Float()), ("median", amp.Float())]
    errors = {statistics.StatisticsError: "NO_DATA"}


class Log(amp.Command):
    """Print a line on the server; no answer."""

    arguments = [("message", amp.String())]
    requires_answer = False


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        return {"result": numerator / denominator}

    @Stats.responder
    def stats(self, values: list[float]) -> dict[str, Any]:
        return {
            "count": len(values),
            "mean": statistics.mean(values),
            "median": statistics.median(values),
        }

    @Log.responder
    def log(self, message: str) -> None:
        print(f"log: {message}", flush=True)


async def main() -> None:
    async with await amp.serve(Calculator, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with await amp.connect("127.0.0.1", port) as client:
            print(await client.call_remote(Sum, a=13, b=81))
            print(await client.call_remote(Stats, values=[1.0, 2.0, 6.0]))


if __name__ == "__main__":
    asyncio.run(main())
