"""
``asyncio-amp proxy``: a logging man-in-the-middle.

Each connection is forwarded byte for byte to the target, and every box in both
directions is printed; the log never holds up forwarding (see ``_output``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._wire import ANSWER, ASK, ERROR, ERROR_CODE, ERROR_DESCRIPTION
from ._common import (
    EXIT_CONNECT,
    EXIT_OK,
    PROG,
    Formatter,
    box_summary,
    error_text,
    fail,
    format_sockname,
    json_bytes,
    os_error,
    parse_address,
    place_error,
    show_bytes,
    user_fields,
    wire_text,
)
from ._output import BoxScanner, LogWriter, say

__all__: list[str] = []

EXAMPLES = """\
examples:
  asyncio-amp proxy 7001 127.0.0.1:7000
  asyncio-amp proxy 127.0.0.1:7001 backend.internal:7000 --json > traffic.jsonl

Clients connect to LISTEN; each connection is forwarded to TARGET byte for byte.
Every box is printed with the time, the connection number, its direction (C->S
from the client, S->C from the server), its kind and tag; answers name their call
and its latency. A malformed stream is still forwarded unchanged, and said so.
The log never holds up forwarding: a box over 1 MiB is shown without its fields,
lines a slow reader cannot take are dropped (and counted), and if the reader goes
away the proxy goes on forwarding without a log.
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``proxy`` and its options to the command's subparsers."""
    parser = subparsers.add_parser(
        "proxy",
        help="forward connections and print every box both ways",
        description="A logging man-in-the-middle: forward each connection to TARGET "
        "and print every box in both directions.",
        epilog=EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "listen", metavar="LISTEN", help="[HOST:]PORT to listen on (default host 127.0.0.1)"
    )
    parser.add_argument("target", metavar="TARGET", help="HOST:PORT of the server")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (pip install 'asyncio-amp[uvloop]')"
    )
    parser.add_argument("--full", action="store_true", help="show long values whole")
    return parser


# How many bytes of log lines may wait for a slow reader of the proxy's output;
# past this, lines are dropped (and counted) rather than holding up forwarding.
LOG_QUEUE_LIMIT = 1 << 20
# How much of one box the proxy keeps to show it (its keys and values, each pair
# counted with its cost as Python objects): past this, a box is "too big to show" and
# skipped to its end, so that memory stays bounded whatever passes.
PROXY_SHOW_LIMIT = 1 << 20
# At shutdown, how long the log may take to go out, and how long a connection's
# unsent bytes may take before it is cut.
LOG_FLUSH_TIMEOUT = 1.0
CLOSE_TIMEOUT = 5.0


class _ProxyLog:
    """Prints the boxes of proxied connections, pairing each answer with its call."""

    def __init__(self, write: Callable[[str], None], *, as_json: bool, full: bool) -> None:
        self.write = write
        self.as_json = as_json
        self.limit = None if full else 80
        # (connection, direction of the call) -> tag -> (time sent, command)
        self.calls: dict[tuple[int, str], dict[bytes, tuple[float, str]]] = {}

    def forget(self, conn: int) -> None:
        """Drop what is kept of a closed connection's unanswered calls."""
        for direction in ("C->S", "S->C"):
            self.calls.pop((conn, direction), None)

    def event(self, conn: int, text: str, **fields: Any) -> None:
        now = time.time()
        if self.as_json:
            record = {"time": _iso(now), "conn": conn, "event": text, **fields}
            self.write(json.dumps(record, ensure_ascii=False))
        else:
            self.write(f"{_clock(now)} #{conn} {text}")

    def box(
        self, conn: int, direction: str, items: Mapping[bytes, bytes], *, too_big: int = 0
    ) -> None:
        """Log one box; ``too_big``: it was too big to show, and had this many keys."""
        now = time.time()
        moment = time.monotonic()
        kind, command, tag_text = box_summary(items)
        reverse = "S->C" if direction == "C->S" else "C->S"
        latency = None
        if kind == "call" and tag_text is not None:
            assert command is not None
            self.calls.setdefault((conn, direction), {})[items[ASK]] = (moment, command)
        elif kind in ("answer", "error"):
            tag = items[ANSWER] if kind == "answer" else items[ERROR]
            sent = self.calls.get((conn, reverse), {}).pop(tag, None)
            if sent is not None:
                latency = (moment - sent[0]) * 1000
                command = sent[1]
        fields = user_fields(items)
        if self.as_json:
            record: dict[str, Any] = {
                "time": _iso(now),
                "conn": conn,
                "direction": direction,
                "kind": kind,
                "command": command,
                "tag": tag_text,
            }
            if kind in ("answer", "error"):
                record["latency_ms"] = None if latency is None else round(latency, 3)
            if kind == "error":
                record["error_code"] = wire_text(items.get(ERROR_CODE, b""))
                record["error_description"] = wire_text(items.get(ERROR_DESCRIPTION, b""))
            record["fields"] = {wire_text(k): json_bytes(v) for k, v in fields.items()}
            if too_big:
                record["too_big"] = True
                record["keys"] = too_big
            self.write(json.dumps(record, ensure_ascii=False))
            return
        parts = [_clock(now), f"#{conn}", direction, kind]
        if kind.startswith("call"):
            parts.append(command or "?")
        if tag_text is not None:
            parts.append(f"tag={tag_text}")
        if kind in ("answer", "error"):
            if latency is None:
                parts.append("(no call with this tag seen)")
            else:
                parts.append(f"{command} {latency:.3f} ms")
        if kind == "error":
            parts.append(error_text(items))
        if too_big:
            parts.append(f"(too big to show: {too_big:,} keys)")
        else:
            parts.extend(
                f"{show_bytes(key)}={show_bytes(value, self.limit)}"
                for key, value in fields.items()
            )
        self.write(" ".join(parts))


def _clock(now: float) -> str:
    return datetime.datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")


def _iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat()


async def _pump(
    conn: int,
    direction: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    log: _ProxyLog,
) -> None:
    """Forward bytes from ``reader`` to ``writer`` unchanged, printing the boxes they hold."""
    # No limits on what passes: a proxy shows what passes, it does not police it.
    # Only what is kept to show a box is bounded (PROXY_SHOW_LIMIT).
    scanner = BoxScanner(show_limit=PROXY_SHOW_LIMIT)
    parsing = True
    while True:
        data = await reader.read(256 * 1024)
        if not data:
            break
        writer.write(data)
        if parsing:
            for box in scanner.feed(data):
                if not box.complete:
                    log.event(
                        conn,
                        f"{direction} box too big to show (box {box.number} at byte "
                        f"{box.offset}): skipping to its end",
                        direction=direction,
                        box=box.number,
                    )
                else:
                    too_big = box.keys if box.too_big else 0
                    log.box(conn, direction, dict(box.items), too_big=too_big)
            if scanner.error is not None:
                parsing = False
                log.event(
                    conn,
                    f"{direction} malformed AMP, forwarding the rest unparsed: {scanner.error}",
                    direction=direction,
                    error=scanner.error,
                )
        await writer.drain()
    if parsing:
        problem = scanner.end()
        if problem is not None:
            log.event(conn, f"{direction} {problem}", direction=direction, error=problem)
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _proxy_connection(
    conn: int,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    log: _ProxyLog,
) -> None:
    peer = format_sockname(client_writer.get_extra_info("peername"))
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        error = place_error("cannot connect to", target[0], f"{target[0]}:{target[1]}", exc)
        log.event(conn, f"from {peer}: {error}", peer=peer, error=os_error(exc))
        client_writer.transport.abort()
        return
    except asyncio.CancelledError:
        client_writer.transport.abort()
        raise
    log.event(conn, f"open {peer} -> {target[0]}:{target[1]}", peer=peer)
    pumps = [
        asyncio.ensure_future(_pump(conn, "C->S", client_reader, server_writer, log)),
        asyncio.ensure_future(_pump(conn, "S->C", server_reader, client_writer, log)),
    ]
    reason = ""
    cut = False
    try:
        pending: set[asyncio.Future[None]] = set(pumps)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [task for task in done if task.exception() is not None]
            if failed:
                reason = f": {os_error(failed[0].exception())}"  # type: ignore[arg-type]
                break
    except asyncio.CancelledError:
        cut = True  # the proxy is stopping
        raise
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        writers = (client_writer, server_writer)
        for writer in writers:
            if reason or cut:
                writer.transport.abort()
            else:
                writer.close()
        if not (reason or cut):
            # Unsent bytes get CLOSE_TIMEOUT to go out (a peer may not read).
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    for writer in writers:
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
            except TimeoutError:
                for writer in writers:
                    writer.transport.abort()
        log.forget(conn)
        if cut:
            log.event(conn, "closed: the proxy is stopping", error="the proxy is stopping")
    log.event(conn, f"closed{reason}", **({"error": reason[2:]} if reason else {}))


def _proxy_output(as_json: bool, full: bool) -> tuple[_ProxyLog, LogWriter]:
    """The proxy's log, written to standard output without ever holding up forwarding."""
    sys.stdout.flush()

    def closed(reason: str) -> None:
        say(f"{PROG} proxy: {reason}: no more log lines; still forwarding")

    writer = LogWriter(sys.stdout.fileno(), limit=LOG_QUEUE_LIMIT, on_closed=closed)
    return _ProxyLog(writer.write, as_json=as_json, full=full), writer


async def run(args: argparse.Namespace) -> int:
    """Forward and log connections as ``args`` say until stopped; return the exit status."""
    listen = parse_address(args.listen, "LISTEN", default_host="127.0.0.1")
    target = parse_address(args.target, "TARGET")
    count = 0
    # Each connection runs as a task of its own, apart from the one asyncio gives the
    # accept callback: cancelling that one makes asyncio log a traceback.
    connections: set[asyncio.Task[None]] = set()
    logs: list[_ProxyLog] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        task = asyncio.ensure_future(_proxy_connection(count, reader, writer, target, logs[0]))
        connections.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            connections.discard(task)

    try:
        server = await asyncio.start_server(accept, *listen)
    except OSError as exc:
        where = f"{listen[0]}:{listen[1]}"
        return fail(EXIT_CONNECT, place_error("cannot listen on", listen[0], where, exc))
    # No connection is handled before the next await: the log is there in time.
    log, output = _proxy_output(args.json, args.full)
    logs.append(log)
    where = ", ".join(format_sockname(s.getsockname()) for s in server.sockets)
    say(f"{PROG} proxy: listening on {where}, forwarding to {target[0]}:{target[1]}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.close()
        for task in list(connections):
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await server.wait_closed()
        await asyncio.to_thread(output.close, LOG_FLUSH_TIMEOUT)
    say(f"{PROG} proxy: stopped")
    return EXIT_OK
