"""Tests for the argument types: exact wire encodings and round trips (no I/O)."""

from __future__ import annotations

import array
import datetime
import decimal
import enum
import fractions
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncio_amp._arguments import (
    AmpList,
    Argument,
    BigBytes,
    BigString,
    Boolean,
    Bytes,
    DateTime,
    Decimal,
    Float,
    Integer,
    ListOf,
    Path,
    String,
    Unicode,
    _Chunked,
    python_name,
    wire_name,
)
from asyncio_amp._errors import TooLongError
from asyncio_amp._wire import encode_box, parse_boxes


class Color(enum.IntEnum):
    RED = 3


# Argument


def test_arguments_are_required_by_default() -> None:
    assert Integer().optional is False
    assert Integer(optional=True).optional is True
    assert Integer(True).optional is True


@pytest.mark.parametrize(
    ("argument", "text"),
    [
        (Argument(), "Argument()"),
        (Integer(), "Integer()"),
        (Integer(optional=True), "Integer(optional=True)"),
        (Float(), "Float()"),
        (Boolean(optional=True), "Boolean(optional=True)"),
        (String(), "String()"),
        (Unicode(), "String()"),
        (Bytes(optional=True), "Bytes(optional=True)"),
    ],
)
def test_repr(argument: Argument[Any], text: str) -> None:
    assert repr(argument) == text


def test_base_class_has_no_encoding() -> None:
    with pytest.raises(NotImplementedError, match="Argument does not implement to_bytes"):
        Argument().to_bytes(1)
    with pytest.raises(NotImplementedError, match="Argument does not implement from_bytes"):
        Argument().from_bytes(b"1")


def test_built_in_types_write_one_key() -> None:
    for argument in (Argument(), Integer(), Float(), Boolean(), String(), Bytes()):
        assert argument.multi_key is False


def test_to_box_writes_under_the_key() -> None:
    box: dict[bytes, bytes] = {b"other": b"x"}
    Integer().to_box(b"n", 42, box)
    assert box == {b"other": b"x", b"n": b"42"}


def test_from_box_reads_the_key_or_returns_none() -> None:
    assert Integer().from_box(b"n", {b"n": b"42"}) == 42
    assert Integer().from_box(b"n", {b"m": b"42"}) is None
    assert Integer(optional=True).from_box(b"n", {}) is None


def test_from_box_raises_for_a_bad_value() -> None:
    with pytest.raises(ValueError):
        Integer().from_box(b"n", {b"n": b"x"})


class Point(Argument[tuple[int, int]]):
    """A custom type: two ints as b"x,y"."""

    def to_bytes(self, value: tuple[int, int]) -> bytes:
        x, y = value
        return b"%d,%d" % (x, y)

    def from_bytes(self, data: bytes) -> tuple[int, int]:
        x, y = data.split(b",")
        return int(x), int(y)


class Halves(Argument[bytes]):
    """A custom multi-key type: a value split over two keys."""

    multi_key = True

    def to_box(self, key: bytes, value: bytes, box: dict[bytes, bytes]) -> None:
        middle = len(value) // 2
        box[key + b".1"] = value[:middle]
        box[key + b".2"] = value[middle:]

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> bytes | None:
        if key + b".1" not in box:
            return None
        return box[key + b".1"] + box[key + b".2"]


def test_custom_argument_subclass_works() -> None:
    point = Point(optional=True)
    assert point.to_bytes((3, -4)) == b"3,-4"
    assert point.from_bytes(b"3,-4") == (3, -4)
    box: dict[bytes, bytes] = {}
    point.to_box(b"p", (1, 2), box)
    assert box == {b"p": b"1,2"}
    assert point.from_box(b"p", box) == (1, 2)
    assert repr(point) == "Point(optional=True)"
    with pytest.raises(ValueError):
        point.from_bytes(b"1")


def test_custom_multi_key_argument_works() -> None:
    halves = Halves()
    box: dict[bytes, bytes] = {}
    halves.to_box(b"h", b"abcde", box)
    assert box == {b"h.1": b"ab", b"h.2": b"cde"}
    assert halves.from_box(b"h", box) == b"abcde"
    assert halves.from_box(b"h", {}) is None
    assert halves.multi_key is True


# Integer


@pytest.mark.parametrize(
    ("value", "data"),
    [
        (0, b"0"),
        (7, b"7"),
        (-42, b"-42"),
        (2**63, b"9223372036854775808"),
        (-(2**70), b"-1180591620717411303424"),
        (Color.RED, b"3"),
    ],
)
def test_integer_encoding(value: int, data: bytes) -> None:
    assert Integer().to_bytes(value) == data
    assert Integer().from_bytes(data) == value


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, "1", b"1", None, decimal.Decimal(1)])
def test_integer_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected an int, got {type(value).__name__}"):
        Integer().to_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "value"),
    [(b" 12 ", 12), (b"+5", 5), (b"-0", 0), (b"007", 7), (b"1_000", 1000), (b"\t3\n", 3)],
)
def test_integer_decoding_is_lenient_like_twisted(data: bytes, value: int) -> None:
    assert Integer().from_bytes(data) == value


@pytest.mark.parametrize("data", [b"0x10", b"", b"1.5", b"1e3", b"x", b"--1", b"\xd9\xa1"])
def test_integer_decoding_refuses_what_int_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):
        Integer().from_bytes(data)


def test_integer_over_4300_digits_fails_both_ways() -> None:
    with pytest.raises(ValueError, match="4300"):
        Integer().to_bytes(10**4300)
    with pytest.raises(ValueError, match="4300"):
        Integer().from_bytes(b"1" * 4301)


# Float


@pytest.mark.parametrize(
    ("value", "data"),
    [
        (math.nan, b"nan"),
        (math.inf, b"inf"),
        (-math.inf, b"-inf"),
        (1e100, b"1e+100"),
        (0.1, b"0.1"),
        (-2.5, b"-2.5"),
        (0.0, b"0.0"),
        (-0.0, b"-0.0"),
        (1e-300, b"1e-300"),
        (1 / 3, b"0.3333333333333333"),
    ],
)
def test_float_encoding(value: float, data: bytes) -> None:
    assert Float().to_bytes(value) == data


@pytest.mark.parametrize(("value", "data"), [(3, b"3.0"), (-7, b"-7.0"), (Color.RED, b"3.0")])
def test_float_accepts_an_int_and_sends_it_as_a_float(value: int, data: bytes) -> None:
    assert Float().to_bytes(value) == data


@pytest.mark.parametrize("value", [True, "1.0", b"1.0", None, decimal.Decimal("1.5")])
def test_float_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected a float, got {type(value).__name__}"):
        Float().to_bytes(value)  # type: ignore[arg-type]


def test_float_refuses_a_fraction() -> None:
    with pytest.raises(TypeError, match="Fraction"):
        Float().to_bytes(fractions.Fraction(1, 2))  # type: ignore[arg-type]


def test_float_refuses_an_int_too_large_for_a_float_with_a_value_error() -> None:
    # The Argument contract: TypeError or ValueError for a value that does not fit, so
    # that commands can report it with the command and argument name.
    with pytest.raises(ValueError, match="too large"):
        Float().to_bytes(10**400)


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"0.1", 0.1),
        (b"1e+100", 1e100),
        (b"inf", math.inf),
        (b"-inf", -math.inf),
        (b"Infinity", math.inf),
        (b"-Infinity", -math.inf),
        (b" 1.0 ", 1.0),
        (b"3", 3.0),
    ],
)
def test_float_decoding(data: bytes, value: float) -> None:
    result = Float().from_bytes(data)
    assert type(result) is float
    assert result == value


@pytest.mark.parametrize("data", [b"nan", b"NaN", b"-nan"])
def test_float_decodes_nan(data: bytes) -> None:
    assert math.isnan(Float().from_bytes(data))


@pytest.mark.parametrize("data", [b"", b"x", b"1,5", b"0x1p3"])
def test_float_decoding_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        Float().from_bytes(data)


# Boolean


def test_boolean_encoding() -> None:
    assert Boolean().to_bytes(True) == b"True"
    assert Boolean().to_bytes(False) == b"False"
    assert Boolean().from_bytes(b"True") is True
    assert Boolean().from_bytes(b"False") is False


@pytest.mark.parametrize(
    ("value", "data"), [(1, b"True"), ("x", b"True"), (0, b"False"), ("", b"False")]
)
def test_boolean_encodes_truthiness_like_twisted(value: object, data: bytes) -> None:
    assert Boolean().to_bytes(value) == data  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"true", b"false", b"TRUE", b"1", b"0", b"", b" True", b"True "])
def test_boolean_decodes_only_true_and_false(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid boolean"):
        Boolean().from_bytes(data)


# String (Twisted's Unicode)


def test_unicode_is_string() -> None:
    assert Unicode is String


@pytest.mark.parametrize(
    ("value", "data"),
    [("", b""), ("hello", b"hello"), ("hé", b"h\xc3\xa9"), ("€𝄞", b"\xe2\x82\xac\xf0\x9d\x84\x9e")],
)
def test_string_is_utf8(value: str, data: bytes) -> None:
    assert String().to_bytes(value) == data
    assert String().from_bytes(data) == value


def test_string_accepts_a_str_subclass() -> None:
    class Name(str):
        pass

    assert String().to_bytes(Name("hé")) == b"h\xc3\xa9"


@pytest.mark.parametrize("value", [b"hello", bytearray(b"x"), 1, None])
def test_string_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected a str, got {type(value).__name__}"):
        String().to_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"\xff", b"h\xc3", b"\xed\xa0\x80", b"\xc0\x80"])
def test_string_decoding_is_strict(data: bytes) -> None:
    with pytest.raises(UnicodeDecodeError):
        String().from_bytes(data)


def test_string_refuses_a_lone_surrogate_with_a_value_error() -> None:
    with pytest.raises(ValueError):
        String().to_bytes("\ud800")


# Bytes (Twisted's String)


def test_bytes_are_sent_unchanged() -> None:
    value = b"\x00\xffabc"
    assert Bytes().to_bytes(value) is value
    assert Bytes().from_bytes(value) is value


@pytest.mark.parametrize("value", [bytearray(b"\x00ab"), memoryview(b"\x00ab")])
def test_bytes_accept_bytearray_and_memoryview(value: bytearray | memoryview) -> None:
    data = Bytes().to_bytes(value)  # type: ignore[arg-type]
    assert type(data) is bytes
    assert data == b"\x00ab"


def test_bytes_copy_a_bytearray() -> None:
    value = bytearray(b"ab")
    data = Bytes().to_bytes(value)  # type: ignore[arg-type]
    value[0] = ord("z")
    assert data == b"ab"


@pytest.mark.parametrize("value", ["abc", 1, None, [1, 2]])
def test_bytes_refuse_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected bytes, got {type(value).__name__}"):
        Bytes().to_bytes(value)  # type: ignore[arg-type]


# Names


@pytest.mark.parametrize(
    ("wire", "name"),
    [
        (b"a", "a"),
        (b"hello-name", "hello_name"),
        (b"from", "from_"),
        (b"class", "class_"),
        (b"async", "async_"),
        (b"None", "None_"),
        (b"print", "print"),
        (b"match", "match"),
        (b"caf\xc3\xa9", "café"),
        (b"\xff", "\\xff"),
    ],
)
def test_python_name(wire: bytes, name: str) -> None:
    assert python_name(wire) == name


@pytest.mark.parametrize(
    ("name", "wire"),
    [("a", b"a"), (b"a-b", b"a-b"), ("café", b"caf\xc3\xa9"), ("k" * 255, b"k" * 255)],
)
def test_wire_name(name: str | bytes, wire: bytes) -> None:
    assert wire_name(name, "field", "Owner") == wire


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (1, "Owner: field names are str or bytes, not int"),
        ("", "Owner: field names cannot be empty"),
        (b"", "Owner: field names cannot be empty"),
        ("k" * 256, "Owner: field name b'kkkk"),
    ],
)
def test_wire_name_refuses_bad_names(name: object, message: str) -> None:
    with pytest.raises(TypeError) as info:
        wire_name(name, "field", "Owner")
    assert str(info.value).startswith(message)


def test_wire_name_refuses_an_unencodable_name_with_type_error() -> None:
    # A schema mistake is a TypeError at class creation, whatever the mistake.
    with pytest.raises(TypeError, match="Owner"):
        wire_name("bad\ud800", "field", "Owner")


# Decimal


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "1.10",
        "-0",
        "1E+2",
        "3.141E-7",
        "Infinity",
        "-Infinity",
        "NaN",
        "-NaN",
        "sNaN",
        "-sNaN",
    ],
)
def test_decimal_encoding_keeps_every_value(text: str) -> None:
    value = decimal.Decimal(text)
    assert Decimal().to_bytes(value) == text.encode("ascii")
    result = Decimal().from_bytes(text.encode("ascii"))
    assert str(result) == text
    assert result.as_tuple() == value.as_tuple()


@pytest.mark.parametrize(
    ("data", "text"), [(b"nan", "NaN"), (b"inf", "Infinity"), (b"1e2", "1E+2")]
)
def test_decimal_decoding_ignores_case(data: bytes, text: str) -> None:
    assert str(Decimal().from_bytes(data)) == text


@pytest.mark.parametrize("value", [1, 1.5, "1.5", b"1.5", None, fractions.Fraction(1, 2)])
def test_decimal_refuses_other_types(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected a decimal.Decimal, got {type(value).__name__}"):
        Decimal().to_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"x", b"1.2.3", b"\xd9\xa1", b"0x10"])
def test_decimal_decoding_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid decimal"):
        Decimal().from_bytes(data)


# DateTime


def tz(minutes: int) -> datetime.timezone:
    return datetime.timezone(datetime.timedelta(minutes=minutes))


@pytest.mark.parametrize(
    ("value", "data"),
    [
        (datetime.datetime(2010, 12, 25, tzinfo=datetime.UTC), b"2010-12-25T00:00:00.000000-00:00"),
        (datetime.datetime(2010, 12, 25, tzinfo=tz(0)), b"2010-12-25T00:00:00.000000-00:00"),
        (
            datetime.datetime(5, 1, 2, 3, 4, 5, 6, tzinfo=tz(330)),
            b"0005-01-02T03:04:05.000006+05:30",
        ),
        (
            datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=tz(-30)),
            b"2024-02-29T23:59:59.999999-00:30",
        ),
        (datetime.datetime(9999, 12, 31, tzinfo=tz(-1439)), b"9999-12-31T00:00:00.000000-23:59"),
        (datetime.datetime(2000, 1, 1, tzinfo=tz(1439)), b"2000-01-01T00:00:00.000000+23:59"),
    ],
)
def test_datetime_encoding(value: datetime.datetime, data: bytes) -> None:
    assert len(data) == 32
    assert DateTime().to_bytes(value) == data
    result = DateTime().from_bytes(data)
    assert result == value
    assert result.utcoffset() == value.utcoffset()


def test_datetime_decodes_a_zero_offset_as_utc() -> None:
    for data in (b"2010-12-25T00:00:00.000000-00:00", b"2010-12-25T00:00:00.000000+00:00"):
        assert DateTime().from_bytes(data).tzinfo is datetime.UTC


def test_datetime_decodes_a_fixed_offset() -> None:
    result = DateTime().from_bytes(b"2010-12-25T01:02:03.000004-05:30")
    assert result.tzinfo == tz(-330)
    assert result.astimezone(datetime.UTC) == datetime.datetime(
        2010, 12, 25, 6, 32, 3, 4, tzinfo=datetime.UTC
    )


def test_datetime_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive datetime 2010-12-25T00:00:00"):
        DateTime().to_bytes(datetime.datetime(2010, 12, 25))


@pytest.mark.parametrize(
    "offset",
    [
        datetime.timedelta(seconds=90),
        datetime.timedelta(seconds=-90),
        datetime.timedelta(microseconds=1),
    ],
)
def test_datetime_refuses_an_offset_with_seconds(offset: datetime.timedelta) -> None:
    value = datetime.datetime(2010, 12, 25, tzinfo=datetime.timezone(offset))
    with pytest.raises(ValueError, match="AMP carries whole minutes"):
        DateTime().to_bytes(value)


@pytest.mark.parametrize("value", [datetime.date(2010, 12, 25), "2010-12-25", 0, None])
def test_datetime_refuses_other_types(value: object) -> None:
    with pytest.raises(
        TypeError, match=f"expected a datetime.datetime, got {type(value).__name__}"
    ):
        DateTime().to_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "invalid datetime b''"),
        (b"2010-12-25T00:00:00.000000-00:0", "invalid datetime"),
        (b"2010-12-25T00:00:00.000000-00:000", "invalid datetime"),
        (b"2010-12-25 00:00:00.000000-00:00", "invalid datetime"),
        (b"2010-12-25T00:00:00.000000+ 1:00", "invalid datetime"),
        (b"2010-12-25T00:00:00.000000~00:00", "invalid datetime"),
        (b"2010-12-25T00:00:00.000000+24:00", "it must be under 24 hours"),
        (b"2010-12-25T00:00:00.000000+23:60", "invalid UTC offset"),
        (b"2010-13-25T00:00:00.000000+00:00", "month must be in 1..12"),
        (b"2010-02-30T00:00:00.000000+00:00", "day is out of range"),
        (b"0000-01-01T00:00:00.000000+00:00", "year 0 is out of range"),
        (b"2010-12-25T24:00:00.000000+00:00", "hour must be in 0..23"),
    ],
)
def test_datetime_decoding_refuses_bad_values(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DateTime().from_bytes(data)


# Path


@pytest.mark.parametrize(
    ("value", "data"),
    [
        (pathlib.Path("/data/xé"), b"/data/x\xc3\xa9"),
        (pathlib.PurePosixPath("a/b"), b"a/b"),
        ("relative/path", b"relative/path"),
    ],
)
def test_path_encoding(value: Any, data: bytes) -> None:
    assert Path().to_bytes(value) == data


def test_path_decodes_to_a_path() -> None:
    result = Path().from_bytes(b"/data/x\xc3\xa9")
    assert isinstance(result, pathlib.Path)
    assert result == pathlib.Path("/data/xé")


@pytest.mark.parametrize("value", [1, None, ["a"]])
def test_path_refuses_what_is_not_a_path(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected a path, got {type(value).__name__}"):
        Path().to_bytes(value)  # type: ignore[arg-type]


def test_path_refuses_a_bytes_path() -> None:
    with pytest.raises(TypeError, match="expected a text path, got bytes"):
        Path().to_bytes(b"/data")  # type: ignore[arg-type]


def test_path_decoding_is_strict_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        Path().from_bytes(b"/data/\xff")


# ListOf


def test_list_of_encoding() -> None:
    assert ListOf(Integer()).to_bytes([1, 22, 333]) == b"\x00\x011\x00\x0222\x00\x03333"
    assert ListOf(Integer()).from_bytes(b"\x00\x011\x00\x0222\x00\x03333") == [1, 22, 333]
    assert ListOf(Integer()).to_bytes([]) == b""
    assert ListOf(Integer()).from_bytes(b"") == []


def test_list_of_accepts_any_iterable() -> None:
    assert ListOf(String()).to_bytes(("a", "é")) == b"\x00\x01a\x00\x02\xc3\xa9"
    assert ListOf(Integer()).to_bytes(iter([7])) == b"\x00\x017"


def test_list_of_empty_elements() -> None:
    assert ListOf(Bytes()).to_bytes([b"", b""]) == b"\x00\x00\x00\x00"
    assert ListOf(Bytes()).from_bytes(b"\x00\x00\x00\x00") == [b"", b""]


def test_list_of_lists() -> None:
    argument = ListOf(ListOf(Integer()))
    data = argument.to_bytes([[1], [], [2, 3]])
    assert data == b"\x00\x03\x00\x011\x00\x00\x00\x06\x00\x012\x00\x013"
    assert argument.from_bytes(data) == [[1], [], [2, 3]]


def test_list_of_repr() -> None:
    assert repr(ListOf(Integer())) == "ListOf(Integer())"
    assert repr(ListOf(String(), optional=True)) == "ListOf(String(), optional=True)"
    assert ListOf(Integer(), optional=True).optional is True


@pytest.mark.parametrize("element", [Integer, BigBytes(), BigString(), 1, None])
def test_list_of_needs_a_single_value_argument(element: object) -> None:
    with pytest.raises(TypeError, match="ListOf needs a single-value Argument"):
        ListOf(element)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["abc", b"abc", {"a": 1}, 5, None])
def test_list_of_refuses_what_is_not_a_list(value: object) -> None:
    with pytest.raises(TypeError, match=f"expected a list, got {type(value).__name__}"):
        ListOf(Integer()).to_bytes(value)  # type: ignore[arg-type]


def test_list_of_refuses_a_none_element() -> None:
    with pytest.raises(TypeError, match="element 1 is None"):
        ListOf(Integer()).to_bytes([1, None])  # type: ignore[list-item]


def test_list_of_passes_on_element_errors() -> None:
    with pytest.raises(TypeError, match="expected an int, got str"):
        ListOf(Integer()).to_bytes([1, "2"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ListOf(Integer()).from_bytes(b"\x00\x01x")


def test_list_of_refuses_an_element_over_65535_bytes() -> None:
    assert len(ListOf(Bytes()).to_bytes([b"x" * 65_535])) == 65_537
    with pytest.raises(TooLongError) as info:
        ListOf(Bytes()).to_bytes([b"", b"x" * 65_536])
    assert (info.value.key, info.value.length, info.value.is_key) == (b"[1]", 65_536, False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00", "ListOf: 1 stray byte after 0 elements"),
        (b"\x00\x011\x00", "ListOf: 1 stray byte after 1 elements"),
        (b"\x00\x02ab\x00\x05xy", "ListOf: element 1 needs 5 bytes but 2 are left"),
    ],
)
def test_list_of_refuses_a_partial_element(data: bytes, message: str) -> None:
    # Twisted drops the partial element silently; here it is an error.
    with pytest.raises(ValueError) as info:
        ListOf(Bytes()).from_bytes(data)
    assert str(info.value) == message


# AmpList


ITEMS = AmpList([("a", Integer()), ("b", String(optional=True))])


def test_amp_list_encoding() -> None:
    data = ITEMS.to_bytes([{"a": 7, "b": "hi"}, {"a": 9}])
    assert data == b"\x00\x01a\x00\x017\x00\x01b\x00\x02hi\x00\x00\x00\x01a\x00\x019\x00\x00"
    assert ITEMS.from_bytes(data) == [{"a": 7, "b": "hi"}, {"a": 9, "b": None}]
    assert ITEMS.to_bytes([{"a": 9, "b": None}]) == b"\x00\x01a\x00\x019\x00\x00"


def test_amp_list_of_nothing() -> None:
    assert ITEMS.to_bytes([]) == b""
    assert ITEMS.from_bytes(b"") == []


def test_amp_list_element_with_every_field_absent() -> None:
    argument = AmpList([("b", String(optional=True))])
    assert argument.to_bytes([{}, {"b": None}]) == b"\x00\x00\x00\x00"
    assert argument.from_bytes(b"\x00\x00") == [{"b": None}]


def test_amp_list_sorts_fields_and_uses_python_names() -> None:
    argument = AmpList(
        [(b"z", Integer()), ("from", Integer()), ("a-b", Integer()), ("B", Integer())]
    )
    data = argument.to_bytes([{"z": 1, "from_": 2, "a_b": 3, "B": 4}])
    assert data == (
        b"\x00\x01B\x00\x014\x00\x03a-b\x00\x013\x00\x04from\x00\x012\x00\x01z\x00\x011\x00\x00"
    )
    assert argument.from_bytes(data) == [{"z": 1, "from_": 2, "a_b": 3, "B": 4}]


def test_amp_list_ignores_unknown_keys_when_decoding() -> None:
    assert ITEMS.from_bytes(b"\x00\x01a\x00\x011\x00\x01x\x00\x00\x00\x00") == [{"a": 1, "b": None}]


def test_amp_list_of_amp_lists() -> None:
    argument = AmpList([("inner", AmpList([("n", Integer())]))])
    value = [{"inner": [{"n": 1}, {"n": 2}]}, {"inner": []}]
    data = argument.to_bytes(value)
    inner = b"\x00\x01n\x00\x011\x00\x00\x00\x01n\x00\x012\x00\x00"
    assert data == b"\x00\x05inner\x00\x10" + inner + b"\x00\x00\x00\x05inner\x00\x00\x00\x00"
    assert argument.from_bytes(data) == value


def test_amp_list_with_a_multi_key_field() -> None:
    argument = AmpList([("big", BigBytes())])
    data = argument.to_bytes([{"big": b"abc"}])
    assert data == b"\x00\x03big\x00\x03abc\x00\x00"
    assert argument.from_bytes(data) == [{"big": b"abc"}]


def test_amp_list_repr() -> None:
    assert repr(ITEMS) == "AmpList([(b'a', Integer()), (b'b', String(optional=True))])"
    assert repr(AmpList([], optional=True)) == "AmpList([], optional=True)"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([("a",)], "AmpList holds (name, Argument) pairs"),
        ([Integer()], "AmpList holds (name, Argument) pairs"),
        ([(1, Integer())], "AmpList: field names are str or bytes, not int"),
        ([("", Integer())], "AmpList: field names cannot be empty"),
        ([("a", Integer)], "AmpList field b'a' needs an Argument"),
        ([("a-b", Integer()), ("a_b", Integer())], "AmpList fields b'a-b' and b'a_b' clash"),
        ([("a", Integer()), (b"a", Integer())], "AmpList fields b'a' and b'a' clash"),
        (
            [("data", BigBytes()), ("data.2", Bytes())],
            "AmpList: the field b'data.2' could be a chunk key of the BigBytes field b'data'",
        ),
        (
            [("t.3", Integer()), ("t", BigString())],
            "AmpList: the field b't.3' could be a chunk key of the BigString field b't'",
        ),
    ],
)
def test_amp_list_checks_its_fields(fields: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        AmpList(fields)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ab", "expected a list of dicts, got str"),
        (b"ab", "expected a list of dicts, got bytes"),
        ({"a": 1}, "expected a list of dicts, got dict"),
        (5, "expected a list of dicts, got int"),
        ([{"a": 1}, [("a", 1)]], "element 1 is a list, not a dict"),
        ([{"a": 1, "c": 2, "d": 3}], "element 0: ['c', 'd'] are not fields"),
        ([{"b": "x"}], "element 0: field 'a' is missing"),
        ([{"a": None}], "element 0: field 'a' is missing"),
        ([{"a": "1"}], "expected an int, got str"),
    ],
)
def test_amp_list_refuses_bad_values(value: Any, message: str) -> None:
    with pytest.raises(TypeError) as info:
        ITEMS.to_bytes(value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01b\x00\x01x\x00\x00", "AmpList element 0: field 'a' is missing"),
        (b"\x00\x01a\x00\x011\x00\x00\x00\x00", "AmpList element 1: field 'a' is missing"),
        (b"\x00\x01a\x00\x011", "nested boxes: the last box has no end"),
        (b"\x00\x01a\x00\x01x\x00\x00", "invalid literal for int"),
    ],
)
def test_amp_list_decoding_refuses_bad_values(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ITEMS.from_bytes(data)


# BigBytes and BigString


def big_box(argument: Argument[Any], value: Any, key: bytes = b"v") -> dict[bytes, bytes]:
    box: dict[bytes, bytes] = {}
    argument.to_box(key, value, box)
    return box


def test_big_bytes_write_several_keys() -> None:
    assert BigBytes.multi_key is True
    assert BigString.multi_key is True
    value = bytes(range(256)) * 600  # 153,600 bytes: 3 chunks
    box = big_box(BigBytes(), value)
    assert sorted(box) == [b"v", b"v.2", b"v.3"]
    assert bytes(box[b"v"]) == value[:65_535]
    assert bytes(box[b"v.2"]) == value[65_535:131_070]
    assert bytes(box[b"v.3"]) == value[131_070:]
    assert BigBytes().from_box(b"v", box) == value


def test_big_bytes_that_fit_use_one_key() -> None:
    assert big_box(BigBytes(), b"") == {b"v": b""}
    box = big_box(BigBytes(), b"x" * 65_535)
    assert box == {b"v": b"x" * 65_535}
    assert type(box[b"v"]) is bytes
    assert sorted(big_box(BigBytes(), b"x" * 65_536)) == [b"v", b"v.2"]


def test_big_bytes_boxes_encode_as_ordinary_boxes() -> None:
    value = b"a" * 65_535 + b"bc"
    data = encode_box(big_box(BigBytes(), value))
    assert data == b"\x00\x01v\xff\xff" + b"a" * 65_535 + b"\x00\x03v.2\x00\x02bc\x00\x00"
    [box] = parse_boxes(data)
    assert BigBytes().from_box(b"v", box) == value


def test_big_bytes_accept_bytearray_and_memoryview() -> None:
    assert big_box(BigBytes(), bytearray(b"ab")) == {b"v": b"ab"}
    assert big_box(BigBytes(), memoryview(array.array("B", [1, 2]))) == {b"v": b"\x01\x02"}
    box = big_box(BigBytes(), bytearray(70_000))
    assert BigBytes().from_box(b"v", box) == bytes(70_000)


def _mutable_values(size: int) -> list[tuple[str, bytearray, Any]]:
    """Mutable buffers of ``size`` patterned bytes, each as (label, buffer, value to send)."""
    values: list[tuple[str, bytearray, Any]] = []
    buffer = bytearray(bytes(range(256)) * (size // 256 + 1))[:size]
    values.append(("bytearray", buffer, buffer))
    buffer = bytearray(buffer)
    values.append(("memoryview", buffer, memoryview(buffer)))
    return values


@pytest.mark.parametrize("size", [10, 65_535, 70_000, 200_000])
def test_big_bytes_capture_a_mutable_value_when_encoded(size: int) -> None:
    for label, buffer, value in _mutable_values(size):
        original = bytes(buffer)
        box = big_box(BigBytes(), value)
        if isinstance(value, memoryview):
            value.release()  # the box holds no export of the caller's buffer
        buffer[0] ^= 0xFF
        buffer[-1] ^= 0xFF
        buffer.extend(b"more")  # a BufferError if the box still held a view of it
        assert BigBytes().from_box(b"v", box) == original, label


def test_big_bytes_do_not_copy_bytes() -> None:
    small = b"x" * 100
    assert big_box(BigBytes(), small)[b"v"] is small
    large = bytes(200_000)
    box = big_box(BigBytes(), large)
    assert all(isinstance(chunk, memoryview) and chunk.obj is large for chunk in box.values())


def test_big_bytes_refuse_other_types() -> None:
    with pytest.raises(TypeError, match="expected bytes, got str"):
        big_box(BigBytes(), "abc")


def test_big_bytes_read_up_to_the_first_missing_chunk() -> None:
    box = {b"v": b"a", b"v.2": b"b", b"v.4": b"d"}
    assert BigBytes().from_box(b"v", box) == b"ab"
    assert BigBytes().from_box(b"v", {b"v.2": b"b"}) is None
    assert BigBytes().from_box(b"w", box) is None


def test_big_bytes_chunk_keys_must_fit() -> None:
    key = b"k" * 254
    assert sorted(big_box(BigBytes(), b"x" * 10, key)) == [key]
    with pytest.raises(TooLongError) as info:
        big_box(BigBytes(), b"x" * 65_536, key)
    assert (info.value.key, info.value.length, info.value.is_key) == (key + b".2", 256, True)


def test_big_types_cannot_be_single_values() -> None:
    with pytest.raises(TypeError, match="BigBytes spans several keys"):
        BigBytes().to_bytes(b"x")
    with pytest.raises(TypeError, match="BigString spans several keys"):
        BigString().to_bytes("x")
    assert BigBytes().from_bytes(b"x") == b"x"
    assert BigString().from_bytes(b"\xc3\xa9") == "é"


def test_big_string_is_utf8_split_over_keys() -> None:
    value = "é" * 40_000  # 80,000 bytes: a character straddles the chunks
    box = big_box(BigString(), value)
    assert sorted(box) == [b"v", b"v.2"]
    assert bytes(box[b"v"]) + bytes(box[b"v.2"]) == value.encode("utf-8")
    assert BigString().from_box(b"v", box) == value
    assert big_box(BigString(), "hé") == {b"v": b"h\xc3\xa9"}


def test_big_string_refuses_other_types_and_bad_utf8() -> None:
    with pytest.raises(TypeError, match="expected a str, got bytes"):
        big_box(BigString(), b"abc")
    with pytest.raises(UnicodeDecodeError):
        BigString().from_box(b"v", {b"v": b"\xff"})


def test_chunked_base_needs_its_conversions() -> None:
    class Half(_Chunked[int]):
        pass

    with pytest.raises(NotImplementedError):
        big_box(Half(), 1)
    with pytest.raises(NotImplementedError):
        Half().from_bytes(b"1")


# Round trips


@settings(max_examples=200)
@given(st.integers(min_value=-(10**200), max_value=10**200))
def test_integer_round_trip(value: int) -> None:
    data = Integer().to_bytes(value)
    assert data == str(value).encode("ascii")
    assert Integer().from_bytes(data) == value


@settings(max_examples=200)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_round_trip(value: float) -> None:
    data = Float().to_bytes(value)
    assert data.isascii()
    result = Float().from_bytes(data)
    if math.isnan(value):
        assert math.isnan(result)
    else:
        # repr tells 0.0 from -0.0, which == does not.
        assert repr(result) == repr(value)


@settings(max_examples=200)
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_float_round_trip_of_ints(value: int) -> None:
    assert Float().from_bytes(Float().to_bytes(value)) == value


@given(st.booleans())
def test_boolean_round_trip(value: bool) -> None:
    assert Boolean().from_bytes(Boolean().to_bytes(value)) is value


@settings(max_examples=200)
@given(st.text())
def test_string_round_trip(value: str) -> None:
    data = String().to_bytes(value)
    assert data == value.encode("utf-8")
    assert String().from_bytes(data) == value


@settings(max_examples=200)
@given(st.binary())
def test_bytes_round_trip(value: bytes) -> None:
    assert Bytes().from_bytes(Bytes().to_bytes(value)) == value
    assert Bytes().from_bytes(Bytes().to_bytes(bytearray(value))) == value  # type: ignore[arg-type]


@settings(max_examples=200)
@given(st.tuples(st.integers(), st.integers()))
def test_custom_argument_round_trip(value: tuple[int, int]) -> None:
    box: dict[bytes, bytes] = {}
    Point().to_box(b"p", value, box)
    assert Point().from_box(b"p", box) == value


@settings(max_examples=200)
@given(st.binary())
def test_multi_key_argument_round_trip(value: bytes) -> None:
    box: dict[bytes, bytes] = {}
    Halves().to_box(b"h", value, box)
    assert Halves().from_box(b"h", box) == value


@settings(max_examples=200)
@given(st.decimals(allow_nan=True, allow_infinity=True))
def test_decimal_round_trip(value: decimal.Decimal) -> None:
    result = Decimal().from_bytes(Decimal().to_bytes(value))
    # str and as_tuple tell apart what == cannot: NaNs, signs of zero, precision.
    assert str(result) == str(value)
    assert result.as_tuple() == value.as_tuple()


fixed_offsets = st.integers(-1439, 1439).map(tz)


@settings(max_examples=200)
@given(st.datetimes(timezones=fixed_offsets))
def test_datetime_round_trip(value: datetime.datetime) -> None:
    data = DateTime().to_bytes(value)
    assert len(data) == 32
    result = DateTime().from_bytes(data)
    assert result == value
    assert result.replace(tzinfo=None) == value.replace(tzinfo=None)
    assert result.utcoffset() == value.utcoffset()


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))))
def test_path_round_trip(text: str) -> None:
    value = pathlib.Path(text)
    assert Path().from_bytes(Path().to_bytes(value)) == value


@settings(max_examples=200)
@given(st.lists(st.integers(-(10**30), 10**30)))
def test_list_of_integers_round_trip(value: list[int]) -> None:
    assert ListOf(Integer()).from_bytes(ListOf(Integer()).to_bytes(value)) == value


@settings(max_examples=200)
@given(st.lists(st.lists(st.text(max_size=5), max_size=4), max_size=4))
def test_list_of_lists_of_strings_round_trip(value: list[list[str]]) -> None:
    argument = ListOf(ListOf(String()))
    assert argument.from_bytes(argument.to_bytes(value)) == value


@settings(max_examples=200)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"a": st.integers()}, optional={"b": st.one_of(st.none(), st.text(max_size=8))}
        ),
        max_size=5,
    )
)
def test_amp_list_round_trip(value: list[dict[str, Any]]) -> None:
    expected = [{"a": element["a"], "b": element.get("b")} for element in value]
    assert ITEMS.from_bytes(ITEMS.to_bytes(value)) == expected


@settings(max_examples=50)
@given(st.integers(0, 200_000), st.binary(min_size=1, max_size=1))
def test_big_bytes_round_trip(size: int, fill: bytes) -> None:
    value = fill * size
    [box] = parse_boxes(encode_box(big_box(BigBytes(), value)))
    assert len(box) == max(1, -(-size // 65_535))
    assert BigBytes().from_box(b"v", box) == value


@settings(max_examples=200)
@given(st.text())
def test_big_string_round_trip(value: str) -> None:
    [box] = parse_boxes(encode_box(big_box(BigString(), value)))
    assert BigString().from_box(b"v", box) == value
