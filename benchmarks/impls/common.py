"""
Helpers shared by every implementation: measuring, reporting, pinning, memory.

Nothing here knows AMP. A child process talks to the orchestrator (``run.py``)
with single lines on stdout: ``PORT <n>`` once a server listens, ``READY <n>``
once the idle client holds its connections, and ``RESULT <json>`` at the end.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import os
import resource
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = [
    "HOST",
    "IdleProbe",
    "MemoryTransport",
    "Meter",
    "announce_port",
    "capture_warnings",
    "emit_result",
    "idle_client",
    "make_payload",
    "new_event_loop",
    "pin_to_cpu",
    "raise_nofile",
    "rss_bytes",
    "run_on_loop",
    "time_op",
    "wait_stdin_closed",
]

HOST = "127.0.0.1"

# The listen backlog of every server: the idle workload opens thousands of
# connections in a burst, and a full accept queue would make the client's
# connect() wait for a SYN retransmission (one second). The kernel caps it at
# net.core.somaxconn.
BACKLOG = 4096

# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)


def announce_port(port: int) -> None:
    """Tell the orchestrator which port the server listens on."""
    print(f"PORT {port}", flush=True)


def emit_result(result: dict[str, Any]) -> None:
    """Hand the measurement to the orchestrator: one line of JSON."""
    print("RESULT " + json.dumps(result), flush=True)


def pin_to_cpu(cpu: int | None) -> list[int]:
    """Run this process on ``cpu`` only, if the machine has it; return the CPUs in use."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        available = os.sched_getaffinity(0)
        if cpu in available and len(available) > 1:
            os.sched_setaffinity(0, {cpu})
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return []


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE toward ``wanted`` as far as the hard limit allows; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes() -> int:
    """This process's resident set size, in bytes (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident = int(f.read().split()[1])
        return resident * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        # Elsewhere: the peak, which is close enough for a growing process.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 20:
            self.records.append(f"{record.name} {record.levelname}: {self.format(record)}")


def capture_warnings(*names: str) -> list[str]:
    """Collect the first 20 WARNING-and-above log lines of loggers ``names``, for the result."""
    records: list[str] = []
    handler = _ListHandler(records)
    for name in names:
        logging.getLogger(name).addHandler(handler)
    return records


def make_payload(size: int) -> bytes:
    """Deterministic, not very compressible bytes of ``size``."""
    pattern = bytes(range(251))
    return (pattern * (size // len(pattern) + 1))[:size]


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop: ``asyncio`` (the default selector loop) or ``uvloop``."""
    if kind == "uvloop":
        uvloop = importlib.import_module("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def run_on_loop(kind: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main()`` to completion on a fresh loop of ``kind``."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(main())


class Meter:
    """
    Count completed operations; measure a window that follows a warm-up.

    Call :meth:`tick` once per completed operation. The first ``warmup`` seconds
    are not counted; then the window lasts at least ``duration`` seconds and
    ``min_calls`` operations, and both its ends fall on completions, so the
    rate is exact. ``on_done`` is called once, when the window closes; after
    that :attr:`done` is true and workers should stop issuing new calls.
    """

    __slots__ = (
        "cpu0",
        "cpu1",
        "done",
        "duration",
        "measuring",
        "min_calls",
        "n",
        "n0",
        "n1",
        "on_done",
        "t0",
        "t1",
        "t_end",
        "warm_end",
    )

    def __init__(self, warmup: float, duration: float, min_calls: int) -> None:
        self.duration = duration
        self.min_calls = max(1, min_calls)
        self.n = 0
        self.n0 = self.n1 = 0
        self.t0 = self.t1 = self.t_end = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.measuring = False
        self.done = False
        self.on_done: Callable[[], None] = lambda: None
        self.warm_end = time.perf_counter() + warmup

    def tick(self) -> None:
        """Record one completed operation."""
        self.n += 1
        if self.measuring:
            if self.n - self.n0 >= self.min_calls:
                now = time.perf_counter()
                if now >= self.t_end and not self.done:
                    self.n1, self.t1, self.cpu1 = self.n, now, time.process_time()
                    self.done = True
                    self.on_done()
        elif not self.done:
            now = time.perf_counter()
            if now >= self.warm_end:
                self.measuring = True
                self.n0, self.t0, self.cpu0 = self.n, now, time.process_time()
                self.t_end = now + self.duration

    def stop_early(self) -> None:
        """Close the window now (the time cap was hit); the result says so."""
        if not self.done:
            self.n1, self.t1, self.cpu1 = self.n, time.perf_counter(), time.process_time()
            self.done = True
            self.on_done()

    def result(self, **extra: Any) -> dict[str, Any]:
        """The measurement: operations, seconds, rate and CPU seconds in the window."""
        calls = self.n1 - self.n0 if self.measuring else 0
        seconds = self.t1 - self.t0 if self.measuring else 0.0
        result: dict[str, Any] = {
            "calls": calls,
            "seconds": seconds,
            "rate": calls / seconds if seconds > 0 else 0.0,
            "cpu_seconds": self.cpu1 - self.cpu0 if self.measuring else 0.0,
            "total_calls": self.n,
            "complete": self.measuring and calls >= self.min_calls,
        }
        result.update(extra)
        return result


class MemoryTransport(asyncio.Transport):
    """
    One end of an in-memory connection between two asyncio protocols.

    ``write`` hands the bytes to the peer's protocol on the event loop's next turn
    (``loop.call_soon``), as a socket would after a read, so both sides run on the
    loop the way they do on a real connection, without the kernel. A
    ``BufferedProtocol`` gets the bytes through ``get_buffer`` and
    ``buffer_updated``, like asyncio's own transports deliver them. Reading can be
    paused (bytes are then held until it resumes); writes never block, so the
    write buffer is always empty.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._peer: MemoryTransport | None = None
        self._closing = False
        self._paused = False
        self._held: list[bytes] = []

    @classmethod
    def join(
        cls, loop: asyncio.AbstractEventLoop, a: asyncio.BaseProtocol, b: asyncio.BaseProtocol
    ) -> None:
        """Connect protocols ``a`` and ``b`` to each other (``a`` first)."""
        end_a, end_b = cls(loop, a), cls(loop, b)
        end_a._peer, end_b._peer = end_b, end_a
        a.connection_made(end_a)
        b.connection_made(end_b)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._peer is None:
            return
        self._loop.call_soon(self._peer._receive, bytes(data))

    def _receive(self, data: bytes) -> None:
        if self._paused:
            self._held.append(data)
            return
        peer = self._protocol
        if isinstance(peer, asyncio.BufferedProtocol):
            view = memoryview(data)
            for _ in range(len(data) + 1):  # each round moves at least one byte
                if not view:
                    break
                buf = peer.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                peer.buffer_updated(n)
                view = view[n:]
        else:
            peer.data_received(data)  # type: ignore[attr-defined]

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        held, self._held = self._held, []
        for data in held:
            self._loop.call_soon(self._receive, data)

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("memory", 0)
        return default


def time_op(op: Callable[[], object], warmup: float, duration: float) -> float:
    """Microseconds per call of ``op``, timed in batches of 100 after ``warmup`` seconds."""
    clock = time.perf_counter
    warm_end = clock() + warmup
    for _ in range(10_000_000):
        op()
        if clock() >= warm_end:
            break
    calls = 0
    t0 = t = clock()
    deadline = t0 + duration
    for _ in range(10_000_000):
        for _ in range(100):
            op()
        calls += 100
        t = clock()
        if t >= deadline:
            break
    return (t - t0) / calls * 1e6


class IdleProbe:
    """
    Count a server's connections and measure its memory for the ``idle`` workload.

    The main figure is the one the issue defines: (RSS with all ``wanted``
    connections open - RSS before the first) / connections. As a cross-check,
    the marginal cost is measured too: the growth from the tenth of the
    connections to all of them, which memory left free in the allocator's
    pools before the first connection cannot flatter.
    """

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.limit = raise_nofile(wanted + 100)
        self.base = max(1, wanted // 10)
        self.connections = 0
        self.rss_base = 0
        gc.collect()
        self.rss_before = rss_bytes()

    def connected(self) -> None:
        """Count one accepted connection (called from the protocol factory)."""
        self.connections += 1
        if self.connections == self.base:
            gc.collect()
            self.rss_base = rss_bytes()

    def finished(self) -> bool:
        """``True`` once every wanted connection is open."""
        return self.connections >= self.wanted

    def report(self) -> dict[str, Any]:
        """The idle workload's result."""
        gc.collect()
        rss_after = rss_bytes()
        n = self.connections
        marginal = (
            (rss_after - self.rss_base) / (n - self.base)
            if n > self.base and self.rss_base
            else 0.0
        )
        return {
            "connections": n,
            "wanted": self.wanted,
            "nofile_limit": self.limit,
            "rss_before": self.rss_before,
            "rss_after": rss_after,
            "bytes_per_connection": (rss_after - self.rss_before) / n if n else 0.0,
            "marginal_bytes_per_connection": marginal,
            "complete": n >= self.wanted,
        }

    async def wait_and_report(self, within: float) -> None:
        """(asyncio) Wait for every connection, or ``within`` seconds, then emit the result."""
        deadline = time.monotonic() + within
        for _ in range(100_000):
            if self.finished() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        # Let the loop finish the work of the last accepted connections.
        await asyncio.sleep(0.1)
        emit_result(self.report())


def idle_client(port: int, count: int, timeout: float) -> None:
    """
    Open ``count`` plain sockets to the server, say ``READY``, and hold them.

    They send nothing. They are closed when stdin closes (the orchestrator's
    signal) or after ``timeout`` seconds, with SO_LINGER 0 so that closing
    thousands of them leaves no TIME_WAIT behind to eat the port range.
    """
    deadline = time.monotonic() + timeout
    socks: list[socket.socket] = []
    error = ""
    for _ in range(count):
        if time.monotonic() > deadline:
            error = "timed out while connecting"
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        try:
            s.connect((HOST, port))
        except OSError as exc:
            s.close()
            error = f"connect failed after {len(socks)}: {exc}"
            break
        socks.append(s)
    print(f"READY {len(socks)} {error}".rstrip(), flush=True)
    wait_stdin_closed(max(0.0, deadline - time.monotonic()))
    for s in socks:
        s.close()


def wait_stdin_closed(timeout: float) -> None:
    """Block until stdin reaches end of file, or ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                return
            if not os.read(sys.stdin.fileno(), 4096):
                return
