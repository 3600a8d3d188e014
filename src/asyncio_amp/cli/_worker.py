"""
The worker's side of ``asyncio-amp serve --workers N``.

A worker is ``asyncio-amp serve`` started by the supervisor (see ``_supervisor``)
with two hidden options: ``--listen-fds``, the listening sockets it inherited, and
``--supervisor-fd``, its end of a socket pair with the supervisor. It serves the
inherited sockets the way the plain ``serve`` serves the ones it binds, writes one
byte on the pair once it listens, and stops (as on SIGTERM) when the pair reaches
end of file: the supervisor is gone, killed or not, and a worker must not
outlive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from .._network import serve
from .._protocol import AMPProtocol
from .._server import Server

__all__: list[str] = []

# The byte a worker sends once it listens.
READY = b"R"


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
    A worker's end of its socket pair with the supervisor.

    Args:
        fd: The inherited descriptor of the pair's end.
        gone: Called once when the supervisor's end closes.
    """

    def __init__(self, fd: int, gone: Callable[[], None]) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._gone = gone
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def ready(self) -> None:
        """Tell the supervisor that this worker listens."""
        with contextlib.suppress(OSError):  # gone already: _readable sees it
            self._sock.send(READY)

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
            self._gone()
