"""
asyncio-amp, through its public API, on the default asyncio loop or on uvloop.

The server is an :class:`asyncio_amp.AMPProtocol` subclass with plain-function
responders, started with :func:`asyncio_amp.serve`. The client opens its
connections with :func:`asyncio_amp.connect` and keeps its calls in flight with
one coroutine per call slot, each awaiting ``call_remote`` in a loop: the way an
application would write it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncio_amp
from asyncio_amp import (
    AMPProtocol,
    BigBytes,
    BoxDecoder,
    Bytes,
    Command,
    Integer,
    encode_box,
    parse_boxes,
)

from . import common

__all__ = ["client", "inproc", "serve"]

# Every loop of a worker is bounded by this count as well as by the meter's time.
MAX_CALLS = 100_000_000

# The middleware on every protocol, server and client: none here. The variants
# with tracing or metrics on (amp_otel.py, amp_metrics.py) set it.
middleware: Callable[[], list[asyncio_amp.Middleware]] = list


class Sum(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Echo(Command):
    arguments = [("data", Bytes())]
    response = [("data", Bytes())]


class BigEcho(Command):
    arguments = [("data", BigBytes())]
    response = [("data", BigBytes())]


class Server(AMPProtocol):
    """Answer the three benchmark commands with plain functions."""

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @BigEcho.responder
    def big_echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}


# The iterations of BusyServer's loop: about 70 µs of CPU per call here.
BUSY_LOOPS = 1_800


class BusyServer(Server):
    """Answer ``Sum`` after some pure-Python work: a server whose calls cost CPU (workers-cpu)."""

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        spent = 0
        for i in range(BUSY_LOOPS):
            spent += i
        return {"total": a + b + (spent - spent)}


async def _serve(workload: str, params: dict[str, Any]) -> None:
    if workload == "idle":
        probe = common.IdleProbe(params["idle_connections"])

        def factory() -> Server:
            probe.connected()
            return Server(middleware=middleware())

        server = await asyncio_amp.serve(factory, common.HOST, 0, backlog=common.BACKLOG)
        common.announce_port(server.sockets[0].getsockname()[1])
        await probe.wait_and_report(params["cap"])
    else:
        server = await asyncio_amp.serve(
            Server, common.HOST, 0, backlog=common.BACKLOG, middleware=middleware()
        )
        common.announce_port(server.sockets[0].getsockname()[1])
    await asyncio.sleep(params["lifetime"])
    server.close()


def serve(workload: str, params: dict[str, Any], loop: str | None) -> None:
    """Serve until stopped (or ``params["lifetime"]`` seconds)."""
    logging.basicConfig(level=logging.WARNING)
    common.run_on_loop(loop or "asyncio", lambda: _serve(workload, params))


# The workers: one per call slot. Each checks every answer.


async def _sum_worker(proto: AMPProtocol, meter: common.Meter, base: int, payload: bytes) -> None:
    call = proto.call_remote
    for i in range(base, base + MAX_CALLS):
        if meter.done:
            break
        answer = await call(Sum, a=i, b=1)
        if answer["total"] != i + 1:
            raise AssertionError(f"Sum({i}, 1) answered {answer!r}")
        meter.tick()


async def _echo_worker(proto: AMPProtocol, meter: common.Meter, base: int, payload: bytes) -> None:
    call = proto.call_remote
    for _ in range(MAX_CALLS):
        if meter.done:
            break
        answer = await call(Echo, data=payload)
        if answer["data"] != payload:
            raise AssertionError("Echo answered other bytes")
        meter.tick()


async def _big_worker(proto: AMPProtocol, meter: common.Meter, base: int, payload: bytes) -> None:
    call = proto.call_remote
    for _ in range(MAX_CALLS):
        if meter.done:
            break
        answer = await call(BigEcho, data=payload)
        if answer["data"] != payload:
            raise AssertionError("BigEcho answered other bytes")
        meter.tick()


Worker = Callable[[AMPProtocol, common.Meter, int, bytes], Coroutine[Any, Any, None]]
WORKERS: dict[str, Worker] = {"sum": _sum_worker, "echo": _echo_worker, "big": _big_worker}


async def _drive(
    protocols: list[AMPProtocol], params: dict[str, Any], warnings: list[str]
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
    finished = loop.create_future()
    meter.on_done = lambda: finished.done() or finished.set_result(None)
    payload = common.make_payload(params.get("payload", 0))
    worker = WORKERS[params["command"]]
    errors: list[str] = []

    def check(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            errors.append(repr(task.exception()))
            meter.stop_early()

    tasks = []
    for c, proto in enumerate(protocols):
        for k in range(params["inflight"]):
            task = loop.create_task(worker(proto, meter, (c * 1000 + k) * MAX_CALLS, payload))
            task.add_done_callback(check)
            tasks.append(task)
    try:
        await asyncio.wait_for(finished, params["warmup"] + params["cap"])
    except TimeoutError:
        errors.append("time cap reached before the measurement ended")
        meter.stop_early()
    # The calls in flight finish: the workers see meter.done and return.
    _, late = await asyncio.wait(tasks, timeout=10)
    if late:
        errors.append(f"{len(late)} workers still waiting for an answer 10 s after the end")
        for task in late:
            task.cancel()
    return meter.result(errors=errors + warnings)


async def _client(workload: str, port: int, params: dict[str, Any]) -> dict[str, Any]:
    warnings = common.capture_warnings("asyncio_amp", "asyncio")
    protocols = [
        await asyncio_amp.connect(common.HOST, port, middleware=middleware())
        for _ in range(params["conns"])
    ]
    result = await _drive(protocols, params, warnings)
    for proto in protocols:
        proto.close()
    closing = [asyncio.ensure_future(proto.wait_closed()) for proto in protocols]
    _, late = await asyncio.wait(closing, timeout=5)
    if late:
        result["errors"].append(f"{len(late)} connections not closed 5 s after close()")
        for waiter in late:
            waiter.cancel()
    return result


def client(workload: str, port: int, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run one network workload against the server on ``port``."""
    result: dict[str, Any] = common.run_on_loop(
        loop or "asyncio", lambda: _client(workload, port, params)
    )
    return result


async def _inproc_calls(params: dict[str, Any]) -> dict[str, Any]:
    warnings = common.capture_warnings("asyncio_amp", "asyncio")
    loop = asyncio.get_running_loop()
    server = Server(middleware=middleware())
    proto = AMPProtocol(middleware=middleware())
    common.MemoryTransport.join(loop, server, proto)
    result = await _drive([proto], {**params, "command": "sum", "conns": 1}, warnings)
    result["us_per_call"] = 1e6 / result["rate"] if result["rate"] else 0.0
    return result


def _codec(params: dict[str, Any]) -> dict[str, Any]:
    box = {b"_ask": b"1f", b"_command": b"Sum", b"a": b"1234", b"b": b"5678"}
    decoder = BoxDecoder()

    def box_level() -> None:
        decoder.receive_data(encode_box(box))

    def generic() -> None:
        parse_boxes(encode_box(box))

    assert decoder.receive_data(encode_box(box)) == [box]
    assert parse_boxes(encode_box(box)) == [box]
    result: dict[str, Any] = {
        "box_us": common.time_op(box_level, params["warmup"], params["duration"]),
        "parse_boxes_us": common.time_op(generic, params["warmup"] / 2, params["duration"]),
        "complete": True,
    }
    # The Command-level path (values -> call box -> values) has no public entry
    # point: it is what call_remote and the responder dispatch do inside. These
    # private class methods may change; the number is then reported as missing.
    try:
        tag_part = len(b"1f").to_bytes(2, "big") + b"1f"
        encode_ask = Sum._encode_ask
        decode_arguments = Sum._decode_arguments

        def command_level() -> None:
            parts, slot = encode_ask({"a": 1234, "b": 5678})
            parts[slot] = tag_part
            decode_arguments(decoder.receive_data(b"".join(parts))[0])

        command_level()
        parts, slot = encode_ask({"a": 1234, "b": 5678})
        parts[slot] = tag_part
        assert b"".join(parts) == encode_box(box)
        result["command_us"] = common.time_op(
            command_level, params["warmup"] / 2, params["duration"]
        )
    except Exception as exc:
        result["command_us"] = None
        result["command_note"] = f"private Command API unavailable: {exc!r}"
    return result


def inproc(workload: str, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run ``codec`` or ``inproc`` in this process."""
    if workload == "codec":
        return _codec(params)
    result: dict[str, Any] = common.run_on_loop(loop or "asyncio", lambda: _inproc_calls(params))
    return result
