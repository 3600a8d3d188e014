"""OpenTelemetry tracing (asyncio_amp.otel): spans on both sides of real connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import asyncio_amp as amp
from asyncio_amp.otel import TRACE_KEY, Tracing, decode_context, encode_context
from helpers import HOST, LONG, client, running_server
from otel_child import Divide, FinishedSpans, Sum

TESTS = pathlib.Path(__file__).parent


class Relay(amp.Command):
    """B's command: it sums by calling C."""

    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Divide.responder
    async def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind is kind]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_client_and_server_spans_are_linked_across_a_connection(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    tracing = Tracing(tracer_provider=provider)
    async with (
        running_server(Calculator, middleware=[tracing]) as (_, port, servers),
        client(port, lambda: amp.AMPProtocol(middleware=[tracing])) as proto,
    ):
        with provider.get_tracer("test").start_as_current_span("request") as request:
            assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        local_port = proto.transport.get_extra_info("sockname")[1]
    spans = exporter.get_finished_spans()
    (call,) = by_kind(spans, SpanKind.CLIENT)
    (served,) = by_kind(spans, SpanKind.SERVER)
    trace_id = request.get_span_context().trace_id
    assert call.name == served.name == "Sum"
    assert call.context.trace_id == served.context.trace_id == trace_id
    assert parent_id(call) == request.get_span_context().span_id
    assert parent_id(served) == call.context.span_id
    assert served.parent is not None and served.parent.is_remote
    assert call.status.status_code is served.status.status_code is StatusCode.UNSET
    assert dict(call.attributes or {}) == {
        "rpc.system": "amp",
        "rpc.system.name": "amp",
        "rpc.method": "Sum",
        "server.address": HOST,
        "server.port": port,
        "network.peer.address": HOST,
        "network.peer.port": port,
        "network.transport": "tcp",
        "network.type": "ipv4",
    }
    assert dict(served.attributes or {}) == {
        "rpc.system": "amp",
        "rpc.system.name": "amp",
        "rpc.method": "Sum",
        "client.address": HOST,
        "client.port": local_port,
        "network.peer.address": HOST,
        "network.peer.port": local_port,
        "network.transport": "tcp",
        "network.type": "ipv4",
    }
    assert len(servers) == 1


async def test_a_call_without_a_current_span_starts_a_trace(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    tracing = Tracing(tracer_provider=provider)
    async with (
        running_server(Calculator, middleware=[tracing]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[tracing])) as proto,
    ):
        await asyncio.gather(*(proto.call_remote(Sum, a=i, b=i) for i in range(5)))
    spans = exporter.get_finished_spans()
    calls = by_kind(spans, SpanKind.CLIENT)
    served = by_kind(spans, SpanKind.SERVER)
    assert len(calls) == len(served) == 5
    assert all(call.parent is None for call in calls)
    # Each server span is the child of its own call, in its own trace.
    assert {(s.context.trace_id, parent_id(s)) for s in served} == {
        (c.context.trace_id, c.context.span_id) for c in calls
    }
    assert len({call.context.trace_id for call in calls}) == 5


async def test_errors_mark_both_spans(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    tracing = Tracing(tracer_provider=provider)
    async with (
        running_server(Calculator, middleware=[tracing]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[tracing])) as proto,
    ):
        with pytest.raises(ZeroDivisionError):
            await proto.call_remote(Divide, numerator=1, denominator=0)
        with pytest.raises(amp.UnhandledCommandError):
            await proto.call_remote_box("NoSuchCommand", {b"x": b"1"})
    spans = exporter.get_finished_spans()
    divide_call, other_call = by_kind(spans, SpanKind.CLIENT)
    divide_served, other_served = by_kind(spans, SpanKind.SERVER)
    for span in (divide_call, divide_served):
        assert span.name == "Divide"
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == "ZERO_DIVISION"
        assert span.attributes["rpc.response.status_code"] == "ZERO_DIVISION"
        assert [event.name for event in span.events] == ["exception"]
    assert other_call.name == "NoSuchCommand"
    assert other_call.attributes is not None
    assert other_call.attributes["error.type"] == "UNHANDLED"
    # An incoming command that no Command of ours names: a bounded span name.
    assert other_served.name == "_OTHER"
    assert other_served.attributes is not None
    assert other_served.attributes["rpc.method"] == "_OTHER"
    assert other_served.attributes["rpc.method_original"] == "NoSuchCommand"
    assert other_served.attributes["error.type"] == "UNHANDLED"
    assert parent_id(other_served) == other_call.context.span_id


async def test_the_context_travels_in_one_extra_key(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    seen: list[dict[bytes, bytes]] = []

    class Watch(amp.Middleware):
        async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
            seen.append(dict(call.extra))
            return await call_next(call)

    async with (
        running_server(Calculator, middleware=[Watch()]) as (_, port, _),
        client(
            port, lambda: amp.AMPProtocol(middleware=[Tracing(tracer_provider=provider)])
        ) as proto,
    ):
        await proto.call_remote(Sum, a=1, b=2)
    ((key, value),) = seen[0].items()
    assert key == TRACE_KEY
    (call,) = exporter.get_finished_spans()
    carrier = decode_context(value)
    context = call.context
    assert carrier == {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    }
    assert encode_context(carrier) == value


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"garbage",
        b"traceparent: 00-zz-zz-01",
        b"\xff\xfe:\x00",
        b"a: b\n" * 10_000,
        b":::\n\n",
    ],
)
async def test_a_junk_context_starts_a_new_trace(
    traced: tuple[TracerProvider, InMemorySpanExporter], junk: bytes
) -> None:
    provider, exporter = traced
    async with (
        running_server(Calculator, middleware=[Tracing(tracer_provider=provider)]) as (_, port, _),
        client(port) as proto,
    ):
        answer = await proto.call_remote_box("Sum", {b"a": b"1", b"b": b"2", TRACE_KEY: junk})
        assert answer[b"total"] == b"3"
    (served,) = exporter.get_finished_spans()
    assert served.parent is None
    assert served.status.status_code is StatusCode.UNSET


async def test_switches_turn_directions_and_propagation_off(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    server_side = Tracing(tracer_provider=provider, outgoing=False)
    client_side = Tracing(tracer_provider=provider, incoming=False, propagate=False)
    async with (
        running_server(Calculator, middleware=[server_side]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[client_side])) as proto,
    ):
        await proto.call_remote(Sum, a=1, b=2)
    call, served = sorted(exporter.get_finished_spans(), key=lambda s: s.kind.value, reverse=True)
    assert call.kind is SpanKind.CLIENT and served.kind is SpanKind.SERVER
    assert served.parent is None  # nothing propagated
    assert served.context.trace_id != call.context.trace_id


@contextlib.asynccontextmanager
async def leaf_process() -> AsyncIterator[int]:
    """The child process C: a traced server; yields its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(TESTS / "otel_child.py"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])},
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(LONG):
            line = await process.stdout.readline()
        yield int(line)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(LONG):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_a_trace_follows_two_hops_into_a_child_process(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    # A (a client here) calls B (a server here), whose responder calls C (a
    # server in a child process), each over its own TCP connection.
    provider, exporter = traced
    tracing = Tracing(tracer_provider=provider)
    async with (
        leaf_process() as leaf,
        client(leaf, lambda: amp.AMPProtocol(middleware=[tracing])) as to_c,
    ):

        class Middle(amp.AMPProtocol):
            @Relay.responder
            async def relay(self, a: int, b: int) -> dict[str, Any]:
                return await to_c.call_remote(Sum, a=a, b=b)

        async with (
            running_server(Middle, middleware=[tracing]) as (_, port, _),
            client(port, lambda: amp.AMPProtocol(middleware=[tracing])) as to_b,
        ):
            with provider.get_tracer("test").start_as_current_span("request") as request:
                assert await to_b.call_remote(Relay, a=20, b=22) == {"total": 42}
        # Untraced: asking C for its spans makes no span on our side.
        async with client(leaf) as plain:
            remote = json.loads((await plain.call_remote(FinishedSpans))["spans"])
    spans = exporter.get_finished_spans()
    trace_id = request.get_span_context().trace_id
    (a_call,) = [s for s in spans if s.kind is SpanKind.CLIENT and s.name == "Relay"]
    (b_served,) = [s for s in spans if s.kind is SpanKind.SERVER and s.name == "Relay"]
    (b_call,) = [s for s in spans if s.kind is SpanKind.CLIENT and s.name == "Sum"]
    (c_served,) = remote
    assert parent_id(a_call) == request.get_span_context().span_id
    assert parent_id(b_served) == a_call.context.span_id
    assert parent_id(b_call) == b_served.context.span_id
    assert c_served["parent_id"] == b_call.context.span_id
    assert c_served["kind"] == "SERVER" and c_served["name"] == "Sum"
    assert c_served["attributes"]["rpc.method"] == "Sum"
    assert {a_call.context.trace_id, b_served.context.trace_id, b_call.context.trace_id} == {
        trace_id
    }
    assert c_served["trace_id"] == trace_id
    # Each span lies within its parent's time.
    for parent, child in ((a_call, b_served), (b_served, b_call)):
        assert parent.start_time is not None and child.start_time is not None
        assert parent.end_time is not None and child.end_time is not None
        assert parent.start_time <= child.start_time <= child.end_time <= parent.end_time
