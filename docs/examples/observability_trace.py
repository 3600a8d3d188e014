"""
A trace across three services, A -> B -> C, drawn as text from the in-memory exporter.

Durations are shown rounded down to 100 ms, so that the output is the same on
every run: C's ``Lookup`` takes 200 ms, everything else much less.
"""

from __future__ import annotations

import asyncio
from typing import Any

# --8<-- [start:setup]
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncio_amp as amp
from asyncio_amp.otel import Tracing

exporter = InMemorySpanExporter()  # in production: an OTLP exporter, say
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracing = Tracing(tracer_provider=provider)  # default: the global tracer provider
# --8<-- [end:setup]


class Lookup(amp.Command):
    arguments = [("sku", amp.String())]
    response = [("price", amp.Integer())]
    errors = {KeyError: b"NO_SUCH_SKU"}


class Checkout(amp.Command):
    arguments = [("skus", amp.ListOf(amp.String()))]
    response = [("total", amp.Integer())]
    errors = {KeyError: b"NO_SUCH_SKU"}


class Prices(amp.AMPProtocol):
    """C: looks prices up, slowly."""

    @Lookup.responder
    async def lookup(self, sku: str) -> dict[str, Any]:
        await asyncio.sleep(0.2 if sku == "book" else 0)
        return {"price": {"book": 25, "pen": 2}[sku]}


# --8<-- [start:nested]
class Shop(amp.AMPProtocol):
    """B: its responder calls C; those calls are children of its server span."""

    prices: amp.AMPProtocol

    @Checkout.responder
    async def checkout(self, skus: list[str]) -> dict[str, Any]:
        answers = await asyncio.gather(*(self.prices.call_remote(Lookup, sku=sku) for sku in skus))
        return {"total": sum(answer["price"] for answer in answers)}


# --8<-- [end:nested]


# --8<-- [start:render]
def render(spans: tuple[ReadableSpan, ...]) -> None:
    """Print spans as a tree: name, kind, duration (rounded down to 100 ms), status."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda span: span.start_time or 0):
        parent = span.parent.span_id if span.parent else None
        children.setdefault(parent, []).append(span)

    def show(span: ReadableSpan, prefix: str, last: bool, root: bool) -> None:
        assert span.start_time is not None and span.end_time is not None
        ms = (span.end_time - span.start_time) // 100_000_000 * 100
        duration = f"{ms} ms" if ms else "<100 ms"
        status = span.status.status_code.name.lower().replace("unset", "ok")
        if span.attributes and "error.type" in span.attributes:
            status += f" {span.attributes['error.type']}"
        branch = "" if root else ("└─ " if last else "├─ ")
        label = f"{prefix}{branch}{span.name} ({span.kind.name.lower()})"
        print(f"{label:<36}{duration:>8}  {status}")
        below = children.get(span.context.span_id, [])
        for i, child in enumerate(below):
            more = "" if root else ("   " if last else "│  ")
            show(child, prefix + more, i == len(below) - 1, False)

    for root in children.get(None, []):
        show(root, "", True, True)


# --8<-- [end:render]


async def main() -> None:
    # --8<-- [start:serve]
    c = await amp.serve(Prices, "127.0.0.1", 0, middleware=[tracing])
    b = await amp.serve(Shop, "127.0.0.1", 0, middleware=[tracing])
    c_port = c.sockets[0].getsockname()[1]
    b_port = b.sockets[0].getsockname()[1]
    to_c = await amp.connect("127.0.0.1", c_port, middleware=[tracing])
    to_b = await amp.connect("127.0.0.1", b_port, middleware=[tracing])
    # --8<-- [end:serve]
    async with c, b, to_c, to_b:
        Shop.prices = to_c
        tracer = provider.get_tracer("shop-frontend")
        with tracer.start_as_current_span("web request"):
            print(await to_b.call_remote(Checkout, skus=["pen", "book"]))
            try:
                await to_b.call_remote(Checkout, skus=["pen", "lamp"])
            except KeyError:
                print("refused: no such sku")
    render(exporter.get_finished_spans())


asyncio.run(main())
