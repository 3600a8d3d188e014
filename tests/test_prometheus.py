"""Prometheus metrics (asyncio_amp.prometheus): counts over real connections, bounded labels."""

from __future__ import annotations

import asyncio
import random
import string
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import asyncio_amp as amp
from asyncio_amp.prometheus import Metrics, failure_reason
from helpers import LONG, client, eventually, raw_connection, running_server


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: b"ZERO_DIVISION"}


class Wait(amp.Command):
    response: list[tuple[str, amp.Argument[Any]]] = []


class Calculator(amp.AMPProtocol):
    release: asyncio.Event

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        return {"result": numerator / denominator}

    @Wait.responder
    async def wait(self) -> dict[str, Any]:
        async with asyncio.timeout(LONG):
            await self.release.wait()
        return {}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def label_values(registry: CollectorRegistry, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in registry.collect()
        for sample in family.samples
        if label in sample.labels
    }


async def test_calls_are_counted_and_timed_on_both_sides() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    release = asyncio.Event()
    Calculator.release = release
    async with (
        running_server(Calculator, middleware=[Metrics(theirs)]) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Metrics(ours)])) as proto,
    ):
        waiting = [asyncio.ensure_future(proto.call_remote(Wait)) for _ in range(3)]
        await eventually(
            lambda: value(theirs, "amp_calls_in_flight", direction="incoming", command="Wait") == 3,
            "three Wait calls in flight on the server",
        )
        assert value(ours, "amp_calls_in_flight", direction="outgoing", command="Wait") == 3
        assert value(theirs, "amp_connections_open") == 1
        release.set()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*waiting)
        await asyncio.gather(*(proto.call_remote(Sum, a=i, b=1) for i in range(40)))
        for _ in range(7):
            with pytest.raises(ZeroDivisionError):
                await proto.call_remote(Divide, numerator=1, denominator=0)
        for _ in range(5):
            with pytest.raises(amp.UnhandledCommandError):
                await proto.call_remote_box("Nope", {})
        for registry, direction in ((ours, "outgoing"), (theirs, "incoming")):
            calls: dict[str, Any] = {"registry": registry, "name": "amp_calls_total"}
            assert value(**calls, direction=direction, command="Sum", outcome="ok") == 40
            assert value(**calls, direction=direction, command="Wait", outcome="ok") == 3
            assert (
                value(**calls, direction=direction, command="Divide", outcome="ZERO_DIVISION") == 7
            )
            assert value(**calls, direction=direction, command="other", outcome="UNHANDLED") == 5
            durations = "amp_call_duration_seconds_count"
            assert value(registry, durations, direction=direction, command="Sum") == 40
            assert value(registry, durations, direction=direction, command="Divide") == 7
            for command in ("Sum", "Divide", "Wait", "other"):
                in_flight = value(
                    registry, "amp_calls_in_flight", direction=direction, command=command
                )
                assert in_flight == 0
        # Every byte one side wrote, the other read.
        sent, received = "amp_sent_bytes_total", "amp_received_bytes_total"
        assert value(ours, sent) == value(theirs, received) > 55 * 20
        assert value(theirs, sent) == value(ours, received) > 55 * 10
    await eventually(lambda: value(theirs, "amp_connections_open") == 0, "the connection closed")
    assert value(theirs, "amp_connections_total") == 1
    assert value(ours, "amp_connections_total") == 1
    assert value(ours, "amp_connections_open") == 0


async def test_junk_command_names_go_to_one_label() -> None:
    registry = CollectorRegistry()
    names = {
        "".join(random.choices(string.printable, k=random.randint(1, 60))) for _ in range(3000)
    }
    async with (
        running_server(Calculator, middleware=[Metrics(registry)]) as (_, port, _),
        client(port) as proto,
    ):
        calls = [proto.call_remote_box(name, {b"a": b"1"}) for name in names]
        calls.append(proto.call_remote(Sum, a=1, b=2))
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(answer, amp.UnhandledCommandError) for answer in answers) == len(names)
    assert label_values(registry, "command") == {"Sum", "other"}
    assert label_values(registry, "outcome") == {"ok", "UNHANDLED"}
    total = value(
        registry, "amp_calls_total", direction="incoming", command="other", outcome="UNHANDLED"
    )
    assert total == len(names)


async def test_max_commands_bounds_the_command_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_commands=1)
    async with (
        running_server(Calculator, middleware=[metrics]) as (_, port, _),
        client(port) as proto,
    ):
        await proto.call_remote(Sum, a=1, b=2)
        with pytest.raises(ZeroDivisionError):
            await proto.call_remote(Divide, numerator=1, denominator=0)
    assert label_values(registry, "command") == {"Sum", "other"}
    assert (
        value(
            registry,
            "amp_calls_total",
            direction="incoming",
            command="other",
            outcome="ZERO_DIVISION",
        )
        == 1
    )


async def test_limit_hits_are_counted() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    release = asyncio.Event()
    Calculator.release = release
    async with (
        running_server(Calculator, middleware=[Metrics(theirs)], max_responders=1) as (_, port, _),
        client(port, lambda: amp.AMPProtocol(middleware=[Metrics(ours)])) as proto,
    ):
        # Three Wait calls on a server with one place: two wait for it.
        waiting = [asyncio.ensure_future(proto.call_remote(Wait)) for _ in range(3)]
        await eventually(
            lambda: value(theirs, "amp_limit_hits_total", limit="max_responders") == 2,
            "two calls waited for max_responders",
        )
        release.set()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*waiting)
        # Four calls with one allowed on the wire: three wait to be sent.
        proto.max_pending_calls = 1
        await asyncio.gather(*(proto.call_remote(Sum, a=i, b=i) for i in range(4)))
    assert value(ours, "amp_limit_hits_total", limit="max_pending_calls") == 3
    assert value(ours, "amp_limit_hits_total", limit="max_responders") == 0
    assert value(theirs, "amp_limit_hits_total", limit="max_responders") == 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00", "empty_box"),
        (b"\x01\x00" + b"k" * 256, "key_too_long"),
        (b"\x00\x07_answer\x00\x0299\x00\x00", "unknown_tag"),
        (b"\x00\x01x\x00\x01y\x00\x00", "no_command"),
        (
            b"".join(b"\x00\x03k%d\x00\x00" % i for i in range(10, 99)) + b"\x00\x00",
            "too_many_keys",
        ),
    ],
)
async def test_protocol_failures_are_counted_by_reason(data: bytes, reason: str) -> None:
    registry = CollectorRegistry()
    async with (
        running_server(Calculator, middleware=[Metrics(registry)], max_keys=50) as (_, port, _),
        raw_connection(port) as (reader, writer),
    ):
        writer.write(data)
        async with asyncio.timeout(LONG):
            await reader.read()  # the server closes the connection
        await eventually(
            lambda: value(registry, "amp_connections_open") == 0, "the connection closed"
        )
    assert label_values(registry, "reason") == {reason}
    assert value(registry, "amp_protocol_failures_total", reason=reason) == 1


def test_failure_reasons_come_from_a_fixed_list() -> None:
    assert failure_reason(amp.ProtocolError("something new")) == "malformed"
    flood = amp.ProtocolError(
        "the peer has more than max_responders + max_queued_calls (3) calls in our hands"
    )
    assert failure_reason(flood) == "flood"


def test_one_registry_takes_one_set_of_metrics() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)
    Metrics(registry, namespace="other")
