"""The Twisted peer's commands, defined with asyncio_amp, and a protocol that records its bytes.

Each command mirrors the one of the same name in ``twisted_peer.py``: same command
name, same wire names, same types. Twisted's ``String`` carries bytes and is our
:class:`Bytes`; Twisted's ``Unicode`` carries text and is our :class:`String`.

:class:`Nope` is the odd one out: the peer has no such command. :data:`ECHO_CASES`
are EchoAll arguments that cover every type.

:class:`RecordingProtocol` is an :class:`AMPProtocol` that keeps a copy of every
byte it writes and reads on its real socket, so tests can compare them with what
Twisted would write.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from asyncio_amp import (
    AmpList,
    AMPProtocol,
    Argument,
    BigBytes,
    BigString,
    Boolean,
    Box,
    BoxDecoder,
    Bytes,
    Command,
    DateTime,
    Decimal,
    Float,
    Integer,
    ListOf,
    Path,
    String,
)

__all__ = [
    "ECHO_CASES",
    "Big",
    "BigEcho",
    "Boom",
    "CallBack",
    "Divide",
    "EchoAll",
    "EchoTypes",
    "Fatal",
    "Hello",
    "Nope",
    "Notify",
    "Quit",
    "RecordingProtocol",
    "Slow",
    "Sum",
]


class Sum(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Divide(Command):
    arguments = [("numerator", Integer()), ("denominator", Integer())]
    response = [("result", Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Fatal(Command):
    arguments = []
    response = []
    fatal_errors = {KeyError: "FATAL_KEY"}


class Boom(Command):
    arguments = []
    response = []


class Notify(Command):
    arguments = [("message", String())]
    response = []
    requires_answer = False


class EchoAll(Command):
    arguments = [
        ("i", Integer()),
        ("s", String()),
        ("b", Bytes()),
        ("f", Float()),
        ("flag", Boolean()),
        ("opt", String(optional=True)),
    ]
    response = [
        ("i", Integer()),
        ("s", String()),
        ("b", Bytes()),
        ("f", Float()),
        ("flag", Boolean()),
        ("opt", String(optional=True)),
    ]


class Big(Command):
    arguments = [("size", Integer())]
    response = [("data", Bytes())]


class Slow(Command):
    arguments = [("delay", Float()), ("value", Integer())]
    response = [("value", Integer())]


class CallBack(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Quit(Command):
    """Twisted's side has ``responseType = QuitBox``; ours closes the same way."""

    response = [("bye", String())]
    close_after_answer = True


class Hello(Command):
    arguments = [("hello-name", String())]
    response = [("greeting", String())]


#: EchoAll arguments covering every type: specials, non-ASCII text, every byte value,
#: the optional argument absent, empty and present.
ECHO_CASES: list[dict[str, Any]] = [
    {"i": 7, "s": "plain", "b": b"bytes", "f": 1.5, "flag": True},
    {"i": -(2**80), "s": "ünïcødé ✓ 漢字 🐍", "b": bytes(range(256)), "f": math.inf, "flag": False},
    {"i": 0, "s": "", "b": b"", "f": -math.inf, "flag": True, "opt": "present"},
    {"i": 2**63, "s": "a\x00b\nc", "b": b"\x00\x00\xff\xfe", "f": -0.0, "flag": False, "opt": ""},
    {"i": 1, "s": "x" * 1000, "b": b"\x00" * 1000, "f": 1e300, "flag": True, "opt": "é"},
    {"i": -1, "s": "\U0010ffff", "b": b"\x80", "f": 5e-324, "flag": False},
    {"i": 3, "s": "tiny", "b": b"z", "f": 0.1, "flag": True},
]


def _echo_types_schema() -> list[tuple[str, Argument[Any]]]:
    return [
        ("dec", Decimal()),
        ("when", DateTime()),
        ("path", Path()),
        ("ints", ListOf(Integer())),
        ("texts", ListOf(String())),
        ("decs", ListOf(Decimal())),
        ("times", ListOf(DateTime())),
        ("rows", AmpList([("a", Integer()), ("b", String(optional=True))])),
        ("maybe", Decimal(optional=True)),
    ]


class EchoTypes(Command):
    """The newer argument types; Twisted's side has amp.Path (FilePath) for ``path``."""

    arguments = _echo_types_schema()
    response = _echo_types_schema()


class BigEcho(Command):
    """BigBytes and BigString; the peer implements the BigString convention by hand."""

    arguments = [("data", BigBytes()), ("text", BigString())]
    response = [("data", BigBytes()), ("text", BigString())]


class Nope(Command):
    """A command the Twisted peer does not have."""

    arguments = [("x", Integer(optional=True))]
    response = []


# A recording protocol


class _TapTransport(asyncio.Transport):
    """Wraps the real transport and copies every byte written through it."""

    def __init__(self, inner: Any, sink: bytearray) -> None:
        super().__init__()
        self._inner = inner
        self._sink = sink

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._sink += data
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


class RecordingProtocol(AMPProtocol):
    """An AMPProtocol that keeps every byte it sends (``sent``) and receives (``received``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.received = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance check.
        super().connection_made(_TapTransport(transport, self.sent))

    def data_received(self, data: bytes) -> None:
        self.received += data
        super().data_received(data)

    def sent_boxes(self) -> list[Box]:
        """The complete boxes written so far."""
        return _complete_boxes(self.sent)

    def received_boxes(self) -> list[Box]:
        """The complete boxes read so far."""
        return _complete_boxes(self.received)

    def sent_tags(self) -> list[bytes]:
        """The ``_ask`` tags of the calls written so far, in order."""
        return [box[b"_ask"] for box in self.sent_boxes() if b"_ask" in box]

    async def wait_received(self, predicate: Callable[[Box], bool]) -> Box:
        """Wait until a received box satisfies ``predicate`` and return it (bound it!)."""
        while True:
            for box in self.received_boxes():
                if predicate(box):
                    return box
            await asyncio.sleep(0.005)


def _complete_boxes(data: bytearray) -> list[Box]:
    return BoxDecoder(max_box_size=len(data) + 1).receive_data(bytes(data))
