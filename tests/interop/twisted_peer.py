"""Reference AMP peer built on Twisted, driven over stdin/stdout with JSON lines.

This program imports only Twisted and the standard library; it must never import
``asyncio_amp``.  It is started by ``peer.py`` (see ``TwistedPeer``) and lets the
interoperability tests check our asyncio implementation against
``twisted.protocols.amp``.

Protocol (one JSON object per line):

* On start-up the program writes ``{"event": "ready"}``.
* Each request carries an ``"id"`` and an ``"op"``; each reply echoes the id:
  ``{"id": N, "ok": true, "result": ...}`` or
  ``{"id": N, "ok": false, "error": {"type": ..., "code": ..., "description": ...}}``.
* Unsolicited events carry ``"event"`` and no id: ``accepted`` (an inbound AMP
  connection, with its ``conn`` id) and ``lost`` (any AMP connection closed, with
  ``conn``, ``reason`` = ``str(failure.value)`` and ``reason_type`` = the
  exception class name).

Value encoding: JSON ints/bools/strings stand for themselves; bytes are
``{"$bytes": "<hex>"}``; floats are ``{"$float": "<repr>"}``; raw boxes are
``{"$box": {"<hex key>": "<hex value>"}}``; absent optional values are ``null``;
``decimal.Decimal`` is ``{"$decimal": "<str(d)>"}``; an aware ``datetime`` is
``{"$datetime": "<isoformat>"}``; a ``FilePath`` is ``{"$path": "<text>"}``.

Argument types (the ``type`` of encode, decode, to_box and from_box) are a name
from ``ARGUMENT_TYPES`` (``"Integer"``, ``"Decimal"``, ``"BigString"``, ...),
``{"ListOf": <type>}`` or ``{"AmpList": [["<name>", <type>, <optional>], ...]}``.

Operations: listen, connect, call, call_raw, send_raw, close, serialize,
received, encode, decode, to_box, from_box, encode_box, quit.  StartTLS:
tls_identity (what the StartTLS responder answers with) and start_tls.  Protocol
switching (``SwitchToRaw``, wire name ``Switch``): switch, raw_send,
raw_received and raw_close.  Over TLS:
listen_tls and connect_tls (certificates and keys are PEM file paths).  Over UNIX
sockets, where ``Descriptor`` passes file descriptors: listen_unix, connect_unix
and fd_calls.  Stdin reaching EOF also stops the program.
"""

from __future__ import annotations

import datetime
import decimal
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import deferLater
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols import amp
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

reactor: Any = _reactor

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------
# JSON value conventions
# ---------------------------------------------------------------------------


def encode_box(box: dict[bytes, bytes]) -> dict[str, Any]:
    return {"$box": {k.hex(): v.hex() for k, v in box.items()}}


def encode_value(value: Any) -> Any:
    """Turn a Python value into its JSON representation."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"$float": repr(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat(timespec="microseconds")}
    if isinstance(value, FilePath):
        return {"$path": value.asTextMode().path}
    if isinstance(value, dict):
        if value and all(isinstance(k, bytes) for k in value):
            return encode_box(value)
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    raise TypeError(f"cannot JSON-encode {value!r}")


def decode_value(value: Any) -> Any:
    """Turn a JSON representation back into a Python value."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == "$bytes":
                return bytes.fromhex(inner)
            if key == "$float":
                return float(inner)
            if key == "$box":
                return {bytes.fromhex(k): bytes.fromhex(v) for k, v in inner.items()}
            if key == "$decimal":
                return decimal.Decimal(inner)
            if key == "$datetime":
                return datetime.datetime.fromisoformat(inner)
            if key == "$path":
                return FilePath(inner)
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def decode_box(value: Any) -> dict[bytes, bytes]:
    box = decode_value(value)
    if not isinstance(box, dict) or not all(
        isinstance(k, bytes) and isinstance(v, bytes) for k, v in box.items()
    ):
        raise TypeError(f"expected a {{'$box': ...}} value, got {value!r}")
    return box


def python_name(wire_name: bytes) -> str:
    """The keyword name Twisted uses for a wire argument name (dashes -> _)."""
    return wire_name.decode("ascii").replace("-", "_")


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


class Sum(amp.Command):
    commandName = b"Sum"
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Divide(amp.Command):
    commandName = b"Divide"
    arguments = [(b"numerator", amp.Integer()), (b"denominator", amp.Integer())]
    response = [(b"result", amp.Float())]
    errors = {ZeroDivisionError: b"ZERO_DIVISION"}


class Fatal(amp.Command):
    commandName = b"Fatal"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    fatalErrors = {KeyError: b"FATAL_KEY"}


class Boom(amp.Command):
    commandName = b"Boom"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


class Notify(amp.Command):
    commandName = b"Notify"
    arguments = [(b"message", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = False


class EchoAll(amp.Command):
    commandName = b"EchoAll"
    arguments = [
        (b"i", amp.Integer()),
        (b"s", amp.Unicode()),
        (b"b", amp.String()),
        (b"f", amp.Float()),
        (b"flag", amp.Boolean()),
        (b"opt", amp.Unicode(optional=True)),
    ]
    response = [
        (b"i", amp.Integer()),
        (b"s", amp.Unicode()),
        (b"b", amp.String()),
        (b"f", amp.Float()),
        (b"flag", amp.Boolean()),
        (b"opt", amp.Unicode(optional=True)),
    ]


class Big(amp.Command):
    commandName = b"Big"
    arguments = [(b"size", amp.Integer())]
    response = [(b"data", amp.String())]


class Slow(amp.Command):
    commandName = b"Slow"
    arguments = [(b"delay", amp.Float()), (b"value", amp.Integer())]
    response = [(b"value", amp.Integer())]


class CallBack(amp.Command):
    commandName = b"CallBack"
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Quit(amp.Command):
    """Answers, then closes the connection (ampoule's Shutdown does the same)."""

    commandName = b"Quit"
    response = [(b"bye", amp.Unicode())]
    responseType = amp.QuitBox


class Hello(amp.Command):
    commandName = b"Hello"
    arguments = [(b"hello-name", amp.Unicode())]
    response = [(b"greeting", amp.Unicode())]


# The BigString convention (amp-protocol.net, clj-amp), which Twisted does not ship:
# a value of any size is cut into chunks of at most MAX_VALUE_LENGTH bytes, sent
# under the keys name, name.2, name.3, ...; an empty value is one empty key.


class _BigArgument(amp.Argument):
    """A Twisted argument that spreads one value over ``name``, ``name.2``, ..."""

    def to_data(self, value: Any) -> bytes:
        raise NotImplementedError

    def from_data(self, data: bytes) -> Any:
        raise NotImplementedError

    def toBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        value = objects.pop(python_name(name), None)
        if value is None:
            if self.optional:
                return
            raise amp.InvalidSignature(f"missing {name!r}")
        data = self.to_data(value)
        step = amp.MAX_VALUE_LENGTH
        strings[name] = data[:step]
        for number, start in enumerate(range(step, len(data), step), start=2):
            strings[name + b".%d" % number] = data[start : start + step]

    def fromBox(
        self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any
    ) -> None:
        first = strings.pop(name, None)
        if first is None:
            if not self.optional:
                raise KeyError(name)
            objects[python_name(name)] = None
            return
        chunks = [first]
        number = 2
        while (chunk := strings.pop(name + b".%d" % number, None)) is not None:
            chunks.append(chunk)
            number += 1
        objects[python_name(name)] = self.from_data(b"".join(chunks))


class BigBytesArgument(_BigArgument):
    def to_data(self, value: Any) -> bytes:
        if not isinstance(value, bytes):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        return value

    def from_data(self, data: bytes) -> bytes:
        return data


class BigStringArgument(_BigArgument):
    def to_data(self, value: Any) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"expected str, got {type(value).__name__}")
        return value.encode("utf-8")

    def from_data(self, data: bytes) -> str:
        return data.decode("utf-8")


def _echo_types_schema() -> list[tuple[bytes, amp.Argument]]:
    return [
        (b"dec", amp.Decimal()),
        (b"when", amp.DateTime()),
        (b"path", amp.Path()),
        (b"ints", amp.ListOf(amp.Integer())),
        (b"texts", amp.ListOf(amp.Unicode())),
        (b"decs", amp.ListOf(amp.Decimal())),
        (b"times", amp.ListOf(amp.DateTime())),
        (b"rows", amp.AmpList([(b"a", amp.Integer()), (b"b", amp.Unicode(optional=True))])),
        (b"maybe", amp.Decimal(optional=True)),
    ]


class EchoTypes(amp.Command):
    commandName = b"EchoTypes"
    arguments = _echo_types_schema()
    response = _echo_types_schema()


class BigEcho(amp.Command):
    commandName = b"BigEcho"
    arguments = [(b"data", BigBytesArgument()), (b"text", BigStringArgument())]
    response = [(b"data", BigBytesArgument()), (b"text", BigStringArgument())]


class WriteTo(amp.Command):
    """The responder writes ``text`` to the descriptor ``fd`` and closes it."""

    commandName = b"WriteTo"
    arguments = [(b"fd", amp.Descriptor()), (b"text", amp.String())]
    response = [(b"written", amp.Integer())]


class OpenPipe(amp.Command):
    """The responder returns the read end of a new pipe that holds ``text``."""

    commandName = b"OpenPipe"
    arguments = [(b"text", amp.String())]
    response = [(b"fd", amp.Descriptor())]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


COMMANDS: dict[str, type[amp.Command]] = {
    cls.commandName.decode("ascii"): cls
    for cls in (
        Sum,
        Divide,
        Fatal,
        Boom,
        Notify,
        EchoAll,
        Big,
        Slow,
        CallBack,
        Quit,
        Hello,
        EchoTypes,
        BigEcho,
        WriteTo,
        OpenPipe,
    )
}

ARGUMENT_TYPES: dict[str, Callable[[], amp.Argument]] = {
    "Integer": amp.Integer,
    "String": amp.String,
    "Unicode": amp.Unicode,
    "Float": amp.Float,
    "Boolean": amp.Boolean,
    "Decimal": amp.Decimal,
    "DateTime": amp.DateTime,
    "Path": amp.Path,
    "BigBytes": BigBytesArgument,
    "BigString": BigStringArgument,
}


def argument_type(spec: Any) -> amp.Argument:
    """Build the Twisted argument a type spec names (see the module docstring)."""
    if isinstance(spec, str):
        if spec not in ARGUMENT_TYPES:
            raise PeerRequestError(f"unknown argument type {spec!r}")
        return ARGUMENT_TYPES[spec]()
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, inner),) = spec.items()
        if kind == "ListOf":
            return amp.ListOf(argument_type(inner))
        if kind == "AmpList":
            fields = []
            for name, field_spec, optional in inner:
                field = argument_type(field_spec)
                field.optional = bool(optional)
                fields.append((str(name).encode("utf-8"), field))
            return amp.AmpList(fields)
    raise PeerRequestError(f"bad argument type {spec!r}")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class PeerRequestError(Exception):
    """A malformed request from the controlling process."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def describe_exception(
    exc: BaseException, command: type[amp.Command] | None = None
) -> dict[str, Any]:
    """Build the ``error`` object of a failed reply."""
    code: str | None = None
    if isinstance(exc, amp.RemoteAmpError):
        code = _text(exc.errorCode)
        description = _text(exc.description)
    elif (
        isinstance(exc, amp.UnhandledCommand)
        and len(exc.args) == 2
        and isinstance(exc.args[0], bytes)
    ):
        # Twisted builds UnhandledCommand(errorCode, description).
        code = _text(exc.args[0])
        description = _text(exc.args[1])
    else:
        if command is not None:
            # callRemote turns a mapped error code back into the exception
            # class; report the code it came from too.
            mapped = {**command.errors, **command.fatalErrors}.get(type(exc))
            if mapped is not None:
                code = _text(mapped)
        if len(exc.args) == 1 and isinstance(exc.args[0], (str, bytes)):
            description = _text(exc.args[0])
        else:
            description = str(exc) or repr(exc)
    return {"type": type(exc).__name__, "code": code, "description": description}


# ---------------------------------------------------------------------------
# The AMP protocol
# ---------------------------------------------------------------------------


class SwitchToRaw(amp.ProtocolSwitchCommand):
    """Switch the connection to a raw byte stream (``RawEcho``)."""

    commandName = b"Switch"
    arguments = [(b"name", amp.Unicode())]


class RawEcho(Protocol):
    """A raw byte-stream protocol: greets, records what it gets, and may echo it upper-cased."""

    def __init__(self, greeting: bytes = b"", echo: bool = False) -> None:
        self.greeting = greeting
        self.echo = echo
        self.received = bytearray()
        self.made = False
        self.lost = False

    def connectionMade(self) -> None:
        self.made = True
        if self.greeting:
            assert self.transport is not None
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data.upper())

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class RawFactory(ClientFactory):
    """Builds the RawEcho a Twisted caller of SwitchToRaw switches to."""

    def __init__(self, controller: Controller, conn_id: int) -> None:
        self.controller = controller
        self.conn_id = conn_id

    def buildProtocol(self, addr: Any) -> RawEcho:
        raw = RawEcho()
        self.controller.raws[self.conn_id] = raw
        return raw


class PeerAMP(amp.AMP):
    """AMP with the test responders; reports its life cycle to the controller."""

    def __init__(self, controller: Controller, inbound: bool) -> None:
        super().__init__()
        self.controller = controller
        self.inbound = inbound
        self.conn_id = controller.new_conn_id()

    def connectionMade(self) -> None:
        super().connectionMade()
        self.controller.register(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.controller.lost(self, reason)

    def _record(self, command: type[amp.Command], **kwargs: Any) -> None:
        args = {
            wire.decode("ascii"): encode_value(kwargs.get(python_name(wire)))
            for wire, _ in command.arguments
        }
        self.controller.record(
            self.conn_id, {"command": command.commandName.decode(), "args": args}
        )

    @amp.StartTLS.responder
    def start_tls(self) -> dict[str, Any]:
        """Answer StartTLS with the identity set by ``tls_identity`` (Twisted's default without)."""
        identity = self.controller.tls_identity
        return {} if identity is None else {"tls_localCertificate": identity}

    @SwitchToRaw.responder
    def switch(self, name: str) -> RawEcho:
        raw = RawEcho(greeting=b"hi " + name.encode("utf-8"), echo=True)
        self.controller.raws[self.conn_id] = raw
        return raw

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        self._record(Sum, a=a, b=b)
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, Any]:
        self._record(Divide, numerator=numerator, denominator=denominator)
        return {"result": float(numerator) / denominator}

    @Fatal.responder
    def fatal(self) -> dict[str, Any]:
        self._record(Fatal)
        raise KeyError("kk")

    @Boom.responder
    def boom(self) -> dict[str, Any]:
        self._record(Boom)
        raise RuntimeError("secret internal detail")

    @Notify.responder
    def notify(self, message: str) -> dict[str, Any]:
        self._record(Notify, message=message)
        return {}

    def locateResponder(self, name: bytes) -> Any:
        if name == EchoAll.commandName:
            return self._respond_echo_all
        return super().locateResponder(name)

    def _respond_echo_all(self, box: amp.AmpBox) -> Deferred[amp.AmpBox]:
        # EchoAll cannot use @EchoAll.responder: Twisted invokes responders as
        # maybeDeferred(responder, **arguments), and maybeDeferred's own first
        # parameter is called ``f``, so an AMP argument named "f" makes Twisted
        # fail with "got multiple values for argument 'f'" (answered as an
        # UNKNOWN error plus a dropped connection).  Do the same job with the
        # command's public parseArguments/makeResponse instead.
        def respond() -> amp.AmpBox:
            kwargs = EchoAll.parseArguments(box, self)
            return EchoAll.makeResponse(self.echo_all(**kwargs), self)

        return maybeDeferred(respond)

    def echo_all(
        self, *, i: int, s: str, b: bytes, f: float, flag: bool, opt: str | None
    ) -> dict[str, Any]:
        self._record(EchoAll, i=i, s=s, b=b, f=f, flag=flag, opt=opt)
        return {"i": i, "s": s, "b": b, "f": f, "flag": flag, "opt": opt}

    @Big.responder
    def big(self, size: int) -> dict[str, Any]:
        self._record(Big, size=size)
        return {"data": b"x" * size}

    @Slow.responder
    def slow(self, delay: float, value: int) -> Deferred[dict[str, Any]]:
        self._record(Slow, delay=delay, value=value)
        return deferLater(reactor, delay, lambda: {"value": value})

    @CallBack.responder
    def call_back(self, a: int, b: int) -> Deferred[dict[str, Any]]:
        self._record(CallBack, a=a, b=b)
        d: Deferred[dict[str, Any]] = self.callRemote(Sum, a=a, b=b)
        d.addCallback(lambda answer: {"total": answer["total"] + 1000})
        return d

    @Quit.responder
    def quit(self) -> dict[str, Any]:
        self._record(Quit)
        return {"bye": "bye"}

    @Hello.responder
    def hello(self, hello_name: str) -> dict[str, Any]:
        self._record(Hello, hello_name=hello_name)
        return {"greeting": "hello " + hello_name}

    @EchoTypes.responder
    def echo_types(self, **kwargs: Any) -> dict[str, Any]:
        self._record(EchoTypes, **kwargs)
        return dict(kwargs)

    @BigEcho.responder
    def big_echo(self, data: bytes, text: str) -> dict[str, Any]:
        self._record(BigEcho, data=data, text=text)
        return {"data": data, "text": text}

    @WriteTo.responder
    def write_to(self, fd: int, text: bytes) -> dict[str, Any]:
        try:
            return {"written": os.write(fd, text)}
        finally:
            os.close(fd)

    @OpenPipe.responder
    def open_pipe(self, text: bytes) -> dict[str, Any]:
        read_end, write_end = os.pipe()
        os.write(write_end, text)
        os.close(write_end)
        # Twisted sends the descriptor later, when it writes: close ours after that.
        reactor.callLater(1, os.close, read_end)
        return {"fd": read_end}


class ServerFactory(Factory):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def buildProtocol(self, addr: Any) -> PeerAMP:
        return PeerAMP(self.controller, inbound=True)


# ---------------------------------------------------------------------------
# Controller: the stdin/stdout side
# ---------------------------------------------------------------------------


class Controller(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 30

    def __init__(self) -> None:
        self._next_conn = 0
        self.conns: dict[int, PeerAMP] = {}
        self.received: dict[int, list[dict[str, Any]]] = {}
        self.ports: list[IListeningPort] = []
        self.stopping = False
        # StartTLS and protocol switching.
        self.tls_identity: Any = None
        self.raws: dict[int, RawEcho] = {}

    # -- output ------------------------------------------------------------

    def emit(self, message: dict[str, Any]) -> None:
        if self.transport is None or self.stopping:
            return
        line = json.dumps(message, allow_nan=False, separators=(",", ":"))
        self.sendLine(line.encode("utf-8"))

    def connectionMade(self) -> None:
        self.emit({"event": "ready"})

    def connectionLost(self, reason: object = None) -> None:
        self.stopping = True
        if reactor.running:
            reactor.stop()

    # -- connection bookkeeping ------------------------------------------------

    def new_conn_id(self) -> int:
        self._next_conn += 1
        return self._next_conn

    def register(self, proto: PeerAMP) -> None:
        self.conns[proto.conn_id] = proto
        self.received.setdefault(proto.conn_id, [])
        if proto.inbound:
            self.emit({"event": "accepted", "conn": proto.conn_id})

    def lost(self, proto: PeerAMP, reason: Failure) -> None:
        self.emit(
            {
                "event": "lost",
                "conn": proto.conn_id,
                "reason": str(reason.value),
                "reason_type": type(reason.value).__name__,
            }
        )

    def record(self, conn_id: int, entry: dict[str, Any]) -> None:
        self.received.setdefault(conn_id, []).append(entry)

    def conn(self, request: dict[str, Any]) -> PeerAMP:
        try:
            return self.conns[int(request["conn"])]
        except KeyError:
            raise PeerRequestError(f"unknown conn {request.get('conn')!r}") from None

    # -- requests ------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            request = json.loads(line)
            request_id = request["id"]
            op = request["op"]
        except Exception as exc:
            self.emit(
                {
                    "event": "bad_request",
                    "line": line.decode("utf-8", "replace"),
                    "error": repr(exc),
                }
            )
            return
        handler = getattr(self, "op_" + str(op), None)
        command: list[type[amp.Command] | None] = [None]

        def run() -> Any:
            if handler is None:
                raise PeerRequestError(f"unknown op {op!r}")
            if op == "call":
                command[0] = COMMANDS.get(str(request.get("command")))
            return handler(request)

        def ok(result: Any) -> None:
            self.emit({"id": request_id, "ok": True, "result": result})

        def failed(failure: Failure) -> None:
            error = describe_exception(failure.value, command[0])
            self.emit({"id": request_id, "ok": False, "error": error})

        d = maybeDeferred(run)
        d.addCallback(ok)
        d.addErrback(failed)
        d.addErrback(lambda f: self.emit({"event": "internal_error", "error": str(f)}))

    def op_listen(self, request: dict[str, Any]) -> Deferred[Any]:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface=HOST)
        d: Deferred[Any] = endpoint.listen(ServerFactory(self))

        def listening(port: IListeningPort) -> dict[str, Any]:
            self.ports.append(port)
            return {"port": port.getHost().port}  # type: ignore[attr-defined]

        return d.addCallback(listening)

    def op_connect(self, request: dict[str, Any]) -> Deferred[Any]:
        endpoint = TCP4ClientEndpoint(reactor, HOST, int(request["port"]))
        d: Deferred[Any] = connectProtocol(endpoint, PeerAMP(self, inbound=False))
        return d.addCallback(lambda proto: {"conn": proto.conn_id})

    def op_listen_unix(self, request: dict[str, Any]) -> dict[str, Any]:
        """Listen on the UNIX socket ``path``."""
        self.ports.append(reactor.listenUNIX(str(request["path"]), ServerFactory(self)))
        return {"path": str(request["path"])}

    def op_connect_unix(self, request: dict[str, Any]) -> Deferred[Any]:
        """Connect to the UNIX socket ``path``; reply with the connection id."""
        endpoint = UNIXClientEndpoint(reactor, str(request["path"]))
        d: Deferred[Any] = connectProtocol(endpoint, PeerAMP(self, inbound=False))
        return d.addCallback(lambda proto: {"conn": proto.conn_id})

    def op_fd_calls(self, request: dict[str, Any]) -> Deferred[Any]:
        """Over UNIX connection ``conn``, call WriteTo then OpenPipe with ``text``.

        WriteTo gets the write end of a new pipe; OpenPipe's answer is a descriptor.
        The reply has what WriteTo answered and the bytes read from each pipe.
        """
        proto = self.conn(request)
        text = bytes.fromhex(str(request["hex"]))
        read_end, write_end = os.pipe()
        result: dict[str, Any] = {}

        def written(answer: dict[str, Any]) -> Deferred[Any]:
            os.close(write_end)  # Twisted sent it with the call's bytes
            result["written"] = answer["written"]
            result["pipe"] = _read_all(read_end).hex()
            os.close(read_end)
            return proto.callRemote(OpenPipe, text=text)

        def opened(answer: dict[str, Any]) -> dict[str, Any]:
            fd = answer["fd"]
            result["opened"] = _read_all(fd).hex()
            os.close(fd)
            return result

        d = proto.callRemote(WriteTo, fd=write_end, text=text)
        assert d is not None
        return d.addCallback(written).addCallback(opened)

    # TLS: twisted.internet.ssl needs pyOpenSSL (Twisted's "tls" extra), so it is
    # imported only by the TLS operations; the other operations run without it.

    def op_listen_tls(self, request: dict[str, Any]) -> Deferred[Any]:
        """Like ``listen``, over TLS.

        ``cert`` and ``key`` are PEM file paths of the server's certificate and
        key; with ``ca`` (a PEM file path), clients must present a certificate
        that this CA signed.
        """
        from twisted.internet.endpoints import SSL4ServerEndpoint
        from twisted.internet.ssl import Certificate

        identity = _tls_identity(request["cert"], request["key"])
        ca = request.get("ca")
        authorities = [Certificate.loadPEM(FilePath(str(ca)).getContent())] if ca else []
        endpoint = SSL4ServerEndpoint(reactor, 0, identity.options(*authorities), interface=HOST)
        d: Deferred[Any] = endpoint.listen(ServerFactory(self))

        def listening(port: IListeningPort) -> dict[str, Any]:
            self.ports.append(port)
            return {"port": port.getHost().port}  # type: ignore[attr-defined]

        return d.addCallback(listening)

    def op_connect_tls(self, request: dict[str, Any]) -> Deferred[Any]:
        """Like ``connect``, over TLS (``optionsForClientTLS``).

        ``ca`` is the PEM file path of the CA to trust, ``hostname`` the name
        (or IP address) the server certificate must match; ``cert`` and ``key``
        (PEM file paths, optional) are a client certificate to present. The
        reply comes once TCP is connected: a failed handshake shows up as a
        ``lost`` event.
        """
        from twisted.internet.endpoints import SSL4ClientEndpoint
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        cert = request.get("cert")
        options = optionsForClientTLS(
            str(request["hostname"]),
            trustRoot=Certificate.loadPEM(FilePath(str(request["ca"])).getContent()),
            clientCertificate=_tls_identity(cert, request["key"]) if cert else None,
        )
        endpoint = SSL4ClientEndpoint(reactor, HOST, int(request["port"]), options)
        d: Deferred[Any] = connectProtocol(endpoint, PeerAMP(self, inbound=False))
        return d.addCallback(lambda proto: {"conn": proto.conn_id})

    def op_call(self, request: dict[str, Any]) -> Any:
        proto = self.conn(request)
        name = str(request["command"])
        command = COMMANDS.get(name)
        if command is None:
            raise PeerRequestError(f"unknown command {name!r}")
        args = decode_value(request.get("args") or {})
        kwargs = {k.replace("-", "_"): v for k, v in args.items()}
        d = proto.callRemote(command, **kwargs)
        if d is None:
            return None
        return d.addCallback(encode_value)

    def op_call_raw(self, request: dict[str, Any]) -> Any:
        proto = self.conn(request)
        box = decode_box(request.get("box") or {"$box": {}})
        requires_answer = bool(request.get("requires_answer", True))
        name = str(request["command"]).encode("utf-8")
        if all(k.isascii() for k in box):
            # callRemoteString takes the box as keyword arguments, which AmpBox
            # encodes back to bytes as ASCII.
            kwargs = {k.decode("ascii"): v for k, v in box.items()}
            d = proto.callRemoteString(name, requires_answer, **kwargs)
        else:
            # Keys that are not ASCII cannot be keyword arguments of
            # callRemoteString; hand the box to the method it delegates to.
            d = proto._sendBoxCommand(name, amp.AmpBox(box), requires_answer)
        if d is None:
            return None
        return d.addCallback(lambda answer: encode_box(dict(answer)))

    def op_send_raw(self, request: dict[str, Any]) -> None:
        proto = self.conn(request)
        assert proto.transport is not None
        proto.transport.write(bytes.fromhex(str(request["hex"])))

    def op_close(self, request: dict[str, Any]) -> None:
        proto = self.conn(request)
        assert proto.transport is not None
        proto.transport.loseConnection()

    def op_serialize(self, request: dict[str, Any]) -> dict[str, Any]:
        box = amp.AmpBox(decode_box(request["box"]))
        return {"hex": box.serialize().hex()}

    def op_received(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        conn_id = int(request["conn"])
        if conn_id not in self.received:
            raise PeerRequestError(f"unknown conn {conn_id!r}")
        return list(self.received[conn_id])

    def _argument_type(self, request: dict[str, Any]) -> amp.Argument:
        return argument_type(request["type"])

    def op_encode(self, request: dict[str, Any]) -> dict[str, Any]:
        argument = self._argument_type(request)
        value = decode_value(request["value"])
        encoded: bytes = argument.toStringProto(value, None)
        return {"hex": encoded.hex()}

    def op_decode(self, request: dict[str, Any]) -> Any:
        argument = self._argument_type(request)
        raw = bytes.fromhex(str(request["hex"]))
        return encode_value(argument.fromStringProto(raw, None))

    def op_to_box(self, request: dict[str, Any]) -> dict[str, Any]:
        """What ``toBox`` writes for one value under ``name`` (a multi-key type may write several keys)."""
        argument = self._argument_type(request)
        name = str(request["name"]).encode("utf-8")
        strings = amp.AmpBox()
        objects = {python_name(name): decode_value(request["value"])}
        argument.toBox(name, strings, objects, None)
        return encode_box(dict(strings))

    def op_from_box(self, request: dict[str, Any]) -> Any:
        """The value ``fromBox`` reads under ``name`` from a raw box."""
        argument = self._argument_type(request)
        name = str(request["name"]).encode("utf-8")
        objects: dict[str, Any] = {}
        argument.fromBox(name, decode_box(request["box"]), objects, None)
        return encode_value(objects[python_name(name)])

    def op_encode_box(self, request: dict[str, Any]) -> dict[str, Any]:
        """The bytes Twisted writes for a call (``kind`` "ask") or an answer ("answer").

        ``args`` are the command's arguments (or response values) and ``tag`` the
        ``_ask`` (or ``_answer``) value; no connection is needed.
        """
        command = COMMANDS[str(request["command"])]
        args = decode_value(request.get("args") or {})
        objects = {k.replace("-", "_"): v for k, v in args.items()}
        tag = str(request.get("tag", "1")).encode("ascii")
        if request.get("kind", "ask") == "ask":
            box = command.makeArguments(objects, None)
            box[amp.COMMAND] = command.commandName
            box[amp.ASK] = tag
        else:
            box = command.makeResponse(objects, None)
            box[amp.ANSWER] = tag
        return {"hex": box.serialize().hex()}

    def op_tls_identity(self, request: dict[str, Any]) -> None:
        """Answer StartTLS with the certificate ``cert`` and key ``key`` (PEM file paths)."""
        self.tls_identity = _tls_identity(request["cert"], request["key"])

    def op_start_tls(self, request: dict[str, Any]) -> Deferred[Any]:
        """Call StartTLS on ``conn``, trusting the CA ``ca`` (a PEM file path).

        Replies once the TLS handshake is done (the peer's certificate verified),
        with the subject of the peer's certificate.
        """
        from twisted.internet.ssl import Certificate

        proto = self.conn(request)
        ca = Certificate.loadPEM(FilePath(str(request["ca"])).getContent())
        d = proto.callRemote(amp.StartTLS, tls_verifyAuthorities=[ca])
        assert d is not None

        def handshake(_: object) -> Deferred[Any]:
            # A call made now is held until the handshake is done, and goes over TLS.
            return proto.callRemote(Sum, a=0, b=0)  # type: ignore[return-value]

        def peer_certificate(_: object) -> dict[str, Any]:
            assert proto.transport is not None
            cert = Certificate.peerFromTransport(proto.transport)
            return {"subject": str(cert.getSubject())}

        return d.addCallback(handshake).addCallback(peer_certificate)

    def op_switch(self, request: dict[str, Any]) -> Deferred[Any]:
        """Call SwitchToRaw with ``name`` on ``conn``; the connection then carries RawEcho."""
        proto = self.conn(request)
        conn_id = proto.conn_id
        d = proto.callRemote(SwitchToRaw, RawFactory(self, conn_id), name=str(request["name"]))
        assert d is not None
        return d.addCallback(lambda _: {})

    def op_raw_send(self, request: dict[str, Any]) -> None:
        """Write ``hex`` on the switched connection ``conn``."""
        raw = self._raw(request)
        assert raw.transport is not None
        raw.transport.write(bytes.fromhex(str(request["hex"])))

    def op_raw_received(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the switched connection ``conn`` received, and whether it is made and lost."""
        raw = self._raw(request)
        return {"hex": bytes(raw.received).hex(), "made": raw.made, "lost": raw.lost}

    def op_raw_close(self, request: dict[str, Any]) -> None:
        """Close the switched connection ``conn``."""
        raw = self._raw(request)
        assert raw.transport is not None
        raw.transport.loseConnection()

    def _raw(self, request: dict[str, Any]) -> RawEcho:
        try:
            return self.raws[int(request["conn"])]
        except KeyError:
            raise PeerRequestError(f"conn {request.get('conn')!r} did not switch") from None

    def op_quit(self, request: dict[str, Any]) -> None:
        # Reply first; closing stdio flushes pending output and then
        # connectionLost stops the reactor.
        reactor.callLater(0, self._shutdown)

    def _shutdown(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def _tls_identity(cert: Any, key: Any) -> Any:
    """A Twisted ``PrivateCertificate`` from PEM file paths of a certificate and its key."""
    from twisted.internet.ssl import PrivateCertificate

    pem = FilePath(str(cert)).getContent() + b"\n" + FilePath(str(key)).getContent()
    return PrivateCertificate.loadPEM(pem)


def main() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    StandardIO(Controller())
    reactor.run()


if __name__ == "__main__":
    main()
