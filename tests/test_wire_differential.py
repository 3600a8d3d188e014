"""
The fast codec against the reference algorithms it replaced: same bytes, same boxes, same errors.

``encode_box``, ``encode_items``, ``parse_boxes``, ``BoxDecoder`` and the connection's
one-pass path take shortcuts for the usual input and hand everything else to the
general code. These tests run them and the previous code (kept here) on random and
adversarial input, and require identical results, or the same exception with the
same message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncio_amp._connection import AMPConnection, Failure, _classify
from asyncio_amp._errors import ProtocolError, TooLongError
from asyncio_amp._wire import (
    _KEY_HEADS,
    _KEY_HEADS_SIZE,
    BOX_END,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    Box,
    BoxDecoder,
    PythonBoxDecoder,
    _parse_boxes_reference,
    check_key,
    encode_box,
    encode_items,
    length_prefix,
    parse_boxes,
    python_encode_box,
)


def reference_encode_items(items: Iterable[tuple[Any, Any]], parts: list[bytes]) -> None:
    """``encode_items`` as it was before its fast path: every key and value checked."""
    for key, raw in items:
        check_key(key)
        value = raw
        if type(value) is bytes:
            n = len(value)
        elif isinstance(value, memoryview):
            n = value.nbytes
            if not value.c_contiguous:
                value = value.tobytes()
        elif isinstance(value, bytearray):
            value = bytes(value)
            n = len(value)
        else:
            raise TypeError(f"AMP values are bytes, not {type(value).__name__} (key {key!r})")
        if n > MAX_VALUE_LENGTH:
            raise TooLongError(key, n, MAX_VALUE_LENGTH, is_key=False)
        parts.append(length_prefix(len(key)))
        parts.append(key)
        parts.append(length_prefix(n))
        parts.append(value)


def reference_encode_box(box: Mapping[Any, Any]) -> bytes:
    """``encode_box`` as it was before its fast path."""
    parts: list[bytes] = []
    reference_encode_items(sorted(box.items()), parts)
    parts.append(BOX_END)
    return b"".join(parts)


def encode_items_outcome(
    encode: Callable[[Iterable[tuple[Any, Any]], list[bytes]], None], items: list[tuple[Any, Any]]
) -> tuple[Any, ...]:
    """The parts ``encode`` appends for ``items`` (as bytes), or its exception and message."""
    parts: list[bytes] = []
    try:
        encode(items, parts)
    except Exception as exc:
        return (type(exc).__name__, str(exc), b"".join(parts))
    return ("result", [bytes(part) for part in parts])


_unpack_length = struct.Struct("!H").unpack_from


class ReferenceDecoder(PythonBoxDecoder):
    """``BoxDecoder`` as it was before lengths were read by indexing (and before C)."""

    __slots__ = ()

    def receive_data(self, data: bytes) -> list[Box]:
        boxes, error = self.receive_data_partial(data)
        if error is not None:
            raise error
        return boxes

    def _parse(self, data: bytes, boxes: list[Box], start: int = 0) -> None:
        box = self._box
        if box is None:
            box = {}
        size = self._box_size
        max_box_size = self._max_box_size
        max_keys = self._max_keys
        unpack = _unpack_length
        if start:
            self._offset -= start
        pos = start
        end = len(data)
        self._need = 2
        while end - pos >= 2:
            (klen,) = unpack(data, pos)
            if not klen:
                if not box:
                    raise self._error_at(pos, "empty")
                boxes.append(box)
                box = {}
                size = 0
                pos += 2
                continue
            if klen > MAX_KEY_LENGTH:
                raise self._error_at(pos, "key", data)
            vpos = pos + 2 + klen
            if end - vpos < 2:
                self._need = vpos + 2 - pos
                break
            (vlen,) = unpack(data, vpos)
            stop = vpos + 2 + vlen
            pair = stop - pos
            if size + pair > max_box_size or len(box) >= max_keys:
                raise self._error_at(pos, "limit", data, size, pair, box)
            if stop > end:
                self._need = pair
                break
            box[data[pos + 2 : vpos]] = data[vpos + 2 : stop]
            size += pair
            pos = stop
        self._box = box
        self._box_size = size
        self._offset += pos
        if pos < end:
            self._rest = bytearray(memoryview(data)[pos:] if pos else data)


def decoder_run(
    decoder: BoxDecoder, data: bytes, cuts: list[int], partial: bool
) -> list[tuple[str, Any]]:
    """Feed ``data`` cut at ``cuts``; what each read gave, and what the end of the stream says."""
    seen: list[tuple[str, Any]] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        chunk = data[start:cut]
        start = cut
        if partial:
            boxes, error = decoder.receive_data_partial(chunk)
            seen.append(("partial", (boxes, None if error is None else str(error))))
        else:
            seen.append(outcome(decoder.receive_data, chunk))
        seen.append(("state", (decoder.in_box, decoder.buffered)))
    end = decoder.end_of_stream()
    seen.append(("end", None if end is None else str(end)))
    return seen


def outcome(function: Callable[[Any], Any], argument: Any) -> tuple[str, Any]:
    """What ``function(argument)`` does: its result, or its exception's type and message."""
    try:
        return ("result", function(argument))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def assert_same_parse(data: Any) -> None:
    assert outcome(parse_boxes, data) == outcome(_parse_boxes_reference, data)


def assert_same_encoding(box: Mapping[Any, Any]) -> None:
    assert outcome(encode_box, box) == outcome(reference_encode_box, box)


keys = st.one_of(
    st.sampled_from([b"_ask", b"_answer", b"_command", b"_error", b"a", b"b", b"total"]),
    st.binary(min_size=1, max_size=8),
)
values = st.one_of(st.binary(max_size=20), st.sampled_from([b"", b"1", b"Sum", b"x" * 1023]))
boxes = st.dictionaries(keys, values, min_size=1, max_size=6)


# BoxDecoder


limits = st.tuples(st.sampled_from([8, 20, 40, 100, 10_000]), st.sampled_from([1, 2, 3, 5, 1024]))


def assert_same_decoding(data: bytes, cuts: list[int], max_box_size: int, max_keys: int) -> None:
    # BoxDecoder is the compiled type when the accelerator is in use: both against the reference.
    for partial in (False, True):
        old = ReferenceDecoder(max_box_size=max_box_size, max_keys=max_keys)
        expected = decoder_run(old, data, cuts, partial)
        for decoder_class in dict.fromkeys((BoxDecoder, PythonBoxDecoder)):
            new = decoder_class(max_box_size=max_box_size, max_keys=max_keys)
            assert decoder_run(new, data, cuts, partial) == expected, decoder_class


@settings(max_examples=300)
@given(st.lists(boxes, max_size=5), limits, st.data())
def test_decoder_matches_the_reference_on_valid_streams(
    stream: list[dict[bytes, bytes]], limit: tuple[int, int], data: st.DataObject
) -> None:
    encoded = b"".join(encode_box(box) for box in stream)
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=6))
    assert_same_decoding(encoded, cuts, *limit)


@settings(max_examples=300)
@given(st.lists(boxes, min_size=1, max_size=4), limits, st.data())
def test_decoder_matches_the_reference_on_corrupted_streams(
    stream: list[dict[bytes, bytes]], limit: tuple[int, int], data: st.DataObject
) -> None:
    encoded = bytearray(b"".join(encode_box(box) for box in stream))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.integers(0, len(encoded) - 1))
        encoded[where] = data.draw(st.sampled_from([0, 1, 2, 255, data.draw(st.integers(0, 255))]))
    cuts = data.draw(st.lists(st.integers(0, len(encoded)), max_size=6))
    assert_same_decoding(bytes(encoded), cuts, *limit)


@settings(max_examples=300)
@given(st.binary(max_size=80), limits, st.lists(st.integers(0, 80), max_size=4))
def test_decoder_matches_the_reference_on_random_bytes(
    data: bytes, limit: tuple[int, int], cuts: list[int]
) -> None:
    assert_same_decoding(data, [c for c in cuts if c <= len(data)], *limit)


def test_decoder_reports_a_broken_stream_again_like_the_reference() -> None:
    for decoder in (BoxDecoder(), PythonBoxDecoder(), ReferenceDecoder()):
        with pytest.raises(ProtocolError) as first:
            decoder.receive_data(b"\x01\x00")
        with pytest.raises(ProtocolError) as again:
            decoder.receive_data(b"\x00\x01a\x00\x00\x00\x00")
        assert again.value is first.value


# parse_boxes


@settings(max_examples=300)
@given(st.lists(boxes, max_size=5), st.data())
def test_parse_boxes_matches_the_reference_on_valid_streams_and_every_cut(
    stream: list[dict[bytes, bytes]], data: st.DataObject
) -> None:
    encoded = b"".join(encode_box(box) for box in stream)
    assert parse_boxes(encoded) == stream
    assert_same_parse(encoded)
    # Every truncation, then a few random ones of a longer stream.
    for cut in range(min(len(encoded), 80)):
        assert_same_parse(encoded[:cut])
    if encoded:
        cut = data.draw(st.integers(0, len(encoded) - 1))
        assert_same_parse(encoded[:cut])


@settings(max_examples=300)
@given(st.lists(boxes, min_size=1, max_size=4), st.data())
def test_parse_boxes_matches_the_reference_on_corrupted_streams(
    stream: list[dict[bytes, bytes]], data: st.DataObject
) -> None:
    encoded = bytearray(b"".join(encode_box(box) for box in stream))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(encoded) - 1))
        what = data.draw(st.sampled_from(["byte", "zero", "high", "insert", "delete"]))
        if what == "byte":
            encoded[where] = data.draw(st.integers(0, 255))
        elif what == "zero":
            encoded[where : where + 2] = b"\x00\x00"  # an early end, or an empty box
        elif what == "high":
            encoded[where] = data.draw(st.integers(1, 255))  # a length over the limits
        elif what == "insert":
            encoded[where:where] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del encoded[where]
    assert_same_parse(bytes(encoded))


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_parse_boxes_matches_the_reference_on_random_bytes(data: bytes) -> None:
    assert_same_parse(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00\x00",  # an empty box
        b"\x00\x01a\x00\x00\x00\x00\x00\x00",  # a box, then an empty one
        b"\x01\x00" + b"k" * 256 + b"\x00\x00\x00\x00",  # a key of 256 bytes
        b"\x00\xff" + b"k" * 255 + b"\x00\x00\x00\x00",  # a key of 255 bytes
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",  # text
        b"\x00\x01a\xff\xff" + b"v" * 65_535 + b"\x00\x00",  # the longest value
        b"\x00\x01a\xff\xff" + b"v" * 65_534 + b"\x00\x00",  # one byte short
        b"\x00\x01a\x00\x01v\x00\x01a\x00\x01w\x00\x00",  # a repeated key: the last wins
        b"\x00\x01a\x00\x01v",  # no end
        b"\x00\x01a\x00\x01v\x00",  # half an end
        b"\x00\x01a\x00",  # half a value length
        b"\x00\x01",  # a key length only
    ],
)
def test_parse_boxes_matches_the_reference_on_edge_cases(data: bytes) -> None:
    assert_same_parse(data)


@pytest.mark.parametrize(
    "data",
    [
        bytearray(b"\x00\x01a\x00\x01v\x00\x00"),
        memoryview(b"\x00\x01a\x00\x01v\x00\x00"),
        bytearray(b"\x00\x00"),
        bytearray(b""),
    ],
)
def test_parse_boxes_takes_other_buffers_as_before(data: Any) -> None:
    assert_same_parse(data)


# encode_box


@settings(max_examples=300)
@given(boxes)
def test_encode_box_matches_the_reference(box: dict[bytes, bytes]) -> None:
    assert_same_encoding(box)
    assert_same_encoding(box)  # the keys are known the second time


@settings(max_examples=300)
@given(st.lists(st.tuples(keys, values), max_size=6))
def test_encode_items_matches_the_reference(items: list[tuple[bytes, bytes]]) -> None:
    for _ in range(2):  # the keys are known the second time
        assert encode_items_outcome(encode_items, items) == encode_items_outcome(
            reference_encode_items, items
        )


class Key(bytes):
    """A bytes subclass: AMP keys are bytes exactly."""


@pytest.mark.parametrize(
    "box",
    [
        {b"a": b"1", "b": b"2"},  # keys that do not sort together
        {"a": b"1"},
        {Key(b"a"): b"1"},  # equal to a known key, not bytes
        {b"a": "1"},
        {b"a": 1},
        {b"a": bytearray(b"1")},
        {b"a": memoryview(b"12345")},
        {b"a": memoryview(b"12345")[::2]},  # not contiguous
        {b"a": b"v" * 1023},
        {b"a": b"v" * 1024},
        {b"a": b"v" * MAX_VALUE_LENGTH},
        {b"a": b"v" * (MAX_VALUE_LENGTH + 1)},
        {b"": b"1"},
        {b"k" * 255: b"1"},
        {b"k" * 256: b"1"},
        {b"a": b"1", b"b": b"v" * (MAX_VALUE_LENGTH + 1), b"c": "3"},  # the first fault
        {},
    ],
)
def test_encode_box_matches_the_reference_on_edge_cases(box: dict[Any, Any]) -> None:
    encode_box({b"a": b"1", b"b": b"2", b"c": b"3"})  # these keys are known
    assert_same_encoding(box)
    assert_same_encoding(box)
    items = list(box.items())
    assert encode_items_outcome(encode_items, items) == encode_items_outcome(
        reference_encode_items, items
    )


def test_encode_box_remembers_a_bounded_number_of_keys() -> None:
    # The pure-Python encode_box's cache of checked keys (the accelerator needs none).
    kept = dict(_KEY_HEADS)
    try:
        for i in range(_KEY_HEADS_SIZE + 100):
            key = b"key-%d" % i
            assert python_encode_box({key: b"v"}) == reference_encode_box({key: b"v"})
        assert len(_KEY_HEADS) == _KEY_HEADS_SIZE
        # Keys it did not keep are still encoded and checked in each box.
        assert_same_encoding({b"new-key": b"v", b"k" * 256: b"v"})
        assert python_encode_box({b"another": b"v"}) == reference_encode_box({b"another": b"v"})
        assert b"another" not in _KEY_HEADS
    finally:
        _KEY_HEADS.clear()
        _KEY_HEADS.update(kept)


def test_encode_box_keeps_no_key_it_refused() -> None:
    for bad in (b"", b"k" * 256):
        with pytest.raises(ValueError):
            python_encode_box({bad: b"v"})
        assert bad not in _KEY_HEADS


# The connection's one-pass path for the usual boxes against the general decoder


def connection_events(data: bytes, max_keys: int) -> list[object]:
    conn = AMPConnection(max_keys=max_keys)
    conn.receive_data(data)
    return [
        ("failure", str(event.error)) if isinstance(event, Failure) else event
        for event in conn.events_received()
    ]


def decoder_events(data: bytes, max_keys: int) -> list[object]:
    boxes, error = BoxDecoder(max_keys=max_keys).receive_data_partial(data)
    events: list[object] = []
    for box in boxes:
        try:
            events.append(_classify(box))
        except ProtocolError as exc:
            error = exc
            break
    if error is not None:
        events.append(("failure", str(error)))
    return events


usual_boxes = st.lists(
    st.tuples(
        st.sampled_from(
            [
                *(b"_ask", b"_answer", b"_command", b"_error"),
                *(b"_error_code", b"_error_description", b"a", b"total"),
            ]
        ),
        st.binary(max_size=4),
    ),
    min_size=1,
    max_size=4,
).map(lambda pairs: encode_box(dict(sorted(pairs))))


@settings(max_examples=300)
@given(st.lists(usual_boxes, min_size=1, max_size=4), st.integers(1, 6), st.data())
def test_connection_matches_the_decoder_on_corrupted_streams(
    stream: list[bytes], max_keys: int, data: st.DataObject
) -> None:
    encoded = bytearray(b"".join(stream))
    for _ in range(data.draw(st.integers(0, 3))):
        where = data.draw(st.integers(0, len(encoded) - 1))
        encoded[where] = data.draw(st.sampled_from([0, 1, 255, data.draw(st.integers(0, 255))]))
    cut = data.draw(st.integers(0, len(encoded)))
    for chunk in (bytes(encoded), bytes(encoded[:cut])):
        assert connection_events(chunk, max_keys) == decoder_events(chunk, max_keys)


@pytest.mark.parametrize("byte", [0, 1, 2, 0x7F, 0xFF])
def test_connection_matches_the_decoder_with_any_byte_changed(byte: int) -> None:
    stream = (
        encode_box({b"_answer": b"1", b"total": b"94"})
        + encode_box({b"_ask": b"2", b"_command": b"Sum", b"a": b"13", b"b": b"81"})
        + encode_box({b"_answer": b"3", b"_error": b"x"})
        + encode_box({b"_error": b"4", b"_error_code": b"X", b"_error_description": b"y"})
        + encode_box({b"_error": b"5", b"_error_code": b"X"})
    )
    for where in range(len(stream)):
        changed = bytearray(stream)
        changed[where] = byte
        for max_keys in (2, 4, 1024):
            data = bytes(changed)
            assert connection_events(data, max_keys) == decoder_events(data, max_keys), where
