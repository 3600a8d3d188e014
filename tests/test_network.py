"""serve() and connect() over TCP on 127.0.0.1 and over UNIX sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import pathlib
import socket
import stat

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


async def test_serve_a_listening_socket_handed_over(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "amp.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen()
    tcp = socket.create_server((HOST, 0))
    async with asyncio.timeout(LONG):
        for sock, target in ((unix, {"path": str(path)}), (tcp, {"port": tcp.getsockname()[1]})):
            async with await amp.serve(Server, sock=sock):
                address = {"host": HOST, **target} if "port" in target else target
                async with await amp.connect(**address) as proto:  # type: ignore[arg-type]
                    assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
    # The path belongs to whoever bound the socket: closing the server leaves it.
    assert path.exists()


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


async def test_serve_returns_a_server_that_closes_its_connections() -> None:
    server = await amp.serve(Server, HOST, 0)
    assert isinstance(server, amp.Server)
    async with asyncio.timeout(LONG):
        proto = await amp.connect(HOST, port_of(server))
        assert await proto.call_remote(Sum, a=1, b=2) == {"total": 3}
        server.close()
        await server.wait_closed()
        await proto.wait_closed()
    assert proto.closed


async def test_a_unix_socket_a_live_server_answers_on_is_refused(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    async with await amp.serve(Server, path=path), asyncio.timeout(LONG):
        with pytest.raises(OSError, match="already in use by a live server") as info:
            await amp.serve(amp.AMPProtocol, path=path)
        assert info.value.errno == errno.EADDRINUSE
        # The first server still has its path, and answers on it.
        async with await amp.connect(path=path) as proto:
            assert await proto.call_remote(Sum, a=2, b=2) == {"total": 4}


async def test_a_stale_unix_socket_file_is_replaced(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)
        dead.listen()
    assert stat.S_ISSOCK(os.stat(path).st_mode)  # left behind, as by a killed server
    async with (
        await amp.serve(Server, path=path),
        asyncio.timeout(LONG),
        await amp.connect(path=path) as proto,
    ):
        assert await proto.call_remote(Sum, a=3, b=3) == {"total": 6}


async def test_a_file_that_is_not_a_socket_is_not_replaced(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "amp.sock"
    path.write_text("keep me")
    with pytest.raises(OSError):
        await amp.serve(Server, path=str(path))
    assert path.read_text() == "keep me"


async def test_closing_removes_the_unix_socket_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "amp.sock"
    server = await amp.serve(Server, path=str(path))
    assert path.exists()
    server.close()
    async with asyncio.timeout(LONG):
        await server.wait_closed()
    assert not path.exists()


async def test_closing_leaves_a_path_another_server_took(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    server = await amp.serve(Server, path=path)
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        other.listen()
        server.close()
        async with asyncio.timeout(LONG):
            await server.wait_closed()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)  # the other server still has it
