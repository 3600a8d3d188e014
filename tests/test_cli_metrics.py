"""asyncio-amp serve --metrics-port: /metrics over HTTP, scraped during and after real calls."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncio_amp as amp
from cli_app import Divide, Sleep, Sum
from cli_helpers import background, free_port, run_cli
from helpers import HOST, LONG, client


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP: each sample's value by its name and labels."""
    async with asyncio.timeout(LONG):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            response = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def scrape_until(port: int, predicate: Any, what: str) -> dict[Any, float]:
    """Scrape until ``predicate(metrics)`` holds (bounded in time and count); the last scrape."""
    async with asyncio.timeout(LONG):
        for _ in range(1000):
            metrics = await scrape(port)
            if predicate(metrics):
                return metrics
            await asyncio.sleep(0.01)
    raise AssertionError(f"the metrics never showed {what}")


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(metrics: dict[Any, float], command: str, outcome: str) -> float:
    return sample(
        metrics, "amp_calls_total", direction="incoming", command=command, outcome=outcome
    )


async def test_serve_metrics_port_counts_the_calls_made() -> None:
    async with background(
        "serve", "cli_app:Calculator", "--port", "0", "--metrics-port", "0"
    ) as server:
        metrics_port = int(
            (await server.line(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")).group(1)
        )
        port = int((await server.line(r"serving \S+ on 127\.0\.0\.1:(\d+)")).group(1))
        before = await scrape(metrics_port)
        assert sample(before, "amp_connections_open") == 0
        # Process metrics from the default registry come along.
        assert any(name.startswith("process_") for name, _ in before)
        async with client(port) as first, client(port) as second:
            # During the load: calls in flight on two connections.
            sleeping = [
                asyncio.ensure_future(proto.call_remote(Sleep, seconds=2.0))
                for proto in (first, second)
                for _ in range(3)
            ]
            during = await scrape_until(
                metrics_port,
                lambda m: (
                    sample(m, "amp_calls_in_flight", direction="incoming", command="Sleep") == 6
                ),
                "six Sleep calls in flight",
            )
            assert sample(during, "amp_connections_open") == 2
            assert sample(during, "amp_connections_total") == 2
            await asyncio.gather(*(first.call_remote(Sum, a=i, b=i) for i in range(50)))
            # Still during the load: the calls that ended are counted already.
            assert calls(await scrape(metrics_port), "Sum", "ok") == 50
            await asyncio.gather(*(second.call_remote(Sum, a=i, b=1) for i in range(30)))
            for _ in range(9):
                with pytest.raises(ZeroDivisionError):
                    await first.call_remote(Divide, numerator=1, denominator=0)
            for _ in range(4):
                with pytest.raises(amp.UnhandledCommandError):
                    await second.call_remote_box("NoSuchCommand", {})
            async with asyncio.timeout(LONG):
                await asyncio.gather(*sleeping)
            after = await scrape(metrics_port)
            assert calls(after, "Sum", "ok") == 80
            assert calls(after, "Divide", "ZERO_DIVISION") == 9
            assert calls(after, "other", "UNHANDLED") == 4
            assert calls(after, "Sleep", "ok") == 6
            duration = "amp_call_duration_seconds_count"
            assert sample(after, duration, direction="incoming", command="Sum") == 80
            assert sample(after, duration, direction="incoming", command="Sleep") == 6
            assert sample(after, "amp_calls_in_flight", direction="incoming", command="Sleep") == 0
            assert sample(after, "amp_received_bytes_total") > 0
            assert sample(after, "amp_sent_bytes_total") > 0
        final = await scrape_until(
            metrics_port,
            lambda m: sample(m, "amp_connections_open") == 0,
            "both connections closed",
        )
        assert sample(final, "amp_connections_total") == 2
        assert await server.stop() == 0
    assert any("serving metrics on" in line for line in server.err)


async def test_serve_metrics_port_in_use_is_an_error() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        result = await run_cli(
            "serve",
            "cli_app:Calculator",
            "--port",
            str(free_port()),
            "--metrics-port",
            str(taken.getsockname()[1]),
        )
    assert result.status != 0
    assert "cannot serve metrics on 127.0.0.1:" in result.err
