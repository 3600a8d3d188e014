"""
serve() and connect(): AMP servers and clients in one call.

They are thin wrappers over ``loop.create_server``, ``loop.create_connection``
and their UNIX-socket variants, and take the same keyword arguments.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Callable
from typing import Any, TypeVar, overload

from ._protocol import AMPProtocol

__all__ = ["connect", "serve"]

P = TypeVar("P", bound=AMPProtocol)

# The limits of AMPProtocol that serve() and connect() take as keywords.
LIMITS = (
    "max_box_size",
    "max_keys",
    "max_responders",
    "max_pending_calls",
    "max_queued_calls",
    "close_timeout",
)


def _with_limits(factory: Callable[[], P], kwargs: dict[str, Any]) -> Callable[[], P]:
    """Take the limit keywords out of ``kwargs`` and return a factory that sets them."""
    limits = {name: kwargs.pop(name) for name in LIMITS if name in kwargs}
    if not limits:
        return factory
    probe = AMPProtocol()
    for name, value in limits.items():
        setattr(probe, name, value)  # checks the values now, not at the first connection

    def build() -> P:
        protocol = factory()
        for name, value in limits.items():
            setattr(protocol, name, value)
        return protocol

    return build


async def serve(
    protocol_factory: Callable[[], AMPProtocol],
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    ssl: _ssl.SSLContext | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """
    Start an AMP server and return the ``asyncio.Server``.

    Args:
        protocol_factory: Called once per connection; usually an
            [`AMPProtocol`][] subclass with responders.
        host: The interface(s) to listen on, as for ``loop.create_server``.
        port: The TCP port; 0 picks a free one (see ``server.sockets``).
        path: Listen on this UNIX socket path instead of TCP.
        ssl: A server-side ``ssl.SSLContext`` to accept TLS connections.
        **kwargs: The limits of [`AMPProtocol`][] (``max_box_size``,
            ``max_keys``, ``max_responders``, ``max_pending_calls``,
            ``max_queued_calls``, ``close_timeout``), set on each
            protocol the factory builds; the rest is passed on to
            ``loop.create_server`` (or ``create_unix_server``).

    The server is already serving when this returns. Use it as an async context
    manager, or call ``close()`` and ``await wait_closed()`` to stop it.
    """
    loop = asyncio.get_running_loop()
    protocol_factory = _with_limits(protocol_factory, kwargs)
    if path is not None:
        if host is not None or port is not None:
            raise TypeError("serve() takes either host and port or path, not both")
        return await loop.create_unix_server(protocol_factory, path, ssl=ssl, **kwargs)
    return await loop.create_server(protocol_factory, host, port, ssl=ssl, **kwargs)


@overload
async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    protocol_factory: Callable[[], P],
    path: str | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    **kwargs: Any,
) -> P: ...


@overload
async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    ssl: _ssl.SSLContext | bool | None = None,
    **kwargs: Any,
) -> AMPProtocol: ...


async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    protocol_factory: Callable[[], AMPProtocol] = AMPProtocol,
    path: str | None = None,
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
        ssl: An ``ssl.SSLContext`` (or ``True`` for the default one) to
            speak TLS.
        **kwargs: The limits of [`AMPProtocol`][] (``max_box_size``,
            ``max_keys``, ``max_responders``, ``max_pending_calls``,
            ``max_queued_calls``, ``close_timeout``); the rest is
            passed on to ``loop.create_connection`` (or
            ``create_unix_connection``), e.g. ``server_hostname``.

    Use the protocol as an async context manager to close it at the end:

        async with await connect("localhost", 8000) as proto:
            print(await proto.call_remote(Sum, a=1, b=2))
    """
    loop = asyncio.get_running_loop()
    protocol_factory = _with_limits(protocol_factory, kwargs)
    if path is not None:
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
