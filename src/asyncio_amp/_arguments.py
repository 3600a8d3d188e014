"""
Argument types: how a Python value becomes the bytes of an AMP value, and back.

Every type is a subclass of :class:`Argument`. A custom type only needs
:meth:`Argument.to_bytes` and :meth:`Argument.from_bytes`; types that spread one
value over several keys (BigString) override :meth:`Argument.to_box` and
:meth:`Argument.from_box` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

__all__ = [
    "Argument",
    "Boolean",
    "Bytes",
    "Float",
    "Integer",
    "String",
    "Unicode",
]

T = TypeVar("T")


class Argument(Generic[T]):
    """
    Base class of argument types.

    Subclass it to add a type: implement :meth:`to_bytes` and :meth:`from_bytes`.
    Raise :class:`TypeError` or :class:`ValueError` for a value that does not fit;
    the error is reported with the command and argument name added.

    Args:
        optional: If true, the value may be ``None`` or left out: ``None`` is not
            sent, and a missing key decodes to ``None``.
    """

    __slots__ = ("optional",)

    #: ``True`` for types that write more than one key per value (see :meth:`to_box`).
    multi_key: bool = False

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
        :attr:`multi_key` need to override it.
        """
        box[key] = self.to_bytes(value)

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> T | None:
        """
        Read the value stored under ``key`` in ``box``; ``None`` if it is absent.

        The default reads ``from_bytes(box[key])``. Only types that set
        :attr:`multi_key` need to override it.
        """
        data = box.get(key)
        return None if data is None else self.from_bytes(data)


class Integer(Argument[int]):
    """An :class:`int`, as decimal ASCII digits (``-42`` is ``b"-42"``)."""

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
    A :class:`float`, as Python writes it (``b"0.1"``, ``b"1e+100"``).

    The specials travel as ``b"nan"``, ``b"inf"`` and ``b"-inf"``, as Twisted
    writes them. An :class:`int` is accepted and sent as a float.
    """

    __slots__ = ()

    def to_bytes(self, value: float) -> bytes:
        """Encode a float with :func:`repr`."""
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a float, got {type(value).__name__}: {value!r}")
            value = float(value)
        return repr(value).encode("ascii")

    def from_bytes(self, data: bytes) -> float:
        """Decode a float, including ``nan``, ``inf`` and ``-inf``."""
        return float(data)


class Boolean(Argument[bool]):
    """A :class:`bool`, as exactly ``b"True"`` or ``b"False"``."""

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
    A :class:`str`, as UTF-8.

    This is Twisted's ``Unicode`` type; Twisted's ``String`` carries bytes and is
    :class:`Bytes` here.
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


#: Twisted's name for :class:`String`: text sent as UTF-8.
Unicode = String


class Bytes(Argument[bytes]):
    """Raw :class:`bytes`, unchanged. This is Twisted's ``String`` type."""

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
