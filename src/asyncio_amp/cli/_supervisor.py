"""
``asyncio-amp serve --workers N``: N server processes on one address, supervised.

The supervisor binds the address, then starts N workers: fresh interpreters
(``sys.executable -m asyncio_amp serve``, no fork) running the same application
with the same options, each handed listening sockets (``--listen-fds``) and one
end of a socket pair (``--supervisor-fd``). It never accepts a connection itself.

- **Sharing the address.** TCP workers each get a socket of their own, bound to
  the same address with ``SO_REUSEPORT``, and the kernel spreads new connections
  over them by a hash of the connection's addresses. The other way, one
  listening socket handed to every worker (gunicorn's, uvicorn's), was measured
  here too: 64 connections opened at once against 2 workers, 15 times. With one
  shared socket, the busiest worker took a median of 47 of the 64 (35 to 57):
  whichever worker wakes first accepts every connection waiting in the queue,
  as asyncio accepts up to its backlog at each wake-up. With ``SO_REUSEPORT`` it
  took a median of 34 (32 to 43), close to the 32 of an even split. AMP
  connections live long, so a lopsided spread at connect time lasts; hence
  ``SO_REUSEPORT``. The supervisor keeps a bound, not listening, socket of its
  own on each address, so that the port (0 too: chosen once) stays reserved
  for the workers it restarts, and gets no connection. A UNIX socket cannot be
  shared by ``SO_REUSEPORT``, so a UNIX path (and TCP where the platform lacks
  ``SO_REUSEPORT``) is one listening socket, bound by the supervisor and
  handed to every worker.
- **Restarts.** A worker that exits while the supervisor runs is started again
  after a delay that doubles with each exit in a row (``BACKOFF_INITIAL`` up to
  ``BACKOFF_MAX``) and starts over once a worker stayed up ``STABLE_AFTER``
  seconds. A worker that exits before it listens failed to start: after
  ``MAX_START_FAILURES`` of those in a row, restarting it is not going to help,
  and the supervisor stops every worker and exits with status 1.
- **Stopping.** On SIGINT or SIGTERM the supervisor asks every worker to drain
  (on their socket pair, see ``_worker``): it shuts its server down with
  ``Server.close(grace=--grace)``. A worker still running ``KILL_MARGIN``
  seconds after the grace period gets SIGKILL. A second SIGINT or SIGTERM asks
  the workers to stop at once, as a plain ``serve`` does on its second signal.
  The workers run in a process group of their own, so that a Ctrl-C in a
  terminal reaches the supervisor only, which then drains them in order. The
  supervisor exits 0 when every worker stopped by itself.
- **No orphans.** The supervisor's end of each socket pair closes when it exits,
  however it exits (SIGKILL included), and a worker that sees end of file on
  its end stops as on SIGTERM: it stops listening at once and ends within
  ``--grace``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .._network import _refuse_live_path
from ._common import EXIT_CONNECT, EXIT_OK, UsageError, fail, format_sockname, place_error
from ._worker import DRAIN, NOW, READY
from .serve import _limits, load_protocol, server_tls

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp.cli")

# A worker's restarts: the first delay, the ceiling, and the factor between them.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 10.0
BACKOFF_MULTIPLIER = 2.0
# A worker up this long was healthy: its next restart starts from BACKOFF_INITIAL.
STABLE_AFTER = 10.0
# Failures to start in a row (exits before listening) after which the supervisor gives up.
MAX_START_FAILURES = 5
# How long after the grace period a worker still running gets SIGKILL: time to
# close its sockets and exit once its last connection closed.
KILL_MARGIN = 1.0
# The listen() backlog, as asyncio's create_server.
BACKLOG = 100
# The options of serve that say where to listen: the supervisor binds, not the workers.
PLACE_OPTIONS = {"host", "port", "unix", "workers", "listen_fds", "supervisor_fd", "help"}

EXIT_WORKERS_FAILED = 1  # a worker kept failing to start, or had to be killed


class GiveUpError(Exception):
    """A worker failed to start too many times in a row."""


@dataclass
class Listener:
    """One address the workers listen on, and how each of them gets a socket for it."""

    family: int
    address: Any  # a socket address: a path, or (host, port[, flowinfo, scope_id])
    # The socket handed to every worker (UNIX, or TCP without SO_REUSEPORT)...
    shared: socket.socket | None = None
    # ...or the supervisor's bound, not listening, SO_REUSEPORT socket holding the port.
    reserved: socket.socket | None = None

    def for_worker(self) -> socket.socket:
        """A listening socket for one more worker (the supervisor closes its copy if new)."""
        if self.shared is not None:
            return self.shared
        sock = _tcp_socket(self.family, reuse_port=True)
        try:
            sock.bind(self.address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for sock in (self.shared, self.reserved):
            if sock is not None:
                sock.close()


def _tcp_socket(family: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As asyncio's create_server: rebind at once after a restart, and an IPv6
        # socket for IPv6 only, so that "::" and "0.0.0.0" can both be bound.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_listeners(args: argparse.Namespace) -> list[Listener]:
    """Bind the address of ``args`` (every address a host name resolves to, as serve does)."""
    if args.unix:
        await _refuse_live_path(args.unix)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(args.unix).st_mode):
                os.unlink(args.unix)  # a killed server's: no one answered on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(args.unix)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return [Listener(socket.AF_UNIX, args.unix, shared=sock)]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        args.host or None, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    listeners: list[Listener] = []
    seen = set()
    try:
        for family, _, _, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            # Bound without SO_REUSEPORT first, so that the bind fails if anything
            # listens there already (another supervisor's workers included); set
            # after the bind, it lets our workers bind beside it.
            sock = _tcp_socket(family, reuse_port=False)
            listener = Listener(family, address)
            listeners.append(listener)
            if reuse_port:
                listener.reserved = sock
                sock.bind(address)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            else:
                listener.shared = sock
                sock.bind(address)
                sock.listen(BACKLOG)
            listener.address = sock.getsockname()  # port 0: the one the kernel chose
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if not listeners:
        raise OSError(errno.EADDRNOTAVAIL, f"{args.host} resolves to no address")
    return listeners


def worker_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command line of serve's options in ``args``, but for where to listen."""
    words: list[str] = []
    for action in parser._actions:
        if action.dest in PLACE_OPTIONS:
            continue
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            words.append(str(value))
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                words.append(action.option_strings[-1])
        elif value is not None and value != action.default:
            words.append(f"{action.option_strings[-1]}={value}")
    return words


def _status_text(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class Worker:
    """One running worker process."""

    slot: int
    process: asyncio.subprocess.Process
    link: socket.socket
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Starts the workers, restarts them, and stops them."""

    def __init__(
        self,
        args: argparse.Namespace,
        worker_argv: list[str],
        listeners: list[Listener],
    ) -> None:
        self.args = args
        self.worker_argv = worker_argv
        self.listeners = listeners
        self.workers: dict[int, Worker] = {}
        self.stopping = asyncio.Event()
        self.killed: list[int] = []
        self.ready: dict[int, asyncio.Event] = {}

    # Public methods

    async def run(self) -> int:
        """Run until stopped (or a worker fails to start too often); return the exit status."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, self._signalled)
        slots = [asyncio.ensure_future(self._keep(slot)) for slot in range(self.args.workers)]
        try:
            announced = asyncio.ensure_future(self._announce())
            stopped = asyncio.ensure_future(self.stopping.wait())
            done, _ = await asyncio.wait([*slots, stopped], return_when=asyncio.FIRST_COMPLETED)
            failure = next((task for task in slots if task in done and task.exception()), None)
            announced.cancel()
            stopped.cancel()
            self._stop()
            await self._drain(slots)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            for listener in self.listeners:
                listener.close()
            if self.args.unix:
                with contextlib.suppress(OSError):
                    os.unlink(self.args.unix)
        if failure is not None:
            exc = failure.exception()
            if isinstance(exc, GiveUpError):
                return fail(EXIT_WORKERS_FAILED, str(exc))
            raise exc  # type: ignore[misc]  # a bug of ours: not hidden
        if self.killed:
            return fail(
                EXIT_WORKERS_FAILED,
                f"worker(s) {', '.join(map(str, self.killed))} did not stop within the "
                f"grace period and were killed",
            )
        logger.info("stopped")
        return EXIT_OK

    # Private methods

    async def _announce(self) -> None:
        """Log where the workers serve once every one of them listens."""
        for slot in range(self.args.workers):
            self.ready.setdefault(slot, asyncio.Event())
        for event in list(self.ready.values()):
            await event.wait()
        where = ", ".join(format_sockname(listener.address) for listener in self.listeners)
        logger.info(
            "serving %s on %s%s with %d worker%s (press Ctrl-C to stop)",
            self.args.app,
            where,
            " with TLS" if self.args.certfile else "",
            self.args.workers,
            "" if self.args.workers == 1 else "s",
        )

    async def _keep(self, slot: int) -> None:
        """Keep a worker running in ``slot`` until stopping."""
        exits = 0  # exits in a row, each after less than STABLE_AFTER seconds up
        failures = 0  # exits in a row before listening
        while not self.stopping.is_set():
            try:
                worker = await self._start(slot)
            except OSError as exc:  # out of descriptors or processes, say
                why, listened, up = f"could not be started: {exc}", False, 0.0
                logger.error("worker %d %s", slot, why)
            else:
                listened = await self._wait_ready(worker)
                if listened:
                    failures = 0
                    self.ready.setdefault(slot, asyncio.Event()).set()
                status = await worker.process.wait()
                worker.link.close()
                del self.workers[slot]
                why = f"it {_status_text(status)}"
                if self.stopping.is_set():
                    text = _status_text(status)
                    if status in (0, -signal.SIGTERM) or worker.pid in self.killed:
                        logger.info("worker %d (pid %d) %s", slot, worker.pid, text)
                    else:
                        logger.warning("worker %d (pid %d) %s", slot, worker.pid, text)
                    return
                up = time.monotonic() - worker.started
                logger.warning(
                    "worker %d (pid %d) %s after %.1f s", slot, worker.pid, _status_text(status), up
                )
            if not listened:
                failures += 1
                if failures >= MAX_START_FAILURES:
                    raise GiveUpError(
                        f"worker {slot} failed to start {failures} times in a row ({why}); "
                        "giving up"
                    )
            exits = 1 if up >= STABLE_AFTER else exits + 1
            delay = min(BACKOFF_INITIAL * BACKOFF_MULTIPLIER ** (exits - 1), BACKOFF_MAX)
            logger.info("restarting worker %d in %.1f s", slot, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()

    async def _start(self, slot: int) -> Worker:
        ours, theirs = socket.socketpair()
        sockets = [listener.for_worker() for listener in self.listeners]
        fds = [sock.fileno() for sock in sockets]
        try:
            process = await asyncio.create_subprocess_exec(
                *self.worker_argv,
                f"--listen-fds={','.join(map(str, fds))}",
                f"--supervisor-fd={theirs.fileno()}",
                stdin=subprocess.DEVNULL,
                pass_fds=[*fds, theirs.fileno()],
                # Out of the terminal's process group: a Ctrl-C is the supervisor's to pass on.
                process_group=0,
            )
        finally:
            theirs.close()
            for listener, sock in zip(self.listeners, sockets, strict=True):
                if sock is not listener.shared:
                    sock.close()  # the worker's own SO_REUSEPORT socket: it has it now
        ours.setblocking(False)
        worker = Worker(slot, process, ours)
        self.workers[slot] = worker
        logger.info("worker %d started (pid %d)", slot, worker.pid)
        if self.stopping.is_set():
            self._terminate(worker)
        return worker

    async def _wait_ready(self, worker: Worker) -> bool:
        """Wait until the worker listens (True) or exits first (False)."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(worker.link, len(READY))
        except OSError:
            return False
        return data == READY

    def _signalled(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            return
        logger.info("stopping the workers now")
        for worker in list(self.workers.values()):
            with contextlib.suppress(OSError):
                worker.link.send(NOW)

    def _stop(self) -> None:
        """Stop listening, and ask every worker to stop."""
        self.stopping.set()
        # Our copies: without them, the address stops taking connections as soon as
        # the workers close theirs (no worker is started from now on).
        for listener in self.listeners:
            listener.close()
        logger.info(
            "shutting down %d worker%s: grace period %g s (Ctrl-C again to stop now)",
            len(self.workers),
            "" if len(self.workers) == 1 else "s",
            self.args.grace,
        )
        for worker in list(self.workers.values()):
            self._terminate(worker)

    def _terminate(self, worker: Worker) -> None:
        """Ask ``worker`` to drain (it reads the request once it listens, if not yet)."""
        with contextlib.suppress(OSError):  # gone already: its exit is seen anyway
            worker.link.send(DRAIN)

    async def _drain(self, slots: list[asyncio.Task[None]]) -> None:
        """Wait for the workers to exit; kill those still there after the grace period."""
        _, pending = await asyncio.wait(slots, timeout=self.args.grace + KILL_MARGIN)
        if pending:
            for worker in list(self.workers.values()):
                logger.warning(
                    "worker %d (pid %d) still running after the grace period: killing it",
                    worker.slot,
                    worker.pid,
                )
                self.killed.append(worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            await asyncio.wait(pending)


async def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``serve --workers N`` as ``args`` say; return the exit status."""
    if args.stdio:
        raise UsageError("--stdio serves one connection: it takes no --workers")
    if args.metrics_port is not None:
        # Each worker would serve /metrics on the one port, and only the first
        # could bind it; metrics summed over processes are not built yet.
        raise UsageError("--metrics-port is not supported with --workers yet")
    if not hasattr(os, "fork"):  # pragma: no cover - POSIX only
        raise UsageError("--workers needs a POSIX system")
    # Check the application and the options once, here, as a plain serve would.
    load_protocol(args.app)
    server_tls(args)
    _limits(args)
    try:
        listeners = await open_listeners(args)
    except OSError as exc:
        target = args.unix or f"{args.host}:{args.port}"
        host = None if args.unix else args.host
        return fail(EXIT_CONNECT, place_error("cannot listen on", host, target, exc))
    argv = [sys.executable, "-m", "asyncio_amp", "serve", *worker_options(parser, args)]
    return await Supervisor(args, argv, listeners).run()
