"""
Tests of the newer argument types: Decimal, DateTime, Path, ListOf, AmpList, BigBytes, BigString.

The sans-I/O tests assert exact bytes: ``to_bytes``/``from_bytes`` for the one-value types,
``to_box``/``from_box`` and whole Command boxes for the ones that span several keys. Hypothesis
round-trips every type. One test carries every type over 127.0.0.1 in both directions (with a
10 MB BigBytes), and one measures the memory that encoding and decoding a 10 MB BigBytes takes.

Where we differ from Twisted on purpose, the test name says so (``..._unlike_twisted``);
``tests/interop/test_twisted_types.py`` checks the same differences against Twisted itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import fractions
import math
import pathlib
import random
import re
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncio_amp as amp
from asyncio_amp._wire import MAX_VALUE_LENGTH, BoxDecoder, parse_nested_boxes
from helpers import LONG, client, running_server

D = decimal.Decimal
CHUNK = 65_535
assert CHUNK == MAX_VALUE_LENGTH

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Helpers


def kv(key: bytes, value: bytes) -> bytes:
    """One key/value pair as AMP writes it."""
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


def prefixed(data: bytes) -> bytes:
    """A 2-byte length and the bytes (a ListOf element)."""
    return len(data).to_bytes(2, "big") + data


def ask_bytes(command: type[amp.Command], tag: bytes = b"1", **values: Any) -> bytes:
    """The bytes of a call's box, with ``tag`` filled in as the protocol does."""
    parts, slot = command._encode_ask(values)
    assert slot >= 0
    parts[slot] = len(tag).to_bytes(2, "big") + tag
    return b"".join(parts)


def only_box(data: bytes) -> amp.Box:
    (box,) = amp.parse_boxes(data)
    return box


def tz(minutes: int) -> dt.timezone:
    return dt.timezone(dt.timedelta(minutes=minutes))


def canon(value: Any) -> Any:
    """A comparable form: Decimals by str (NaN != NaN), floats by repr, datetimes with offset."""
    if isinstance(value, D):
        return ("Decimal", str(value))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat(), value.utcoffset(), type(value.tzinfo))
    if isinstance(value, pathlib.PurePath):
        return ("Path", type(value), str(value))
    if isinstance(value, list):
        return [canon(v) for v in value]
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    return (type(value), value)


# Decimal

DECIMAL_TEXTS = [
    "Infinity",
    "-Infinity",
    "NaN",
    "-NaN",
    "sNaN",
    "-sNaN",
    "NaN123",
    "-sNaN7",
    "1E+2",
    "3.141E-7",
    "1.5E+2",
    "-0",
    "0",
    "0E-8",
    "1.10",
    "-1.000",
    "123456789012345678901234567890.123456789",
]


@pytest.mark.parametrize("text", DECIMAL_TEXTS)
def test_decimal_is_str_of_the_value_and_comes_back_identical(text: str) -> None:
    value = D(text)
    data = amp.Decimal().to_bytes(value)
    assert data == text.encode("ascii")
    back = amp.Decimal().from_bytes(data)
    assert type(back) is D
    assert str(back) == text
    # Same sign, same exponent (precision), same NaN payload.
    assert back.compare_total(value) == 0
    assert back.as_tuple() == value.as_tuple()


def test_decimal_keeps_negative_zero_and_trailing_zeros() -> None:
    minus_zero = amp.Decimal().from_bytes(b"-0")
    assert minus_zero.is_signed() and minus_zero.is_zero()
    assert amp.Decimal().from_bytes(b"1.10").as_tuple().exponent == -2
    assert amp.Decimal().from_bytes(b"1E+2").as_tuple() == (0, (1,), 2)
    assert amp.Decimal().to_bytes(D("1.10")) != amp.Decimal().to_bytes(D("1.1"))


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"nan", "NaN"),
        (b"-INF", "-Infinity"),
        (b"infinity", "Infinity"),
        (b"snan", "sNaN"),
        (b"1e2", "1E+2"),
        (b"-0.0", "-0.0"),
    ],
)
def test_decimal_decoding_reads_any_case_as_python_does(data: bytes, text: str) -> None:
    assert str(amp.Decimal().from_bytes(data)) == text


@pytest.mark.parametrize(
    "data", [b"", b"x", b"1.2.3", b"1,5", b"0x10", b"\xff", b"--1", "١٢".encode(), b"1e"]
)
def test_decimal_malformed_bytes_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="decimal"):
        amp.Decimal().from_bytes(data)


@pytest.mark.parametrize("value", [1, 1.5, "1.5", b"1", None, True, fractions.Fraction(1, 2)])
def test_decimal_refuses_other_values_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match=r"decimal\.Decimal"):
        amp.Decimal().to_bytes(value)


DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from([D(t) for t in DECIMAL_TEXTS]),
    st.builds(
        lambda sign, digits, exp: D((sign, tuple(digits), exp)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=40),
        st.integers(-50, 50),
    ),
)


@SETTINGS
@given(value=DECIMALS)
def test_decimal_round_trip(value: D) -> None:
    data = amp.Decimal().to_bytes(value)
    assert data == str(value).encode("ascii")
    back = amp.Decimal().from_bytes(data)
    assert str(back) == str(value)
    assert back.compare_total(value) == 0


# DateTime

DATETIME_CASES = [
    (dt.datetime(9876, 1, 23, 12, 34, 56, 54321, tz(-83)), b"9876-01-23T12:34:56.054321-01:23"),
    (dt.datetime(2010, 12, 25, tzinfo=dt.UTC), b"2010-12-25T00:00:00.000000-00:00"),
    (dt.datetime(2010, 12, 25, tzinfo=tz(0)), b"2010-12-25T00:00:00.000000-00:00"),
    (dt.datetime(2010, 12, 25, 1, tzinfo=tz(330)), b"2010-12-25T01:00:00.000000+05:30"),
    (dt.datetime(2010, 12, 25, 1, tzinfo=tz(-419)), b"2010-12-25T01:00:00.000000-06:59"),
    (dt.datetime(5, 2, 3, 4, 5, 6, 7, tz(60)), b"0005-02-03T04:05:06.000007+01:00"),
    (dt.datetime(1, 1, 1, tzinfo=tz(1439)), b"0001-01-01T00:00:00.000000+23:59"),
    (
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tz(-1439)),
        b"9999-12-31T23:59:59.999999-23:59",
    ),
    (dt.datetime(2000, 2, 29, 1, 2, 3, 100000, tz(1)), b"2000-02-29T01:02:03.100000+00:01"),
    (dt.datetime(2000, 2, 29, tzinfo=tz(-1)), b"2000-02-29T00:00:00.000000-00:01"),
]


@pytest.mark.parametrize(
    ("value", "data"), DATETIME_CASES, ids=[d.decode() for _, d in DATETIME_CASES]
)
def test_datetime_exact_bytes_and_back(value: dt.datetime, data: bytes) -> None:
    encoded = amp.DateTime().to_bytes(value)
    assert encoded == data
    assert len(encoded) == 32 and encoded.isascii()
    back = amp.DateTime().from_bytes(encoded)
    assert back == value
    # The same wall clock and the same offset, not just the same instant.
    assert back.replace(tzinfo=None) == value.replace(tzinfo=None)
    assert back.utcoffset() == value.utcoffset()
    # A fixed-offset tzinfo equal to the one sent.
    assert isinstance(back.tzinfo, dt.timezone)
    assert back.tzinfo == dt.timezone(value.utcoffset())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data", [b"2010-12-25T00:00:00.000000+00:00", b"2010-12-25T00:00:00.000000-00:00"]
)
def test_datetime_both_zero_offsets_decode_to_utc(data: bytes) -> None:
    back = amp.DateTime().from_bytes(data)
    assert back == dt.datetime(2010, 12, 25, tzinfo=dt.UTC)
    assert back.utcoffset() == dt.timedelta(0)
    assert back.tzinfo == dt.UTC
    # And it is written back Twisted's way.
    assert amp.DateTime().to_bytes(back) == b"2010-12-25T00:00:00.000000-00:00"


class _IndiaTime(dt.tzinfo):
    """A tzinfo that is not a datetime.timezone."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=5, minutes=30)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, when: dt.datetime | None) -> str:
        return "IST"


def test_datetime_with_any_tzinfo_comes_back_with_its_fixed_offset() -> None:
    value = dt.datetime(2020, 6, 1, 12, 0, tzinfo=_IndiaTime())
    data = amp.DateTime().to_bytes(value)
    assert data == b"2020-06-01T12:00:00.000000+05:30"
    back = amp.DateTime().from_bytes(data)
    assert back == value
    assert back.tzinfo == tz(330)


def test_naive_datetime_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="naive"):
        amp.DateTime().to_bytes(dt.datetime(2010, 12, 25))

    class Stamp(amp.Command):
        arguments = [("when", amp.DateTime())]

    with pytest.raises(ValueError, match="naive") as info:
        Stamp._encode_ask({"when": dt.datetime(2010, 12, 25)})
    assert "when" in str(info.value)


@pytest.mark.parametrize(
    "offset",
    [
        dt.timedelta(seconds=90),
        dt.timedelta(seconds=-90),
        dt.timedelta(minutes=5, seconds=1),
        dt.timedelta(hours=-3, seconds=-59),
        dt.timedelta(microseconds=1),
    ],
)
def test_datetime_offset_with_seconds_is_refused_unlike_twisted(offset: dt.timedelta) -> None:
    # Twisted floors the offset to whole minutes (+90 s -> "+00:01", -90 s -> "-00:02").
    value = dt.datetime(2010, 1, 1, tzinfo=dt.timezone(offset))
    with pytest.raises(ValueError, match="offset"):
        amp.DateTime().to_bytes(value)


@pytest.mark.parametrize(
    "value", [dt.date(2010, 1, 1), "2010-12-25T00:00:00.000000-00:00", 0, None]
)
def test_datetime_refuses_other_values_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="datetime"):
        amp.DateTime().to_bytes(value)


MALFORMED_DATETIMES = [
    b"",
    b"2010-12-25T00:00:00.00000-00:00",  # 31 characters
    b"2010-12-25T00:00:00.0000000-00:00",  # 33 characters
    b"2010-12-25T00:00:00.000000-00:00\n",
    b"2010-12-25T00:00:00.000000-00:0",
    b"2010-12-25T00:00:00.000000+24:00",  # a day or more
    b"2010-12-25T00:00:00.000000-24:00",
    b"2010-12-25T00:00:00.000000+99:00",
    b"2010-12-25T00:00:00.000000+01:60",  # minutes >= 60 (Twisted: +02:00)
    b"2010-12-25T00:00:00.000000-00:99",
    b"2010-12-25T00:00:00.000000*01:00",  # bad sign
    b"2010-12-25T00:00:00.000000 01:00",
    b"2010-12-25T00:00:00.000000001:00",
    b"2010-13-25T00:00:00.000000-00:00",  # no month 13
    b"2010-02-30T00:00:00.000000-00:00",
    b"0000-01-01T00:00:00.000000-00:00",
    b"2010-12-25T24:00:00.000000-00:00",
    b"2010-12-25T00:00:00.000000-0\xd9\xa1:0",  # an Arabic-Indic digit
    b"\xff" * 32,
]

# Bytes that Twisted's lenient parser turns into a datetime: int() strips spaces and takes
# a sign, and the separators are never looked at.
LENIENT_DATETIMES = [
    b"2010-12-25T00:00:00.000000+ 1:00",
    b"2010- 1-25T00:00:00.000000+01:00",
    b"2010-12-25 00:00:00.000000+01:00",
    b"2010/12/25T00:00:00.000000+01:00",
    b"+010-12-25T00:00:00.000000+01:00",
    b"2010-12-25T00:00:00.-00000+01:00",
    b"2010-12-25T00:00:00.000000+01:60",
]


@pytest.mark.parametrize("data", MALFORMED_DATETIMES)
def test_datetime_malformed_bytes_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        amp.DateTime().from_bytes(data)


@pytest.mark.parametrize("data", LENIENT_DATETIMES)
def test_datetime_lenient_forms_are_refused_unlike_twisted(data: bytes) -> None:
    assert len(data) == 32
    with pytest.raises(ValueError):
        amp.DateTime().from_bytes(data)


OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(tz)
DATETIMES = st.datetimes(timezones=OFFSETS)
_DATETIME_SHAPE = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d")


@SETTINGS
@given(value=DATETIMES)
def test_datetime_round_trip(value: dt.datetime) -> None:
    data = amp.DateTime().to_bytes(value)
    assert len(data) == 32
    assert _DATETIME_SHAPE.fullmatch(data)
    offset = value.utcoffset()
    assert offset is not None
    assert data[26:27] == (b"+" if offset > dt.timedelta(0) else b"-")
    back = amp.DateTime().from_bytes(data)
    assert back == value
    assert back.replace(tzinfo=None) == value.replace(tzinfo=None)
    assert back.tzinfo == value.tzinfo


_TRICKY = b"0123456789 +-_:.Tx\x00"


@SETTINGS
@given(
    value=DATETIMES,
    edits=st.lists(st.tuples(st.integers(0, 31), st.sampled_from(list(_TRICKY))), max_size=3),
)
def test_datetime_bytes_decode_exactly_or_not_at_all(
    value: dt.datetime, edits: list[tuple[int, int]]
) -> None:
    # Whatever the bytes, either they are an exact encoding or they are a ValueError:
    # never a silently different value.
    data = bytearray(amp.DateTime().to_bytes(value))
    for position, byte in edits:
        data[position] = byte
    try:
        back = amp.DateTime().from_bytes(bytes(data))
    except ValueError:
        return
    expected = bytes(data).replace(b"+00:00", b"-00:00")
    assert amp.DateTime().to_bytes(back) == expected


# Path


@pytest.mark.parametrize(
    ("value", "data"),
    [
        (pathlib.Path("/tmp/xé"), b"/tmp/x\xc3\xa9"),
        (pathlib.Path("/"), b"/"),
        (pathlib.Path("relative/dir"), b"relative/dir"),
        (pathlib.Path("/a b/\U0001f40d"), b"/a b/\xf0\x9f\x90\x8d"),
    ],
)
def test_path_exact_bytes_and_back(value: pathlib.Path, data: bytes) -> None:
    assert amp.Path().to_bytes(value) == data
    back = amp.Path().from_bytes(data)
    assert isinstance(back, pathlib.Path)
    assert back == value


@pytest.mark.parametrize("value", [b"/tmp/x", 3, None, ["/tmp"]])
def test_path_refuses_other_values_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        amp.Path().to_bytes(value)


def test_path_that_is_not_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        amp.Path().from_bytes(b"/tmp/\xff")
    # A surrogate-escaped name (undecodable bytes from the file system) cannot be UTF-8.
    with pytest.raises(ValueError):
        amp.Path().to_bytes(pathlib.Path("/tmp/\udcff"))


PATH_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)


@SETTINGS
@given(text=PATH_TEXT)
def test_path_round_trip(text: str) -> None:
    value = pathlib.Path(text)
    data = amp.Path().to_bytes(value)
    assert data == str(value).encode("utf-8")
    assert amp.Path().from_bytes(data) == value


# ListOf

LIST_CASES: list[tuple[amp.Argument[Any], list[Any], bytes]] = [
    (amp.Integer(), [1, 22, 333], b"\x00\x011\x00\x0222\x00\x03333"),
    (amp.Integer(), [], b""),
    (amp.Integer(), [0, -5, 2**70], b"\x00\x010\x00\x02-5\x00\x161180591620717411303424"),
    (amp.Float(), [0.1, math.inf, -0.0], b"\x00\x030.1\x00\x03inf\x00\x04-0.0"),
    (amp.Boolean(), [True, False], b"\x00\x04True\x00\x05False"),
    (amp.String(), ["é", ""], b"\x00\x02\xc3\xa9\x00\x00"),
    (amp.Bytes(), [b"\x00\xff", b""], b"\x00\x02\x00\xff\x00\x00"),
    (amp.Decimal(), [D("1.10"), D("-sNaN"), D("-0")], b"\x00\x041.10\x00\x05-sNaN\x00\x02-0"),
    (
        amp.DateTime(),
        [dt.datetime(2010, 12, 25, tzinfo=dt.UTC), dt.datetime(5, 1, 1, tzinfo=tz(330))],
        b"\x00\x202010-12-25T00:00:00.000000-00:00\x00\x200005-01-01T00:00:00.000000+05:30",
    ),
    (
        amp.Path(),
        [pathlib.Path("/a"), pathlib.Path("/b/é")],
        b"\x00\x02/a\x00\x05/b/\xc3\xa9",
    ),
    (amp.ListOf(amp.Integer()), [[1], []], b"\x00\x03\x00\x011\x00\x00"),
]


@pytest.mark.parametrize(
    ("element", "value", "data"),
    LIST_CASES,
    ids=[f"{c[0]!r}-{i}" for i, c in enumerate(LIST_CASES)],
)
def test_listof_exact_bytes_and_back(
    element: amp.Argument[Any], value: list[Any], data: bytes
) -> None:
    argument = amp.ListOf(element)
    assert argument.to_bytes(value) == data
    back = argument.from_bytes(data)
    assert canon(back) == canon(value)


def test_listof_takes_any_iterable_but_not_text_bytes_or_dicts() -> None:
    argument = amp.ListOf(amp.Integer())
    assert argument.to_bytes((1, 2)) == b"\x00\x011\x00\x012"
    assert argument.to_bytes(n for n in [7]) == b"\x00\x017"
    for value in ["12", b"12", {1: 2}, 12, None]:
        with pytest.raises(TypeError):
            argument.to_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\x00\x02ab\x00\x05xy", "element 1 needs 5 bytes"),  # Twisted: [b'ab']
        (b"\x00\x02ab\x00", "stray byte"),
        (b"\x00", "stray byte"),
        (b"\x00\x05ab", "element 0 needs 5 bytes"),
    ],
)
def test_listof_trailing_partial_element_is_a_value_error_unlike_twisted(
    data: bytes, what: str
) -> None:
    with pytest.raises(ValueError, match=what):
        amp.ListOf(amp.Bytes()).from_bytes(data)


@pytest.mark.parametrize(
    ("element", "data"),
    [
        (amp.Integer(), b"\x00\x01x"),
        (amp.Boolean(), b"\x00\x03yes"),
        (amp.Decimal(), b"\x00\x03one"),
        (amp.DateTime(), b"\x00\x05today"),
        (amp.String(), b"\x00\x01\xff"),
    ],
)
def test_listof_bad_element_is_a_value_error(element: amp.Argument[Any], data: bytes) -> None:
    with pytest.raises(ValueError):
        amp.ListOf(element).from_bytes(data)


def test_listof_refuses_none_elements() -> None:
    with pytest.raises(TypeError, match="element 1 is None"):
        amp.ListOf(amp.Integer()).to_bytes([1, None, 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        amp.ListOf(amp.String(optional=True)).to_bytes([None])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "element",
    [amp.BigBytes(), amp.BigString(), amp.BigBytes(optional=True), amp.Integer, int, None],
)
def test_listof_needs_a_single_value_argument_instance(element: Any) -> None:
    with pytest.raises(TypeError, match="ListOf"):
        amp.ListOf(element)


def test_listof_element_and_list_over_the_value_limit_are_too_long() -> None:
    with pytest.raises(amp.TooLongError):
        amp.ListOf(amp.Bytes()).to_bytes([b"x" * 65_536])

    class Blobs(amp.Command):
        arguments = [("blobs", amp.ListOf(amp.Bytes()))]

    # 2 x (2 + 32_766) = 65_536 bytes: one too many for one value.
    with pytest.raises(amp.TooLongError):
        Blobs._encode_ask({"blobs": [b"x" * 32_766, b"y" * 32_766]})
    just_fits = [b"x" * 32_766, b"y" * 32_765]
    box = only_box(ask_bytes(Blobs, blobs=just_fits))
    assert len(box[b"blobs"]) == CHUNK
    assert Blobs._decode_arguments(box) == {"blobs": just_fits}


def test_listof_repr() -> None:
    assert repr(amp.ListOf(amp.Integer())) == "ListOf(Integer())"
    assert (
        repr(amp.ListOf(amp.String(optional=True), optional=True))
        == "ListOf(String(optional=True), optional=True)"
    )
    assert repr(amp.ListOf(amp.ListOf(amp.Decimal()))) == "ListOf(ListOf(Decimal()))"


SCALARS: dict[str, tuple[amp.Argument[Any], st.SearchStrategy[Any]]] = {
    "Integer": (amp.Integer(), st.integers(-(2**80), 2**80)),
    "Float": (amp.Float(), st.floats()),
    "Boolean": (amp.Boolean(), st.booleans()),
    "String": (amp.String(), st.text(max_size=30)),
    "Bytes": (amp.Bytes(), st.binary(max_size=30)),
    "Decimal": (amp.Decimal(), DECIMALS),
    "DateTime": (amp.DateTime(), DATETIMES),
    "Path": (amp.Path(), PATH_TEXT.map(pathlib.Path)),
}


@pytest.mark.parametrize("kind", list(SCALARS))
@SETTINGS
@given(data=st.data())
def test_listof_round_trip_of_each_scalar(kind: str, data: st.DataObject) -> None:
    element, values = SCALARS[kind]
    value = data.draw(st.lists(values, max_size=12))
    argument = amp.ListOf(element)
    encoded = argument.to_bytes(value)
    # Exactly a 2-byte length and the element's bytes, for each element.
    assert encoded == b"".join(prefixed(element.to_bytes(v)) for v in value)
    back = argument.from_bytes(encoded)
    assert canon(back) == canon(value)


@SETTINGS
@given(data=st.binary(max_size=40))
def test_listof_bytes_decode_exactly_or_not_at_all(data: bytes) -> None:
    argument = amp.ListOf(amp.Bytes())
    try:
        value = argument.from_bytes(data)
    except ValueError:
        return
    assert argument.to_bytes(value) == data


# AmpList

ROWS = amp.AmpList([(b"a", amp.Integer()), (b"b", amp.String(optional=True))])


def test_amplist_exact_bytes_and_back() -> None:
    value = [{"a": 7, "b": "hi"}, {"a": 9}]
    data = b"\x00\x01a\x00\x017\x00\x01b\x00\x02hi\x00\x00\x00\x01a\x00\x019\x00\x00"
    assert ROWS.to_bytes(value) == data
    assert ROWS.from_bytes(data) == [{"a": 7, "b": "hi"}, {"a": 9, "b": None}]
    assert ROWS.to_bytes([]) == b""
    assert ROWS.from_bytes(b"") == []


def test_amplist_element_with_every_field_absent_is_a_bare_box_end() -> None:
    argument = amp.AmpList([("b", amp.String(optional=True)), ("c", amp.Integer(optional=True))])
    assert argument.to_bytes([{}]) == b"\x00\x00"
    assert argument.to_bytes([{"b": None, "c": None}]) == b"\x00\x00"
    assert argument.to_bytes([{}, {"c": 1}, {}]) == b"\x00\x00\x00\x01c\x00\x011\x00\x00\x00\x00"
    assert argument.from_bytes(b"\x00\x00") == [{"b": None, "c": None}]
    assert argument.from_bytes(b"\x00\x00\x00\x00") == [{"b": None, "c": None}] * 2


def test_amplist_writes_sorted_keys_whatever_the_declaration_order() -> None:
    argument = amp.AmpList([("z", amp.Integer()), ("a", amp.Integer()), ("m-n", amp.Bytes())])
    data = argument.to_bytes([{"z": 1, "a": 2, "m_n": b"x"}])
    assert data == b"\x00\x01a\x00\x012\x00\x03m-n\x00\x01x\x00\x01z\x00\x011\x00\x00"
    assert argument.from_bytes(data) == [{"a": 2, "m_n": b"x", "z": 1}]
    # Reading does not depend on the order of the keys.
    shuffled = b"\x00\x01z\x00\x011\x00\x03m-n\x00\x01x\x00\x01a\x00\x012\x00\x00"
    assert argument.from_bytes(shuffled) == [{"a": 2, "m_n": b"x", "z": 1}]


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ([{"a": 1, "c": 2}], "not fields"),
        ([{"a": 1, "A": 2}], "not fields"),
        ([{"b": "x"}], "'a' is missing"),
        ([{"a": None}], "'a' is missing"),
        ([{"a": 1}, 5], "element 1"),
        ([{"a": "1"}], "int"),
    ],
)
def test_amplist_refuses_unknown_keys_missing_fields_and_bad_values(
    value: list[Any], what: str
) -> None:
    with pytest.raises(TypeError, match=what):
        ROWS.to_bytes(value)


@pytest.mark.parametrize("value", [{"a": 1}, "ab", b"ab", 3, None])
def test_amplist_needs_a_list(value: Any) -> None:
    with pytest.raises(TypeError):
        ROWS.to_bytes(value)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x01b\x00\x01x\x00\x00",  # required "a" missing
        b"\x00\x01a\x00\x01x\x00\x00",  # "a" is not an int
        b"\x00",
        b"\x00\x01a",
        b"\x00\x01a\x00\x05xy",
    ],
)
def test_amplist_malformed_bytes_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        ROWS.from_bytes(data)


@pytest.mark.parametrize(
    "data", [b"\x00\x01a\x00\x011\x00\x00\x00\x01a\x00\x012", b"\x00\x01a\x00\x011"]
)
def test_amplist_unterminated_last_box_is_a_value_error_unlike_twisted(data: bytes) -> None:
    # Twisted silently drops a last box that has no end.
    with pytest.raises(ValueError, match="no end"):
        ROWS.from_bytes(data)


def test_nested_amplist() -> None:
    argument = amp.AmpList(
        [("inner", amp.AmpList([("x", amp.Integer())])), ("k", amp.String(optional=True))]
    )
    value = [{"inner": [{"x": 1}, {"x": 2}], "k": "z"}, {"inner": []}]
    inner = b"\x00\x01x\x00\x011\x00\x00\x00\x01x\x00\x012\x00\x00"
    data = kv(b"inner", inner) + kv(b"k", b"z") + b"\x00\x00" + kv(b"inner", b"") + b"\x00\x00"
    assert argument.to_bytes(value) == data
    assert argument.from_bytes(data) == [
        {"inner": [{"x": 1}, {"x": 2}], "k": "z"},
        {"inner": [], "k": None},
    ]


def test_amplist_fields_of_every_type() -> None:
    argument = amp.AmpList(
        [
            ("d", amp.Decimal()),
            ("t", amp.DateTime()),
            ("p", amp.Path()),
            ("l", amp.ListOf(amp.Decimal())),
            ("f", amp.Float(optional=True)),
            ("o", amp.Boolean(optional=True)),
        ]
    )
    value = [
        {
            "d": D("-sNaN"),
            "t": dt.datetime(5, 1, 1, tzinfo=tz(-1)),
            "p": pathlib.Path("/é"),
            "l": [D("1E+2")],
            "f": math.nan,
            "o": False,
        }
    ]
    data = argument.to_bytes(value)
    (box,) = parse_nested_boxes(data)
    assert list(box) == [b"d", b"f", b"l", b"o", b"p", b"t"]
    assert box[b"t"] == b"0005-01-01T00:00:00.000000-00:01"
    assert canon(argument.from_bytes(data)) == canon(value)


def test_amplist_repr() -> None:
    assert repr(ROWS) == "AmpList([(b'a', Integer()), (b'b', String(optional=True))])"
    assert repr(amp.AmpList([("x", amp.ListOf(amp.Bytes()))], optional=True)) == (
        "AmpList([(b'x', ListOf(Bytes()))], optional=True)"
    )


ROW_FIELDS: list[tuple[str, amp.Argument[Any], st.SearchStrategy[Any]]] = [
    ("i", amp.Integer(), st.integers()),
    ("s", amp.String(optional=True), st.text(max_size=10)),
    ("d", amp.Decimal(optional=True), DECIMALS),
    ("t", amp.DateTime(optional=True), DATETIMES),
    ("l", amp.ListOf(amp.Bytes(), optional=True), st.lists(st.binary(max_size=5), max_size=4)),
]
RANDOM_ROWS = amp.AmpList([(name, argument) for name, argument, _ in ROW_FIELDS])


@st.composite
def row(draw: st.DrawFn) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, argument, values in ROW_FIELDS:
        choice = draw(
            st.sampled_from(["value", "none", "absent"]) if argument.optional else st.just("value")
        )
        if choice == "value":
            result[name] = draw(values)
        elif choice == "none":
            result[name] = None
    return result


@SETTINGS
@given(value=st.lists(row(), max_size=5))
def test_amplist_round_trip(value: list[dict[str, Any]]) -> None:
    data = RANDOM_ROWS.to_bytes(value)
    boxes = parse_nested_boxes(data)
    assert len(boxes) == len(value)
    for box, element in zip(boxes, value, strict=True):
        assert list(box) == sorted(box)
        assert set(box) == {k.encode() for k, v in element.items() if v is not None}
    back = RANDOM_ROWS.from_bytes(data)
    full = [{name: element.get(name) for name, _, _ in ROW_FIELDS} for element in value]
    assert canon(back) == canon(full)


# BigBytes and BigString

CHUNK_CASES = [
    (0, [0]),
    (1, [1]),
    (CHUNK - 1, [CHUNK - 1]),
    (CHUNK, [CHUNK]),
    (CHUNK + 1, [CHUNK, 1]),
    (2 * CHUNK, [CHUNK, CHUNK]),
    (2 * CHUNK + 1, [CHUNK, CHUNK, 1]),
]


def chunk_keys(name: bytes, count: int) -> list[bytes]:
    return [name] + [name + b".%d" % n for n in range(2, count + 1)]


def patterned(size: int) -> bytes:
    """Bytes whose every 65,535-byte chunk differs, so a misplaced chunk shows."""
    return bytes((i * 7 + i // CHUNK) % 251 for i in range(size))


@pytest.mark.parametrize(("size", "lengths"), CHUNK_CASES)
def test_bigbytes_chunks(size: int, lengths: list[int]) -> None:
    value = patterned(size)
    box: dict[bytes, bytes] = {}
    amp.BigBytes().to_box(b"name", value, box)
    keys = chunk_keys(b"name", len(lengths))
    assert sorted(box) == sorted(keys)
    assert [len(box[k]) for k in keys] == lengths
    assert b"".join(bytes(box[k]) for k in keys) == value
    back = amp.BigBytes().from_box(b"name", box)
    assert type(back) is bytes
    assert back == value


@pytest.mark.parametrize(("size", "lengths"), CHUNK_CASES)
def test_bigstring_chunks(size: int, lengths: list[int]) -> None:
    value = "x" * size
    box: dict[bytes, bytes] = {}
    amp.BigString().to_box(b"t", value, box)
    keys = chunk_keys(b"t", len(lengths))
    assert sorted(box) == sorted(keys)
    assert [len(box[k]) for k in keys] == lengths
    assert amp.BigString().from_box(b"t", box) == value


def test_big_empty_value_is_one_empty_key() -> None:
    for argument, empty in ((amp.BigBytes(), b""), (amp.BigString(), "")):
        box: dict[bytes, bytes] = {}
        argument.to_box(b"v", empty, box)  # type: ignore[attr-defined]
        assert box == {b"v": b""}
        assert argument.from_box(b"v", box) == empty


@pytest.mark.parametrize(
    ("prefix", "char", "split"),
    [
        (CHUNK - 1, "é", 1),
        (CHUNK - 1, "\U0001f40d", 1),
        (CHUNK - 2, "\U0001f40d", 2),
        (CHUNK - 3, "\U0001f40d", 3),
        (CHUNK - 2, "€", 2),
    ],
)
def test_bigstring_character_straddling_two_chunks_comes_back_whole(
    prefix: int, char: str, split: int
) -> None:
    value = "a" * prefix + char + "b"
    encoded_char = char.encode("utf-8")
    box: dict[bytes, bytes] = {}
    amp.BigString().to_box(b"t", value, box)
    assert sorted(box) == [b"t", b"t.2"]
    first, second = bytes(box[b"t"]), bytes(box[b"t.2"])
    assert len(first) == CHUNK
    assert first.endswith(encoded_char[:split])
    assert second == encoded_char[split:] + b"b"
    with pytest.raises(UnicodeDecodeError):
        first.decode("utf-8")
    assert amp.BigString().from_box(b"t", box) == value


def test_big_decoding_does_not_depend_on_key_order() -> None:
    value = patterned(5 * CHUNK + 3)
    box: dict[bytes, bytes] = {}
    amp.BigBytes().to_box(b"k", value, box)
    items = [(key, bytes(chunk)) for key, chunk in box.items()]
    for order in (items, items[::-1], random.Random(4).sample(items, len(items))):
        assert amp.BigBytes().from_box(b"k", dict(order)) == value
    assert amp.BigBytes().from_box(b"other", box) is None


class BigCall(amp.Command):
    arguments = [
        ("data", amp.BigBytes()),
        ("data-x", amp.Integer()),
        ("text", amp.BigString(optional=True)),
    ]
    response = [("data", amp.BigBytes()), ("text", amp.BigString(optional=True))]


def test_big_command_box_exact_bytes_small_case() -> None:
    value = b"a" * CHUNK + b"z"
    # Keys in sorted byte order: "data", "data-x" ('-' < '.'), "data.2".
    expected = (
        kv(b"_ask", b"1")
        + kv(b"_command", b"BigCall")
        + kv(b"data", b"a" * CHUNK)
        + kv(b"data-x", b"5")
        + kv(b"data.2", b"z")
        + b"\x00\x00"
    )
    assert ask_bytes(BigCall, data=value, data_x=5) == expected
    assert BigCall._decode_arguments(only_box(expected)) == {
        "data": value,
        "data_x": 5,
        "text": None,
    }
    small = ask_bytes(BigCall, tag=b"a", data=b"", data_x=0, text="é")
    assert small == (
        kv(b"_ask", b"a")
        + kv(b"_command", b"BigCall")
        + kv(b"data", b"")
        + kv(b"data-x", b"0")
        + kv(b"text", b"\xc3\xa9")
        + b"\x00\x00"
    )


def test_big_command_box_sorts_chunk_10_before_chunk_2() -> None:
    chunks = [bytes([n]) * CHUNK for n in range(1, 11)] + [b"\xee"]
    value = b"".join(chunks)
    keys = chunk_keys(b"data", 11)
    assert keys[9:] == [b"data.10", b"data.11"]
    # "data-x" comes between "data" and "data.10" ('-' < '.'), and "data.10" before "data.2".
    order = [b"data.10", b"data.11"] + [b"data.%d" % n for n in range(2, 10)]
    expected = (
        kv(b"_ask", b"1")
        + kv(b"_command", b"BigCall")
        + kv(b"data", chunks[0])
        + kv(b"data-x", b"1")
        + b"".join(kv(key, chunks[keys.index(key)]) for key in order)
        + b"\x00\x00"
    )
    wire = ask_bytes(BigCall, data=value, data_x=1)
    assert wire == expected
    assert BigCall._decode_arguments(only_box(wire))["data"] == value


def test_big_command_decodes_keys_in_any_order() -> None:
    value = patterned(3 * CHUNK + 10)
    box = only_box(ask_bytes(BigCall, data=value, data_x=2, text="é" * 40_000))
    # Write the same box with its keys reversed, and decode it as it arrives.
    reversed_wire = b"".join(kv(key, box[key]) for key in reversed(list(box))) + b"\x00\x00"
    decoder = BoxDecoder()
    boxes = []
    for start in range(0, len(reversed_wire), 1000):
        boxes += decoder.receive_data(reversed_wire[start : start + 1000])
    (received,) = boxes
    assert next(iter(received)) == b"text.2"
    assert BigCall._decode_arguments(received) == {
        "data": value,
        "data_x": 2,
        "text": "é" * 40_000,
    }


def test_big_values_in_the_response() -> None:
    value = patterned(CHUNK + 1)
    data = BigCall._encode_answer(b"7", {"data": value, "text": None})
    assert data == (
        kv(b"_answer", b"7")
        + kv(b"data", value[:CHUNK])
        + kv(b"data.2", value[CHUNK:])
        + b"\x00\x00"
    )
    assert BigCall._decode_response(only_box(data)) == {"data": value, "text": None}
    text = "€" * 30_000  # 90,000 bytes
    data = BigCall._encode_answer(b"8", {"data": b"", "text": text})
    box = only_box(data)
    assert sorted(box) == [b"_answer", b"data", b"text", b"text.2"]
    assert BigCall._decode_response(box) == {"data": b"", "text": text}


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        (amp.BigBytes(), "text"),
        (amp.BigBytes(), 5),
        (amp.BigBytes(), [b"x"]),
        (amp.BigString(), b"bytes"),
        (amp.BigString(), 5),
    ],
)
def test_big_refuses_values_of_the_wrong_type(argument: amp.Argument[Any], value: Any) -> None:
    with pytest.raises(TypeError):
        argument.to_box(b"k", value, {})


def test_big_type_error_in_a_command_names_the_command_and_argument() -> None:
    with pytest.raises(TypeError, match=r"BigCall.*'data'"):
        BigCall._encode_ask({"data": "not bytes", "data_x": 1})


def test_big_types_cannot_be_one_value() -> None:
    with pytest.raises(TypeError, match="several keys"):
        amp.BigBytes().to_bytes(b"x")
    with pytest.raises(TypeError, match="several keys"):
        amp.BigString().to_bytes("x")
    assert amp.BigBytes().multi_key and amp.BigString().multi_key


def test_big_repr() -> None:
    assert repr(amp.BigBytes()) == "BigBytes()"
    assert repr(amp.BigString(optional=True)) == "BigString(optional=True)"


BOUNDARY_SIZES = st.one_of(
    st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK]),
    st.integers(-3, 3)
    .flatmap(lambda d: st.sampled_from([CHUNK + d, 2 * CHUNK + d]))
    .filter(lambda n: n >= 0),
    st.integers(0, 3 * CHUNK + 5),
)


@SETTINGS
@given(size=BOUNDARY_SIZES, seed=st.binary(min_size=1, max_size=8))
def test_bigbytes_round_trip(size: int, seed: bytes) -> None:
    value = (seed * (size // len(seed) + 1))[:size]
    box: dict[bytes, bytes] = {}
    amp.BigBytes().to_box(b"data", value, box)
    count = max(1, -(-size // CHUNK))
    assert sorted(box) == sorted(chunk_keys(b"data", count))
    assert all(len(chunk) <= CHUNK for chunk in box.values())
    assert amp.BigBytes().from_box(b"data", box) == value
    wire = ask_bytes(BigCall, data=value, data_x=size)
    assert BigCall._decode_arguments(only_box(wire)) == {
        "data": value,
        "data_x": size,
        "text": None,
    }


@SETTINGS
@given(
    prefix=st.integers(-4, 4).map(lambda d: CHUNK + d) | st.integers(0, 2 * CHUNK + 4),
    char=st.characters(min_codepoint=0x80, blacklist_categories=("Cs",)),
    suffix=st.text(max_size=5),
)
def test_bigstring_round_trip(prefix: int, char: str, suffix: str) -> None:
    value = "a" * prefix + char + suffix
    box: dict[bytes, bytes] = {}
    amp.BigString().to_box(b"text", value, box)
    data = value.encode("utf-8")
    count = max(1, -(-len(data) // CHUNK))
    keys = chunk_keys(b"text", count)
    assert sorted(box) == sorted(keys)
    assert b"".join(bytes(box[k]) for k in keys) == data
    assert amp.BigString().from_box(b"text", box) == value
    wire = ask_bytes(BigCall, data=b"", data_x=0, text=value)
    assert BigCall._decode_arguments(only_box(wire))["text"] == value


# Every type is optional on request, in arguments and in response


def optional_fields() -> list[tuple[str, amp.Argument[Any]]]:
    return [
        ("dec", amp.Decimal(optional=True)),
        ("when", amp.DateTime(optional=True)),
        ("path", amp.Path(optional=True)),
        ("ints", amp.ListOf(amp.Integer(), optional=True)),
        ("rows", amp.AmpList([("a", amp.Integer())], optional=True)),
        ("blob", amp.BigBytes(optional=True)),
        ("text", amp.BigString(optional=True)),
    ]


class Optionals(amp.Command):
    arguments = optional_fields()
    response = optional_fields()


OPTIONAL_VALUES: dict[str, Any] = {
    "dec": D("-0"),
    "when": dt.datetime(2010, 12, 25, tzinfo=dt.UTC),
    "path": pathlib.Path("/p"),
    "ints": [],
    "rows": [],
    "blob": b"",
    "text": "",
}


def test_every_new_type_can_be_optional_in_arguments_and_response() -> None:
    none = dict.fromkeys(OPTIONAL_VALUES)
    empty_ask = kv(b"_ask", b"1") + kv(b"_command", b"Optionals") + b"\x00\x00"
    assert ask_bytes(Optionals) == empty_ask
    assert ask_bytes(Optionals, **none) == empty_ask
    assert Optionals._decode_arguments(only_box(empty_ask)) == none
    empty_answer = kv(b"_answer", b"1") + b"\x00\x00"
    assert Optionals._encode_answer(b"1", {}) == empty_answer
    assert Optionals._decode_response(only_box(empty_answer)) == none

    # Present, even when empty, they are sent.
    box = only_box(ask_bytes(Optionals, **OPTIONAL_VALUES))
    assert {k: v for k, v in box.items() if not k.startswith(b"_")} == {
        b"blob": b"",
        b"dec": b"-0",
        b"ints": b"",
        b"path": b"/p",
        b"rows": b"",
        b"text": b"",
        b"when": b"2010-12-25T00:00:00.000000-00:00",
    }
    assert canon(Optionals._decode_arguments(box)) == canon(OPTIONAL_VALUES)
    answer = only_box(Optionals._encode_answer(b"2", OPTIONAL_VALUES))
    assert canon(Optionals._decode_response(answer)) == canon(OPTIONAL_VALUES)


# Every type over 127.0.0.1


def all_fields() -> list[tuple[str, amp.Argument[Any]]]:
    return [
        ("dec", amp.Decimal()),
        ("when", amp.DateTime()),
        ("path", amp.Path()),
        ("ints", amp.ListOf(amp.Integer())),
        ("floats", amp.ListOf(amp.Float())),
        ("flags", amp.ListOf(amp.Boolean())),
        ("texts", amp.ListOf(amp.String())),
        ("blobs", amp.ListOf(amp.Bytes())),
        ("decs", amp.ListOf(amp.Decimal())),
        ("times", amp.ListOf(amp.DateTime())),
        ("paths", amp.ListOf(amp.Path())),
        ("rows", amp.AmpList([("a", amp.Integer()), ("b", amp.String(optional=True))])),
        ("big", amp.BigBytes()),
        ("text", amp.BigString()),
        ("maybe_dec", amp.Decimal(optional=True)),
        ("maybe_rows", amp.AmpList([("x", amp.Bytes())], optional=True)),
        ("maybe_big", amp.BigBytes(optional=True)),
    ]


class EveryType(amp.Command):
    arguments = all_fields()
    response = all_fields()


class EveryTypeServer(amp.AMPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []

    @EveryType.responder
    async def every_type(self, **values: Any) -> dict[str, Any]:
        self.received.append(values)
        await asyncio.sleep(0)
        return values


TEN_MB = 10_000_000
# "é" straddles the first chunk boundary (1 + 1 bytes), the snake the second (2 + 2).
STRADDLING_TEXT = "a" * (CHUNK - 1) + "é" + "b" * (CHUNK - 3) + "\U0001f40d" + "c"


def every_type_values(big: bytes, text: str) -> dict[str, Any]:
    return {
        "dec": D("-sNaN"),
        "when": dt.datetime(9876, 1, 23, 12, 34, 56, 54321, tz(-83)),
        "path": pathlib.Path("/tmp/xé"),
        "ints": [1, 22, 333, -(2**70)],
        "floats": [0.1, math.inf, -0.0],
        "flags": [True, False],
        "texts": ["é", "", "\U0001f40d"],
        "blobs": [b"\x00\xff", b""],
        "decs": [D("1.10"), D("-0"), D("1E+2"), D("NaN")],
        "times": [dt.datetime(2010, 12, 25, tzinfo=dt.UTC), dt.datetime(5, 1, 1, tzinfo=tz(330))],
        "paths": [pathlib.Path("/a"), pathlib.Path("/b/é")],
        "rows": [{"a": 7, "b": "hi"}, {"a": 9, "b": None}],
        "big": big,
        "text": text,
        "maybe_dec": None,
        "maybe_rows": [{"x": b""}],
        "maybe_big": None,
    }


async def test_every_type_over_tcp_with_10_mb_bigbytes_and_straddling_bigstring() -> None:
    big = (patterned(CHUNK) * (TEN_MB // CHUNK + 1))[: TEN_MB - 3] + b"end"
    assert len(big) == TEN_MB
    chunks: dict[bytes, bytes] = {}
    amp.BigString().to_box(b"text", STRADDLING_TEXT, chunks)
    assert sorted(chunks) == [b"text", b"text.2", b"text.3"]
    assert bytes(chunks[b"text"]).endswith(b"\xc3")
    assert bytes(chunks[b"text.2"]).startswith(b"\xa9")
    assert bytes(chunks[b"text.2"]).endswith(b"\xf0\x9f")
    values = every_type_values(big, STRADDLING_TEXT)
    async with running_server(EveryTypeServer) as (_, port, protocols), client(port) as proto:
        async with asyncio.timeout(LONG):
            answer = await proto.call_remote(EveryType, **values)
        assert answer["big"] == big
        assert answer["text"] == STRADDLING_TEXT
        assert canon(answer) == canon(values)
        (server,) = protocols
        assert isinstance(server, EveryTypeServer)
        (received,) = server.received
        assert canon(received) == canon(values)
        assert type(received["path"]) is type(pathlib.Path())
        assert received["when"].utcoffset() == dt.timedelta(minutes=-83)

        # The optional ones, present; small big values.
        small = every_type_values(b"", "")
        small.update(maybe_dec=D("0E-8"), maybe_rows=[], maybe_big=b"\x00")
        async with asyncio.timeout(LONG):
            answer = await proto.call_remote(EveryType, **small)
        assert canon(answer) == canon(small)


async def test_bad_values_are_refused_before_sending_and_the_connection_stays_usable() -> None:
    good = every_type_values(b"x", "y")
    async with running_server(EveryTypeServer) as (_, port, protocols), client(port) as proto:
        for name, bad, error in [
            ("when", dt.datetime(2010, 12, 25), ValueError),
            (
                "when",
                dt.datetime(2010, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=90))),
                ValueError,
            ),
            ("dec", 1.5, TypeError),
            ("ints", [1, None], TypeError),
            ("rows", [{"a": 1, "zz": 2}], TypeError),
            ("big", "text", TypeError),
        ]:
            with pytest.raises(error, match=name):
                proto.call_remote(EveryType, **{**good, name: bad})
        async with asyncio.timeout(LONG):
            answer = await proto.call_remote(EveryType, **good)
        assert canon(answer) == canon(good)
        (server,) = protocols
        assert isinstance(server, EveryTypeServer)
        assert len(server.received) == 1


# A call that waits in the queue sends its values as they were when it was made


class Hold(amp.Command):
    """Keeps the only place for a pending call until the test lets it go."""


class Store(amp.Command):
    arguments = [("data", amp.BigBytes()), ("small", amp.Bytes())]


class HoldingServer(amp.AMPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.stored: list[tuple[bytes, bytes]] = []

    @Hold.responder
    async def hold(self) -> dict[str, Any]:
        await self.release.wait()
        return {}

    @Store.responder
    def store(self, data: bytes, small: bytes) -> dict[str, Any]:
        self.stored.append((data, small))
        return {}


async def test_a_queued_call_sends_its_mutable_values_as_they_were_when_called() -> None:
    data = bytearray(patterned(CHUNK) * 3)  # three chunks of BigBytes
    small = bytearray(b"small")
    original = bytes(data), bytes(small)
    async with running_server(HoldingServer) as (_, port, protocols):
        async with asyncio.timeout(LONG):
            proto = await amp.connect("127.0.0.1", port, max_pending_calls=1)
        async with proto:
            held = proto.call_remote(Hold)
            queued = proto.call_remote(Store, data=data, small=small)
            # The Store call waits behind Hold: its caller is free to reuse the buffers.
            data[0] ^= 0xFF
            data.extend(b"more")
            small[:] = b"other"
            (server,) = protocols
            assert isinstance(server, HoldingServer)
            server.release.set()
            async with asyncio.timeout(LONG):
                await held
                await queued
            assert server.stored == [original]


# Memory for one 10 MB BigBytes


class Upload(amp.Command):
    arguments = [("blob", amp.BigBytes())]


def _peak_of(step: Any) -> tuple[int, Any]:
    """Run ``step`` and return the peak of the memory it allocated (over what existed) and its result."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = step()
    return tracemalloc.get_traced_memory()[1] - before, result


def test_memory_of_a_10_mb_bigbytes_stays_under_three_times_its_size() -> None:
    value = b"\x5a" * TEN_MB

    def encode() -> bytes:
        parts, slot = Upload._encode_ask({"blob": value})
        parts[slot] = b"\x00\x011"
        return b"".join(parts)

    def decode(wire: bytes) -> dict[str, Any]:
        decoder = BoxDecoder()
        boxes: list[amp.Box] = []
        step = 64 * 1024
        for start in range(0, len(wire), step):
            boxes += decoder.receive_data(wire[start : start + step])
        (box,) = boxes
        return Upload._decode_arguments(box)

    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        encode_peak, wire = _peak_of(encode)
        decode_peak, decoded = _peak_of(lambda: decode(wire))
    finally:
        if not started:
            tracemalloc.stop()
    assert len(wire) > TEN_MB
    assert decoded == {"blob": value}
    figures = f"encode peak {encode_peak:,} B, decode peak {decode_peak:,} B for {TEN_MB:,} B"
    assert encode_peak < 3 * TEN_MB, figures
    assert decode_peak < 3 * TEN_MB, figures
