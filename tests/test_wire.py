"""Tests for the box codec: encode_box, BoxDecoder and parse_boxes (exact bytes, no I/O)."""

from __future__ import annotations

import array
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncio_amp._errors import ProtocolError, TooLongError
from asyncio_amp._wire import (
    ANSWER,
    ASK,
    BOX_END,
    COMMAND,
    DEFAULT_MAX_BOX_SIZE,
    DEFAULT_MAX_KEYS,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    RESERVED_KEYS,
    Box,
    BoxDecoder,
    PythonBoxDecoder,
    check_key,
    encode_box,
    length_prefix,
    parse_boxes,
    parse_nested_boxes,
)

#: Twisted's bytes for ``callRemote(Sum, a=13, b=81)`` on a fresh connection.
SUM_ASK = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00"
SUM_ASK_BOX = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
SUM_ANSWER = b"\x00\x07_answer\x00\x011\x00\x05total\x00\x0294\x00\x00"
SUM_ANSWER_BOX = {b"_answer": b"1", b"total": b"94"}


def feed_in_chunks(decoder: BoxDecoder, data: bytes, cuts: list[int]) -> list[Box]:
    """Feed ``data`` cut at the offsets in ``cuts``; return every box decoded."""
    boxes: list[Box] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        boxes += decoder.receive_data(data[start:cut])
        start = cut
    return boxes


# Constants


def test_wire_constants_are_twisteds() -> None:
    assert (ASK, ANSWER, COMMAND) == (b"_ask", b"_answer", b"_command")
    assert (ERROR, ERROR_CODE, ERROR_DESCRIPTION) == (
        b"_error",
        b"_error_code",
        b"_error_description",
    )
    assert {ASK, ANSWER, COMMAND, ERROR, ERROR_CODE, ERROR_DESCRIPTION} == RESERVED_KEYS
    assert (MAX_KEY_LENGTH, MAX_VALUE_LENGTH) == (255, 65_535)
    assert BOX_END == b"\x00\x00"


@pytest.mark.parametrize(
    ("n", "prefix"),
    [
        (0, b"\x00\x00"),
        (1, b"\x00\x01"),
        (255, b"\x00\xff"),
        (256, b"\x01\x00"),
        (1023, b"\x03\xff"),
        (1024, b"\x04\x00"),
        (4660, b"\x12\x34"),
        (65_535, b"\xff\xff"),
    ],
)
def test_length_prefix_is_two_bytes_big_endian(n: int, prefix: bytes) -> None:
    assert length_prefix(n) == prefix


# encode_box


def test_encode_box_writes_twisteds_sum_ask_box() -> None:
    box = {b"b": b"81", b"_command": b"Sum", b"a": b"13", b"_ask": b"1"}
    assert encode_box(box) == SUM_ASK


def test_encode_box_writes_an_answer_box() -> None:
    assert encode_box({b"total": b"94", b"_answer": b"1"}) == SUM_ANSWER


def test_encode_box_of_nothing_is_the_terminator() -> None:
    assert encode_box({}) == b"\x00\x00"


def test_encode_box_sorts_keys_bytewise() -> None:
    # b"B" (0x42) < b"_ask" (0x5f) < b"a" (0x61) < b"\xc3\xa9" (0xc3).
    box = {b"\xc3\xa9": b"4", b"a": b"3", b"_ask": b"2", b"B": b"1"}
    assert encode_box(box) == (
        b"\x00\x01B\x00\x011"
        b"\x00\x04_ask\x00\x012"
        b"\x00\x01a\x00\x013"
        b"\x00\x02\xc3\xa9\x00\x014"
        b"\x00\x00"
    )


def test_encode_box_writes_an_empty_value() -> None:
    assert encode_box({b"k": b""}) == b"\x00\x01k\x00\x00\x00\x00"


@pytest.mark.parametrize("n", [1023, 1024, 4660, 65_535])
def test_encode_box_writes_long_values_with_their_length(n: int) -> None:
    value = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
    assert encode_box({b"v": value}) == b"\x00\x01v" + n.to_bytes(2, "big") + value + b"\x00\x00"


def test_encode_box_accepts_a_key_of_255_bytes() -> None:
    key = b"k" * 255
    assert encode_box({key: b"v"}) == b"\x00\xff" + key + b"\x00\x01v\x00\x00"


def test_encode_box_accepts_a_key_of_one_byte() -> None:
    assert encode_box({b"k": b"v"}) == b"\x00\x01k\x00\x01v\x00\x00"


def test_encode_box_refuses_a_key_of_256_bytes() -> None:
    key = b"k" * 256
    with pytest.raises(TooLongError) as info:
        encode_box({b"a": b"1", key: b"v"})
    exc = info.value
    assert (exc.key, exc.length, exc.limit, exc.is_key) == (key, 256, 255, True)
    assert str(exc) == f"key {b'k' * 40 + b'...'!r} is 256 bytes; AMP allows at most 255"
    assert isinstance(exc, ValueError)


def test_encode_box_accepts_a_value_of_65535_bytes() -> None:
    value = b"x" * 65_535
    assert encode_box({b"v": value}) == b"\x00\x01v\xff\xff" + value + b"\x00\x00"


def test_encode_box_refuses_a_value_of_65536_bytes() -> None:
    with pytest.raises(TooLongError) as info:
        encode_box({b"a": b"1", b"big": b"x" * 65_536})
    exc = info.value
    assert (exc.key, exc.length, exc.limit, exc.is_key) == (b"big", 65_536, 65_535, False)
    assert str(exc) == "value of key b'big' is 65536 bytes; AMP allows at most 65535"


def test_encode_box_refuses_a_str_key() -> None:
    with pytest.raises(TypeError, match="bytes, not str"):
        encode_box({"a": b"1"})  # type: ignore[dict-item]


def test_encode_box_refuses_a_str_value_and_names_the_key() -> None:
    with pytest.raises(TypeError, match=r"bytes, not str \(key b'name'\)"):
        encode_box({b"name": "value"})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [None, 12, 1.5, ["a"]])
def test_encode_box_refuses_values_that_are_not_bytes(value: object) -> None:
    with pytest.raises(TypeError, match=type(value).__name__):
        encode_box({b"k": value})  # type: ignore[dict-item]


def test_encode_box_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="empty") as info:
        encode_box({b"": b"x"})
    assert not isinstance(info.value, TooLongError)


def test_encode_box_accepts_bytearray_and_memoryview_values() -> None:
    box = {b"a": bytearray(b"12"), b"b": memoryview(b"345")}
    assert encode_box(box) == b"\x00\x01a\x00\x0212\x00\x01b\x00\x03345\x00\x00"  # type: ignore[arg-type]


def test_encode_box_writes_a_memoryview_slice_as_its_bytes() -> None:
    view = memoryview(b"abcdef")[1:3]
    assert encode_box({b"k": view}) == b"\x00\x01k\x00\x02bc\x00\x00"  # type: ignore[dict-item]


def test_encode_box_counts_a_memoryview_in_bytes() -> None:
    view = memoryview(array.array("H", [1, 2]))
    data = encode_box({b"k": view})  # type: ignore[dict-item]
    assert data == b"\x00\x01k\x00\x04" + view.tobytes() + b"\x00\x00"


def test_encode_box_accepts_a_strided_memoryview() -> None:
    view = memoryview(b"abcdef")[::2]
    assert encode_box({b"k": view}) == b"\x00\x01k\x00\x03ace\x00\x00"  # type: ignore[dict-item]


def test_encode_box_refuses_a_memoryview_over_the_limit() -> None:
    with pytest.raises(TooLongError) as info:
        encode_box({b"v": memoryview(bytes(65_536))})  # type: ignore[dict-item]
    assert (info.value.key, info.value.length) == (b"v", 65_536)


def test_encode_box_refuses_a_bytearray_value_over_the_limit() -> None:
    with pytest.raises(TooLongError) as info:
        encode_box({b"v": bytearray(65_536)})  # type: ignore[dict-item]
    assert info.value.length == 65_536


def test_check_key_refuses_a_bytes_subclass() -> None:
    class Key(bytes):
        pass

    with pytest.raises(TypeError, match="Key"):
        check_key(Key(b"k"))


# BoxDecoder: good input


def test_decoder_decodes_one_box_in_one_chunk() -> None:
    decoder = BoxDecoder()
    assert decoder.receive_data(SUM_ASK) == [SUM_ASK_BOX]
    assert not decoder.in_box
    assert decoder.buffered == 0


def test_decoder_returns_nothing_for_no_data() -> None:
    decoder = BoxDecoder()
    assert decoder.receive_data(b"") == []
    assert not decoder.in_box


def test_decoder_decodes_two_boxes_split_at_every_point() -> None:
    stream = SUM_ASK + SUM_ANSWER
    for cut in range(len(stream) + 1):
        decoder = BoxDecoder()
        first = decoder.receive_data(stream[:cut])
        second = decoder.receive_data(stream[cut:])
        assert first + second == [SUM_ASK_BOX, SUM_ANSWER_BOX], cut
        assert len(first) == (0 if cut < len(SUM_ASK) else 1 if cut < len(stream) else 2)


def test_decoder_decodes_boxes_split_at_every_pair_of_points() -> None:
    stream = SUM_ANSWER + SUM_ANSWER
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            decoder = BoxDecoder()
            assert feed_in_chunks(decoder, stream, [i, j]) == [SUM_ANSWER_BOX] * 2, (i, j)


def test_decoder_decodes_one_byte_at_a_time() -> None:
    stream = SUM_ASK + SUM_ANSWER
    decoder = BoxDecoder()
    seen: list[tuple[int, Box]] = []
    for i in range(len(stream)):
        for box in decoder.receive_data(stream[i : i + 1]):
            seen.append((i, box))
    # Each box comes out with its last byte, not before.
    assert seen == [(len(SUM_ASK) - 1, SUM_ASK_BOX), (len(stream) - 1, SUM_ANSWER_BOX)]


def test_decoder_decodes_100_boxes_in_one_chunk() -> None:
    boxes = [{b"_ask": b"%x" % i, b"_command": b"Sum", b"a": b"%d" % i} for i in range(100)]
    stream = b"".join(encode_box(box) for box in boxes)
    assert BoxDecoder().receive_data(stream) == boxes


def test_decoder_decodes_a_value_of_65535_bytes() -> None:
    value = bytes(range(256)) * 255 + bytes(range(255))
    assert len(value) == 65_535
    stream = b"\x00\x01v\xff\xff" + value + b"\x00\x01w\x00\x00\x00\x00"
    assert BoxDecoder().receive_data(stream) == [{b"v": value, b"w": b""}]


def test_decoder_decodes_a_key_of_255_bytes() -> None:
    key = b"k" * 255
    assert BoxDecoder().receive_data(b"\x00\xff" + key + b"\x00\x01v\x00\x00") == [{key: b"v"}]


def test_decoder_accepts_keys_in_any_order() -> None:
    stream = (
        b"\x00\x01b\x00\x0281\x00\x08_command\x00\x03Sum\x00\x01a\x00\x0213\x00\x04_ask\x00\x011"
    )
    assert BoxDecoder().receive_data(stream + b"\x00\x00") == [SUM_ASK_BOX]


def test_decoder_keeps_the_last_of_duplicate_keys() -> None:
    stream = b"\x00\x01k\x00\x01a\x00\x01j\x00\x01x\x00\x01k\x00\x02bb\x00\x00"
    assert BoxDecoder().receive_data(stream) == [{b"k": b"bb", b"j": b"x"}]


def test_decoder_returns_values_and_keys_as_bytes() -> None:
    [box] = BoxDecoder().receive_data(SUM_ANSWER)
    assert all(type(key) is bytes and type(value) is bytes for key, value in box.items())


def test_decoder_boxes_are_independent_dicts() -> None:
    decoder = BoxDecoder()
    first, second = decoder.receive_data(SUM_ANSWER * 2)
    first[b"extra"] = b"1"
    assert second == SUM_ANSWER_BOX


# BoxDecoder: in_box, buffered, end_of_stream


def test_in_box_and_buffered_follow_the_box_being_received() -> None:
    decoder = BoxDecoder()
    assert (decoder.in_box, decoder.buffered) == (False, 0)
    decoder.receive_data(b"\x00")
    assert (decoder.in_box, decoder.buffered) == (True, 1)
    decoder.receive_data(b"\x07_answer\x00\x011")
    assert (decoder.in_box, decoder.buffered) == (True, 12)
    decoder.receive_data(b"\x00\x05total\x00\x0294")
    assert (decoder.in_box, decoder.buffered) == (True, 23)
    decoder.receive_data(b"\x00")
    assert (decoder.in_box, decoder.buffered) == (True, 24)
    assert decoder.receive_data(b"\x00") == [SUM_ANSWER_BOX]
    assert (decoder.in_box, decoder.buffered) == (False, 0)


def test_buffered_counts_a_partial_value() -> None:
    decoder = BoxDecoder()
    decoder.receive_data(b"\x00\x01v\x01\x00" + b"x" * 100)
    assert decoder.in_box
    assert decoder.buffered == 105


def test_end_of_stream_on_a_box_boundary_is_clean() -> None:
    decoder = BoxDecoder()
    assert decoder.end_of_stream() is None
    decoder.receive_data(SUM_ANSWER)
    assert decoder.end_of_stream() is None


def test_end_of_stream_inside_a_box_is_an_error() -> None:
    decoder = BoxDecoder()
    decoder.receive_data(SUM_ANSWER[:-2] + b"\x00\x01k")
    error = decoder.end_of_stream()
    assert isinstance(error, ProtocolError)
    assert str(error) == (
        "the stream ended inside a box (26 bytes of it received, 2 complete keys)"
    )


def test_end_of_stream_after_one_byte_is_an_error() -> None:
    decoder = BoxDecoder()
    decoder.receive_data(b"\x00")
    error = decoder.end_of_stream()
    assert isinstance(error, ProtocolError)
    assert "1 bytes of it received, 0 complete keys" in str(error)


def test_end_of_stream_after_an_error_reports_nothing_new() -> None:
    decoder = BoxDecoder()
    decoder.receive_data_partial(b"\x00\x01k\x00\x01v\x01\x00")
    assert decoder.end_of_stream() is None


# BoxDecoder: malformed input


def test_empty_box_is_an_error() -> None:
    decoder = BoxDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(b"\x00\x00")
    assert str(info.value) == "empty box at stream offset 0: a box needs at least one key"


def test_empty_box_after_a_box_reports_its_offset() -> None:
    decoder = BoxDecoder()
    decoder.receive_data(SUM_ANSWER)
    boxes, error = decoder.receive_data_partial(b"\x00\x00")
    assert boxes == []
    assert str(error) == "empty box at stream offset 25: a box needs at least one key"


def test_key_length_over_255_is_an_error() -> None:
    with pytest.raises(ProtocolError) as info:
        BoxDecoder().receive_data(b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00")
    assert str(info.value) == "key length 256 at stream offset 0 is over the AMP limit of 255"


def test_key_length_over_255_is_caught_from_its_length_alone() -> None:
    decoder = BoxDecoder()
    assert decoder.receive_data(b"\x01") == []
    with pytest.raises(ProtocolError, match="key length 256"):
        decoder.receive_data(b"\x00")


def test_key_length_over_255_in_a_later_key_and_a_later_box() -> None:
    decoder = BoxDecoder()
    with pytest.raises(ProtocolError, match="key length 65535 at stream offset 6 "):
        decoder.receive_data(b"\x00\x01a\x00\x011\xff\xff")
    decoder = BoxDecoder()
    boxes, error = decoder.receive_data_partial(SUM_ANSWER + b"\x01\x00")
    assert boxes == [SUM_ANSWER_BOX]
    assert str(error) == "key length 256 at stream offset 25 is over the AMP limit of 255"


def test_http_request_is_reported_as_text() -> None:
    with pytest.raises(ProtocolError) as info:
        BoxDecoder().receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert str(info.value) == (
        "key length 18245 at stream offset 0 is over the AMP limit of 255; "
        "the data starts with b'GET / HTTP/1.0\\r\\n\\r\\n', which is text, not AMP"
    )


def test_long_text_is_shown_cut_to_24_bytes() -> None:
    with pytest.raises(ProtocolError) as info:
        BoxDecoder().receive_data(b"POST /a/long/path/to/something HTTP/1.1\r\n")
    assert str(info.value).endswith(
        "the data starts with b'POST /a/long/path/to/som', which is text, not AMP"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\x00\x01",  # binary
        b"1GET / HTTP/1.0",  # does not start with a letter
        b"Ab\x00\x01\x02",  # starts with letters, then binary
    ],
)
def test_binary_input_is_not_described_as_text(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        BoxDecoder().receive_data(data)
    assert str(info.value).endswith("is over the AMP limit of 255")


def test_error_keeps_the_boxes_before_it() -> None:
    decoder = BoxDecoder()
    boxes, error = decoder.receive_data_partial(SUM_ASK + SUM_ANSWER + b"\x00\x00" + SUM_ANSWER)
    assert boxes == [SUM_ASK_BOX, SUM_ANSWER_BOX]
    assert isinstance(error, ProtocolError)


def test_receive_data_raises_for_an_error_after_good_boxes() -> None:
    decoder = BoxDecoder()
    with pytest.raises(ProtocolError, match="empty box at stream offset 25"):
        decoder.receive_data(SUM_ANSWER + b"\x00\x00")


def test_errors_are_sticky() -> None:
    decoder = BoxDecoder()
    boxes, error = decoder.receive_data_partial(b"\x00\x00")
    assert boxes == []
    assert error is not None
    # Every later call reports the same error, good data or not.
    assert decoder.receive_data_partial(SUM_ANSWER) == ([], error)
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(SUM_ANSWER)
    assert info.value is error
    assert not decoder.in_box


def test_error_inside_a_partial_box_drops_that_box() -> None:
    decoder = BoxDecoder()
    decoder.receive_data(b"\x00\x01a\x00\x011")
    assert decoder.in_box
    _, error = decoder.receive_data_partial(b"\x01\x00")
    assert error is not None
    assert not decoder.in_box
    assert decoder.end_of_stream() is None


def test_buffered_is_zero_after_an_error() -> None:
    # The unfinished box is dropped with the error, so nothing belongs to it any more:
    # in_box is False and buffered must agree.
    decoder = BoxDecoder()
    decoder.receive_data(b"\x00\x01a\x00\x011")
    assert decoder.buffered == 6
    decoder.receive_data_partial(b"\x01\x00")
    assert not decoder.in_box
    assert decoder.buffered == 0


def test_a_value_length_without_its_bytes_waits() -> None:
    # Like Twisted: a length prefix followed by too few bytes just waits for more.
    decoder = BoxDecoder()
    assert decoder.receive_data(b"\x00\x01v\xff\xff" + b"x" * 1000) == []
    assert decoder.in_box
    assert isinstance(decoder.end_of_stream(), ProtocolError)


# BoxDecoder: receiving limits


def test_default_limits() -> None:
    assert DEFAULT_MAX_BOX_SIZE == 16 * 1024 * 1024
    assert DEFAULT_MAX_KEYS == 1024


def test_box_at_max_box_size_is_accepted() -> None:
    # Two pairs of 3 + 2 + 10 = 15 bytes each; the limit counts the pairs.
    stream = b"\x00\x01a\x00\x0a" + b"x" * 10 + b"\x00\x01b\x00\x0a" + b"y" * 10 + b"\x00\x00"
    decoder = BoxDecoder(max_box_size=30)
    assert decoder.receive_data(stream) == [{b"a": b"x" * 10, b"b": b"y" * 10}]
    # The limit is per box: a second box of the same size is fine.
    assert decoder.receive_data(stream) == [{b"a": b"x" * 10, b"b": b"y" * 10}]


def test_box_over_max_box_size_is_an_error() -> None:
    stream = b"\x00\x01a\x00\x0a" + b"x" * 10 + b"\x00\x01b\x00\x0b" + b"y" * 11 + b"\x00\x00"
    with pytest.raises(ProtocolError) as info:
        BoxDecoder(max_box_size=30).receive_data(stream)
    assert str(info.value) == (
        "box at stream offset 0 is over the limit of 30 bytes (key b'b' brings it to 31)"
    )


def test_max_box_size_is_checked_before_the_value_arrives() -> None:
    decoder = BoxDecoder(max_box_size=1000)
    decoder.receive_data(SUM_ANSWER)
    # Only the key and the value's length: 3 + 2 + 60,000 is over 1,000 already.
    boxes, error = decoder.receive_data_partial(b"\x00\x01v\xea\x60")
    assert boxes == []
    assert str(error) == (
        "box at stream offset 25 is over the limit of 1000 bytes (key b'v' brings it to 60005)"
    )


def test_max_box_size_offset_is_the_start_of_the_box() -> None:
    # SUM_ANSWER's pairs take exactly 23 bytes: at the limit, so accepted.
    decoder = BoxDecoder(max_box_size=23)
    assert decoder.receive_data(SUM_ANSWER + b"\x00\x01a\x00\x011") == [SUM_ANSWER_BOX]
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(b"\x00\x01b\x00\x12")
    assert str(info.value) == (
        "box at stream offset 25 is over the limit of 23 bytes (key b'b' brings it to 29)"
    )


def test_box_with_max_keys_is_accepted() -> None:
    box = {b"k%d" % i: b"%d" % i for i in range(5)}
    assert BoxDecoder(max_keys=5).receive_data(encode_box(box)) == [box]


def test_box_over_max_keys_is_an_error() -> None:
    box = {b"k%d" % i: b"%d" % i for i in range(6)}
    with pytest.raises(ProtocolError) as info:
        BoxDecoder(max_keys=5).receive_data(SUM_ANSWER + encode_box(box))
    assert str(info.value) == "box at stream offset 25 has more than 5 keys"


def test_max_keys_is_checked_before_the_value_arrives() -> None:
    decoder = BoxDecoder(max_keys=2)
    # Two keys, then the header of a third whose 1,000-byte value has not arrived.
    boxes, error = decoder.receive_data_partial(
        b"\x00\x01a\x00\x011\x00\x01b\x00\x011\x00\x01c\x03\xe8"
    )
    assert boxes == []
    assert isinstance(error, ProtocolError)
    assert "more than 2 keys" in str(error)


# BoxDecoder: work done


class CountingDecoder(PythonBoxDecoder):
    """The pure-Python BoxDecoder, counting the bytes it parses (the compiled one mirrors it)."""

    __slots__ = ("parsed",)

    def __init__(self) -> None:
        super().__init__()
        self.parsed = 0

    def _parse(self, data: bytes, boxes: list[Box], start: int = 0) -> None:
        self.parsed += len(data) - start
        super()._parse(data, boxes, start)


def test_one_byte_feeds_are_decoded_in_linear_work() -> None:
    value = b"x" * 65_535
    box = b"\x00\x01v\xff\xff" + value + b"\x00\x00"
    small = b"\x00\x01k\x00\x01v\x00\x00"
    stream = box * 3 + small * ((200_000 - 3 * len(box)) // len(small))
    assert len(stream) > 199_990
    decoder = CountingDecoder()
    boxes: list[Box] = []
    for i in range(len(stream)):
        boxes += decoder.receive_data(stream[i : i + 1])
    assert boxes[:3] == [{b"v": value}] * 3
    assert len(boxes) == 3 + (len(stream) - 3 * len(box)) // len(small)
    # Re-parsing the buffered bytes on every feed would be about 65,535 ** 2 / 2 bytes
    # per big value; linear decoding parses each byte a small constant number of times.
    assert decoder.parsed <= 3 * len(stream)


# parse_boxes


def test_parse_boxes_parses_a_whole_stream() -> None:
    assert parse_boxes(SUM_ASK + SUM_ANSWER) == [SUM_ASK_BOX, SUM_ANSWER_BOX]


def test_parse_boxes_of_nothing_is_no_boxes() -> None:
    assert parse_boxes(b"") == []


def test_parse_boxes_refuses_a_stream_that_ends_inside_a_box() -> None:
    with pytest.raises(ProtocolError, match="the stream ended inside a box"):
        parse_boxes(SUM_ANSWER + SUM_ANSWER[:-1])


def test_parse_boxes_refuses_malformed_input() -> None:
    with pytest.raises(ProtocolError, match="empty box"):
        parse_boxes(SUM_ANSWER + b"\x00\x00")


def test_parse_boxes_has_no_receiving_limits() -> None:
    box = {b"k%d" % i: b"v" for i in range(DEFAULT_MAX_KEYS + 10)}
    assert parse_boxes(encode_box(box)) == [box]


# parse_nested_boxes (AmpList values)


def test_parse_nested_boxes() -> None:
    data = b"\x00\x01a\x00\x017\x00\x01b\x00\x02hi\x00\x00\x00\x01a\x00\x019\x00\x00"
    assert parse_nested_boxes(data) == [{b"a": b"7", b"b": b"hi"}, {b"a": b"9"}]


def test_parse_nested_boxes_allows_empty_boxes() -> None:
    assert parse_nested_boxes(b"") == []
    assert parse_nested_boxes(b"\x00\x00") == [{}]
    assert parse_nested_boxes(b"\x00\x00\x00\x01k\x00\x00\x00\x00\x00\x00") == [{}, {b"k": b""}, {}]


def test_parse_nested_boxes_keeps_the_last_of_duplicate_keys() -> None:
    assert parse_nested_boxes(b"\x00\x01k\x00\x011\x00\x01k\x00\x012\x00\x00") == [{b"k": b"2"}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00", "nested boxes: 1 stray byte at offset 0"),
        (b"\x00\x00\x00", "nested boxes: 1 stray byte at offset 2"),
        (b"\x01\x00" + b"k" * 256, "nested boxes: key length 256 at offset 0 is over 255"),
        (b"\x00\x02k", "nested boxes: truncated key at offset 0"),
        (b"\x00\x00\x00\x01k\x00", "nested boxes: truncated key at offset 2"),
        (b"\x00\x01k\x00\x03ab", "nested boxes: truncated value at offset 3"),
        (b"\x00\x01k\x00\x01a", "nested boxes: the last box has no end"),
    ],
)
def test_parse_nested_boxes_refuses_what_is_not_whole_boxes(data: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_nested_boxes(data)
    assert str(info.value) == message
    assert not isinstance(info.value, ProtocolError)


# Properties

keys = st.binary(min_size=1, max_size=MAX_KEY_LENGTH)
short_keys = st.binary(min_size=1, max_size=8)
values = st.binary(max_size=300)
boxes_strategy = st.dictionaries(st.one_of(short_keys, keys), values, min_size=1, max_size=8)


@settings(max_examples=200)
@given(st.lists(boxes_strategy, max_size=6), st.data())
def test_encoded_boxes_decode_the_same_however_split(boxes: list[Box], data: st.DataObject) -> None:
    stream = b"".join(encode_box(box) for box in boxes)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoder = BoxDecoder()
    assert feed_in_chunks(decoder, stream, cuts) == boxes
    assert not decoder.in_box
    assert decoder.end_of_stream() is None
    assert parse_boxes(stream) == boxes


@settings(max_examples=200)
@given(boxes_strategy)
def test_encoded_box_is_sorted_and_framed(box: Box) -> None:
    data = encode_box(box)
    expected = b"".join(
        len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
        for key, value in sorted(box.items())
    )
    assert data == expected + b"\x00\x00"


def _feed_all(decoder: BoxDecoder, chunks: list[bytes]) -> tuple[list[Box], bool]:
    boxes: list[Box] = []
    failed = False
    for chunk in chunks:
        try:
            boxes += decoder.receive_data(chunk)
        except ProtocolError:
            failed = True
            break
    return boxes, failed


@settings(max_examples=200)
@given(
    st.binary(max_size=200),
    st.data(),
    st.integers(1, 4),
    st.integers(1, 64),
)
def test_arbitrary_bytes_decode_or_raise_protocol_error(
    stream: bytes, data: st.DataObject, max_keys: int, max_box_size: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    pieces = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        pieces.append(stream[start:cut])
        start = cut
    for limits in ({}, {"max_keys": max_keys, "max_box_size": max_box_size}):
        # Whatever the chunks, the outcome is that of the whole stream at once.
        chunked = BoxDecoder(**limits)
        whole = BoxDecoder(**limits)
        assert _feed_all(chunked, pieces) == _feed_all(whole, [stream])
        assert chunked.in_box == whole.in_box
        assert (chunked.end_of_stream() is None) == (whole.end_of_stream() is None)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 300), st.binary(max_size=6)), max_size=12))
def test_near_amp_bytes_decode_or_raise_protocol_error(parts: list[tuple[int, bytes]]) -> None:
    # Length prefixes with short bodies, so that boxes, empty boxes and bad keys all occur.
    stream = b"".join(n.to_bytes(2, "big") + body for n, body in parts)
    decoder = BoxDecoder(max_keys=3, max_box_size=40)
    try:
        boxes = decoder.receive_data(stream)
    except ProtocolError:
        return
    assert all(box for box in boxes)
    assert boxes == parse_boxes(stream[: len(stream) - decoder.buffered])


@settings(max_examples=200)
@given(st.lists(st.dictionaries(short_keys, values, max_size=4), max_size=5))
def test_nested_boxes_round_trip(boxes: list[Box]) -> None:
    assert parse_nested_boxes(b"".join(encode_box(box) for box in boxes)) == boxes


@settings(max_examples=200)
@given(st.binary(max_size=60))
def test_arbitrary_nested_bytes_parse_or_raise_value_error(data: bytes) -> None:
    try:
        boxes = parse_nested_boxes(data)
    except ValueError:
        return
    # What parses is whole boxes, which encode and parse back to themselves.
    assert parse_nested_boxes(b"".join(encode_box(box) for box in boxes)) == boxes


# Errors


def test_decoder_errors_pickle() -> None:
    _, error = BoxDecoder().receive_data_partial(b"\x00\x00")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ProtocolError
    assert str(copy) == str(error)


def test_at_boundary_and_skip() -> None:
    decoder = BoxDecoder()
    assert decoder._at_boundary
    decoder.receive_data(SUM_ASK[:3])
    assert not decoder._at_boundary
    decoder.receive_data(SUM_ASK[3:12])
    assert not decoder._at_boundary  # a complete pair is in the box being built
    decoder.receive_data(SUM_ASK[12:])
    assert decoder._at_boundary
    # Bytes parsed elsewhere count in the offsets of later errors.
    decoder._skip(100)
    with pytest.raises(ProtocolError, match="empty box at stream offset 140"):
        decoder.receive_data(b"\x00\x00")
    assert not decoder._at_boundary


def test_limits_are_checked_when_set() -> None:
    decoder = BoxDecoder(max_box_size=10, max_keys=2)
    assert (decoder.max_box_size, decoder.max_keys) == (10, 2)
    for name in ("max_box_size", "max_keys"):
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match=f"{name} must be a positive int"):
                setattr(decoder, name, bad)


@pytest.mark.parametrize("cut", [1, 2, 9, 12, 20, 37, 39])
def test_error_offsets_after_a_pair_completed_across_reads(cut: int) -> None:
    decoder = BoxDecoder()
    assert decoder.receive_data(SUM_ASK[:cut]) == []
    boxes, error = decoder.receive_data_partial(SUM_ASK[cut:] + SUM_ANSWER + b"\x01\x00")
    assert boxes == [SUM_ASK_BOX, SUM_ANSWER_BOX]
    assert error is not None
    offset = len(SUM_ASK) + len(SUM_ANSWER)
    assert f"key length 256 at stream offset {offset} is over" in str(error)
