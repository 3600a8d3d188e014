"""
Argument types: how a Python value becomes the bytes of an AMP value, and back.

Every type is a subclass of [`Argument`][]. A custom type only needs
[`Argument.to_bytes`][] and [`Argument.from_bytes`][]; types that spread one
value over several keys (BigString) override [`Argument.to_box`][] and
[`Argument.from_box`][] instead.
"""

from __future__ import annotations

import contextvars
import datetime as _datetime
import decimal as _decimal
import keyword
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ._errors import TooLongError
from ._wire import (
    BOX_END,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    encode_items,
    length_prefix,
    parse_nested_boxes,
)

__all__ = [
    "AmpList",
    "Argument",
    "BigBytes",
    "BigString",
    "Boolean",
    "Bytes",
    "DateTime",
    "Decimal",
    "Descriptor",
    "Float",
    "Integer",
    "ListOf",
    "Path",
    "String",
    "Unicode",
]

T = TypeVar("T")


def python_name(wire: bytes) -> str:
    """
    Return the keyword under which a wire name reaches Python code.

    Dashes become underscores (``b"hello-name"`` → ``hello_name``) and Python
    keywords get a trailing underscore (``b"from"`` → ``from_``), as PEP 8 suggests.
    """
    name = wire.decode("utf-8", "backslashreplace").replace("-", "_")
    if keyword.iskeyword(name):
        name += "_"
    return name


def wire_name(name: object, what: str, owner: str) -> bytes:
    """Encode an argument or command name for the wire, checking it."""
    if isinstance(name, str):
        try:
            wire = name.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(f"{owner}: {what} name {name!r} cannot be encoded as UTF-8") from None
    elif isinstance(name, bytes):
        wire = name
    else:
        raise TypeError(f"{owner}: {what} names are str or bytes, not {type(name).__name__}")
    if not wire:
        raise TypeError(f"{owner}: {what} names cannot be empty")
    if len(wire) > MAX_KEY_LENGTH:
        raise TypeError(f"{owner}: {what} name {wire!r} is over {MAX_KEY_LENGTH} bytes")
    return wire


class Argument(Generic[T]):
    """
    Base class of argument types.

    Subclass it to add a type: implement [`to_bytes`][] and [`from_bytes`][].
    Raise ``TypeError`` or ``ValueError`` for a value that does not fit;
    the error is reported with the command and argument name added.

    Args:
        optional: If true, the value may be ``None`` or left out: ``None`` is not
            sent, and a missing key decodes to ``None``.
    """

    __slots__ = ("optional",)

    multi_key: bool = False
    """``True`` for types that write more than one key per value (see [`to_box`][])."""
    uses_descriptors: bool = False
    """``True`` for types that pass file descriptors (see [`Descriptor`][])."""

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(optional=True)" if self.optional else f"{type(self).__name__}()"
        )

    def to_bytes(self, value: T) -> bytes:
        """
        Return the wire form of ``value``.

        Raises:
            TypeError: ``value`` is not of this type.
            ValueError: ``value`` cannot be represented.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement to_bytes()")

    def from_bytes(self, data: bytes) -> T:
        """
        Return the value that ``data`` encodes.

        Raises:
            ValueError: ``data`` is not a valid encoding of this type.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement from_bytes()")

    def to_box(self, key: bytes, value: T, box: dict[bytes, bytes]) -> None:
        """
        Write ``value`` into ``box`` under ``key`` (or keys derived from it).

        The default writes ``to_bytes(value)`` under ``key``. Only types that set
        [`multi_key`][] need to override it.
        """
        box[key] = self.to_bytes(value)

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> T | None:
        """
        Read the value stored under ``key`` in ``box``; ``None`` if it is absent.

        The default reads ``from_bytes(box[key])``. Only types that set
        [`multi_key`][] need to override it.
        """
        data = box.get(key)
        return None if data is None else self.from_bytes(data)


class Integer(Argument[int]):
    """An ``int``, as decimal ASCII digits (``-42`` is ``b"-42"``)."""

    __slots__ = ()

    def to_bytes(self, value: int) -> bytes:
        """Encode an int as decimal digits."""
        if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"expected an int, got {type(value).__name__}: {value!r}")
        return b"%d" % value

    def from_bytes(self, data: bytes) -> int:
        """Decode decimal digits (with optional sign) to an int."""
        return int(data)


class Float(Argument[float]):
    """
    A ``float``, as Python writes it (``b"0.1"``, ``b"1e+100"``).

    The specials travel as ``b"nan"``, ``b"inf"`` and ``b"-inf"``, as Twisted
    writes them. An ``int`` is accepted and sent as a float.
    """

    __slots__ = ()

    def to_bytes(self, value: float) -> bytes:
        """Encode a float with ``repr``."""
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a float, got {type(value).__name__}: {value!r}")
            try:
                value = float(value)
            except OverflowError:
                raise ValueError("the int is too large for a float") from None
        return repr(value).encode("ascii")

    def from_bytes(self, data: bytes) -> float:
        """Decode a float, including ``nan``, ``inf`` and ``-inf``."""
        return float(data)


class Boolean(Argument[bool]):
    """A ``bool``, as exactly ``b"True"`` or ``b"False"``."""

    __slots__ = ()

    def to_bytes(self, value: bool) -> bytes:
        """Encode truth as ``b"True"`` and falsehood as ``b"False"``, as Twisted does."""
        return b"True" if value else b"False"

    def from_bytes(self, data: bytes) -> bool:
        """Decode ``b"True"`` or ``b"False"``; anything else is an error."""
        if data == b"True":
            return True
        if data == b"False":
            return False
        raise ValueError(f"invalid boolean {data[:40]!r}: expected b'True' or b'False'")


class String(Argument[str]):
    """
    A ``str``, as UTF-8.

    This is Twisted's ``Unicode`` type; Twisted's ``String`` carries bytes and is
    [`Bytes`][] here.
    """

    __slots__ = ()

    def to_bytes(self, value: str) -> bytes:
        """Encode text as UTF-8."""
        if type(value) is not str and not isinstance(value, str):
            raise TypeError(f"expected a str, got {type(value).__name__}: {value!r:.60}")
        return value.encode("utf-8")

    def from_bytes(self, data: bytes) -> str:
        """Decode strict UTF-8."""
        return data.decode("utf-8")


Unicode = String
"""Twisted's name for [`String`][]: text sent as UTF-8."""


class Bytes(Argument[bytes]):
    """Raw ``bytes``, unchanged. This is Twisted's ``String`` type."""

    __slots__ = ()

    def to_bytes(self, value: bytes) -> bytes:
        """Send bytes as they are (bytearray and memoryview are copied to bytes)."""
        if type(value) is bytes:
            return value
        if isinstance(value, bytearray | memoryview):
            return bytes(value)
        raise TypeError(f"expected bytes, got {type(value).__name__}: {value!r:.60}")

    def from_bytes(self, data: bytes) -> bytes:
        """Return the bytes as received."""
        return data


class Decimal(Argument[_decimal.Decimal]):
    """
    A ``decimal.Decimal``, as ``str(d)``.

    Every value survives the trip: ``NaN``, ``-NaN``, ``sNaN``, ``-sNaN``,
    ``Infinity`` and ``-Infinity``, exponents (``1E+2``), ``-0`` and trailing zeros
    (``1.10`` keeps its precision).
    """

    __slots__ = ()

    def to_bytes(self, value: _decimal.Decimal) -> bytes:
        """Encode a Decimal with ``str``; other numbers are refused."""
        if not isinstance(value, _decimal.Decimal):
            raise TypeError(f"expected a decimal.Decimal, got {type(value).__name__}: {value!r}")
        return str(value).encode("ascii")

    def from_bytes(self, data: bytes) -> _decimal.Decimal:
        """Decode a Decimal (the specials in any case, as Python reads them)."""
        try:
            return _decimal.Decimal(data.decode("ascii"))
        except (UnicodeDecodeError, _decimal.InvalidOperation):
            raise ValueError(f"invalid decimal {data[:60]!r}") from None


_DATETIME_FORMAT = re.compile(
    rb"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{6})([+-])(\d{2}):(\d{2})"
)


class DateTime(Argument[_datetime.datetime]):
    """
    A timezone-aware ``datetime.datetime``, as exactly 32 ASCII characters.

    The form is ``YYYY-MM-DDTHH:MM:SS.ffffff±HH:MM``, as Twisted writes it. UTC and
    any zero offset are written ``-00:00`` (Twisted's choice); ``+00:00`` is
    accepted too. A decoded value has a fixed-offset tzinfo equal to the sent one
    (``datetime.timezone.utc`` for a zero offset).

    A naive datetime is refused, and so is an offset with seconds, which the
    format cannot carry (Twisted would drop them silently).
    """

    __slots__ = ()

    def to_bytes(self, value: _datetime.datetime) -> bytes:
        """Encode an aware datetime in the 32-character form."""
        if not isinstance(value, _datetime.datetime):
            raise TypeError(f"expected a datetime.datetime, got {type(value).__name__}: {value!r}")
        offset = value.utcoffset()
        if offset is None:
            raise ValueError(
                f"cannot send the naive datetime {value.isoformat()}: AMP needs a timezone"
            )
        seconds = int(offset.total_seconds())
        if seconds % 60 or offset.microseconds:
            raise ValueError(f"cannot send the UTC offset {offset}: AMP carries whole minutes")
        minutes = seconds // 60
        sign = "+" if minutes > 0 else "-"
        hours, minutes = divmod(abs(minutes), 60)
        return (
            f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}"
            f"{sign}{hours:02d}:{minutes:02d}"
        ).encode("ascii")

    def from_bytes(self, data: bytes) -> _datetime.datetime:
        """Decode the 32-character form; anything else is an error."""
        match = _DATETIME_FORMAT.fullmatch(data)
        if match is None:
            raise ValueError(
                f"invalid datetime {data[:60]!r}: expected 32 characters like "
                "b'2010-12-25T00:00:00.000000-00:00'"
            )
        year, month, day, hour, minute, second, micro = (int(g) for g in match.groups()[:7])
        sign, off_hours, off_minutes = match.group(8), int(match.group(9)), int(match.group(10))
        if off_minutes >= 60:
            raise ValueError(f"invalid UTC offset in {data!r}")
        delta = _datetime.timedelta(hours=off_hours, minutes=off_minutes)
        if delta >= _datetime.timedelta(hours=24):
            raise ValueError(f"invalid UTC offset in {data!r}: it must be under 24 hours")
        tz = _datetime.UTC if not delta else _datetime.timezone(-delta if sign == b"-" else delta)
        return _datetime.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)


class Path(Argument[pathlib.Path]):
    """A ``pathlib.Path`` (or any text path), as UTF-8 text; decodes to a Path."""

    __slots__ = ()

    def to_bytes(self, value: pathlib.Path) -> bytes:
        """Encode a path's text as UTF-8."""
        try:
            text = os.fspath(value)
        except TypeError:
            raise TypeError(f"expected a path, got {type(value).__name__}: {value!r}") from None
        if not isinstance(text, str):
            raise TypeError(f"expected a text path, got bytes: {text!r}")
        return text.encode("utf-8")

    def from_bytes(self, data: bytes) -> pathlib.Path:
        """Decode UTF-8 text to a Path."""
        return pathlib.Path(data.decode("utf-8"))


class ListOf(Argument[list[T]]):
    """
    A list of values of one type, in one AMP value.

    Each element is written as a 2-byte length and its bytes, with no count or
    terminator (Twisted's ``ListOf``). The whole list must fit in 65,535 bytes.
    Unlike Twisted, bytes at the end that do not make a whole element are an
    error, not silently dropped.

    Args:
        element: The type of the elements; any type that encodes to one value.
        optional: As for every type.
    """

    __slots__ = ("element",)

    def __init__(self, element: Argument[T], optional: bool = False) -> None:
        if not isinstance(element, Argument) or element.multi_key:
            raise TypeError(f"ListOf needs a single-value Argument, not {element!r}")
        super().__init__(optional)
        self.element = element

    def __repr__(self) -> str:
        extra = ", optional=True" if self.optional else ""
        return f"ListOf({self.element!r}{extra})"

    def to_bytes(self, value: list[T]) -> bytes:
        """Encode each element with its length prefix."""
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise TypeError(f"expected a list, got {type(value).__name__}: {value!r:.60}")
        parts: list[bytes] = []
        encode = self.element.to_bytes
        for index, item in enumerate(value):
            if item is None:
                raise TypeError(f"element {index} is None; ListOf elements cannot be missing")
            data = encode(item)
            if len(data) > MAX_VALUE_LENGTH:
                raise TooLongError(b"[%d]" % index, len(data), MAX_VALUE_LENGTH, is_key=False)
            parts.append(length_prefix(len(data)))
            parts.append(data)
        return b"".join(parts)

    def from_bytes(self, data: bytes) -> list[T]:
        """Split the value into elements and decode each; a partial element is an error."""
        result: list[T] = []
        decode = self.element.from_bytes
        pos = 0
        end = len(data)
        while pos < end:
            if end - pos < 2:
                raise ValueError(f"ListOf: 1 stray byte after {len(result)} elements")
            n = (data[pos] << 8) | data[pos + 1]
            stop = pos + 2 + n
            if stop > end:
                raise ValueError(
                    f"ListOf: element {len(result)} needs {n} bytes but {end - pos - 2} are left"
                )
            result.append(decode(data[pos + 2 : stop]))
            pos = stop
        return result


class AmpList(Argument[list[dict[str, Any]]]):
    """
    A list of dicts, each with its own typed keys, in one AMP value.

    Each dict is written as a whole nested box (sorted keys, then the empty key),
    as Twisted's ``AmpList`` does. Dict keys are the Python names of the fields;
    optional fields may be absent or ``None``, and a dict with every field absent
    round-trips. The whole list must fit in 65,535 bytes.

    Args:
        fields: ``(name, Argument)`` pairs, like a Command's ``arguments``.
        optional: As for every type.
    """

    __slots__ = ("_fields", "_names")

    def __init__(
        self, fields: Sequence[tuple[str | bytes, Argument[Any]]], optional: bool = False
    ) -> None:
        super().__init__(optional)
        parsed: list[tuple[bytes, str, Argument[Any]]] = []
        names: dict[str, bytes] = {}
        for item in fields:
            try:
                name, argument = item
            except (TypeError, ValueError):
                raise TypeError(f"AmpList holds (name, Argument) pairs, not {item!r}") from None
            key = wire_name(name, "field", "AmpList")
            if not isinstance(argument, Argument):
                raise TypeError(f"AmpList field {key!r} needs an Argument, not {argument!r}")
            pyname = python_name(key)
            if pyname in names:
                raise TypeError(f"AmpList fields {names[pyname]!r} and {key!r} clash")
            names[pyname] = key
            parsed.append((key, pyname, argument))
        check_chunk_keys(((key, argument) for key, _, argument in parsed), "AmpList", "field")
        self._fields = tuple(sorted(parsed))
        self._names = frozenset(names)
        if any(argument.uses_descriptors for _, _, argument in parsed):
            raise TypeError("AmpList cannot hold a Descriptor: it is encoded with to_bytes()")

    def __repr__(self) -> str:
        fields = ", ".join(f"({key!r}, {arg!r})" for key, _, arg in self._fields)
        extra = ", optional=True" if self.optional else ""
        return f"AmpList([{fields}]{extra})"

    def to_bytes(self, value: list[dict[str, Any]]) -> bytes:
        """Encode each dict as a nested box."""
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
            raise TypeError(f"expected a list of dicts, got {type(value).__name__}")
        parts: list[bytes] = []
        for index, element in enumerate(value):
            if not isinstance(element, Mapping):
                raise TypeError(f"element {index} is a {type(element).__name__}, not a dict")
            unknown = set(element) - self._names
            if unknown:
                raise TypeError(f"element {index}: {sorted(unknown)!r} are not fields")
            box: dict[bytes, bytes] = {}
            for key, pyname, argument in self._fields:
                item = element.get(pyname)
                if item is None:
                    if argument.optional:
                        continue
                    raise TypeError(f"element {index}: field {pyname!r} is missing")
                argument.to_box(key, item, box)
            encode_items(sorted(box.items()), parts)
            parts.append(BOX_END)
        return b"".join(parts)

    def from_bytes(self, data: bytes) -> list[dict[str, Any]]:
        """Parse the nested boxes and decode each field."""
        result: list[dict[str, Any]] = []
        for index, box in enumerate(parse_nested_boxes(data)):
            element: dict[str, Any] = {}
            for key, pyname, argument in self._fields:
                item = argument.from_box(key, box)
                if item is None and not argument.optional:
                    raise ValueError(f"AmpList element {index}: field {pyname!r} is missing")
                element[pyname] = item
            result.append(element)
        return result


def _chunk_keys(key: bytes, count: int) -> list[bytes]:
    return [key] + [key + b".%d" % i for i in range(2, count + 1)]


def check_chunk_keys(fields: Iterable[tuple[bytes, Argument[Any]]], where: str, what: str) -> None:
    """
    Refuse a key of one box that a big value of the same box may write a chunk under.

    A [`BigBytes`][] or [`BigString`][] under ``key`` writes its later chunks under
    ``key.2``, ``key.3``, …; another field under one of those keys would mix with
    it on the wire and when decoded.

    Raises:
        TypeError: Naming both fields, with ``where`` (who owns the box) and
            ``what`` (``"argument"``, ``"field"``, …) in the message.
    """
    fields = list(fields)
    chunked = {key: argument for key, argument in fields if isinstance(argument, _Chunked)}
    if not chunked:
        return
    for key, _ in fields:
        base, dot, number = key.rpartition(b".")
        big = chunked.get(base) if dot else None
        # Chunk numbers are written b".%d" from 2: no sign, no leading zero.
        if big is not None and number.isdigit() and number[:1] != b"0" and int(number) >= 2:
            raise TypeError(
                f"{where}: the {what} {key!r} could be a chunk key of the "
                f"{type(big).__name__} {what} {base!r}, whose values over "
                f"{MAX_VALUE_LENGTH:,} bytes go under {base!r}, {base + b'.2'!r}, …; "
                "rename one of them"
            )


class _Chunked(Argument[T]):
    """A value of any size, split over ``name``, ``name.2``, … (see [`BigBytes`][])."""

    __slots__ = ()
    multi_key = True

    def _data(self, value: T) -> bytes | bytearray | memoryview:
        """Return the bytes of ``value``; a mutable buffer is copied by ``to_box``."""
        raise NotImplementedError

    def _value(self, data: bytes) -> T:
        raise NotImplementedError

    def to_bytes(self, value: T) -> bytes:
        """Refused: a big value spans several keys, so it cannot be one value."""
        raise TypeError(f"{type(self).__name__} spans several keys; it cannot be a ListOf element")

    def from_bytes(self, data: bytes) -> T:
        """Decode a value that fits in one key."""
        return self._value(data)

    def to_box(self, key: bytes, value: T, box: dict[bytes, bytes]) -> None:
        """
        Write the value in chunks under ``key``, ``key.2``, …

        The value is captured here: ``bytes`` are shared, and any other buffer
        (``bytearray``, ``memoryview``) is copied, so changing it after the call
        changes nothing that is sent.
        """
        data = self._data(value)
        if type(data) is not bytes:
            # A call may wait in a queue before it is written, so a mutable buffer
            # (bytearray, memoryview, ...) is captured now, as it is at the call;
            # the chunks below are views of this copy and hold no export of the
            # caller's buffer. Immutable bytes are shared, not copied.
            data = bytes(data)
        size = len(data)
        if size <= MAX_VALUE_LENGTH:
            box[key] = data
            return
        view = memoryview(data)
        count = -(-size // MAX_VALUE_LENGTH)
        for i, chunk_key in enumerate(_chunk_keys(key, count)):
            if len(chunk_key) > MAX_KEY_LENGTH:
                raise TooLongError(chunk_key, len(chunk_key), MAX_KEY_LENGTH, is_key=True)
            start = i * MAX_VALUE_LENGTH
            # A view of the value, not a copy: the box is joined once, when it is sent.
            box[chunk_key] = view[start : start + MAX_VALUE_LENGTH]  # type: ignore[assignment]

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> T | None:
        """Join ``key``, ``key.2``, … up to the first missing one."""
        first = box.get(key)
        if first is None:
            return None
        chunks = [first]
        index = 2
        while (chunk := box.get(key + b".%d" % index)) is not None:
            chunks.append(chunk)
            index += 1
        return self._value(first if len(chunks) == 1 else b"".join(chunks))


class BigBytes(_Chunked[bytes]):
    """
    ``bytes`` of any size, split over several keys.

    A value over 65,535 bytes goes in chunks of at most 65,535 bytes under
    ``name``, ``name.2``, ``name.3``, … (the BigString convention of
    amp-protocol.net and clj-amp); an empty value is one empty ``name`` key.
    A peer that does not know the convention sees ordinary keys.

    A ``bytearray`` or ``memoryview`` is copied when the call (or the answer)
    is encoded, so what is sent is the value at that moment, and the buffer may
    change or grow afterwards; ``bytes`` are sent without a copy.
    """

    __slots__ = ()

    def _data(self, value: bytes) -> bytes | bytearray | memoryview:
        if isinstance(value, bytes | bytearray | memoryview):
            return value
        raise TypeError(f"expected bytes, got {type(value).__name__}: {value!r:.60}")

    def _value(self, data: bytes) -> bytes:
        return data


class BigString(_Chunked[str]):
    """
    A ``str`` of any size, as UTF-8 split over several keys (see [`BigBytes`][]).

    The text is split as bytes, so a character may straddle two chunks; it is
    whole again once decoded.
    """

    __slots__ = ()

    def _data(self, value: str) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8")
        raise TypeError(f"expected a str, got {type(value).__name__}: {value!r:.60}")

    def _value(self, data: bytes) -> str:
        return data.decode("utf-8")


# The most descriptors received that no decoded box has claimed yet. They come
# with the bytes of the boxes that name them and are claimed as soon as those
# boxes are decoded, so more than one message's worth (at most 253 on Linux)
# waiting means the peer sends descriptors with boxes that name none: the
# oldest are closed and dropped.
MAX_UNCLAIMED_FDS = 256


class DescriptorExchange:
    """
    The file descriptors one connection has sent and received (sans-I/O).

    The asyncio layer creates one per UNIX socket connection and makes it the
    ``descriptor_exchange`` while it encodes or decodes a box that has a
    [`Descriptor`][]. It sends ``outgoing`` (and then closes them) with
    the next bytes it writes, and adds the descriptors it receives with
    ``received``.

    Ordinals count from 0 per connection and direction, as in Twisted: our n-th
    descriptor sent is ordinal n, and the n-th one that arrives is the peer's n.
    """

    __slots__ = ("_claimed", "_next_in", "_next_out", "_unclaimed", "outgoing")

    def __init__(self) -> None:
        #: Duplicates of the descriptors encoded, owned here until they are sent.
        self.outgoing: list[int] = []
        self._next_out = 0
        self._next_in = 0
        # ordinal -> fd received and not yet claimed by a decoded box
        self._unclaimed: dict[int, int] = {}
        # ordinal -> fd claimed by the box being decoded (see end_decode())
        self._claimed: dict[int, int] = {}

    def send(self, fd: int) -> int:
        """Duplicate ``fd`` to go out with the next write; return its ordinal."""
        self.outgoing.append(os.dup(fd))
        ordinal = self._next_out
        self._next_out += 1
        return ordinal

    def mark(self) -> int:
        """Return a point to ``rollback`` to if the box being encoded fails."""
        return len(self.outgoing)

    def rollback(self, mark: int) -> None:
        """Forget (and close) the descriptors encoded since ``mark``: their box was not sent."""
        while len(self.outgoing) > mark:
            os.close(self.outgoing.pop())
            self._next_out -= 1

    def received(self, fds: Iterable[int]) -> int:
        """
        Take ownership of descriptors that arrived, in arrival order.

        Returns:
            How many descriptors received earlier and never claimed were closed
            and dropped to keep to ``MAX_UNCLAIMED_FDS``.
        """
        unclaimed = self._unclaimed
        for fd in fds:
            unclaimed[self._next_in] = fd
            self._next_in += 1
        dropped = 0
        while len(unclaimed) > MAX_UNCLAIMED_FDS:
            os.close(unclaimed.pop(next(iter(unclaimed))))
            dropped += 1
        return dropped

    def receive(self, ordinal: int) -> int:
        """Return the descriptor the peer sent as ``ordinal``, claimed by the box being decoded."""
        fd = self._unclaimed.pop(ordinal, None)
        if fd is None:
            fd = self._claimed.get(ordinal)  # a second decoding pass of the same box
            if fd is None:
                raise ValueError(f"no file descriptor was received as number {ordinal}")
        self._claimed[ordinal] = fd
        return fd

    def end_decode(self, ok: bool) -> None:
        """A box is decoded: its descriptors now belong to its user, or are closed if it failed."""
        if not ok:
            for fd in self._claimed.values():
                os.close(fd)
        self._claimed.clear()

    def close(self) -> None:
        """The connection is closed: close every descriptor still owned here."""
        for fd in (*self.outgoing, *self._unclaimed.values(), *self._claimed.values()):
            os.close(fd)
        self.outgoing.clear()
        self._unclaimed.clear()
        self._claimed.clear()


#: The exchange of the connection whose box is being encoded or decoded, if it
#: is a UNIX socket connection; set by the asyncio layer.
descriptor_exchange: contextvars.ContextVar[DescriptorExchange | None] = contextvars.ContextVar(
    "asyncio_amp_descriptor_exchange", default=None
)


class Descriptor(Argument[int]):
    """
    A file descriptor, passed over a UNIX socket connection (``SCM_RIGHTS``).

    It only works on connections made with ``loop.create_unix_server`` or
    ``create_unix_connection`` (or ``serve``/``connect`` given a ``path``), on
    asyncio's own event loop (not TLS, not uvloop, whose transports cannot be made
    to read with ``recvmsg``); on any other connection, sending one raises
    ``TypeError`` and receiving one answers the call with an error. As in Twisted,
    the wire value is an ``Integer``: the sender's count of descriptors sent on
    this connection, from 0. The descriptor itself goes out with (so never after)
    the bytes of the box that names it.

    Who owns what:

    * **Sending** (an argument of ``call_remote``, or a value a responder
      returns): the descriptor is duplicated when the box is encoded, that is,
      when ``call_remote`` is called or when the responder returns. The caller
      keeps its own descriptor and closes it whenever it likes after that. The
      duplicate belongs to the connection, which closes it once it is sent (or
      when the connection closes, if it never was).
    * **Receiving** (a responder's argument, or a value in a call's result): the
      descriptor is new in this process and belongs to the code that gets it,
      which must close it (``os.close``). Descriptors that arrive but are never
      named by a box that decodes are closed when the connection closes.
    """

    __slots__ = ()

    multi_key = True  # not for the compiled codecs: it needs the connection's exchange
    uses_descriptors = True

    @staticmethod
    def _exchange() -> DescriptorExchange:
        exchange = descriptor_exchange.get()
        if exchange is None:
            raise TypeError(
                "Descriptor needs a UNIX socket connection (create_unix_server or "
                "create_unix_connection, or serve/connect with path=) on asyncio's own "
                "event loop; uvloop is not supported"
            )
        return exchange

    def to_bytes(self, value: int) -> bytes:
        raise TypeError("Descriptor is only sent as a command's argument or response value")

    def from_bytes(self, data: bytes) -> int:
        raise ValueError("Descriptor is only received as a command's argument or response value")

    def to_box(self, key: bytes, value: int, box: dict[bytes, bytes]) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"a Descriptor is a file descriptor (an int >= 0), not {value!r}")
        box[key] = Integer().to_bytes(self._exchange().send(value))

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> int | None:
        data = box.get(key)
        if data is None:
            return None
        return self._exchange().receive(Integer().from_bytes(data))
