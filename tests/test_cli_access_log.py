"""``asyncio-amp serve --access-log`` and ``--middleware``, through the real command."""

from __future__ import annotations

import json

from cli_helpers import run_cli, served
from helpers import HOST

TEXT_LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1:\d+ < "


async def test_text_access_log_on_standard_output() -> None:
    async with served("--access-log") as (server, port):
        assert (await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")).status == 0
        divided = await run_cli("call", f"{HOST}:{port}", "Divide", "numerator=1", "denominator=0")
        assert divided.status != 0
        await server.line(TEXT_LINE + r"Sum 1 ok \d+\.\d{3}ms$", stream="out")
        await server.line(TEXT_LINE + r"Divide 1 ZERO_DIVISION \d+\.\d{3}ms$", stream="out")
        assert await server.stop() == 0
    # Only access lines on standard output; the log stays on standard error.
    assert len(server.out) == 2
    assert not any(" < Sum" in line for line in server.err)
    assert any("connection from" in line for line in server.err)


async def test_json_access_log() -> None:
    async with served("--access-log", "--access-log-format", "json") as (server, port):
        assert (await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")).status == 0
        assert (await run_cli("call", f"{HOST}:{port}", "Boom")).status != 0
        assert (await run_cli("call", f"{HOST}:{port}", "Note", "text=hi")).status == 0
        await server.line(r'"command": "Note"', stream="out")
        assert await server.stop() == 0
    records = [json.loads(line) for line in server.out]
    assert [(r["command"], r["tag"], r["outcome"]) for r in records] == [
        ("Sum", "1", "ok"),
        ("Boom", "1", "UNKNOWN"),
        ("Note", "1", "ok"),  # the command line asks for an answer
    ]
    for record in records:
        assert record["peer"].startswith(f"{HOST}:")
        assert record["direction"] == "incoming"
        assert isinstance(record["duration_ms"], float) and record["duration_ms"] >= 0
        assert record["time"].endswith("Z")


async def test_middleware_from_the_command_line_with_the_access_log() -> None:
    async with served("--middleware", "cli_middleware:Deny", "--access-log") as (server, port):
        divided = await run_cli("call", f"{HOST}:{port}", "Divide", "numerator=4", "denominator=2")
        assert divided.status != 0
        assert "refused by the middleware" in divided.err
        summed = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
        assert (summed.status, summed.out) == (0, "total: 3\n")
        # The access log is outermost: it logs the refusal too.
        await server.line(r" < Divide 1 ZERO_DIVISION ", stream="out")
        await server.line(r" < Sum 1 ok ", stream="out")


async def test_bad_middleware_is_a_usage_error() -> None:
    for spec in ("cli_middleware:not_middleware", "cli_middleware:Missing", "nocolon"):
        result = await run_cli("serve", "cli_app:Calculator", "--port", "0", "--middleware", spec)
        assert result.status != 0
        assert "--middleware" in result.err or spec in result.err
        assert "Traceback" not in result.err
