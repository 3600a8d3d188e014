"""
asyncio-amp with OpenTelemetry tracing on both sides: ``asyncio_amp.otel.Tracing``
with the SDK's tracer provider and an in-memory exporter (cleared as it fills),
so that every span is made, ended and exported, and nothing is sent anywhere.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import asyncio_amp
from asyncio_amp.otel import Tracing

from . import amp

__all__ = ["client", "inproc", "serve"]

# The exporter keeps the spans it is given: forget them every this many.
KEEP_SPANS = 10_000


class _Exporter(InMemorySpanExporter):
    def __init__(self) -> None:
        super().__init__()
        self.kept = 0

    def export(self, spans: Any) -> Any:
        self.kept += len(spans)
        if self.kept >= KEEP_SPANS:
            self.clear()
            self.kept = len(spans)
        return super().export(spans)


_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_Exporter()))
_tracing = Tracing(tracer_provider=_provider)


def _middleware() -> list[asyncio_amp.Middleware]:
    return [_tracing]


amp.middleware = _middleware
client, inproc, serve = amp.client, amp.inproc, amp.serve
