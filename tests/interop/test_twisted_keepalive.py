"""Keepalive and ``asyncio-amp ping`` against an unchanged Twisted peer, which answers UNHANDLED."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest
from peer import TwistedPeer

import asyncio_amp as amp
from cli_helpers import run_cli
from helpers import HOST, LONG, TIME, running_server

pytestmark = pytest.mark.asyncio_loop_only

INTERVAL = 0.1 * TIME
TIMEOUT = 0.3 * TIME


async def test_keepalive_against_a_twisted_server() -> None:
    async with await TwistedPeer.start() as peer:
        port = await peer.listen()
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port, keepalive=INTERVAL, keepalive_timeout=TIMEOUT)
        async with proto:
            # Many periods of silence: every heartbeat is answered UNHANDLED, which counts.
            await asyncio.sleep(5 * (INTERVAL + TIMEOUT))
            assert not proto.closed
            assert proto._conn._tag_counter >= 3  # heartbeats went out
            answer = await proto.call_remote_box("Sum", {"a": "1", "b": "2"})
            assert answer == {b"total": b"3"}
            os.kill(peer.pid, signal.SIGSTOP)
            try:
                with pytest.raises(amp.ConnectionLostError, match="keepalive timeout"):
                    async with asyncio.timeout(LONG):
                        await proto.call_remote_box("Sum", {"a": "1", "b": "2"})
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(peer.pid, signal.SIGCONT)


async def test_a_server_with_keepalive_keeps_a_twisted_client() -> None:
    kwargs = {"keepalive": INTERVAL, "keepalive_timeout": TIMEOUT}
    async with (
        running_server(amp.AMPProtocol, **kwargs) as (server, port, protos),
        await TwistedPeer.start() as peer,
    ):
        await peer.connect(port)
        await asyncio.sleep(5 * (INTERVAL + TIMEOUT))
        assert len(server.connections) == 1 and not protos[0].closed
        os.kill(peer.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(LONG):
                await protos[0].wait_closed()
            assert not server.connections
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer.pid, signal.SIGCONT)


async def test_ping_a_twisted_server() -> None:
    async with await TwistedPeer.start() as peer:
        port = await peer.listen()
        result = await run_cli("ping", f"{HOST}:{port}", "-c", "2", "-i", "0.05")
    assert result.status == 0, result.err
    assert result.out.count(" ms (UNHANDLED)\n") == 2
    assert "2 heartbeats sent, 2 answered, 0% lost" in result.out


async def test_a_client_with_keepalive_takes_a_twisted_server() -> None:
    # The Client waits for an answer to a heartbeat before it sends calls on a
    # new connection: Twisted's UNHANDLED is that answer.
    async with await TwistedPeer.start() as peer:
        port = await peer.listen()
        client = amp.Client(
            f"{HOST}:{port}", keepalive=INTERVAL, keepalive_timeout=TIMEOUT, connect_timeout=LONG
        )
        async with client:
            assert len(client.connections) == 1
            answer = await client.call_remote_box("Sum", {"a": "1", "b": "2"})
            assert answer == {b"total": b"3"}
            await asyncio.sleep(3 * (INTERVAL + TIMEOUT))
            stats = client.stats()
            assert (stats["connected"], stats["losses"], stats["failures"]) == (1, 0, 0)
