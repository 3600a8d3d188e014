"""
The optional compiled accelerator (_speedups.c): the same boxes, events and errors as the
pure-Python codec, chosen at import time, and importing nothing.

The differential checks load the compiled module directly, so they also run when
ASYNCIO_AMP_NO_EXTENSIONS=1 keeps the package on the pure-Python codec.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncio_amp
from asyncio_amp import Boolean, Bytes, Command, Float, Integer, String, _commands, _wire
from asyncio_amp._wire import BoxDecoder, encode_box, parse_boxes
from fuzz_speedups import (
    _MISSING,
    _TAGS,
    _VALUES,
    Encoded,
    _Dict,
    both_encoders,
    check_one,
    copy,
    encode_outcome,
    load_accelerator,
    random_input,
)
from helpers import LONG

ACCEL: Any = load_accelerator()
needs_build = pytest.mark.skipif(ACCEL is None, reason="the C extension was not built here")
C_SOURCE = pathlib.Path(_wire.__file__).with_name("_speedups.c")


def accelerated_in_child(**env: str) -> str:
    """asyncio_amp.ACCELERATED and the codec's functions, in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != "ASYNCIO_AMP_NO_EXTENSIONS"}
    code = (
        "import asyncio_amp, asyncio_amp._wire as w;"
        "print(asyncio_amp.ACCELERATED, type(w.encode_box).__name__,"
        " type(w.parse_boxes).__name__, w._scan_boxes is not None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=LONG,
        check=True,
    )
    return result.stdout.strip()


def test_accelerated_says_which_codec_is_in_use() -> None:
    assert asyncio_amp.ACCELERATED is _wire.ACCELERATED
    assert asyncio_amp.ACCELERATED is (_wire._speedups is not None)
    assert isinstance(asyncio_amp.ACCELERATED, bool)


@needs_build
def test_the_accelerator_is_used_when_built() -> None:
    assert (
        accelerated_in_child() == "True builtin_function_or_method builtin_function_or_method True"
    )


def test_the_environment_variable_forces_the_pure_python_codec() -> None:
    assert accelerated_in_child(ASYNCIO_AMP_NO_EXTENSIONS="1") == "False function function False"


def test_the_compiled_code_imports_nothing() -> None:
    # The sans-I/O rule holds for the C code too: it imports no module at all (so no
    # asyncio), and calls back only the Python functions _wire gives it.
    source = C_SOURCE.read_text()
    assert "PyImport_" not in source
    assert "#include <Python.h>" in source
    assert [line for line in source.splitlines() if line.startswith("#include")] == [
        "#include <Python.h>"
    ]


@needs_build
def test_the_compiled_module_imports_no_asyncio() -> None:
    # Loaded alone, outside the package, in a fresh interpreter.
    code = (
        "import importlib.machinery, importlib.util, sys;"
        f"loader = importlib.machinery.ExtensionFileLoader('asyncio_amp._speedups', {ACCEL.__file__!r});"
        "spec = importlib.util.spec_from_loader('asyncio_amp._speedups', loader);"
        "module = importlib.util.module_from_spec(spec);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'asyncio_amp')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=LONG, check=True
    )
    assert result.stdout.strip() == "['asyncio_amp._speedups']"


@needs_build
def test_differential_on_random_streams() -> None:
    # A bounded run of the fuzz target (tests/fuzz_speedups.py runs it for millions).
    rng = random.Random(17)
    for _ in range(3000):
        check_one(ACCEL, random_input(rng))


@needs_build
@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_differential_on_arbitrary_bytes(data: bytes) -> None:
    check_one(ACCEL, data)


@needs_build
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x01a\x00\x00\x00\x00",
        b"\x00\x01a\x00\x01b\x00\x00\x00\x01",
        b"\x01\x00",
        b"GET / HTTP/1.1\r\n",
        b"\x00\x01a\xff\xff",
        b"\x00\x01a\x00\x01b\x00\x00" * 3 + b"\x00\x02",
    ],
)
def test_differential_on_edge_cases(data: bytes) -> None:
    check_one(ACCEL, data)


@needs_build
def test_setup_is_required_and_checked() -> None:
    with pytest.raises(ValueError, match="prefixes"):
        ACCEL.setup(_wire.python_encode_box, _wire.encode_items, _wire.parse_boxes, (b"\x00",) * 2)
    with pytest.raises(TypeError):
        ACCEL.setup(1, 2, 3)


def test_limits_past_the_machine_size_are_no_limit() -> None:
    # Python ints have no size; the compiled scan must not take them for an error.
    decoder = BoxDecoder(max_box_size=10**30, max_keys=2**63)
    assert decoder.receive_data(encode_box({b"a": b"1"})) == [{b"a": b"1"}]


# The compiled BoxDecoder: every cut of the same bytes, against the pure-Python class

SUM_ASK = encode_box({b"_ask": b"1f", b"_command": b"Sum", b"a": b"1234", b"b": b"5678"})
BIG = encode_box({b"_answer": b"1", b"data": b"x" * 65_535})

# Streams with something to say at every cut: whole boxes, a repeated key, a key and a
# value over the table of prefixes, each fault the decoder reports, text, and a value
# longer than the stream (a pair that never completes).
STREAMS = [
    SUM_ASK * 3,
    b"\x00\x01a\x00\x011\x00\x01a\x00\x012\x00\x00",
    encode_box({b"k" * 255: b"v" * 1500}) + SUM_ASK,
    SUM_ASK + b"\x00\x00" + SUM_ASK,
    SUM_ASK[:-2] + b"\x01\x00rest",
    SUM_ASK + b"GET / HTTP/1.1\r\nHost: x\r\n",
    b"\x00\x01a\xff\xff" + b"x" * 40,
]
LIMITS = [{}, {"max_box_size": 20}, {"max_keys": 2}, {"max_box_size": 40, "max_keys": 3}]


def decoder_story(decoder_class: Any, pieces: list[bytes], limits: dict[str, int]) -> list[Any]:
    """What a decoder says about each piece, through both entry points, and its state."""
    said: list[Any] = []
    for partial in (False, True):
        decoder = decoder_class(**limits)
        for piece in pieces:
            if partial:
                boxes, error = decoder.receive_data_partial(piece)
                said.append((boxes, None if error is None else (type(error), str(error))))
            else:
                try:
                    said.append(decoder.receive_data(piece))
                except Exception as exc:
                    said.append((type(exc), str(exc)))
            said.append(
                (
                    decoder.in_box,
                    decoder.buffered,
                    decoder._offset,
                    decoder._at_boundary,
                    copy(decoder._rest),
                )
            )
        end = decoder.end_of_stream()
        said.append(None if end is None else (type(end), str(end)))
    return said


def assert_same_story(pieces: list[bytes], limits: dict[str, int]) -> None:
    expected = decoder_story(_wire.PythonBoxDecoder, pieces, limits)
    assert decoder_story(ACCEL.BoxDecoder, pieces, limits) == expected, (pieces, limits)


@needs_build
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("stream", STREAMS)
def test_compiled_decoder_matches_at_every_cut(stream: bytes, limits: dict[str, int]) -> None:
    for cut in range(len(stream) + 1):
        assert_same_story([stream[:cut], stream[cut:]], limits)


@needs_build
@pytest.mark.parametrize("stream", STREAMS[:2] + STREAMS[3:5])
def test_compiled_decoder_matches_at_every_pair_of_cuts(stream: bytes) -> None:
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            pieces = [stream[:first], stream[first:second], stream[second:]]
            assert_same_story(pieces, {"max_keys": 3})


@needs_build
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("stream", STREAMS)
def test_compiled_decoder_matches_byte_by_byte(stream: bytes, limits: dict[str, int]) -> None:
    assert_same_story([stream[i : i + 1] for i in range(len(stream))], limits)


@needs_build
@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(STREAMS), st.lists(st.integers(0, 2000), max_size=12), st.sampled_from(LIMITS)
)
def test_compiled_decoder_matches_at_random_cuts(
    stream: bytes, cuts: list[int], limits: dict[str, int]
) -> None:
    points = sorted(cut for cut in cuts if cut <= len(stream))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert_same_story(pieces, limits)


@needs_build
def test_compiled_decoder_takes_a_big_value_in_small_reads() -> None:
    # 65,535 bytes of value in reads of 7, then a box: the same state as Python's at each read.
    stream = BIG + SUM_ASK
    fast, slow = ACCEL.BoxDecoder(), _wire.PythonBoxDecoder()
    boxes: list[Any] = []
    for i in range(0, len(stream), 7):
        read = fast.receive_data(stream[i : i + 7])
        assert read == slow.receive_data(stream[i : i + 7])
        assert (fast.buffered, fast._rest, fast._offset) == (
            slow.buffered,
            slow._rest,
            slow._offset,
        )
        boxes += read
    assert boxes == parse_boxes(stream)
    assert fast._at_boundary
    assert (fast.buffered, fast._rest, fast._offset) == (0, None, len(stream))


@needs_build
def test_compiled_decoder_raises_the_same_error_again() -> None:
    decoder = ACCEL.BoxDecoder()
    with pytest.raises(_wire.ProtocolError, match="key length 256") as first:
        decoder.receive_data(SUM_ASK + b"\x01\x00")
    with pytest.raises(_wire.ProtocolError) as again:
        decoder.receive_data(SUM_ASK)
    assert again.value is first.value
    assert decoder.receive_data_partial(SUM_ASK) == ([], first.value)
    assert decoder._error is first.value
    assert decoder.end_of_stream() is None
    assert not decoder._at_boundary


@needs_build
def test_compiled_decoder_limits_and_defaults_are_the_python_ones() -> None:
    fast, slow = ACCEL.BoxDecoder(), _wire.PythonBoxDecoder()
    assert (fast.max_box_size, fast.max_keys) == (slow.max_box_size, slow.max_keys)
    assert (fast.max_box_size, fast.max_keys) == (
        _wire.DEFAULT_MAX_BOX_SIZE,
        _wire.DEFAULT_MAX_KEYS,
    )
    for name in ("max_box_size", "max_keys"):
        for bad in (0, -1, -(10**30), True, 1.5, "3", None):
            errors = []
            for decoder in (fast, slow):
                with pytest.raises(ValueError) as raised:
                    setattr(decoder, name, bad)
                errors.append(str(raised.value))
                with pytest.raises(ValueError):
                    type(decoder)(**{name: bad})
            assert errors[0] == errors[1] == f"{name} must be a positive int, not {bad!r}"
        huge = 10**30
        setattr(fast, name, huge)
        assert getattr(fast, name) is huge
    with pytest.raises(TypeError):
        ACCEL.BoxDecoder(100)  # the limits are keyword-only, as in Python


@needs_build
def test_compiled_decoder_reports_limits_as_set() -> None:
    # The messages print the limits as they were set, even past the machine's sizes.
    for decoder_class in (ACCEL.BoxDecoder, _wire.PythonBoxDecoder):
        decoder = decoder_class(max_box_size=10**30, max_keys=1)
        _, error = decoder.receive_data_partial(SUM_ASK)
        assert str(error) == "box at stream offset 0 has more than 1 keys"


@needs_build
def test_compiled_decoder_init_starts_afresh() -> None:
    decoder = ACCEL.BoxDecoder()
    decoder.receive_data(SUM_ASK[:9])
    decoder.__init__(max_keys=5)  # type: ignore[misc]
    assert (decoder._at_boundary, decoder._offset, decoder.max_keys) == (True, 0, 5)
    assert decoder.receive_data(SUM_ASK) == parse_boxes(SUM_ASK)


@needs_build
def test_compiled_decoder_reads_other_bytes_like_objects_as_bytes() -> None:
    # Transports give bytes; a bytearray or a memoryview is read as the same bytes.
    for data in (bytearray(SUM_ASK), memoryview(SUM_ASK)):
        [box] = ACCEL.BoxDecoder().receive_data(data)
        assert box == parse_boxes(SUM_ASK)[0]
        assert all(type(k) is bytes and type(v) is bytes for k, v in box.items())
    with pytest.raises(TypeError):
        ACCEL.BoxDecoder().receive_data("text")


def test_box_decoder_can_be_subclassed() -> None:
    # Whichever class BoxDecoder is, it can be subclassed, with or without slots, and a
    # subclass's override of a public method is what its callers get.
    class Logging(BoxDecoder):
        __slots__ = ("seen",)

        def __init__(self, **limits: int) -> None:
            super().__init__(**limits)
            self.seen: list[int] = []

        def receive_data(self, data: bytes) -> list[Any]:
            self.seen.append(len(data))
            return super().receive_data(data)

    class Plain(BoxDecoder):
        pass

    decoder = Logging(max_keys=10)
    assert decoder.receive_data(SUM_ASK) == parse_boxes(SUM_ASK)
    assert decoder.seen == [len(SUM_ASK)]
    assert decoder.max_keys == 10
    assert isinstance(decoder, BoxDecoder)
    assert isinstance(decoder, asyncio_amp.BoxDecoder)
    plain = Plain()
    plain.note = 1  # type: ignore[attr-defined]
    assert plain.receive_data_partial(SUM_ASK) == (parse_boxes(SUM_ASK), None)


def test_box_decoder_is_the_compiled_type_when_accelerated() -> None:
    assert asyncio_amp.BoxDecoder is _wire.BoxDecoder
    if asyncio_amp.ACCELERATED:
        assert _wire.BoxDecoder is ACCEL.BoxDecoder
        assert _wire.BoxDecoder.__doc__ is not None
        assert "incrementally" in _wire.BoxDecoder.__doc__
    else:
        assert _wire.BoxDecoder is _wire.PythonBoxDecoder


# The compiled per-Command parser: the same values where the generated Python one decodes
# the usual layout, an exception wherever it raises


class Mixed(Command):
    arguments = [
        ("count", Integer()),
        ("name", String()),
        ("blob", Bytes()),
        ("ratio", Float()),
        ("flag", Boolean()),
        ("when", Integer(optional=True)),
        ("note", String(optional=True)),
    ]
    response = [("total", Integer())]


def both_parsers(command: type[Command]) -> tuple[Any, Any]:
    """The generated Python parser of ``command``'s arguments, and the compiled mirror of it."""
    fields = command._arguments_schema.fields
    kept = _commands._speedups
    try:
        _commands._speedups = None
        slow = _commands._compile_parser(command.__name__, fields)
        _commands._speedups = ACCEL
        fast = _commands._accelerated_parser(slow, fields)
    finally:
        _commands._speedups = kept
    assert type(fast) is ACCEL.Parser
    return slow, fast


def parse_outcome(parse: Any, data: Any, p: Any) -> Any:
    try:
        values, end = parse(data, p)
    except Exception as exc:
        return ("error", exc)
    # repr: a float NaN is not equal to itself.
    return ("ok", repr(values), [type(v) for v in values.values()], end)


def assert_same_parse_at(slow: Any, fast: Any, data: Any, p: Any) -> None:
    expected = parse_outcome(slow, data, p)
    got = parse_outcome(fast, data, p)
    if expected[0] == "ok" or got[0] == "ok":
        assert got == expected, (data, p)
    elif not isinstance(got[1], LookupError):
        # A value that does not decode: the same exception, from the same code.
        assert (type(got[1]), str(got[1])) == (type(expected[1]), str(expected[1])), (data, p)


def mixed_box(values: dict[str, Any]) -> bytes:
    """The wire form of a Mixed call's arguments (without the _ask and _command keys)."""
    fields = Mixed._arguments_schema.by_name
    return encode_box(
        {name.encode(): fields[name].argument.to_bytes(v) for name, v in values.items()}
    )


MIXED_VALUES = [
    {"count": 12, "name": "é", "blob": b"", "ratio": 1.5, "flag": True},
    {
        "count": -(10**30),
        "name": "",
        "blob": b"\x00" * 300,
        "ratio": float("nan"),
        "flag": False,
        "when": 0,
    },
    {
        "count": 0,
        "name": "x" * 40,
        "blob": b"b",
        "ratio": -0.0,
        "flag": True,
        "note": "n",
        "when": 10**17,
    },
]


@needs_build
@pytest.mark.parametrize("values", MIXED_VALUES)
def test_compiled_parser_matches_at_every_start_and_cut(values: dict[str, Any]) -> None:
    slow, fast = both_parsers(Mixed)
    data = mixed_box(values)
    assert parse_outcome(fast, data, 0) == parse_outcome(slow, data, 0)
    assert parse_outcome(fast, data, 0)[0] == "ok"
    for cut in range(len(data) + 1):
        for start in range(cut + 1):
            assert_same_parse_at(slow, fast, data[:cut] + b"\x00" * (start % 2), start)


@needs_build
@settings(max_examples=500, deadline=None)
@given(st.sampled_from(MIXED_VALUES), st.integers(0, 400), st.integers(0, 255), st.data())
def test_compiled_parser_matches_on_mangled_boxes(
    values: dict[str, Any], where: int, byte: int, data: st.DataObject
) -> None:
    slow, fast = both_parsers(Mixed)
    box = bytearray(mixed_box(values))
    if where < len(box):
        box[where] = byte
    start = data.draw(st.integers(0, len(box)))
    assert_same_parse_at(slow, fast, bytes(box), start)
    assert_same_parse_at(slow, fast, bytes(box), 0)


@needs_build
@pytest.mark.parametrize(
    "digits",
    [
        b"0",
        b"-0",
        b"007",
        b"-12",
        b"+5",
        b" 5 ",
        b"1_000",
        b"",
        b"-",
        b"12a",
        b"\xd9\xa3",
        b"9" * 18,
        b"9" * 19,
        b"-" + b"9" * 18,
        b"--1",
        b"1e3",
    ],
)
def test_compiled_parser_decodes_integers_as_int_does(digits: bytes) -> None:
    slow, fast = both_parsers(Mixed)
    data = encode_box(
        {b"blob": b"", b"count": digits, b"flag": b"True", b"name": b"", b"ratio": b"1"}
    )
    assert_same_parse_at(slow, fast, data, 0)
    expected = parse_outcome(slow, data, 0)
    assert parse_outcome(fast, data, 0)[0] == expected[0]


@needs_build
def test_compiled_parser_hands_odd_arguments_to_the_python_one() -> None:
    slow, fast = both_parsers(Mixed)
    data = mixed_box(MIXED_VALUES[0])
    for odd in ((bytearray(data), 0), (memoryview(data), 0), (data, -1), (data, True)):
        expected, got = parse_outcome(slow, *odd), parse_outcome(fast, *odd)
        if expected[0] == "ok":
            assert got == expected, odd
        else:
            assert (type(got[1]), str(got[1])) == (type(expected[1]), str(expected[1])), odd
    with pytest.raises(TypeError):
        fast(data)


def test_commands_use_the_compiled_parser_when_accelerated() -> None:
    parser = Mixed._parse_arguments
    assert (type(parser).__name__ == "Parser") is asyncio_amp.ACCELERATED


# The compiled per-Command encoders: the same box bytes as the generated Python ones, or
# the same exception (they hand anything unusual to them)

ENCODER_NAMES = ["ask", "send", "answer"]


def encoder_fields(which: str) -> Any:
    schema = Encoded._response_schema if which == "answer" else Encoded._arguments_schema
    return schema.fields


USUAL = {
    "ask": {"Early": b"e", "a": 1, "b": 2, "data": b"d", "name": "n", "ratio": 0.5, "flag": True},
    "answer": {"total": 3, "ok": False, "note": "n"},
}
USUAL["send"] = USUAL["ask"]


def assert_same_encoding(which: str, *args: Any) -> Any:
    slow, fast, params = ENCODERS[ENCODER_NAMES.index(which)]
    if params and len(args) == 1:
        args = (*args, b"1f")
    expected = encode_outcome(slow, args)
    assert encode_outcome(fast, args) == expected, args
    return expected


ENCODERS: Any = both_encoders(ACCEL) if ACCEL is not None else []


@needs_build
def test_compiled_encoders_are_the_compiled_type() -> None:
    assert [type(fast) for _, fast, _ in ENCODERS] == [ACCEL.Encoder] * 3


@needs_build
@pytest.mark.parametrize("which", ENCODER_NAMES)
def test_compiled_encoders_match_on_each_edge_value(which: str) -> None:
    outcomes = set()
    for field in encoder_fields(which):
        for value in [*_VALUES[type(field.argument)], _MISSING]:
            values = dict(USUAL[which])
            if value is _MISSING:
                del values[field.name]
            else:
                values[field.name] = value
            outcomes.add(assert_same_encoding(which, values)[:2])
    # Each way out is exercised: written boxes, and the errors of odd values.
    assert {"ok", "TypeError", "ValueError", "_Fallback"} <= {
        o[1] if o[0] == "error" else "ok" for o in outcomes
    }


@needs_build
@pytest.mark.parametrize("tag", _TAGS)
def test_compiled_answer_encoder_matches_on_each_tag(tag: Any) -> None:
    assert_same_encoding("answer", USUAL["answer"], tag)


@needs_build
@pytest.mark.parametrize("which", ENCODER_NAMES)
def test_compiled_encoders_match_on_odd_calls(which: str) -> None:
    usual = USUAL[which]
    required = [f.name for f in encoder_fields(which) if not f.optional]
    optional = [f.name for f in encoder_fields(which) if f.optional]
    cases: list[tuple[Any, ...]] = [
        ({},),
        ({**usual, "extra": 1},),
        ({**usual, 5: 1},),
        (_Dict(usual),),
        (types.MappingProxyType(usual),),
        (list(usual.items()),),
        (None,),
        ({k: v for k, v in usual.items() if k not in optional},),
        ({**usual, **dict.fromkeys(optional)},),
        ({**usual, required[0]: None},),
        ({k: v for k, v in usual.items() if k != required[-1]},),
    ]
    for case in cases:
        assert_same_encoding(which, *case)
    slow, fast, params = ENCODERS[ENCODER_NAMES.index(which)]
    for args in ((), (usual, b"1", b"2"), (usual, b"1f", None)):
        assert encode_outcome(fast, args) == encode_outcome(slow, args)
    # Keywords go to the generated function as they are.
    kwargs = {"values": usual, "tag": b"1f"} if params else {"values": usual}
    expected = encode_outcome(lambda: slow(**kwargs), ())
    assert encode_outcome(lambda: fast(**kwargs), ()) == expected
    assert expected[0] == "ok"


@needs_build
@settings(max_examples=300, deadline=None)
@given(
    st.integers(),
    st.binary(max_size=70_000),
    st.text(max_size=30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.one_of(st.none(), st.integers(), st.booleans()),
)
def test_compiled_encoders_match_on_generated_values(
    a: int, data: bytes, name: str, ratio: float, flag: bool, b: Any
) -> None:
    values = {"a": a, "data": data, "name": name, "ratio": ratio, "flag": flag, "b": b}
    for which in ("ask", "send"):
        assert_same_encoding(which, values)
    assert_same_encoding("answer", {"total": a, "ok": flag, "note": name})


@needs_build
def test_compiled_encoders_give_the_usual_box_in_few_parts() -> None:
    slow, fast, _ = ENCODERS[0]
    parts, slot = fast(USUAL["ask"])
    assert (len(parts), slot, parts[slot]) == (3, 1, b"")
    parts[slot] = b"\x00\x02TG"  # the caller fills the tag in
    expected, expected_slot = slow(USUAL["ask"])
    expected[expected_slot] = b"\x00\x02TG"
    assert b"".join(parts) == b"".join(expected)
    assert fast(USUAL["ask"])[0][slot] == b""  # a fresh list each time
    box = ENCODERS[2][1](USUAL["answer"], b"1f")
    assert len(box) == 1 and parse_boxes(box[0]) == [
        {b"_answer": b"1f", b"note": b"n", b"ok": b"False", b"total": b"3"}
    ]


@needs_build
@pytest.mark.parametrize("which", ["ask", "send"])
def test_compiled_encoders_keep_long_bytes_values_as_they_are(which: str) -> None:
    # A call held until the transport drains keeps the caller's bytes, not a copy.
    long, short = b"L" * 512, b"s" * 511
    values = dict(USUAL[which])
    for value in (long, short):
        values["Early"] = values["data"] = value
        assert assert_same_encoding(which, values)[0] == "ok"
        out = ENCODERS[ENCODER_NAMES.index(which)][1](values)
        parts = out[0] if type(out) is tuple else out
        assert sum(part is value for part in parts) == (2 if value is long else 0)


@needs_build
def test_compiled_encoders_keep_no_references() -> None:
    # The usual path and each way to the generated code give back what they take.
    # Objects of this test's own (not small ints or interned strings), whose counts
    # nothing else changes.
    values: dict[str, Any] = {
        "Early": bytes(bytearray(b"ee")),
        "a": int("1" * 40),
        "b": int("123456789012"),
        "data": bytes(bytearray(b"dd")),
        "name": "".join(["\u00e9", "t\u00e9"]),
        "ratio": float("0.25"),
        "flag": True,
    }
    mine = [v for v in values.values() if v is not True]
    odd = dict(values, flag=1)
    _, fast, _ = ENCODERS[0]
    before = [sys.getrefcount(v) for v in (*mine, values, odd)]
    for _ in range(1000):
        fast(values)
        fast(odd)  # the generated code's to_bytes writes it
        with pytest.raises(TypeError):
            fast(dict(values, a=1.0))
    after = [sys.getrefcount(v) for v in (*mine, values, odd)]
    assert after == before


class OddInteger(Integer):
    """An Integer subclass: it may override to_bytes, so it keeps the generated code."""


class Counted(Command):
    arguments = [("n", Integer())]
    response = [("n", OddInteger())]


def test_commands_use_the_compiled_encoder_when_accelerated() -> None:
    assert (type(Mixed._plain_ask).__name__ == "Encoder") is asyncio_amp.ACCELERATED
    assert (type(Mixed._plain_answer).__name__ == "Encoder") is asyncio_amp.ACCELERATED
    assert (type(Counted._fast_ask).__name__ == "Encoder") is asyncio_amp.ACCELERATED
    assert type(Counted._fast_answer).__name__ == "function"
