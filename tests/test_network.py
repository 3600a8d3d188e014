"""serve() and connect() over TCP on 127.0.0.1 and over UNIX sockets."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

import asyncio_amp as amp
from helpers import HOST, LONG, port_of


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Server(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


class Client(amp.AMPProtocol):
    pass


async def test_serve_and_connect_over_tcp() -> None:
    server = await amp.serve(Server, HOST, 0)
    async with server:
        assert server.is_serving()
        proto = await amp.connect(HOST, port_of(server))
        assert type(proto) is amp.AMPProtocol
        async with proto:
            assert await proto.call_remote(Sum, a=2, b=3) == {"total": 5}
        custom = await amp.connect(HOST, port_of(server), protocol_factory=Client)
        assert isinstance(custom, Client)
        async with custom:
            assert await custom.call_remote(Sum, a=1, b=1) == {"total": 2}


async def test_serve_and_connect_over_a_unix_socket(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    server = await amp.serve(Server, path=path)
    async with server, asyncio.timeout(LONG), await amp.connect(path=path) as proto:
        assert await proto.call_remote(Sum, a=20, b=22) == {"total": 42}


async def test_host_and_path_are_exclusive(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TypeError, match="not both"):
        await amp.serve(Server, HOST, 0, path=str(tmp_path / "x"))
    with pytest.raises(TypeError, match="not both"):
        await amp.connect(HOST, 1, path=str(tmp_path / "x"))


async def test_connection_refused_is_an_os_error() -> None:
    server = await amp.serve(Server, HOST, 0)
    port = port_of(server)
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await amp.connect(HOST, port)
