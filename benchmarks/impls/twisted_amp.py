"""
Twisted AMP (``twisted.protocols.amp``) on Twisted's default reactor (epoll on Linux).

Only Twisted's public API is used. The client keeps its calls in flight the
idiomatic Twisted way: each answer's callback issues the next call. Both ends set
TCP_NODELAY, as asyncio does by default.
``BigBytesArgument`` is written here because Twisted has no chunked bytes type;
it splits a value over ``name``, ``name.2``, … like asyncio-amp's ``BigBytes``.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from zope.interface import implementer

from . import common

__all__ = ["client", "inproc", "serve"]

reactor: Any = _reactor

CHUNK = 65_535


class BigBytesArgument(amp.Argument):
    """Bytes of any size, in chunks of 65,535 bytes under ``name``, ``name.2``, …"""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = memoryview(objects.pop(name.decode("ascii")))
        count = max(1, -(-len(value) // CHUNK))
        for i in range(count):
            key = name if i == 0 else name + b".%d" % (i + 1)
            strings[key] = value[i * CHUNK : (i + 1) * CHUNK]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        chunks = [strings.pop(name)]
        for i in range(2, len(strings) + 3):
            chunk = strings.pop(name + b".%d" % i, None)
            if chunk is None:
                break
            chunks.append(chunk)
        objects[name.decode("ascii")] = chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Sum(amp.Command):
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Echo(amp.Command):
    arguments = [(b"data", amp.String())]
    response = [(b"data", amp.String())]


class BigEcho(amp.Command):
    arguments = [(b"data", BigBytesArgument())]
    response = [(b"data", BigBytesArgument())]


def _no_delay(transport: Any) -> None:
    # asyncio sets TCP_NODELAY on every TCP connection and Twisted does not. Set it on
    # Twisted's too, so the comparison is between the libraries, not the socket options
    # (measured here: Twisted is 10 to 20 % faster on seq, pipelined and conns with it).
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class Server(amp.AMP):
    """Answer the three benchmark commands."""

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        super().connectionMade()

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @BigEcho.responder
    def big_echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}


class CountingFactory(Factory):
    protocol = Server

    def __init__(self, probe: common.IdleProbe) -> None:
        self.probe = probe

    def buildProtocol(self, addr: Any) -> Any:
        self.probe.connected()
        return super().buildProtocol(addr)


def serve(workload: str, params: dict[str, Any], loop: str | None) -> None:
    """Serve until stopped (or ``params["lifetime"]`` seconds)."""
    logging.basicConfig(level=logging.WARNING)
    factory: Factory
    if workload == "idle":
        probe = common.IdleProbe(params["idle_connections"])
        factory = CountingFactory(probe)
        deadline = time.monotonic() + params["cap"]

        def poll() -> None:
            if probe.finished() or time.monotonic() > deadline:
                # Let the reactor finish the work of the last accepted connections.
                reactor.callLater(0.1, lambda: common.emit_result(probe.report()))
            else:
                reactor.callLater(0.02, poll)

        reactor.callWhenRunning(poll)
    else:
        factory = Factory.forProtocol(Server)
    port = reactor.listenTCP(0, factory, backlog=common.BACKLOG, interface=common.HOST)
    common.announce_port(port.getHost().port)
    reactor.callLater(params["lifetime"], reactor.stop)
    reactor.run()


class _Slot:
    """One call slot: each answer's callback checks it and issues the next call."""

    def __init__(
        self, proto: amp.AMP, meter: common.Meter, state: dict[str, Any], params: dict[str, Any]
    ) -> None:
        self.proto = proto
        self.meter = meter
        self.state = state
        self.command = params["command"]
        self.payload: bytes = state["payload"]
        self.i = 0

    def fire(self) -> None:
        if self.meter.done or self.i >= 100_000_000:
            self.state["active"] -= 1
            if self.state["active"] == 0:
                self.state["on_idle"]()
            return
        self.i += 1
        if self.command == "sum":
            d = self.proto.callRemote(Sum, a=self.i, b=1)
        elif self.command == "echo":
            d = self.proto.callRemote(Echo, data=self.payload)
        else:
            d = self.proto.callRemote(BigEcho, data=self.payload)
        d.addCallbacks(self.answered, self.failed, callbackArgs=(self.i,))

    def answered(self, answer: dict[str, Any], i: int) -> None:
        ok = answer["total"] == i + 1 if self.command == "sum" else answer["data"] == self.payload
        if not ok:
            _note(self.state, f"wrong answer {answer!r:.200}")
            self.meter.stop_early()
        self.meter.tick()
        self.fire()

    def failed(self, failure: Any) -> None:
        _note(self.state, repr(failure.value))
        self.meter.stop_early()
        self.fire()


def _note(state: dict[str, Any], error: str) -> None:
    # The first 20 errors are enough to see what went wrong.
    if len(state["errors"]) < 20:
        state["errors"].append(error)


def _new_state(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "payload": common.make_payload(params.get("payload", 0)),
        "active": 0,
        "errors": [],
        "on_idle": lambda: None,
    }


def client(workload: str, port: int, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run one network workload against the server on ``port``."""
    meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
    state = _new_state(params)
    protocols: list[amp.AMP] = []
    outcome: dict[str, Any] = {}

    def finish() -> None:
        if "result" in outcome:
            return
        outcome["result"] = meter.result(errors=state["errors"])
        for proto in protocols:
            proto.transport.loseConnection()
        reactor.callLater(0.05, reactor.stop)

    def start(connected: list[amp.AMP]) -> None:
        for proto in connected:
            _no_delay(proto.transport)
        protocols.extend(connected)
        state["on_idle"] = finish
        meter.warm_end = time.perf_counter() + params["warmup"]
        slots = [
            _Slot(p, meter, state, params) for p in connected for _ in range(params["inflight"])
        ]
        state["active"] = len(slots)
        for slot in slots:
            slot.fire()

    def capped() -> None:
        if not meter.done:
            state["errors"].append("time cap reached before the measurement ended")
            meter.stop_early()
        # Whatever is still in flight 10 s later is abandoned.
        reactor.callLater(10, finish)

    def connect_failed(failure: Any) -> None:
        state["errors"].append(repr(failure.value))
        meter.stop_early()
        finish()

    endpoint = TCP4ClientEndpoint(reactor, common.HOST, port)
    d = gatherResults([connectProtocol(endpoint, amp.AMP()) for _ in range(params["conns"])])
    d.addCallbacks(start, connect_failed)
    reactor.callLater(params["warmup"] + params["cap"] + 1, capped)
    reactor.run()
    result: dict[str, Any] = outcome.get("result") or meter.result(errors=state["errors"])
    return result


def _string_transport() -> Any:
    # Imported only by the in-process workloads: twisted.internet.testing pulls in
    # a lot (13 MB of RSS), which would distort the idle server's memory figures.
    return importlib.import_module("twisted.internet.testing").StringTransport


def _inproc_calls(params: dict[str, Any]) -> dict[str, Any]:
    # Twisted's own way to join two protocols in memory (as in its test suite):
    # StringTransports, pumped here in a loop until both sides are quiet.
    meter = common.Meter(params["warmup"], params["duration"], params["min_calls"])
    state = _new_state(params)
    string_transport = _string_transport()
    proto = amp.AMP()
    server = Server()
    client_end = string_transport()
    server_end = string_transport()
    proto.makeConnection(client_end)
    server.makeConnection(server_end)
    slots = [_Slot(proto, meter, state, {"command": "sum"}) for _ in range(params["inflight"])]
    state["active"] = len(slots)
    for slot in slots:
        slot.fire()
    deadline = time.perf_counter() + params["warmup"] + params["cap"]
    for _ in range(100_000_000):
        data = client_end.value()
        if data:
            client_end.clear()
            server.dataReceived(data)
        data = server_end.value()
        if data:
            server_end.clear()
            proto.dataReceived(data)
        elif state["active"] == 0:
            break
        if time.perf_counter() > deadline:
            state["errors"].append("time cap reached before the measurement ended")
            meter.stop_early()
            break
    result = meter.result(errors=state["errors"])
    result["us_per_call"] = 1e6 / result["rate"] if result["rate"] else 0.0
    return result


@implementer(amp.IBoxReceiver)
class _Collector:
    """Keep the boxes a BinaryBoxProtocol parses."""

    def __init__(self) -> None:
        self.boxes: list[amp.AmpBox] = []

    def startReceivingBoxes(self, sender: Any) -> None:
        pass

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self.boxes.append(box)

    def stopReceivingBoxes(self, reason: Any) -> None:
        pass


def _codec(params: dict[str, Any]) -> dict[str, Any]:
    box = amp.AmpBox({b"_ask": b"1f", b"_command": b"Sum", b"a": b"1234", b"b": b"5678"})
    collector = _Collector()
    parser = amp.BinaryBoxProtocol(collector)
    parser.makeConnection(_string_transport()())
    boxes = collector.boxes
    proto = amp.AMP()

    def box_level() -> None:
        parser.dataReceived(box.serialize())
        boxes.pop()

    def box_level_parse_string() -> None:
        amp.parseString(box.serialize())

    def command_level() -> None:
        # What callRemote and the responder dispatch do with the values.
        ask = Sum.makeArguments({"a": 1234, "b": 5678}, proto)
        ask[b"_ask"] = b"1f"
        ask[b"_command"] = b"Sum"
        parser.dataReceived(ask.serialize())
        Sum.parseArguments(boxes.pop(), proto)

    assert amp.parseString(box.serialize()) == [box]
    warmup, duration = params["warmup"], params["duration"]
    parse_string_us = common.time_op(box_level_parse_string, warmup / 2, duration)
    return {
        "box_us": common.time_op(box_level, warmup, duration),
        # The same figure under both names: parse_boxes_us is the row's, the other
        # the name earlier results used.
        "box_parse_string_us": parse_string_us,
        "parse_boxes_us": parse_string_us,
        "command_us": common.time_op(command_level, warmup / 2, duration),
        "complete": True,
    }


def inproc(workload: str, params: dict[str, Any], loop: str | None) -> dict[str, Any]:
    """Run ``codec`` or ``inproc`` in this process."""
    if workload == "codec":
        return _codec(params)
    return _inproc_calls(params)
