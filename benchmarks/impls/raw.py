"""
The floor: the same AMP bytes over asyncio with no library at all.

Server and client are ``asyncio.BufferedProtocol`` subclasses that read into a
preallocated buffer, frame and parse boxes with the hand codec of
:mod:`rawcodec`, and write the exact bytes Twisted and asyncio-amp write. The
client checks every answer (its tag, and its total or data) but keeps no
futures and no tasks: the protocol callback that parses an answer writes the
next call itself. That is the least any program speaking these bytes on this
event loop can do, so it is the floor the library is compared with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import common
from .rawcodec import (
    BoxBuffer,
    answer_for,
    encode_ask_big,
    encode_box,
    encode_echo_ask,
    encode_sum_ask,
    join_big,
    parse_boxes,
)

__all__ = ["client", "inproc", "serve"]


class RawServer(asyncio.BufferedProtocol):
    """Answer ``Sum``, ``Echo`` and ``BigEcho``: the answers to one read go out in one write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Allocated at the first read, so an idle connection costs no buffer.
        self.rb: BoxBuffer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.rb is None:
            self.rb = BoxBuffer()
        return self.rb.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        boxes: list[dict[bytes, bytes]] = []
        assert self.rb is not None and self.transport is not None
        self.rb.feed(nbytes, boxes)
        if boxes:
            self.transport.write(b"".join([answer_for(box) for box in boxes]))


class RawClient(asyncio.BufferedProtocol):
    """Keep ``inflight`` calls going on one connection, checking every answer."""

    def __init__(self, meter: common.Meter, command: str, payload: bytes, inflight: int) -> None:
        self.meter = meter
        self.command = command
        self.payload = payload
        self.inflight = inflight
        self.transport: asyncio.Transport | None = None
        self.rb = BoxBuffer()
        self.pending: dict[bytes, int] = {}
        self.counter = 0
        self.error: BaseException | None = None
        self.idle: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        """Send the first ``inflight`` calls."""
        assert self.transport is not None
        self.transport.write(b"".join([self._next_call() for _ in range(self.inflight)]))

    def _next_call(self) -> bytes:
        self.counter += 1
        n = self.counter
        tag = b"%x" % n
        if self.command == "sum":
            self.pending[tag] = n + 1
            return encode_sum_ask(tag, n, 1)
        self.pending[tag] = 0
        if self.command == "echo":
            return encode_echo_ask(tag, self.payload)
        return encode_ask_big(tag, self.payload)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.rb.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        boxes: list[dict[bytes, bytes]] = []
        try:
            self.rb.feed(nbytes, boxes)
            out = []
            meter = self.meter
            for box in boxes:
                expected = self.pending.pop(box[b"_answer"])
                if self.command == "sum":
                    ok = int(box[b"total"]) == expected
                elif self.command == "echo":
                    ok = box[b"data"] == self.payload
                else:
                    ok = join_big(box) == self.payload
                if not ok:
                    raise AssertionError(f"wrong answer {box!r:.200}")
                meter.tick()
                if not meter.done:
                    out.append(self._next_call())
            if out:
                assert self.transport is not None
                self.transport.write(b"".join(out))
        except Exception as exc:
            self.error = exc
            self.meter.stop_early()
        if not self.pending and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending and self.error is None:
            self.error = ConnectionError(f"connection lost with {len(self.pending)} calls pending")
            self.meter.stop_early()


async def _serve(workload: str, params: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    if workload == "idle":
        probe = common.IdleProbe(params["idle_connections"])

        def factory() -> RawServer:
            probe.connected()
            return RawServer()

        server = await loop.create_server(factory, common.HOST, 0, backlog=common.BACKLOG)
        common.announce_port(server.sockets[0].getsockname()[1])
        await probe.wait_and_report(params["cap"])
    else:
        server = await loop.create_server(RawServer, common.HOST, 0, backlog=common.BACKLOG)
        common.announce_port(server.sockets[0].getsockname()[1])
    await asyncio.sleep(params["lifetime"])
    server.close()


def serve(workload: str, params: dict[str, Any], loop: str | None) -> None:
    """Serve until stopped (or ``params["lifetime"]`` seconds)."""
    common.run_on_loop(loop or "asyncio", lambda: _serve(workload, params))


async def _drive(
    protocols: list[RawClient], meter: common.Meter, params: dict[str, Any]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    meter.on_done = lambda: finished.done() or finished.set_result(None)
    warmup = params["warmup"]
    if "start_at" in params:  # one of several client processes: the same window for all
        warmup = max(0.0, params["start_at"] - time.time())
    meter.warm_end = time.perf_counter() + warmup
    for proto in protocols:
        proto.start()
    errors = []
    try:
        await asyncio.wait_for(finished, params["warmup"] + params["cap"])
    except TimeoutError:
        errors.append("time cap reached before the measurement ended")
        meter.stop_early()
    # Let the calls in flight finish, so the peer sees a clean end.
    for proto in protocols:
        if proto.pending:
            proto.idle = loop.create_future()
    waiters = [p.idle for p in protocols if p.idle is not None]
    if waiters:
        await asyncio.wait(waiters, timeout=5)
    errors += [repr(p.error) for p in protocols if p.error is not None][:20]
    # When the window opened, on the wall clock that every process shares.
    opened = time.time() - (time.perf_counter() - meter.t0) if meter.measuring else None
    return meter.result(errors=errors, window_start=opened)


async def _client(workload: str, port: int, params: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
    payload = common.make_payload(params.get("payload", 0))
    protocols = []
    for _ in range(params["conns"]):
        _, proto = await loop.create_connection(
            lambda: RawClient(meter, params["command"], payload, params["inflight"]),
            common.HOST,
            port,
        )
        protocols.append(proto)
    result = await _drive(protocols, meter, params)
    for proto in protocols:
        assert proto.transport is not None
        proto.transport.close()
    return result


def client(workload: str, port: int, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run one network workload against the server on ``port``."""
    result: dict[str, Any] = common.run_on_loop(
        loop or "asyncio", lambda: _client(workload, port, params)
    )
    return result


async def _inproc_calls(params: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
    server = RawServer()
    proto = RawClient(meter, "sum", b"", params["inflight"])
    common.MemoryTransport.join(loop, server, proto)
    result = await _drive([proto], meter, params)
    result["us_per_call"] = 1e6 / result["rate"] if result["rate"] else 0.0
    return result


def _codec(params: dict[str, Any]) -> dict[str, Any]:
    box = [(b"_ask", b"1f"), (b"_command", b"Sum"), (b"a", b"1234"), (b"b", b"5678")]

    def box_level() -> None:
        parse_boxes(encode_box(box))

    def command_level() -> None:
        parsed = parse_boxes(encode_sum_ask(b"1f", 1234, 5678))[0]
        int(parsed[b"a"]) + int(parsed[b"b"])

    assert parse_boxes(encode_box(box)) == [dict(box)]
    box_us = common.time_op(box_level, params["warmup"], params["duration"])
    return {
        "box_us": box_us,
        # The hand codec parses whole byte strings only: both rows are the same work.
        "parse_boxes_us": box_us,
        "command_us": common.time_op(command_level, params["warmup"] / 2, params["duration"]),
        "complete": True,
    }


def inproc(workload: str, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run ``codec`` or ``inproc`` in this process."""
    if workload == "codec":
        return _codec(params)
    result: dict[str, Any] = common.run_on_loop(loop or "asyncio", lambda: _inproc_calls(params))
    return result
