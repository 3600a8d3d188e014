"""
``asyncio-amp ping``: send heartbeats to a peer and print each round-trip time.

Every AMPProtocol answers the keepalive's heartbeat at once, without a
responder; a peer without it (Twisted) answers ``UNHANDLED``, which is an
answer all the same. So it works against any AMP peer, and it can be a
Kubernetes exec probe or a Docker ``HEALTHCHECK``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import ssl
import sys
import time

from .._errors import ConnectionLostError, ProtocolError, RemoteAmpError
from .._keepalive import Heartbeat
from .._network import connect
from ._common import (
    EXIT_CONNECT,
    EXIT_LOST,
    EXIT_OK,
    EXIT_TIMEOUT,
    PROG,
    Formatter,
    UsageError,
    add_client_tls_options,
    client_tls,
    fail,
    parse_address,
    place_error,
    seconds,
)

__all__: list[str] = []

EXAMPLES = """\
examples:
  asyncio-amp ping 127.0.0.1:7000
  asyncio-amp ping 127.0.0.1:7000 -c 3 -i 0.2
  asyncio-amp ping --unix /run/app.sock -c 1 -q      # a health check
  asyncio-amp ping example.com:7443 -c 1 --tls --cafile ca.pem

Each heartbeat waits for its answer (up to --timeout) before the next one is
sent, --interval after the previous one. An error answer such as UNHANDLED (a
Twisted peer) counts as a reply. Ctrl-C stops and prints the summary.

exit status:
  0  at least one heartbeat was answered (like ping)
  2  bad command line
  3  could not connect (refused, unknown host, TLS failure)
  4  no heartbeat was answered within --timeout
  5  the connection closed before any heartbeat was answered
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``ping`` and its options to the command's subparsers."""
    parser = subparsers.add_parser(
        "ping",
        help="send heartbeats to a peer and print the round-trip times",
        description="Send AMP heartbeats to a peer and print each round-trip time.",
        usage=f"{PROG} ping [options] (HOST:PORT | --unix PATH)",
        epilog=EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument("target", nargs="?", metavar="HOST:PORT", help="the peer's address")
    parser.add_argument(
        "-c", "--count", type=_count, metavar="N", help="stop after N heartbeats (default: forever)"
    )
    parser.add_argument(
        "-i",
        "--interval",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="wait this long between heartbeats (default 1)",
    )
    parser.add_argument(
        "-W",
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="wait this long for the connection and for each reply (default 5)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only the summary at the end"
    )
    parser.add_argument("--unix", metavar="PATH", help="connect to a UNIX socket instead of TCP")
    add_client_tls_options(parser)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, not {text!r}")
    return value


def _ms(value: float) -> str:
    return f"{value * 1000:.3f}"


async def run(args: argparse.Namespace) -> int:
    """Ping the peer ``args`` names; return the exit status (see EXAMPLES)."""
    if (args.target is None) == (args.unix is None):
        raise UsageError("ping needs HOST:PORT or --unix PATH (one of them)")
    tls = client_tls(args)
    host: str | None = None
    if args.unix:
        where = args.unix
    else:
        host, port = parse_address(args.target, "the target")
        where = f"{host}:{port}"
    out = sys.stdout
    try:
        async with asyncio.timeout(args.timeout):
            if args.unix:
                protocol = await connect(path=args.unix, ssl=tls)
            else:
                protocol = await connect(
                    host, port, ssl=tls, server_hostname=args.server_hostname if tls else None
                )
    except TimeoutError:
        return fail(EXIT_TIMEOUT, f"no connection to {where} within {args.timeout:g} s")
    except (OSError, ssl.SSLError) as exc:
        return fail(EXIT_CONNECT, place_error("cannot connect to", host, where, exc))
    if not args.quiet:
        print(f"PING {where} ({protocol.peer})", file=out, flush=True)
    times: list[float] = []
    sent = 0
    lost: str | None = None
    began = time.monotonic()
    try:
        while args.count is None or sent < args.count:
            if sent:
                await asyncio.sleep(args.interval)
            sent += 1
            started = time.perf_counter()
            note = ""
            try:
                async with asyncio.timeout(args.timeout):
                    await protocol.call_remote(Heartbeat)
            except RemoteAmpError as exc:  # an answer all the same (UNHANDLED from Twisted)
                note = f" ({exc.error_code})"
            except TimeoutError:
                if not args.quiet:
                    print(f"no reply from {where}: seq={sent} (timeout)", file=out, flush=True)
                continue
            except (ConnectionLostError, ProtocolError) as exc:
                lost = str(exc)
                break
            elapsed = time.perf_counter() - started
            times.append(elapsed)
            if not args.quiet:
                print(
                    f"reply from {where}: seq={sent} time={_ms(elapsed)} ms{note}",
                    file=out,
                    flush=True,
                )
    except asyncio.CancelledError:  # Ctrl-C: the summary, as ping prints it
        pass
    finally:
        protocol.close()
    _summary(where, sent, times, time.monotonic() - began)
    if times:
        if lost is not None:
            print(f"{PROG}: warning: {lost}", file=sys.stderr)
        return EXIT_OK
    if lost is not None:
        return fail(EXIT_LOST, lost)
    return fail(EXIT_TIMEOUT, f"no reply from {where} within {args.timeout:g} s")


def _summary(where: str, sent: int, times: list[float], total: float) -> None:
    answered = len(times)
    loss = 0 if not sent else round(100 * (sent - answered) / sent)
    print(f"--- {where} ping statistics ---")
    print(f"{sent} heartbeats sent, {answered} answered, {loss}% lost, time {total * 1000:.0f} ms")
    if times:
        mean = sum(times) / answered
        deviation = math.sqrt(sum((t - mean) ** 2 for t in times) / answered)
        print(
            f"rtt min/avg/max/mdev = {_ms(min(times))}/{_ms(mean)}/{_ms(max(times))}/"
            f"{_ms(deviation)} ms",
            flush=True,
        )
