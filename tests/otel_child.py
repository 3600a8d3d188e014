"""
A traced AMP server in a child process, for the tests of tracing across processes.

It serves on 127.0.0.1 and a free port, prints the port on a line of its own,
and runs until its standard input closes. Its spans go to an in-memory exporter
of its own, which the ``FinishedSpans`` command returns as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncio_amp as amp
from asyncio_amp.otel import Tracing


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: b"ZERO_DIVISION"}


class FinishedSpans(amp.Command):
    arguments: list[tuple[str, amp.Argument[Any]]] = []
    response = [("spans", amp.String())]


def span_record(span: Any) -> dict[str, Any]:
    """What the tests compare of a finished span, as JSON-friendly values."""
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent_id": span.parent.span_id if span.parent is not None else None,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


class Leaf(amp.AMPProtocol):
    """The last hop: sums, divides, and reports its spans."""

    exporter: InMemorySpanExporter

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}

    @FinishedSpans.responder
    def finished_spans(self) -> dict[str, Any]:
        spans = [span_record(span) for span in self.exporter.get_finished_spans()]
        return {"spans": json.dumps(spans)}


async def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    Leaf.exporter = exporter
    tracing = Tracing(tracer_provider=provider)
    server = await amp.serve(Leaf, "127.0.0.1", 0, middleware=[tracing])
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
