"""
serve() and connect(): AMP servers and clients in one call.

They are thin wrappers over ``loop.create_server``, ``loop.create_connection``
and their UNIX-socket variants, and take the same keyword arguments.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl as _ssl
import stat
from collections.abc import Callable
from typing import Any, TypeVar, overload

from ._protocol import AMPProtocol
from ._server import Server

__all__ = ["connect", "serve"]

P = TypeVar("P", bound=AMPProtocol)

# The limits of AMPProtocol that serve() and connect() take as keywords (and its
# locators and middleware, set the same way).
LIMITS = (
    "max_box_size",
    "max_keys",
    "max_responders",
    "max_pending_calls",
    "max_queued_calls",
    "close_timeout",
    "locators",
    "keepalive",
    "keepalive_timeout",
    "middleware",
)

# How long serve(path=...) waits for a connection to a UNIX socket that is already
# there. The kernel, not the server, completes it, so a live server accepts at
# once; only a full backlog makes it wait, and that too means a live server.
PROBE_TIMEOUT = 1.0


def _with_limits(factory: Callable[[], P], kwargs: dict[str, Any]) -> Callable[[], P]:
    """Take the limit keywords out of ``kwargs`` and return a factory that sets them."""
    limits = {name: kwargs.pop(name) for name in LIMITS if name in kwargs}
    if not limits:
        return factory
    probe = AMPProtocol()
    for name, value in limits.items():
        setattr(probe, name, value)  # checks the values now, not at the first connection
        limits[name] = getattr(probe, name)  # an iterator of locators is read once

    def build() -> P:
        protocol = factory()
        for name, value in limits.items():
            setattr(protocol, name, value)
        return protocol

    return build


async def _refuse_live_path(path: str) -> None:
    """
    Raise if a live server answers on the UNIX socket ``path``.

    The event loop replaces a socket file that is already there. That is right
    for the file a killed server left behind, but it would take the path from a
    server still running on it.
    """
    if path.startswith("\0"):
        return  # the abstract namespace: binding it fails by itself if taken
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # not a socket: the event loop refuses it by itself
    except OSError:
        return
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await loop.sock_connect(probe, path)
        except TimeoutError:
            pass  # a full backlog: someone listens there
        except OSError:
            return  # refused: a stale file, which the event loop replaces
    raise OSError(errno.EADDRINUSE, f"{path} is already in use by a live server")


async def serve(
    protocol_factory: Callable[[], P],
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    ssl: _ssl.SSLContext | None = None,
    **kwargs: Any,
) -> Server[P]:
    """
    Start an AMP server and return its [`Server`][asyncio_amp.Server].

    Args:
        protocol_factory: Called once per connection; usually an
            [`AMPProtocol`][] subclass with responders.
        host: The interface(s) to listen on, as for ``loop.create_server``.
        port: The TCP port; 0 picks a free one (see ``server.sockets``).
        path: Listen on this UNIX socket path instead of TCP. A socket file
            already there is replaced if nothing answers on it (a server was
            killed), and refused if a live server does.
        ssl: A server-side ``ssl.SSLContext`` to accept TLS connections.
        **kwargs: The limits of [`AMPProtocol`][] (``max_box_size``,
            ``max_keys``, ``max_responders``, ``max_pending_calls``,
            ``max_queued_calls``, ``close_timeout``), its ``locators``,
            ``keepalive`` / ``keepalive_timeout`` and its ``middleware`` (the
            same instances for every connection), set on each protocol the
            factory builds; the rest is passed on to
            ``loop.create_server`` (or ``create_unix_server``). A listening
            socket given as ``sock=`` (TCP or UNIX) is served instead of host
            and port; a UNIX one's path is left to whoever bound it.

    Returns:
        The server, already serving. Use it as an async context manager, or call
        its ``close()`` (which closes its connections too) and
        ``await wait_closed()`` to stop it.

    Raises:
        OSError: The server cannot listen: the address is taken (``EADDRINUSE``,
            also for a UNIX socket a live server answers on), or not allowed.
    """
    loop = asyncio.get_running_loop()
    server = Server(_with_limits(protocol_factory, kwargs))
    if path is not None:
        if host is not None or port is not None:
            raise TypeError("serve() takes either host and port or path, not both")
        await _refuse_live_path(os.fsdecode(path))
        unix = await loop.create_unix_server(server._build, path, ssl=ssl, **kwargs)
        server._listen(unix, os.fsdecode(path))
    else:
        server._listen(await loop.create_server(server._build, host, port, ssl=ssl, **kwargs))
    return server


@overload
async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    protocol_factory: Callable[[], P],
    path: str | None = None,
    sock: socket.socket | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    **kwargs: Any,
) -> P: ...


@overload
async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    sock: socket.socket | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    **kwargs: Any,
) -> AMPProtocol: ...


async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    protocol_factory: Callable[[], AMPProtocol] = AMPProtocol,
    path: str | None = None,
    sock: socket.socket | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    **kwargs: Any,
) -> AMPProtocol:
    """
    Open an AMP connection and return its protocol once connected.

    Args:
        host: The server's host name or address.
        port: The server's TCP port.
        protocol_factory: Builds the client's protocol; give an
            [`AMPProtocol`][] subclass with responders to answer the server's
            calls. [`AMPProtocol`][] by default.
        path: Connect to this UNIX socket path instead of TCP.
        sock: Use this socket, already connected, instead of opening one: a
            TCP or a UNIX stream socket (one end of ``socket.socketpair()``,
            say). The connection owns it from now on and closes it at the end.
        ssl: An ``ssl.SSLContext`` (or ``True`` for the default one) to
            speak TLS.
        **kwargs: The limits of [`AMPProtocol`][] (``max_box_size``,
            ``max_keys``, ``max_responders``, ``max_pending_calls``,
            ``max_queued_calls``, ``close_timeout``), its ``locators``,
            ``keepalive`` / ``keepalive_timeout`` and its ``middleware``; the
            rest is passed on to ``loop.create_connection`` (or
            ``create_unix_connection``), e.g. ``server_hostname``.

    Use the protocol as an async context manager to close it at the end:

        async with await connect("localhost", 8000) as proto:
            print(await proto.call_remote(Sum, a=1, b=2))
    """
    loop = asyncio.get_running_loop()
    protocol_factory = _with_limits(protocol_factory, kwargs)
    if sock is not None:
        if host is not None or port is not None or path is not None:
            raise TypeError("connect() takes host and port, path or sock, only one of them")
        # The UNIX variant for a UNIX socket: uvloop picks its transport by the call.
        if getattr(socket, "AF_UNIX", None) == sock.family:
            _, protocol = await loop.create_unix_connection(
                protocol_factory, sock=sock, ssl=ssl, **kwargs
            )
        else:
            _, protocol = await loop.create_connection(
                protocol_factory, sock=sock, ssl=ssl, **kwargs
            )
    elif path is not None:
        if host is not None or port is not None:
            raise TypeError("connect() takes either host and port or path, not both")
        _, protocol = await loop.create_unix_connection(protocol_factory, path, ssl=ssl, **kwargs)
    else:
        _, protocol = await loop.create_connection(
            protocol_factory,
            host,  # type: ignore[arg-type]  # None is valid with sock=, as in asyncio
            port,  # type: ignore[arg-type]
            ssl=ssl,
            **kwargs,
        )
    return protocol
