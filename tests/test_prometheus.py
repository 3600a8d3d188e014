"""Prometheus metrics (asyncio_amp.prometheus): counts over real connections, bounded labels."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import string
import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import asyncio_amp as amp
import pool_worker
from asyncio_amp import prometheus
from asyncio_amp.pool import ProcessPool, WorkerCrashedError
from asyncio_amp.prometheus import Metrics, failure_reason, serve_http
from helpers import HOST, LONG, TIME, client, eventually, raw_connection, running_server
from pool_worker import Worker


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


# Pools and clients (Metrics.watch)


def scraped(registry: CollectorRegistry, kind: str) -> dict[str, dict[str, float]]:
    """The figures of the watched ``kind`` in a scrape of ``registry``, by name then key."""
    found: dict[str, dict[str, float]] = {}
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            prefix = f"amp_{kind}_"
            if sample.name.startswith(prefix) and not sample.name.endswith("_created"):
                key = sample.name.removeprefix(prefix).removesuffix("_total")
                found.setdefault(sample.labels[kind], {})[key] = sample.value
    return found


def stop_left_behind(pids: list[int]) -> None:
    """Kill and reap the workers of ``pids`` that a failed test left running."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def test_a_pool_s_figures_are_exported() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    pool = ProcessPool(Worker, min_workers=2, max_workers=2, output="log")
    pids: list[int] = []
    try:
        async with asyncio.timeout(LONG):
            await pool.start()
        pids.extend(pool.pids)
        metrics.watch(pool, name="maths")
        async with asyncio.timeout(LONG):
            for a in range(3):
                assert await pool.call_remote(pool_worker.Sum, a=a, b=1) == {"total": a + 1}
            with pytest.raises(WorkerCrashedError):
                await pool.call_remote(pool_worker.Die, how="exit")
            await eventually(lambda: pool.stats()["workers"] == 2, "the crashed worker replaced")
        pids.extend(pool.pids)
        stats = pool.stats()
        assert stats["completed"] == 3
        assert stats["failed"] == stats["crashed"] == 1
        assert scraped(registry, "pool") == {"maths": {k: float(v) for k, v in stats.items()}}
        # The kinds of the metrics: counters for the figures that only grow.
        kinds = {f.name: f.type for f in registry.collect() if f.name.startswith("amp_pool_")}
        assert kinds["amp_pool_completed"] == kinds["amp_pool_crashed"] == "counter"
        assert kinds["amp_pool_workers"] == kinds["amp_pool_queued"] == "gauge"
        async with asyncio.timeout(LONG):
            await pool.close(grace=0)
        # A closed pool is forgotten, and its name is free again.
        assert scraped(registry, "pool") == {}
        assert "amp_pool_workers" not in generate_latest(registry).decode()
        metrics.watch(ProcessPool(Worker), name="maths")
    finally:
        async with asyncio.timeout(LONG):
            await pool.close(grace=0)
        stop_left_behind(pids)


async def test_a_client_s_figures_are_exported() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    async with running_server(Calculator) as (_, port, _):
        client_ = amp.Client(f"{HOST}:{port}")
        metrics.watch(client_, name="calculator")
        try:
            async with asyncio.timeout(LONG):
                for a in range(4):
                    await client_.call_remote(Sum, a=a, b=a)
                with contextlib.suppress(ZeroDivisionError):
                    await client_.call_remote(Divide, numerator=1, denominator=0)
            stats = client_.stats()
            assert stats["calls"] == 5 and stats["connected"] == 1
            assert scraped(registry, "client") == {
                "calculator": {k: float(v) for k, v in stats.items()}
            }
        finally:
            async with asyncio.timeout(LONG):
                await client_.close()
        assert client_.closed
        assert scraped(registry, "client") == {}


class Figures:
    """A source with a pool's figures, which notes the threads that read them."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def stats(self) -> dict[str, int]:
        self.threads.append(threading.get_ident())
        return dict.fromkeys(
            ("workers", "busy", "idle", "queued", "completed", "failed", "crashed"), 1
        ) | {"recycled": 0, "timed_out": 0}


def fetch(port: int) -> str:
    """GET /metrics from 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=LONG) as response:
        body: bytes = response.read()
    return body.decode()


async def test_a_scrape_from_another_thread_reads_on_the_loop() -> None:
    # As /metrics does: prometheus_client's HTTP server answers in a thread.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    http = serve_http(HOST, 0, registry)
    try:
        async with (
            running_server(Calculator) as (_, port, _),
            amp.Client(f"{HOST}:{port}") as client_,
        ):
            metrics.watch(client_, name="calculator")
            figures = Figures()
            metrics.watch(figures, name="figures")
            async with asyncio.timeout(LONG):
                for a in range(3):
                    await client_.call_remote(Sum, a=a, b=a)
            async with asyncio.timeout(LONG):
                text = await asyncio.to_thread(fetch, http.server_port)
            assert set(figures.threads) == {threading.get_ident()}
            samples = {
                sample.name: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.labels.get("client") == "calculator"
            }
            assert samples["amp_client_calls_total"] == client_.stats()["calls"] == 3
            assert samples["amp_client_connected"] == 1
    finally:
        http.shutdown()
        http.server_close()


async def test_a_scrape_leaves_out_the_figures_of_a_blocked_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prometheus, "_READ_TIMEOUT", 0.2 * TIME)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    figures = Figures()  # watched weakly: it must stay alive
    metrics.watch(figures, name="figures")
    http = serve_http(HOST, 0, registry)
    try:
        # The loop waits for the scrape, so the scrape cannot read on the loop.
        with caplog.at_level(logging.WARNING, logger="asyncio_amp.prometheus"):
            text = fetch(http.server_port)
    finally:
        http.shutdown()
        http.server_close()
    assert "amp_pool_workers" not in text
    assert "scrape left out pool 'figures'" in caplog.text
    await asyncio.sleep(0)  # the late read, cancelled, does nothing
    assert 'amp_pool_workers{pool="figures"} 1.0' in generate_latest(registry).decode()


async def test_watch_refuses_what_it_cannot_export() -> None:
    metrics = Metrics(CollectorRegistry())
    with pytest.raises(TypeError, match="cannot watch object"):
        metrics.watch(object(), name="x")
    with pytest.raises(TypeError, match="cannot watch"):
        metrics.watch(amp.AMPProtocol(), name="x")
    first, second = amp.Client(f"{HOST}:7000"), amp.Client(f"{HOST}:7001")
    with pytest.raises(ValueError, match="non-empty"):
        metrics.watch(first, name="")
    metrics.watch(first, name="a")
    with pytest.raises(ValueError, match="watched already, as 'a'"):
        metrics.watch(first, name="b")
    with pytest.raises(ValueError, match="a client named 'a'"):
        metrics.watch(second, name="a")
    # A pool and a client may share a name: their labels differ.
    pool = ProcessPool(Worker)
    metrics.watch(pool, name="a")
    metrics.unwatch(first)
    metrics.unwatch(first)  # not watched: nothing happens
    metrics.watch(second, name="a")
    assert set(scraped(metrics.registry, "client")) == {"a"}
    assert set(scraped(metrics.registry, "pool")) == {"a"}


async def test_a_collected_source_is_forgotten() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.watch(amp.Client(f"{HOST}:7000"), name="gone")
    gc.collect()
    assert scraped(registry, "client") == {}
    metrics.watch(amp.Client(f"{HOST}:7000"), name="gone")  # the name is free


def test_figures_clash_with_other_metrics_of_the_same_names() -> None:
    registry = CollectorRegistry()
    Gauge("amp_pool_workers", "someone else's", registry=registry)
    with pytest.raises(ValueError, match="amp_pool_workers"):
        Metrics(registry)
