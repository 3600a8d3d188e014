"""
The worker process: load the worker class, speak AMP to the parent, exit with it.

``python -m asyncio_amp.pool MODULE:CLASS --fd N --parent PID`` runs here. The
parent hands the child one end of a UNIX socketpair as descriptor ``N``; stdout
and stderr are a pipe the parent reads, so nothing printed can reach the AMP
stream. The child:

1. makes sure it dies with its parent: ``PR_SET_PDEATHSIG`` (Linux) kills it
   with SIGKILL if the parent dies, even while a responder holds the CPU, and
   the parent's end of the socket closing (EOF) ends it otherwise;
2. imports the worker class (from a module, or from the parent's main script,
   run as ``__mp_main__`` as ``multiprocessing`` does);
3. connects an instance of it on the socket, awaits its ``worker_started()``
   hook, and tells the parent it is ready (the ``Ready`` command);
4. serves until the parent closes the connection, awaits ``worker_stopping()``,
   and exits 0.

An exception before the parent hears ``Ready`` is printed to stderr, which the
parent keeps for its crash report, and the child exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import importlib
import inspect
import os
import runpy
import signal
import socket
import sys
from typing import Any

from .._arguments import Integer
from .._commands import Command
from .._protocol import AMPProtocol

__all__: list[str] = []

# The Linux prctl() option that sends a signal to the process when its parent dies.
PR_SET_PDEATHSIG = 1


class Ready(Command):
    """Sent by a worker to the parent once its ``worker_started()`` hook is done."""

    command_name = "asyncio_amp.pool.Ready"
    arguments = [("pid", Integer())]
    response = []


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit if it is gone already."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        # The parent died before prctl() took effect: nobody waits for this child.
        os._exit(1)


def load(target: str, main: str | None) -> type[AMPProtocol]:
    """The worker class named ``module:Class`` (a module of ``__main__``: the parent's script)."""
    module_name, _, qualname = target.partition(":")
    if module_name == "__main__":
        if main is None:
            raise ImportError(f"cannot import {target}: the parent's main module has no file")
        # Run as __mp_main__, so that its `if __name__ == "__main__":` part stays out.
        namespace = runpy.run_path(main, run_name="__mp_main__")
        module: Any = type(sys)("__mp_main__")
        module.__dict__.update(namespace)
        sys.modules["__mp_main__"] = module
    else:
        module = importlib.import_module(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, AMPProtocol)):
        raise TypeError(f"{target} is not an AMPProtocol subclass: {found!r}")
    return found


async def hook(protocol: AMPProtocol, name: str) -> None:
    """Run the worker's ``worker_started`` or ``worker_stopping`` hook, if it has one."""
    method = getattr(protocol, name, None)
    if method is not None:
        result = method()
        if inspect.isawaitable(result):
            await result


async def serve(cls: type[AMPProtocol], sock: socket.socket) -> None:
    """Serve the parent on ``sock`` with an instance of ``cls`` until the parent closes it."""
    loop = asyncio.get_running_loop()
    protocol = cls()
    await loop.create_unix_connection(lambda: protocol, sock=sock)
    try:
        await hook(protocol, "worker_started")
        await protocol.call_remote(Ready, pid=os.getpid())
        await protocol.wait_closed()
    finally:
        protocol.close()
    await hook(protocol, "worker_stopping")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m asyncio_amp.pool",
        description="A worker process of asyncio_amp.pool.ProcessPool (started by the pool).",
    )
    parser.add_argument("target", help="the worker class, as module:Class")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the parent")
    parser.add_argument("--parent", type=int, required=True, help="the parent's process id")
    parser.add_argument("--path", action="append", default=[], help="prepend to sys.path")
    parser.add_argument(
        "--parent-path", action="append", default=[], help="append to sys.path if missing"
    )
    parser.add_argument("--main", help="the parent's main script, for classes of __main__")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """The worker process's entry point (``python -m asyncio_amp.pool``)."""
    args = parse(argv)
    # Ctrl-C in a terminal signals the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(args.parent)
    # stdout is a pipe, so it would be block-buffered: lines go out as printed.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    faulthandler.enable()  # a segfault's traceback goes to the parent's crash report
    for entry in reversed(args.path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # The parent's own entries, so that what it imports, its workers import too.
    sys.path.extend(entry for entry in args.parent_path if entry not in sys.path)
    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)  # the worker's own subprocesses don't hold the parent's link
    cls = load(args.target, args.main)
    asyncio.run(serve(cls, sock))
