"""Descriptor against Twisted (``twisted_peer.py``) over UNIX sockets, both ways."""

from __future__ import annotations

import asyncio
import os
import pathlib
from typing import Any

import pytest
from peer import TwistedPeer

import asyncio_amp as amp
from helpers import LONG


class WriteTo(amp.Command):
    arguments = [("fd", amp.Descriptor()), ("text", amp.Bytes())]
    response = [("written", amp.Integer())]


class OpenPipe(amp.Command):
    arguments = [("text", amp.Bytes())]
    response = [("fd", amp.Descriptor())]


class Server(amp.AMPProtocol):
    @WriteTo.responder
    def write_to(self, fd: int, text: bytes) -> dict[str, Any]:
        try:
            return {"written": os.write(fd, text)}
        finally:
            os.close(fd)

    @OpenPipe.responder
    def open_pipe(self, text: bytes) -> dict[str, Any]:
        read_end, write_end = os.pipe()
        os.write(write_end, text)
        os.close(write_end)
        asyncio.get_running_loop().call_soon(os.close, read_end)  # we sent a duplicate
        return {"fd": read_end}


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.asyncio_loop_only
async def test_we_call_twisted(tmp_path: pathlib.Path, amp_loop: str) -> None:
    path = str(tmp_path / "twisted.sock")
    async with await TwistedPeer.start() as peer:
        await peer.request("listen_unix", path=path)
        client = await amp.connect(path=path)
        try:
            for i in range(3):
                read_end, write_end = os.pipe()
                future = client.call_remote(WriteTo, fd=write_end, text=b"to twisted %d" % i)
                os.close(write_end)
                assert await asyncio.wait_for(future, LONG) == {"written": 12}
                assert read_all(read_end) == b"to twisted %d" % i
                os.close(read_end)
                result = await asyncio.wait_for(
                    client.call_remote(OpenPipe, text=b"from twisted %d" % i), LONG
                )
                assert read_all(result["fd"]) == b"from twisted %d" % i
                os.close(result["fd"])
        finally:
            client.close()
            await client.wait_closed()


@pytest.mark.asyncio_loop_only
async def test_twisted_calls_us(tmp_path: pathlib.Path, amp_loop: str) -> None:
    path = str(tmp_path / "ours.sock")
    server = await amp.serve(Server, path=path)
    try:
        async with await TwistedPeer.start() as peer:
            result = await peer.request("connect_unix", path=path)
            for text in (b"one", b"two", b"three"):
                answer = await peer.request("fd_calls", conn=result["conn"], hex=text.hex())
                assert answer == {
                    "written": len(text),
                    "pipe": text.hex(),
                    "opened": text.hex(),
                }
    finally:
        server.close()
        await server.wait_closed()
