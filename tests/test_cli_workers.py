"""
``asyncio-amp serve --workers N``: real supervisor and worker processes on loopback.

Every process is stopped by its pid; the workers' pids come from the
supervisor's log, and any still running at the end of a test is killed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pathlib
import re
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

import asyncio_amp as amp
from asyncio_amp.cli import build_parser
from asyncio_amp.cli._supervisor import (
    BACKOFF_INITIAL,
    BACKOFF_MULTIPLIER,
    MAX_START_FAILURES,
    worker_options,
)
from cli_helpers import Background, background, run_cli
from helpers import HOST, LONG, TIME, eventually
from workers_app import Block, Hold, Pid, Started

APP = "workers_app:Server"

pytestmark = pytest.mark.asyncio_loop_only  # the loop under test runs in the workers


def worker_pids(server: Background) -> dict[int, int]:
    """The pid of the latest worker started in each slot, from the supervisor's log."""
    pids: dict[int, int] = {}
    for line in server.err:
        found = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def started_pids(server: Background) -> set[int]:
    """Every worker pid the supervisor logged."""
    return {
        int(found.group(1))
        for line in server.err
        if (found := re.search(r"worker \d+ started \(pid (\d+)\)", line))
    }


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not reaped yet, does not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.asynccontextmanager
async def supervised(
    workers: int, *extra: str, place: tuple[str, ...] = ("--port", "0")
) -> AsyncIterator[tuple[Background, str]]:
    """``serve --workers N``, once every worker listens: the supervisor and its address."""
    async with background("serve", APP, *place, "--workers", str(workers), *extra) as server:
        try:
            found = await server.line(r"serving \S+ on (\S+) with \d+ workers?")
            yield server, found.group(1)
        finally:
            with contextlib.suppress(TimeoutError):
                await server.stop()
            for pid in started_pids(server):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


async def answering_pid(port: int | None = None, path: str | None = None) -> int:
    """Connect, ask which worker answers, and close."""
    async with asyncio.timeout(LONG):
        if path is not None:
            protocol = await amp.connect(path=path)
        else:
            protocol = await amp.connect(HOST, port)
        async with protocol:
            answer = await protocol.call_remote(Pid)
    pid: int = answer["pid"]
    return pid


async def test_every_worker_answers_on_the_one_port() -> None:
    async with supervised(2) as (server, address):
        pids = worker_pids(server)
        assert sorted(pids) == [0, 1]
        assert len(set(pids.values())) == 2
        assert server.process.pid not in pids.values()
        answers = collections.Counter([await answering_pid(port_of(address)) for _ in range(64)])
        # 64 connections hashed over two sockets all on one: a chance of 2 in 2**64.
        assert set(answers) == set(pids.values())
        for pid in pids.values():
            await server.line(rf"\[{pid}\] INFO worker serving {APP} on {address}")


async def test_options_reach_the_workers() -> None:
    async with supervised(2, "--max-box-size", "200") as (server, address):
        port = port_of(address)
        for _ in range(8):  # on both workers, most likely; on each, surely
            assert await answering_pid(port) in worker_pids(server).values()
            async with asyncio.timeout(LONG):
                protocol = await amp.connect(HOST, port)
                async with protocol:
                    with pytest.raises(amp.ConnectionLostError):
                        await protocol.call_remote_box("Pid", {"padding": b"x" * 300})
        await server.line(r"WARNING closing the connection with .*over the limit of 200 bytes")


async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering() -> None:
    async with supervised(2) as (server, address):
        port = port_of(address)
        before = worker_pids(server)
        victim, survivor = before[0], before[1]
        os.kill(victim, signal.SIGKILL)
        await server.line(rf"worker 0 \(pid {victim}\) was killed by SIGKILL after [\d.]+ s")
        await server.line(rf"restarting worker 0 in {BACKOFF_INITIAL:.1f} s")
        # While worker 0 is down, the other one takes every connection.
        assert {await answering_pid(port) for _ in range(8)} <= {survivor}
        await eventually(lambda: worker_pids(server)[0] != victim, "worker 0 started again")
        restarted = worker_pids(server)[0]
        await server.line(rf"\[{restarted}\] INFO worker serving")
        assert not alive(victim)
        seen: set[int] = set()
        for _ in range(256):
            seen.add(await answering_pid(port))
            if restarted in seen:
                break
        assert seen <= {restarted, survivor}
        assert restarted in seen


async def test_a_worker_crashing_at_start_makes_the_supervisor_give_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The supervisor, our child, loads the app; its workers crash importing it.
    monkeypatch.setenv("AMP_TEST_ONLY_CHILD_OF", str(os.getpid()))
    async with background("serve", APP, "--port", "0", "--workers", "2") as server:
        async with asyncio.timeout(LONG * 2):
            status = await server.process.wait()
        await server.stop()
    assert status == 1
    log = "\n".join(server.err)
    assert re.search(
        rf"error: worker \d failed to start {MAX_START_FAILURES} times in a row "
        r"\(it exited with status 3\); giving up",
        log,
    ), log
    assert "with 2 workers" not in log  # it never served
    delays = re.findall(r"restarting worker 0 in ([\d.]+) s", log)
    expected = [BACKOFF_INITIAL * BACKOFF_MULTIPLIER**n for n in range(MAX_START_FAILURES - 1)]
    assert [float(d) for d in delays[: len(expected)]] == pytest.approx(expected, abs=0.05)
    for pid in started_pids(server):
        assert not alive(pid)


class Caller(amp.AMPProtocol):
    """A client told by the server when its Hold call runs."""

    def __init__(self) -> None:
        super().__init__()
        self.holding: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @Started.responder
    def started(self, pid: int) -> None:
        if not self.holding.done():
            self.holding.set_result(pid)


async def test_sigterm_drains_the_calls_in_flight_and_leaves_no_process() -> None:
    async with supervised(2, "--grace", "5") as (server, address):
        pids = set(worker_pids(server).values())
        callers: list[Caller] = []
        try:
            async with asyncio.timeout(LONG):
                for _ in range(16):
                    callers.append(
                        await amp.connect(HOST, port_of(address), protocol_factory=Caller)
                    )
                calls = [
                    asyncio.ensure_future(caller.call_remote(Hold, seconds=0.5 * TIME))
                    for caller in callers
                ]
                holders = await asyncio.gather(*(caller.holding for caller in callers))
                assert set(holders) == pids  # 16 calls, all on one worker: 2 in 2**16
                server.process.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*calls)
                status = await server.process.wait()
        finally:
            for caller in callers:
                caller.close()
        assert [answer["pid"] for answer in answers] == holders
        assert status == 0
        await server.line(r"INFO stopped")
        for pid in pids:
            assert not alive(pid)
        with pytest.raises(OSError):
            await answering_pid(port_of(address))


async def hold_on_every_worker(
    address: str, pids: set[int], callers: list[Caller], seconds: float
) -> tuple[list[asyncio.Future[dict[str, Any]]], list[int]]:
    """Open 16 connections, start a Hold call on each, and wait until every one runs."""
    for _ in range(16):
        callers.append(await amp.connect(HOST, port_of(address), protocol_factory=Caller))
    calls = [asyncio.ensure_future(caller.call_remote(Hold, seconds=seconds)) for caller in callers]
    holders = list(await asyncio.gather(*(caller.holding for caller in callers)))
    assert set(holders) == pids  # 16 calls, all on one worker: 2 in 2**16
    return calls, holders


async def test_sigterm_to_the_whole_group_still_drains() -> None:
    # As systemd stops a service: SIGTERM to every process at once, workers included.
    async with supervised(2, "--grace", "5") as (server, address):
        pids = set(worker_pids(server).values())
        callers: list[Caller] = []
        try:
            async with asyncio.timeout(LONG):
                calls, holders = await hold_on_every_worker(address, pids, callers, 0.5 * TIME)
                for pid in (server.process.pid, *pids):
                    os.kill(pid, signal.SIGTERM)
                answers = await asyncio.gather(*calls)
                status = await server.process.wait()
        finally:
            for caller in callers:
                caller.close()
        assert [answer["pid"] for answer in answers] == holders
        assert status == 0


async def test_a_second_sigterm_stops_the_workers_at_once() -> None:
    async with supervised(2, "--grace", "60") as (server, address):
        pids = set(worker_pids(server).values())
        callers: list[Caller] = []
        try:
            async with asyncio.timeout(LONG):
                calls, _ = await hold_on_every_worker(address, pids, callers, 60)
                server.process.send_signal(signal.SIGTERM)
                await server.line(r"shutting down 2 workers")
                server.process.send_signal(signal.SIGTERM)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                status = await server.process.wait()
        finally:
            for caller in callers:
                caller.close()
        assert all(isinstance(outcome, amp.ConnectionLostError) for outcome in outcomes)
        assert status == 0
        await server.line(r"stopping the workers now")
        for pid in pids:
            assert not alive(pid)


async def test_a_worker_still_running_after_the_grace_period_is_killed() -> None:
    async with supervised(1, "--grace", "0.5") as (server, address):
        (pid,) = worker_pids(server).values()
        async with asyncio.timeout(LONG):
            protocol = await amp.connect(HOST, port_of(address), protocol_factory=Caller)
            async with protocol:
                await protocol.call_remote(Block, seconds=60)
                assert await protocol.holding == pid  # its loop is blocked from now on
                server.process.send_signal(signal.SIGTERM)
                status = await server.process.wait()
        await server.line(rf"worker 0 \(pid {pid}\) still running after the grace period")
        await server.line(rf"worker 0 \(pid {pid}\) was killed by SIGKILL")
        await server.line(rf"error: worker\(s\) {pid} did not stop within the grace period")
        assert status == 1
        assert not alive(pid)


async def test_workers_do_not_outlive_a_killed_supervisor() -> None:
    async with supervised(2) as (server, address):
        pids = set(worker_pids(server).values())
        async with asyncio.timeout(LONG):
            idle = await amp.connect(HOST, port_of(address))
        try:
            os.kill(server.process.pid, signal.SIGKILL)
            async with asyncio.timeout(LONG):
                await server.process.wait()
            # Each worker sees its link to the supervisor close, and stops at once.
            async with asyncio.timeout(2 * TIME):
                await eventually(lambda: not any(map(alive, pids)), "the workers exited")
        finally:
            idle.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_workers_on_a_unix_socket(tmp_path: pathlib.Path, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    socket_file = tmp_path / "amp.sock"
    path = str(socket_file)
    extra = ["--uvloop"] if loop == "uvloop" else []
    async with supervised(2, *extra, place=("--unix", path)) as (server, address):
        assert address == path
        pids = set(worker_pids(server).values())
        seen: set[int] = set()
        for _ in range(256):
            seen.add(await answering_pid(path=path))
            if seen == pids:
                break
        assert seen == pids
        assert await server.stop() == 0
    assert not socket_file.exists()


async def test_the_port_of_a_running_supervisor_is_refused() -> None:
    async with supervised(1) as (_, address):
        result = await run_cli("serve", APP, "--port", str(port_of(address)), "--workers", "2")
        assert result.status == 3
        assert f"cannot listen on 127.0.0.1:{port_of(address)}" in result.err
        assert "Address already in use" in result.err
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind((HOST, port_of(address)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "expected 1 or more workers, not 0"),
        (["--workers", "two"], "expected a number of workers, not 'two'"),
        (["--workers", "2", "--stdio"], "--stdio serves one connection: it takes no --workers"),
        (
            ["--workers", "2", "--port", "0", "--metrics-port", "0"],
            "--metrics-port is not supported with --workers yet",
        ),
    ],
)
async def test_workers_usage_errors(args: list[str], message: str) -> None:
    result = await run_cli("serve", APP, *args)
    assert result.status == 2
    assert message in result.err


async def test_an_app_that_cannot_load_is_reported_once() -> None:
    result = await run_cli("serve", "no_such_module:App", "--port", "0", "--workers", "2")
    assert result.status == 2
    assert result.err.count("cannot import 'no_such_module'") == 1
    assert "started" not in result.err


def test_worker_options_pass_every_option_but_the_place() -> None:
    parser = build_parser()
    argv = ["serve", APP, "--host", "127.0.0.2", "--port", "0", "--workers", "3"]
    argv += ["--grace", "2.5", "--max-keys", "7", "--close-timeout", "0.5", "-v", "--uvloop"]
    argv += ["--certfile", "cert.pem", "--keyfile", "key.pem"]
    args = parser.parse_args(argv)
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    words = worker_options(serve_parser, args)
    again = parser.parse_args(["serve", *words])
    for name in ("app", "grace", "max_keys", "close_timeout", "verbose", "uvloop", "certfile"):
        assert getattr(again, name) == getattr(args, name), name
    assert again.keyfile == "key.pem"
    assert (again.host, again.port, again.workers) == ("127.0.0.1", 7000, None)
