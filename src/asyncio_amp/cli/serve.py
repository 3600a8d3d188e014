"""
``asyncio-amp serve``: run a user's `AMPProtocol` subclass as a server.

Each connection is logged at INFO and every box at DEBUG. SIGINT or SIGTERM
shuts the server down with a grace period for running responders.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from typing import Any

from .._middleware import AccessLog, Middleware
from .._network import serve
from .._pipes import serve_stdio
from .._protocol import AMPProtocol
from ._common import (
    EXIT_CONNECT,
    EXIT_OK,
    Formatter,
    UsageError,
    fail,
    format_sockname,
    import_user_module,
    place_error,
    port_number,
    seconds,
    user_attribute,
)
from ._worker import SupervisorLink, parse_fds, serve_inherited

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp.cli")

EXAMPLES = """\
examples:
  asyncio-amp serve myapp.server:Calculator --port 7000
  asyncio-amp serve myapp.server:Calculator --host 0.0.0.0 --port 7000 -v
  asyncio-amp serve myapp.server:Calculator --unix /run/app.sock
  asyncio-amp serve myapp.server:Calculator --stdio     # one connection on stdin/stdout
  asyncio-amp serve myapp.server:Calculator --port 7443 --certfile cert.pem --keyfile key.pem
  asyncio-amp serve myapp.server:Calculator --access-log --access-log-format json
  asyncio-amp serve myapp.server:Calculator --middleware myapp.auth:LoginRequired
  asyncio-amp serve myapp.server:Calculator --port 7000 --workers 4   # 4 processes, one port
  asyncio-amp serve myapp.server:Calculator --metrics-port 9100   # Prometheus /metrics
  asyncio-amp serve myapp.server:Calculator --middleware asyncio_amp.otel:Tracing

The current directory is on the import path. Each connection is logged at INFO,
every box at DEBUG (-v). SIGINT (Ctrl-C) or SIGTERM stops accepting, refuses new
calls with SHUTDOWN, and lets running responders finish for --grace seconds;
a second Ctrl-C stops at once. --access-log writes one line per call to standard
output (to standard error with --stdio), apart from the log on standard error.
With --workers N, a supervisor runs N server processes on the one address,
restarts a crashed one with backoff, and on SIGINT or SIGTERM drains them all
within --grace.
"""

# serve's options for the limits of AMPProtocol: (name, type, metavar, default shown).
LIMIT_OPTIONS = (
    ("max_box_size", int, "BYTES", "16 MiB"),
    ("max_keys", int, "N", "1024"),
    ("max_responders", int, "N", "100"),
    ("max_pending_calls", int, "N", "1000"),
    ("max_queued_calls", int, "N", "10000"),
    ("close_timeout", float, "SECONDS", "10"),
    ("keepalive", float, "SECONDS", "off; a heartbeat after this long without a byte"),
    ("keepalive_timeout", float, "SECONDS", "20; then the connection is dropped"),
)


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``serve`` and its options to the command's subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run an AMPProtocol subclass as a server",
        description="Run an AMP server from MODULE:ProtocolClass, an AMPProtocol subclass.",
        epilog=EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument("app", metavar="MODULE:ProtocolClass")
    # Where to serve: --host and --port, or --unix. Another place to serve (standard
    # I/O, say) would be an option beside these, and run() would hand it to a
    # function beside _listen.
    parser.add_argument(
        "--host", default="127.0.0.1", help="the interface to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=7000,
        help="the TCP port (default 7000; 0: any free port)",
    )
    parser.add_argument("--unix", metavar="PATH", help="listen on a UNIX socket instead")
    parser.add_argument(
        "--stdio",
        action="store_true",
        help="serve one connection on standard input and output instead (the log goes to stderr)",
    )
    parser.add_argument(
        "--grace",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long running responders may take to finish at shutdown (default 10)",
    )
    parser.add_argument(
        "--workers",
        type=worker_count,
        metavar="N",
        help="run N server processes on this address under a supervisor that restarts them "
        "(POSIX only)",
    )
    # How a supervisor hands a worker its listening sockets and its end of their link.
    parser.add_argument("--listen-fds", type=parse_fds, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certfile", metavar="FILE", help="serve TLS with this certificate")
    parser.add_argument("--keyfile", metavar="FILE", help="the certificate's key")
    parser.add_argument(
        "--cafile", metavar="FILE", help="require client certificates signed by this CA"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (pip install 'asyncio-amp[uvloop]')"
    )
    parser.add_argument(
        "--middleware",
        action="append",
        default=[],
        metavar="MODULE:OBJECT",
        help="run this Middleware (an instance, or a class called with no arguments) around "
        "every call; repeat for more, outermost first",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="write one line per call (peer, command, tag, outcome, duration) to standard output",
    )
    parser.add_argument(
        "--access-log-format",
        choices=("text", "json"),
        default="text",
        help="the access log's lines: readable text (default) or one JSON object per line",
    )
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, on the --host interface "
        "(127.0.0.1 with --unix or --stdio); 0: any free port "
        "(pip install 'asyncio-amp[prometheus]')",
    )
    limits = parser.add_argument_group("limits (per connection; see AMPProtocol)")
    for name, kind, metavar, default in LIMIT_OPTIONS:
        limits.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            metavar=metavar,
            help=f"default {default}",
        )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every box sent and received (DEBUG)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser


def worker_count(text: str) -> int:
    """argparse's type for --workers: 1 or more."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers, not {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more workers, not {count}")
    return count


# Loading the server


def load_protocol(spec: str) -> type[AMPProtocol]:
    """Import ``MODULE:ProtocolClass`` and check that it is an AMPProtocol subclass."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise UsageError(f"the server must be given as MODULE:ProtocolClass, not {spec!r}")
    target = user_attribute(import_user_module(module_name), name, spec)
    if not (isinstance(target, type) and issubclass(target, AMPProtocol)):
        raise UsageError(f"{spec} is {target!r}, not an AMPProtocol subclass")
    return target


def server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from --certfile, --keyfile and --cafile (client certs)."""
    if not args.certfile:
        if args.keyfile or args.cafile:
            raise UsageError("--keyfile and --cafile need --certfile")
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
        if args.cafile:
            context.load_verify_locations(args.cafile)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    return context


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The limits given on the command line, checked by AMPProtocol itself."""
    given = {name: getattr(args, name) for name, *_ in LIMIT_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    probe = AMPProtocol()
    for name, value in given.items():
        try:
            setattr(probe, name, value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--{name.replace('_', '-')}: {exc}") from None
    return given


def load_middleware(spec: str) -> Middleware:
    """Import ``MODULE:OBJECT``: a Middleware instance, or a class to call with no arguments."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise UsageError(f"--middleware takes MODULE:OBJECT, not {spec!r}")
    target = user_attribute(import_user_module(module_name), name, spec)
    if isinstance(target, type) and issubclass(target, Middleware):
        try:
            target = target()
        except Exception as exc:
            raise UsageError(f"--middleware {spec}: {type(exc).__name__}: {exc}") from None
    if not isinstance(target, Middleware):
        raise UsageError(f"--middleware {spec} is {target!r}, not a Middleware")
    return target


def _middleware(args: argparse.Namespace) -> list[Middleware]:
    """The access log (outermost, so it sees refusals too) and the --middleware ones."""
    middleware: list[Middleware] = []
    if args.access_log:
        access = logging.getLogger("asyncio_amp.access")
        # Its own stream, apart from the log: standard output, unless that is
        # the connection itself (--stdio).
        handler = logging.StreamHandler(sys.stderr if args.stdio else sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
        middleware.append(AccessLog(args.access_log_format))
    middleware.extend(load_middleware(spec) for spec in args.middleware)
    return middleware


def _logged(cls: type[AMPProtocol], live: set[AMPProtocol]) -> type[AMPProtocol]:
    """
    The user's protocol class, logging each connection at INFO.

    Each connection is in ``live`` from when it is made until it is lost, so that
    shutdown reaches every open one and a closed one is not kept.
    """

    def connection_made(self: AMPProtocol, transport: asyncio.BaseTransport) -> None:
        live.add(self)
        cls.connection_made(self, transport)
        logger.info("connection from %s", self.peer)

    def connection_lost(self: AMPProtocol, exc: Exception | None) -> None:
        live.discard(self)
        cls.connection_lost(self, exc)
        logger.info("connection from %s closed%s", self.peer, f": {exc}" if exc else "")

    namespace = {
        "connection_made": connection_made,
        "connection_lost": connection_lost,
        "__qualname__": cls.__qualname__,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (cls,), namespace)


# Serving


async def run(args: argparse.Namespace) -> int:
    """Run the server ``args`` describe until SIGINT or SIGTERM; return the exit status."""
    if args.stdio and (args.unix or args.certfile or args.keyfile or args.cafile):
        raise UsageError("--stdio serves one connection on standard I/O: no --unix or TLS")
    cls = load_protocol(args.app)
    tls = server_tls(args)
    limits = _limits(args)
    middleware = _middleware(args)
    metrics_server = None
    if args.metrics_port is not None:
        host = "127.0.0.1" if args.unix or args.stdio else args.host
        try:
            metrics, metrics_server = _metrics(host, args.metrics_port)
        except OSError as exc:
            target = f"{host}:{args.metrics_port}"
            return fail(EXIT_CONNECT, place_error("cannot serve metrics on", host, target, exc))
        # Innermost, after the access log and the user's middleware: it counts
        # the calls that reach the application, and sees the connections.
        middleware.append(metrics)
    if middleware:
        limits["middleware"] = middleware
    live: set[AMPProtocol] = set()
    factory = _logged(cls, live)
    try:
        if args.stdio:
            return await _stdio(args, factory, limits, live)
        return await _listen(args, factory, tls, limits, live)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


def _metrics(host: str, port: int) -> tuple[Middleware, Any]:
    """The Metrics middleware, and the HTTP server of /metrics, already serving."""
    try:
        from ..prometheus import Metrics, serve_http  # noqa: PLC0415 (an optional dependency)
    except ImportError as exc:
        raise UsageError(
            f"--metrics-port needs prometheus_client ({exc}): pip install 'asyncio-amp[prometheus]'"
        ) from None
    http = serve_http(host, port)
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving metrics on http://%s:%d/metrics", shown, http.server_port)
    return Metrics(), http


async def _stdio(
    args: argparse.Namespace,
    factory: type[AMPProtocol],
    limits: dict[str, Any],
    live: set[AMPProtocol],
) -> int:
    """Serve one connection on standard I/O until it ends; shut it down with grace when stopped."""
    logger.info("serving %s on standard input and output", args.app)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if stopping:  # a second signal: drop the connection now
            for protocol in live:
                if protocol.transport is not None:
                    protocol.transport.abort()
            return
        logger.info("shutting down: grace period %g s (Ctrl-C again to stop now)", args.grace)
        stopping.extend(loop.create_task(p.shutdown(args.grace)) for p in list(live))

    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop)
    try:
        await serve_stdio(factory, **limits)
        if stopping:
            await asyncio.wait(stopping, timeout=max(1.0, args.grace))
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    logger.info("stopped")
    return EXIT_OK


async def _listen(
    args: argparse.Namespace,
    factory: type[AMPProtocol],
    tls: ssl.SSLContext | None,
    limits: dict[str, Any],
    live: set[AMPProtocol],
) -> int:
    """
    Listen on TCP or a UNIX socket, and shut down with grace when stopped.

    A worker of ``--workers`` serves the sockets its supervisor handed it instead,
    and also stops when its supervisor is gone.
    """
    try:
        if args.listen_fds:
            servers = await serve_inherited(args.listen_fds, factory, tls, limits)
        elif args.unix:
            servers = [await serve(factory, path=args.unix, ssl=tls, **limits)]
        else:
            servers = [await serve(factory, args.host, args.port, ssl=tls, **limits)]
    except OSError as exc:
        target = args.unix or f"{args.host}:{args.port}"
        host = None if args.unix else args.host
        return fail(EXIT_CONNECT, place_error("cannot listen on", host, target, exc))
    where = args.unix or ", ".join(
        format_sockname(s.getsockname()) for server in servers for s in server.sockets
    )
    scheme = " with TLS" if tls else ""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # A worker's signals only drain it; stopping at once is its supervisor's to ask.
    link = None if args.supervisor_fd is None else SupervisorLink(args.supervisor_fd, stop)
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set if link is None else link.drain)
    if link is not None:  # ready once a SIGTERM would drain us
        link.ready()
        logger.info("worker serving %s on %s%s", args.app, where, scheme)
    else:
        logger.info("serving %s on %s%s (press Ctrl-C to stop)", args.app, where, scheme)
    try:
        await stop.wait()
        stop.clear()
        if link is not None:
            link.draining()
        still_open = [protocol for protocol in live if not protocol.closed]
        logger.info(
            "shutting down: %d open connection%s, grace period %g s (Ctrl-C again to stop now)",
            len(still_open),
            "" if len(still_open) == 1 else "s",
            args.grace,
        )
        # Every connection shuts down through shutdown(grace), at once.
        for server in servers:
            server.close(grace=args.grace)
        shutdowns = asyncio.gather(*(server.wait_closed() for server in servers))
        interrupt = asyncio.ensure_future(stop.wait())
        waiters: set[asyncio.Future[Any]] = {shutdowns, interrupt}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not shutdowns.done():
            logger.info("stopping now")
            for server in servers:
                server.abort_clients()
            await shutdowns
        interrupt.cancel()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if link is not None:
            link.close()
        if args.unix and not args.listen_fds:
            with contextlib.suppress(OSError):
                os.unlink(args.unix)
    logger.info("stopped")
    return EXIT_OK
