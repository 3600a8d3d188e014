"""``asyncio-amp ping`` run as a subprocess against real servers, a closed port and a stopped peer."""

from __future__ import annotations

import contextlib
import os
import re
import signal

from cli_helpers import free_port, run_cli, served
from helpers import HOST

REPLY = re.compile(r"^reply from 127\.0\.0\.1:\d+: seq=(\d) time=\d+\.\d{3} ms$")


async def test_ping_a_server_prints_each_reply_and_a_summary() -> None:
    async with served() as (_server, port):
        result = await run_cli("ping", f"{HOST}:{port}", "-c", "3", "-i", "0.05")
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith(f"PING {HOST}:{port} ")
    assert [REPLY.match(line).group(1) for line in lines[1:4]] == ["1", "2", "3"]  # type: ignore[union-attr]
    assert lines[4] == f"--- {HOST}:{port} ping statistics ---"
    assert lines[5].startswith("3 heartbeats sent, 3 answered, 0% lost, time ")
    assert re.match(r"^rtt min/avg/max/mdev = [\d.]+/[\d.]+/[\d.]+/[\d.]+ ms$", lines[6])
    assert result.err == ""


async def test_ping_quiet_prints_the_summary_only() -> None:
    async with served() as (_server, port):
        result = await run_cli("ping", f"{HOST}:{port}", "-c", "1", "-q")
    assert result.status == 0, result.err
    assert (
        result.out.splitlines()[1]
        == "1 heartbeats sent, 1 answered, 0% lost, "
        + (result.out.splitlines()[1].split("lost, ")[1])
    )
    assert not result.out.startswith("PING")


async def test_ping_a_closed_port_exits_3() -> None:
    port = free_port()
    result = await run_cli("ping", f"{HOST}:{port}", "-c", "1")
    assert result.status == 3
    assert result.out == ""
    assert (
        result.err == f"asyncio-amp: error: cannot connect to {HOST}:{port}: Connection refused\n"
    )


async def test_ping_a_stopped_server_exits_4() -> None:
    async with served() as (server, port):
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            result = await run_cli("ping", f"{HOST}:{port}", "-c", "2", "-i", "0", "-W", "0.3")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGCONT)
    assert result.status == 4, result.err
    assert f"no reply from {HOST}:{port}: seq=1 (timeout)" in result.out
    assert "2 heartbeats sent, 0 answered, 100% lost" in result.out
    assert result.err == f"asyncio-amp: error: no reply from {HOST}:{port} within 0.3 s\n"


async def test_ping_usage_errors_exit_2() -> None:
    assert (await run_cli("ping")).status == 2
    assert (await run_cli("ping", f"{HOST}:1", "-c", "0")).status == 2
    assert (await run_cli("ping", f"{HOST}:1", "-W", "0")).status == 2
