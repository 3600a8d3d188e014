"""
Differential fuzzing of the compiled accelerator against the pure-Python codec.

Each input is fed to both implementations, which must give identical boxes, events and
errors (same type, same message), and leave their decoders in the same state:

- ``parse_boxes`` on the input as a whole;
- a ``BoxDecoder`` fed the input in pieces (split where the input's own bytes say: whole,
  byte by byte, or at random cuts), through ``receive_data`` and ``receive_data_partial``,
  then ``end_of_stream``: the compiled ``BoxDecoder`` type, and the pure-Python class with
  and without the compiled whole-box scan;
- an ``AMPConnection`` fed the same pieces (its events), on each of those decoders;
- ``encode_box`` and ``encode_items`` on a box made of the input's pairs, and on its
  odd variants (a key too long or empty, a value too long, values that are not bytes);
- a Command's compiled parser and the generated Python one it mirrors, from every offset
  of the input: the same values and end, or both raising (the same exception when a
  value does not decode).
- a Command's compiled encoders (ask, send, answer) and the generated Python ones they
  mirror, on values drawn from a generator seeded with the input: edge integers, bools,
  subclasses, empty and over-long bytes and strings, lone surrogates, NaN and infinities,
  None, missing and unknown names, wrong types, odd tags and mappings. The same box
  bytes, or the same exception.

Run it as a script for a long run (``python tests/fuzz_speedups.py -n 1000000``); the
test suite runs a bounded number of inputs (tests/test_speedups.py).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

from asyncio_amp import (
    Boolean,
    Bytes,
    Command,
    Float,
    Integer,
    String,
    _commands,
    _connection,
    _wire,
)
from asyncio_amp._connection import AMPConnection, Failure
from asyncio_amp._errors import ProtocolError
from asyncio_amp._wire import PythonBoxDecoder, python_encode_box, python_encode_items

_USUAL_KEYS = [b"_ask", b"_answer", b"_command", b"_error", b"a", b"b", b"total", b"data"]


class Fuzzed(Command):
    """A schema whose keys the random inputs use: required, optional, and each inline kind."""

    arguments = [
        ("a", Integer()),
        ("b", Integer(optional=True)),
        ("data", Bytes()),
        ("total", String(optional=True)),
    ]


def both_parsers(accel: Any) -> tuple[Any, Any]:
    """The generated Python parser of Fuzzed's arguments, and the compiled mirror of it."""
    fields = Fuzzed._arguments_schema.fields
    kept = _commands._speedups
    try:
        _commands._speedups = None
        slow = _commands._compile_parser("Fuzzed", fields)
        _commands._speedups = accel
        fast = _commands._accelerated_parser(slow, fields)
    finally:
        _commands._speedups = kept
    return slow, fast


_parsers: dict[Any, tuple[Any, Any]] = {}


def parse_outcome(parse: Any, data: bytes, p: int) -> Any:
    """What a parser returns (its values by repr: NaN), or the exception it raises."""
    try:
        values, end = parse(data, p)
    except Exception as exc:
        return ("error", exc)
    return ("ok", repr(values), end)


class Encoded(Command):
    """A schema for the encoders: each inline kind, required and optional, and a key before _ask."""

    arguments = [
        ("Early", Bytes(optional=True)),
        ("a", Integer()),
        ("b", Integer(optional=True)),
        ("data", Bytes()),
        ("name", String(optional=True)),
        ("ratio", Float()),
        ("flag", Boolean(optional=True)),
    ]
    response = [("total", Integer()), ("ok", Boolean()), ("note", String(optional=True))]


class _Int(int):
    """An int subclass: the generated code calls the argument's to_bytes for it."""


class _Str(str):
    """A str subclass."""


# Values for each field, usual and odd; _MISSING leaves the name out.
_MISSING = object()
_INTEGERS = [0, 1, -1, 7, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -(10**30), 10**70]
_INTEGERS += [True, False, _Int(5), 10**5000, 1.0, "1", b"1", None]
_BYTES = [b"", b"x", b"\x00\xff", b"y" * 65_535, b"y" * 65_536, bytearray(b"ba")]
_BYTES += [memoryview(b"mv"), "str", 1, None]
_STRINGS = ["", "a", "\u00e9t\u00e9", "\U0001f600", "\ud800", "x" * 65_535, "\u00e9" * 32_768]
_STRINGS += [_Str("sub"), b"bytes", 3, None]
_FLOATS = [0.0, -0.0, 1.5, 0.1, 1e308, 5e-324, -1e-310, 1e16, 123456789.123456789]
_FLOATS += [float("nan"), float("inf"), float("-inf"), 1, True, "1.5", None]
_BOOLEANS = [True, False, 0, 1, "", None]
_VALUES = {Integer: _INTEGERS, Bytes: _BYTES, String: _STRINGS, Float: _FLOATS}
_VALUES[Boolean] = _BOOLEANS
_TAGS = [b"1", b"1f", b"", b"t" * 1023, b"t" * 1024, bytearray(b"2"), "3", None]


def both_encoders(accel: Any) -> list[tuple[Any, Any, int]]:
    """The generated Python encoders of Encoded's ask, send and answer, their compiled
    mirrors, and how many parameters follow the values (the answer's tag)."""
    kept = _commands._speedups
    result = []
    try:
        for steps, specials in (
            (Encoded._ask_steps, (None, Encoded.wire_name)),
            (Encoded._send_steps, (Encoded.wire_name,)),
            (Encoded._answer_steps, ("tag",)),
        ):
            _commands._speedups = None
            slow = _commands._compile_encoder("Encoded", steps, specials)
            _commands._speedups = accel
            fast = _commands._accelerated_encoder(slow, steps, specials)
            result.append((slow, fast, int("tag" in specials)))
    finally:
        _commands._speedups = kept
    return result


def encode_outcome(encode: Any, args: tuple[Any, ...]) -> Any:
    """The box an encoder writes (its tag slot filled in), or its exception's type and message."""
    try:
        result = encode(*args)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    if type(result) is tuple:
        parts, slot = result
        assert type(parts) is list and parts[slot] == b"", result
        parts = list(parts)
        parts[slot] = b"\x00\x02TG"
        return ("ok", b"".join(parts), "slot")
    return ("ok", b"".join(result))


def random_values(rng: random.Random, fields: Any) -> Any:
    """Values for ``fields``: usually all usual, now and then odd, missing or extra."""
    values: dict[str, Any] = {}
    odd = rng.random() < 0.3
    for field in fields:
        pool = _VALUES[type(field.argument)]
        if not odd:
            usual = [v for v in pool if v is not None and type(v) in (int, bytes, str, float)]
            if type(field.argument) is Boolean:
                usual = [True, False]
            if field.optional and rng.random() < 0.3:
                continue
            values[field.name] = rng.choice(usual)
            continue
        choice = rng.choice([*pool, _MISSING])
        if choice is not _MISSING:
            values[field.name] = choice
    if odd and rng.random() < 0.1:
        values["extra"] = 1
    if odd and rng.random() < 0.05:
        return rng.choice((_Dict, types.MappingProxyType))(values)
    return values


class _Dict(dict[str, Any]):
    """A dict subclass: the generated code takes any mapping."""


_encoders: dict[Any, list[tuple[Any, Any, int]]] = {}


def check_encoders(accel: Any, rng: random.Random) -> None:
    """Call each compiled encoder and its Python mirror on the same random values."""
    if accel not in _encoders:
        _encoders[accel] = both_encoders(accel)
    for (slow, fast, params), fields in zip(
        _encoders[accel],
        (
            Encoded._arguments_schema.fields,
            Encoded._arguments_schema.fields,
            Encoded._response_schema.fields,
        ),
        strict=True,
    ):
        values = random_values(rng, fields)
        args = (values, rng.choice(_TAGS) if rng.random() < 0.2 else b"1f")[: 1 + params]
        expected = encode_outcome(slow, args)
        assert encode_outcome(fast, args) == expected, args


def load_accelerator() -> Any:
    """The compiled accelerator, ready to use even if ASYNCIO_AMP_NO_EXTENSIONS is set; or None."""
    try:
        from asyncio_amp import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    _speedups.setup(
        python_encode_box, python_encode_items, _wire._parse_boxes_reference, _wire.PREFIXES
    )
    _speedups.setup_decoder(ProtocolError, _wire._describe_start)
    return _speedups


@contextlib.contextmanager
def decoder_scan(scan: Any, decoder_class: Any = PythonBoxDecoder) -> Iterator[None]:
    """
    Decode with ``decoder_class`` (the connection's too), and ``scan`` as the whole-box
    scan of the pure-Python class (None: no compiled code at all).
    """
    kept = _wire._scan_boxes, _connection.BoxDecoder
    _wire._scan_boxes = scan
    _connection.BoxDecoder = decoder_class
    try:
        yield
    finally:
        _wire._scan_boxes, _connection.BoxDecoder = kept


def outcome(function: Any, *args: Any) -> Any:
    """What ``function(*args)`` returns, or its exception's type and message."""
    try:
        return ("ok", function(*args))
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


def copy(rest: bytearray | None) -> bytes | None:
    """The decoder's buffered bytes as they are now (the bytearray itself may grow later)."""
    return None if rest is None else bytes(rest)


def pieces_of(data: bytes) -> list[bytes]:
    """Split ``data`` where its first byte (as a seed) says: whole, bytes, or random cuts."""
    if not data:
        return [data]
    how = data[0] % 4
    if how == 0:
        return [data]
    if how == 1:
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(data[:8])
    cuts = sorted(rng.sample(range(1, len(data) + 1), min(len(data), 1 + data[0] % 5)))
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def decode(data: bytes, limits: dict[str, int], partial: bool) -> list[Any]:
    """Everything a BoxDecoder says about ``data`` fed in pieces, and its state after each."""
    decoder = _connection.BoxDecoder(**limits)
    said: list[Any] = []
    for piece in pieces_of(data):
        if partial:
            boxes, error = decoder.receive_data_partial(piece)
            said.append((boxes, None if error is None else (type(error), str(error))))
        else:
            said.append(outcome(decoder.receive_data, piece))
        said.append(
            (
                decoder.in_box,
                decoder.buffered,
                decoder._offset,
                decoder._at_boundary,
                copy(decoder._rest),
            )
        )
    error = decoder.end_of_stream()
    said.append(None if error is None else str(error))
    return said


def events(data: bytes, limits: dict[str, int]) -> list[Any]:
    """The events of an AMPConnection fed ``data`` in pieces."""
    connection = AMPConnection(**limits)
    said: list[Any] = []
    for piece in pieces_of(data):
        connection.receive_data(piece)
        for event in connection.events_received():
            if type(event) is Failure:
                said.append(("failure", type(event.error), str(event.error)))
            else:
                said.append(event)
    lost = connection.connection_lost()
    said.append(None if lost is None else str(lost))
    return said


def boxes_to_encode(data: bytes) -> list[Any]:
    """A box made of the pairs in ``data``, and variants that take the general ways."""
    rng = random.Random(data)
    box: dict[Any, Any] = {}
    for _ in range(rng.randrange(6)):
        key = rng.choice(_USUAL_KEYS) if rng.random() < 0.5 else data[: rng.randrange(1, 6)]
        box[key or b"k"] = data[rng.randrange(len(data) + 1) :]
    boxes: list[Any] = [box]
    odd = dict(box)
    variant = rng.randrange(8)
    if variant == 0:
        odd[b"k" * rng.choice((255, 256))] = b"v"
    elif variant == 1:
        odd[b""] = b"v"
    elif variant == 2:
        odd[b"big"] = b"v" * rng.choice((65_535, 65_536))
    elif variant == 3:
        odd[b"a"] = rng.choice(
            (bytearray(b"x"), memoryview(b"xy"), "str", 1, memoryview(b"abc")[::2])
        )
    elif variant == 4:
        odd["text"] = b"v"
    elif variant == 5:
        odd[b"v" * 300] = b"x" * 1500  # lengths past the table of prefixes
    boxes.append(odd)
    return boxes


def check_one(accel: Any, data: bytes) -> None:
    """Feed ``data`` to both implementations; raise AssertionError if they differ."""
    # parse_boxes
    assert outcome(accel.parse_boxes, data) == outcome(_wire.python_parse_boxes, data), data
    # BoxDecoder and AMPConnection, with small limits now and then
    limits: dict[str, int] = {}
    if data[-1:] and data[-1] % 3 == 0:
        limits = {"max_box_size": 1 + data[-1] * 2, "max_keys": 1 + data[-1] % 7}
    for partial in (False, True):
        with decoder_scan(None):
            slow = decode(data, limits, partial)
        with decoder_scan(accel.scan_boxes):
            fast = decode(data, limits, partial)
        assert fast == slow, (data, limits, partial, fast, slow)
        with decoder_scan(None, accel.BoxDecoder):
            fast = decode(data, limits, partial)
        assert fast == slow, ("C BoxDecoder", data, limits, partial, fast, slow)
    with decoder_scan(None):
        slow = events(data, limits)
    with decoder_scan(accel.scan_boxes):
        fast = events(data, limits)
    assert fast == slow, (data, limits, fast, slow)
    with decoder_scan(None, accel.BoxDecoder):
        fast = events(data, limits)
    assert fast == slow, ("C BoxDecoder", data, limits, fast, slow)
    # The compiled parser of a Command's usual layout, from every offset
    if accel not in _parsers:
        _parsers[accel] = both_parsers(accel)
    slow_parse, fast_parse = _parsers[accel]
    for p in range(len(data) + 1):
        expected = parse_outcome(slow_parse, data, p)
        got = parse_outcome(fast_parse, data, p)
        if expected[0] == "ok" or got[0] == "ok":
            assert got == expected, (data, p)
        elif not isinstance(got[1], LookupError):
            assert (type(got[1]), str(got[1])) == (type(expected[1]), str(expected[1])), (data, p)
    # A Command's compiled encoders, on values the input seeds
    check_encoders(accel, random.Random(data))
    # encode_box and encode_items
    for box in boxes_to_encode(data):
        assert outcome(accel.encode_box, box) == outcome(python_encode_box, box), box
        items = list(box.items())
        with contextlib.suppress(TypeError):
            items.sort()
        fast_parts: list[bytes] = []
        slow_parts: list[bytes] = []
        fast_result = outcome(accel.encode_items, items, fast_parts)
        slow_result = outcome(python_encode_items, items, slow_parts)
        assert fast_result == slow_result, box
        assert b"".join(fast_parts) == b"".join(slow_parts), box


def random_input(rng: random.Random) -> bytes:
    """A stream of AMP boxes, usually mangled: cut, flipped, grown, or with odd boxes in it."""
    parts: list[bytes] = []
    for _ in range(rng.randrange(4)):
        box = {
            rng.choice(_USUAL_KEYS): rng.randbytes(rng.choice((0, 1, 2, 5, 40, 300)))
            for _ in range(rng.randrange(5))
        }
        if rng.random() < 0.3:
            # Fuzzed's arguments, usually well-formed (for its parsers).
            box = {b"a": b"%d" % rng.randrange(-(10**20), 10**20), b"data": rng.randbytes(3)}
            if rng.random() < 0.5:
                box[b"b"] = rng.choice((b"7", b"-0", b"x", b" 1", b"1_0", b""))
            if rng.random() < 0.5:
                box[b"total"] = rng.choice((b"t", "\u00e9".encode(), b"\xff", b""))
        parts.append(python_encode_box(box) if box else b"\x00\x00")
    data = bytearray(b"".join(parts))
    mutation = rng.randrange(6)
    if mutation == 0 and data:
        del data[rng.randrange(len(data)) :]
    elif mutation == 1 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif mutation == 2:
        data[rng.randrange(len(data) + 1) : 0] = rng.randbytes(rng.randrange(1, 6))
    elif mutation == 3:
        data += b"GET / HTTP/1.1\r\n"[: rng.randrange(1, 17)]
    return bytes(data)


def run(accel: Any, count: int, seed: int) -> float:
    """Check ``count`` random inputs; return the seconds it took."""
    rng = random.Random(seed)
    start = time.perf_counter()
    for _ in range(count):
        check_one(accel, random_input(rng))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="number of inputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    accel = load_accelerator()
    if accel is None:
        print("the compiled accelerator was not built: nothing to compare", file=sys.stderr)
        return 2
    seconds = run(accel, args.n, args.seed)
    print(f"{args.n:,} inputs, both implementations identical, in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
