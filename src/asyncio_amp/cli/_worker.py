"""
The worker's side of ``asyncio-amp serve --workers N``.

A worker is ``asyncio-amp serve`` started by the supervisor (see ``_supervisor``)
with two hidden options: ``--listen-fds``, the listening sockets it inherited, and
``--supervisor-fd``, its end of a socket pair with the supervisor. It serves the
inherited sockets the way the plain ``serve`` serves the ones it binds, and writes
``READY`` on the pair once it listens. It drains (as a plain ``serve`` on its
first SIGTERM) when the supervisor writes ``DRAIN``, when the pair reaches end of
file (the supervisor is gone, killed or not, and a worker must not outlive it),
and on SIGTERM or SIGINT. It stops at once only when the supervisor writes
``NOW``.

A worker's own signals never mean "stop now", unlike a plain ``serve``'s second
one: a service manager may signal every process of the group besides the
supervisor (systemd does, by default), and a worker that got SIGTERM from it
after the supervisor's drain must keep draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from .._network import serve
from .._protocol import AMPProtocol
from .._server import Server

__all__: list[str] = []

# The byte a worker sends once it listens, and those the supervisor sends: drain, stop now.
READY = b"R"
DRAIN = b"D"
NOW = b"N"


def parse_fds(text: str) -> list[int]:
    """The descriptors of ``--listen-fds 3,4``."""
    try:
        fds = [int(word) for word in text.split(",")]
    except ValueError:
        raise ValueError(f"--listen-fds takes descriptors such as 3,4, not {text!r}") from None
    if not fds or min(fds) < 0:
        raise ValueError(f"--listen-fds takes descriptors such as 3,4, not {text!r}")
    return fds


async def serve_inherited(
    fds: list[int],
    factory: type[AMPProtocol],
    tls: ssl.SSLContext | None,
    limits: dict[str, Any],
) -> list[Server[AMPProtocol]]:
    """Serve every listening socket inherited as ``fds``: one server each."""
    servers: list[Server[AMPProtocol]] = []
    try:
        for fd in fds:
            servers.append(await serve(factory, sock=socket.socket(fileno=fd), ssl=tls, **limits))
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


class SupervisorLink:
    """
    A worker's end of its socket pair with the supervisor, and when it stops.

    Args:
        fd: The inherited descriptor of the pair's end.
        stop: Set to drain, and set again, once draining, to stop at once (the
            plain ``serve``'s event for its first and second signals).
    """

    def __init__(self, fd: int, stop: asyncio.Event) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._stop = stop
        self._draining = False
        self._now = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def ready(self) -> None:
        """Tell the supervisor that this worker listens."""
        with contextlib.suppress(OSError):  # gone already: _readable sees it
            self._sock.send(READY)

    def drain(self) -> None:
        """Drain, unless draining already."""
        if not self._draining:
            self._stop.set()

    def draining(self) -> None:
        """The worker drains now: ``stop`` is cleared, and set again only to stop at once."""
        self._draining = True
        if self._now:  # asked for before the drain began
            self._stop.set()

    def close(self) -> None:
        """Stop watching, and close our end."""
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def _readable(self) -> None:
        try:
            data = self._sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the supervisor's end closed: it exited or was killed
            self._loop.remove_reader(self._sock.fileno())
            self.drain()
            return
        if DRAIN in data:
            self.drain()
        if NOW in data:
            self._now = True
            self._stop.set()
