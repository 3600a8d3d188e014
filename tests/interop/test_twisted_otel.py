"""Tracing on our side of a connection with a real Twisted AMP peer, both ways.

Our traced calls carry the trace context in an extra key of the box
(asyncio_amp.otel.TRACE_KEY): Twisted ignores it and answers as usual. Twisted's
calls carry none: our server spans start traces of their own, and the calls our
responders make back to Twisted are their children.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from commands import CallBack, Divide, Notify, RecordingProtocol, Sum
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from peer import PeerError, TwistedPeer

from asyncio_amp.otel import TRACE_KEY, Tracing
from helpers import LONG, client, running_server


class Ours(RecordingProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}

    @CallBack.responder
    async def call_back(self, a: int, b: int) -> dict[str, Any]:
        answer = await self.call_remote(Sum, a=a, b=b)
        return {"total": answer["total"] + 1}


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def traced_ours(provider: TracerProvider) -> Ours:
    protocol = Ours()
    protocol.middleware = [Tracing(tracer_provider=provider)]
    return protocol


async def test_our_traced_client_calls_twisted(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port, lambda: traced_ours(provider)) as proto:
            conn = int((await peer.wait_event("accepted"))["conn"])
            with provider.get_tracer("test").start_as_current_span("request"):
                assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
                with pytest.raises(ZeroDivisionError):
                    await proto.call_remote(Divide, numerator=1, denominator=0)
                assert await proto.call_remote(Notify, message="hi") is None
                # Twisted's responder calls our Sum back (and adds 1000): a server span of ours.
                assert await proto.call_remote(CallBack, a=2, b=3) == {"total": 1005}
            # Every call went out with the trace context, and Twisted answered.
            sent = [box for box in proto.sent_boxes() if b"_command" in box]
            assert [box[b"_command"] for box in sent] == [b"Sum", b"Divide", b"Notify", b"CallBack"]
            assert all(box[TRACE_KEY].startswith(b"traceparent: 00-") for box in sent)
            received = await peer.request("received", conn=conn)
            assert [r["command"] for r in received] == ["Sum", "Divide", "Notify", "CallBack"]
    finally:
        await peer.stop()
    spans = exporter.get_finished_spans()
    calls = {s.name: s for s in spans if s.kind is SpanKind.CLIENT}
    assert sorted(calls) == ["CallBack", "Divide", "Notify", "Sum"]
    assert calls["Divide"].status.status_code is StatusCode.ERROR
    assert calls["Sum"].status.status_code is StatusCode.UNSET
    (served,) = [s for s in spans if s.kind is SpanKind.SERVER]
    # Twisted sends no trace context: the call back starts a trace of its own.
    assert served.name == "Sum"
    assert served.parent is None
    assert served.status.status_code is StatusCode.UNSET


async def test_twisted_calls_our_traced_server(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    async with running_server(lambda: traced_ours(provider)) as (_, port, protocols):
        peer = await TwistedPeer.start()
        try:
            conn = await peer.connect(port)
            assert await peer.call(conn, "Sum", a=1, b=2) == {"total": 3}
            with pytest.raises(PeerError) as mapped:
                await peer.call(conn, "Divide", numerator=1, denominator=0)
            assert mapped.value.code == "ZERO_DIVISION"
            # Our responder calls Twisted back with the trace context in the box.
            async with asyncio.timeout(LONG):
                assert await peer.call(conn, "CallBack", a=2, b=3) == {"total": 6}
            (ours,) = protocols
            (nested,) = [box for box in ours.sent_boxes() if box.get(b"_command") == b"Sum"]
            assert nested[TRACE_KEY].startswith(b"traceparent: 00-")
        finally:
            await peer.stop()
    spans = exporter.get_finished_spans()
    served = {s.name: s for s in spans if s.kind is SpanKind.SERVER}
    assert sorted(served) == ["CallBack", "Divide", "Sum"]
    assert all(span.parent is None for span in served.values())
    assert served["Divide"].status.status_code is StatusCode.ERROR
    assert served["Divide"].attributes is not None
    assert served["Divide"].attributes["rpc.response.status_code"] == "ZERO_DIVISION"
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert call.name == "Sum"
    assert call.parent is not None
    assert call.parent.span_id == served["CallBack"].context.span_id
    assert call.context.trace_id == served["CallBack"].context.trace_id
