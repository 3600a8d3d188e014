"""Tests for the sans-I/O connection: bytes in, events out; tags; the send queue."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asyncio_amp import Command, Integer, String
from asyncio_amp._connection import (
    AMPConnection,
    Answer,
    Ask,
    ErrorAnswer,
    Failure,
    State,
    _classify,
)
from asyncio_amp._errors import ProtocolError
from asyncio_amp._wire import BoxDecoder, encode_box

SUM_ASK_BOX = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
SUM_ASK = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00"
ANSWER_BOX = {b"_answer": b"1", b"total": b"94"}
ERROR_BOX = {b"_error": b"2", b"_error_code": b"ZERO", b"_error_description": b"div by zero!"}


def received(*boxes: dict[bytes, bytes]) -> list[object]:
    """The events a new connection emits for these boxes, fed as one chunk."""
    conn = AMPConnection()
    conn.receive_data(b"".join(encode_box(box) for box in boxes))
    return list(conn.events_received())


# Events


def test_new_connection_is_open_and_quiet() -> None:
    conn = AMPConnection()
    assert conn.state is State.OPEN
    assert conn.error is None
    assert conn.events_received() == []
    assert conn.data_to_send() == []
    assert not conn.has_data_to_send


def test_ask_with_a_tag() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK)
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]
    # Events are handed out once.
    assert conn.events_received() == []
    assert conn.state is State.OPEN


def test_ask_without_a_tag() -> None:
    box = {b"_command": b"Note", b"text": b"hi"}
    [event] = received(box)
    assert event == Ask(None, b"Note", box)
    assert isinstance(event, Ask)
    assert event.tag is None


def test_tags_are_opaque_bytes() -> None:
    box = {b"_ask": b"\x00\xffnot-hex", b"_command": b""}
    assert received(box) == [Ask(b"\x00\xffnot-hex", b"", box)]


def test_answer() -> None:
    [event] = received(ANSWER_BOX)
    assert event == Answer(b"1", ANSWER_BOX)
    assert isinstance(event, Answer)
    assert event.box[b"total"] == b"94"


def test_error_answer() -> None:
    assert received(ERROR_BOX) == [ErrorAnswer(b"2", b"ZERO", b"div by zero!", ERROR_BOX)]


def test_error_answer_with_empty_code_and_description() -> None:
    box = {b"_error": b"3", b"_error_code": b"", b"_error_description": b""}
    assert received(box) == [ErrorAnswer(b"3", b"", b"", box)]


def test_box_with_answer_and_command_is_an_answer() -> None:
    box = {b"_answer": b"5", b"_ask": b"6", b"_command": b"Sum"}
    assert received(box) == [Answer(b"5", box)]


def test_box_with_answer_and_error_is_an_answer() -> None:
    box = {b"_answer": b"5", b"_error": b"6"}
    assert received(box) == [Answer(b"5", box)]


def test_box_with_error_and_command_is_an_error_answer() -> None:
    box = {**ERROR_BOX, b"_ask": b"9", b"_command": b"Sum"}
    assert received(box) == [ErrorAnswer(b"2", b"ZERO", b"div by zero!", box)]


def test_events_of_several_boxes_come_in_order() -> None:
    note = {b"_command": b"Note"}
    assert received(SUM_ASK_BOX, ANSWER_BOX, ERROR_BOX, note) == [
        Ask(b"1", b"Sum", SUM_ASK_BOX),
        Answer(b"1", ANSWER_BOX),
        ErrorAnswer(b"2", b"ZERO", b"div by zero!", ERROR_BOX),
        Ask(None, b"Note", note),
    ]


def test_events_accumulate_until_taken() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK[:10])
    assert conn.events_received() == []
    conn.receive_data(SUM_ASK[10:] + encode_box(ANSWER_BOX)[:-1])
    conn.receive_data(encode_box(ANSWER_BOX)[-1:])
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX), Answer(b"1", ANSWER_BOX)]


def test_receiving_limits_are_passed_to_the_decoder() -> None:
    conn = AMPConnection(max_keys=1)
    conn.receive_data(encode_box(ANSWER_BOX))
    [event] = conn.events_received()
    assert isinstance(event, Failure)
    assert "more than 1 keys" in str(event.error)
    conn = AMPConnection(max_box_size=20)
    conn.receive_data(encode_box(ANSWER_BOX))
    [event] = conn.events_received()
    assert isinstance(event, Failure)
    assert "over the limit of 20 bytes" in str(event.error)


# Failures


def assert_failed(conn: AMPConnection, message: str) -> ProtocolError:
    assert conn.state is State.CLOSED
    assert isinstance(conn.error, ProtocolError)
    assert str(conn.error) == message
    return conn.error


def test_empty_box_fails_after_the_good_boxes_before_it() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + encode_box(ANSWER_BOX) + b"\x00\x00" + SUM_ASK)
    error = assert_failed(conn, "empty box at stream offset 65: a box needs at least one key")
    assert conn.events_received() == [
        Ask(b"1", b"Sum", SUM_ASK_BOX),
        Answer(b"1", ANSWER_BOX),
        Failure(error),
    ]


def test_box_of_no_kind_fails() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box(ANSWER_BOX) + encode_box({b"b": b"1", b"a": b"2"}))
    error = assert_failed(
        conn, "box has none of _command, _answer or _error (its keys: [b'a', b'b'])"
    )
    assert conn.events_received() == [Answer(b"1", ANSWER_BOX), Failure(error)]


def test_box_with_only_ask_fails() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box({b"_ask": b"1"}))
    assert_failed(conn, "box has none of _command, _answer or _error (its keys: [b'_ask'])")


def test_box_of_no_kind_with_many_keys_shows_the_first_eight() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box({b"k%d" % i: b"" for i in range(10)}))
    assert_failed(
        conn,
        "box has none of _command, _answer or _error (its keys: [b'k0', b'k1', b'k2', "
        "b'k3', b'k4', b'k5', b'k6', b'k7'], ...)",
    )


def test_error_box_without_code_fails() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box({b"_error": b"1", b"_error_description": b"x"}))
    error = assert_failed(conn, "error answer for tag b'1' has no _error_code key")
    assert conn.events_received() == [Failure(error)]


def test_error_box_without_description_fails() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + encode_box({b"_error": b"7", b"_error_code": b"X"}))
    error = assert_failed(conn, "error answer for tag b'7' has no _error_description key")
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX), Failure(error)]


def test_error_box_without_code_or_description_names_the_code() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box({b"_error": b"1"}))
    assert_failed(conn, "error answer for tag b'1' has no _error_code key")


def test_boxes_after_a_bad_box_in_the_same_chunk_are_dropped() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + encode_box({b"x": b"1"}) + encode_box(ANSWER_BOX))
    events = conn.events_received()
    assert [type(event) for event in events] == [Ask, Failure]


def test_bad_framing_fails() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + b"GET / HTTP/1.0\r\n\r\n")
    events = conn.events_received()
    assert events[0] == Ask(b"1", b"Sum", SUM_ASK_BOX)
    assert events[1] == Failure(conn.error)  # type: ignore[arg-type]
    assert "key length 18245 at stream offset 40" in str(conn.error)
    assert len(events) == 2


def test_data_is_ignored_once_failed() -> None:
    conn = AMPConnection()
    conn.receive_data(b"\x00\x00")
    error = conn.error
    assert [type(event) for event in conn.events_received()] == [Failure]
    conn.receive_data(SUM_ASK)
    conn.receive_data(b"\x00\x00")
    assert conn.events_received() == []
    assert conn.error is error
    assert conn.state is State.CLOSED


def test_fail_closes_with_a_failure_event() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK)
    error = ProtocolError("answer for tag b'9', which was never sent")
    conn.fail(error)
    assert conn.state is State.CLOSED
    assert conn.error is error
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX), Failure(error)]
    conn.receive_data(SUM_ASK)
    assert conn.events_received() == []


def test_fail_once_closed_does_nothing() -> None:
    conn = AMPConnection()
    first = ProtocolError("first")
    conn.fail(first)
    conn.events_received()
    conn.fail(ProtocolError("second"))
    assert conn.error is first
    assert conn.events_received() == []
    conn = AMPConnection()
    conn.connection_lost()
    conn.fail(ProtocolError("late"))
    assert conn.error is None
    assert conn.events_received() == []


# connection_lost


def test_connection_lost_on_a_box_boundary() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK)
    assert conn.connection_lost() is None
    assert conn.state is State.CLOSED
    assert conn.error is None
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]


def test_connection_lost_inside_a_box() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + SUM_ASK[:20])
    error = conn.connection_lost()
    assert isinstance(error, ProtocolError)
    assert str(error) == "the stream ended inside a box (20 bytes of it received, 1 complete keys)"
    assert conn.state is State.CLOSED
    # Everything before the unfinished box was delivered; no Failure event is added.
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]


def test_connection_lost_twice_reports_once() -> None:
    conn = AMPConnection()
    conn.receive_data(b"\x00")
    assert isinstance(conn.connection_lost(), ProtocolError)
    assert conn.connection_lost() is None


def test_connection_lost_after_a_failure_reports_nothing() -> None:
    conn = AMPConnection()
    conn.receive_data(b"\x00\x00\x00")
    assert conn.state is State.CLOSED
    assert conn.connection_lost() is None
    assert conn.state is State.CLOSED


def test_data_is_ignored_after_connection_lost() -> None:
    conn = AMPConnection()
    conn.connection_lost()
    conn.receive_data(SUM_ASK)
    conn.receive_data(b"\x00\x00")
    assert conn.events_received() == []
    assert conn.error is None


# Tags


def test_tags_are_lowercase_hex_from_one() -> None:
    conn = AMPConnection()
    tags = [conn.next_tag() for _ in range(17)]
    assert tags == [
        b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9",
        b"a", b"b", b"c", b"d", b"e", b"f", b"10", b"11",
    ]  # fmt: skip


def test_tags_keep_counting() -> None:
    conn = AMPConnection()
    for _ in range(254):
        conn.next_tag()
    assert conn.next_tag() == b"ff"
    assert conn.next_tag() == b"100"


def test_skip_tag_leaves_a_gap() -> None:
    # Twisted: a no-answer call takes tag 1 without sending it; the next call is 2.
    conn = AMPConnection()
    conn.skip_tag()
    assert conn.next_tag() == b"2"
    conn.skip_tag()
    conn.skip_tag()
    assert conn.next_tag() == b"5"


def test_after_23_calls_the_tag_is_17() -> None:
    conn = AMPConnection()
    conn.skip_tag()
    for _ in range(21):
        conn.next_tag()
    assert conn.next_tag() == b"17"


def test_each_connection_counts_from_one() -> None:
    first = AMPConnection()
    first.next_tag()
    first.next_tag()
    assert AMPConnection().next_tag() == b"1"
    assert first.next_tag() == b"3"


def test_tags_do_not_depend_on_what_is_received() -> None:
    conn = AMPConnection()
    conn.receive_data(SUM_ASK + encode_box({b"_ask": b"ff", b"_command": b"X"}))
    assert conn.next_tag() == b"1"


# Sending


def test_send_queues_data_in_order() -> None:
    conn = AMPConnection()
    conn.send(SUM_ASK)
    assert conn.has_data_to_send
    conn.send(b"\x00\x01a\x00\x00\x00\x00")
    assert conn.data_to_send() == [SUM_ASK, b"\x00\x01a\x00\x00\x00\x00"]
    assert not conn.has_data_to_send
    assert conn.data_to_send() == []
    conn.send(b"x")
    assert conn.data_to_send() == [b"x"]


def test_data_to_send_returns_a_list_the_connection_no_longer_uses() -> None:
    conn = AMPConnection()
    conn.send(b"a")
    taken = conn.data_to_send()
    conn.send(b"b")
    assert taken == [b"a"]
    assert conn.data_to_send() == [b"b"]


def test_sending_does_not_affect_receiving() -> None:
    conn = AMPConnection()
    conn.send(SUM_ASK)
    assert conn.events_received() == []
    conn.receive_data(SUM_ASK)
    assert conn.data_to_send() == [SUM_ASK]
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]


# Events and state


def test_states() -> None:
    assert [state.value for state in State] == ["open", "closed"]


@pytest.mark.parametrize(
    "event",
    [
        Ask(b"1", b"Sum", {}),
        Answer(b"1", {}),
        ErrorAnswer(b"1", b"C", b"D", {}),
        Failure(ProtocolError("x")),
    ],
)
def test_events_are_slotted(event: object) -> None:
    with pytest.raises(AttributeError):
        event.unexpected = 1  # type: ignore[attr-defined]


# The fast path for the usual layouts (whole answers and calls with _ask first)
# must give exactly what the general decoder gives, and leave everything else to it.


def general_events(data: bytes, **limits: int) -> list[object]:
    """What the general decoder and classification give for ``data``, as a reference."""
    decoder = BoxDecoder(**limits)
    boxes, error = decoder.receive_data_partial(data)
    events: list[object] = []
    for box in boxes:
        try:
            events.append(_classify(box))
        except ProtocolError as exc:
            error = exc
            break
    if error is not None:
        events.append(Failure(error))
    return events


def fast_events(data: bytes, **limits: int) -> list[object]:
    conn = AMPConnection(**limits)
    conn.receive_data(data)
    return list(conn.events_received())


def same_events(data: bytes, **limits: int) -> list[object]:
    events = fast_events(data, **limits)
    reference = general_events(data, **limits)
    assert [type(e) for e in events] == [type(e) for e in reference]
    for event, expected in zip(events, reference, strict=True):
        if isinstance(event, Failure):
            assert isinstance(expected, Failure)
            assert str(event.error) == str(expected.error)
        else:
            assert event == expected
    return events


def pair(key: bytes, value: bytes) -> bytes:
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


def test_fast_path_answers_and_asks_in_one_read() -> None:
    data = SUM_ASK + encode_box(ANSWER_BOX) + SUM_ASK
    events = same_events(data)
    ask = Ask(b"1", b"Sum", SUM_ASK_BOX)
    assert events == [ask, Answer(b"1", ANSWER_BOX), ask]


def test_fast_path_leaves_an_incomplete_box_to_the_decoder() -> None:
    answer = encode_box(ANSWER_BOX)
    for cut in range(1, len(answer)):
        conn = AMPConnection()
        conn.receive_data(SUM_ASK + answer[:cut])
        assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]
        conn.receive_data(answer[cut:] + answer)
        assert conn.events_received() == [Answer(b"1", ANSWER_BOX)] * 2
        assert conn.state is State.OPEN


def test_fast_path_hands_over_at_an_error_answer_and_takes_back() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box(ERROR_BOX) + SUM_ASK)
    conn.receive_data(SUM_ASK)
    assert conn.events_received() == [
        ErrorAnswer(b"2", b"ZERO", b"div by zero!", ERROR_BOX),
        Ask(b"1", b"Sum", SUM_ASK_BOX),
        Ask(b"1", b"Sum", SUM_ASK_BOX),
    ]


def test_fast_path_offsets_in_errors_count_its_boxes() -> None:
    # A key over 255 bytes inside an answer, after boxes the fast path parsed.
    bad = b"\x00\x07_answer\x00\x012" + b"\x01\x00" + b"k" * 256 + b"\x00\x00"
    [_, _, failure] = same_events(SUM_ASK + encode_box(ANSWER_BOX) + bad)
    assert isinstance(failure, Failure)
    offset = len(SUM_ASK) + len(encode_box(ANSWER_BOX)) + 12
    assert f"key length 256 at stream offset {offset} is over" in str(failure.error)
    # The same after a first read that the fast path took whole.
    conn = AMPConnection()
    conn.receive_data(SUM_ASK)
    conn.receive_data(encode_box(ANSWER_BOX) + bad)
    assert str(conn.error) == str(failure.error)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_keys": 2},
        {"max_keys": 4},
        {"max_keys": 5},
        {"max_box_size": 37},
        {"max_box_size": 38},
    ],
)
def test_fast_path_limits_are_those_of_the_decoder(limits: dict[str, int]) -> None:
    # SUM_ASK has 4 keys and 38 bytes without its end marker.
    same_events(encode_box(ANSWER_BOX) + SUM_ASK + SUM_ASK, **limits)


def test_fast_path_repeated_key_at_the_key_limit() -> None:
    # 3 pairs, 2 distinct keys: the general decoder counts keys before each pair.
    box = pair(b"_answer", b"1") + pair(b"x", b"1") + pair(b"x", b"2") + b"\x00\x00"
    [failure] = same_events(box, max_keys=2)
    assert isinstance(failure, Failure)
    [answer] = same_events(box, max_keys=3)
    assert answer == Answer(b"1", {b"_answer": b"1", b"x": b"2"})


def test_fast_path_repeated_special_key_takes_the_last_value() -> None:
    box = pair(b"_ask", b"1") + pair(b"_command", b"Sum") + pair(b"_ask", b"2") + b"\x00\x00"
    [event] = same_events(box)
    assert event == Ask(b"2", b"Sum", {b"_ask": b"2", b"_command": b"Sum"})


@pytest.mark.parametrize(
    "box",
    [
        # Unsorted keys: classified in Twisted's order, by the general path.
        pair(b"_ask", b"1") + pair(b"_command", b"Sum") + pair(b"_answer", b"1"),
        pair(b"_ask", b"1") + pair(b"_error", b"1") + pair(b"_command", b"Sum"),
        # An _ask without a _command is not AMP.
        pair(b"_ask", b"1") + pair(b"a", b"1"),
        # An empty value and an empty tag.
        pair(b"_answer", b"") + pair(b"total", b""),
    ],
)
def test_fast_path_unusual_boxes(box: bytes) -> None:
    same_events(SUM_ASK + box + b"\x00\x00" + SUM_ASK)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from([b"_ask", b"_answer", b"_command", b"_error", b"a", b"Z"]),
                st.binary(max_size=3),
            ),
            max_size=4,
        ),
        max_size=5,
    ),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=200),
)
def test_fast_path_matches_the_general_decoder(
    boxes: list[list[tuple[bytes, bytes]]], max_keys: int, cut: int
) -> None:
    data = b"".join(b"".join(pair(k, v) for k, v in box) + b"\x00\x00" for box in boxes)
    same_events(data, max_keys=max_keys)
    # Split in two reads: the events are those of the whole stream.
    conn = AMPConnection(max_keys=max_keys)
    conn.receive_data(data[:cut])
    conn.receive_data(data[cut:])
    assert [type(e) for e in conn.events_received()] == [
        type(e) for e in general_events(data, max_keys=max_keys)
    ]


def test_queued_counts_the_pieces_waiting() -> None:
    conn = AMPConnection()
    assert conn.queued == 0
    conn.send(b"a")
    conn.send(b"b")
    assert conn.queued == 2
    conn.data_to_send()
    assert conn.queued == 0


def test_limits_are_settable() -> None:
    conn = AMPConnection()
    conn.max_box_size = 37
    conn.max_keys = 4
    assert (conn.max_box_size, conn.max_keys) == (37, 4)
    [failure] = general_events(SUM_ASK, max_box_size=37)
    conn.receive_data(SUM_ASK)
    assert str(conn.error) == str(failure.error)  # type: ignore[attr-defined]


# Decoding straight to values: the answers to pending calls with a parser, and the
# calls to commands in ask_parsers. Everything else comes as before.


class Sum(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Maybe(Command):
    """A response of optional values only: fewer keys on the wire than values."""

    response = [("note", String(optional=True)), ("more", String(optional=True))]


def Call(parser: object, name: str = "call") -> tuple[object, str]:
    """What the I/O layer puts in ``pending``: a tuple, its answer's parser first."""
    return (parser, name)


HANDLER = object()  # opaque to the connection
ASK_PARSERS: dict[bytes, tuple[Any, object]] = {b"Sum": (Sum._parse_arguments, HANDLER)}


def sum_answer(tag: bytes, total: bytes = b"94") -> bytes:
    return encode_box({b"_answer": tag, b"total": total})


def sum_ask(tag: bytes, a: bytes = b"13", b: bytes = b"81", command: bytes = b"Sum") -> bytes:
    return encode_box({b"_ask": tag, b"_command": command, b"a": a, b"b": b})


def decoding(*tags: bytes, parser: object = Sum._parse_response, **limits: int) -> AMPConnection:
    """A connection with a pending Sum call for each tag, and a parser for Sum calls."""
    conn = AMPConnection(**limits)
    for tag in tags:
        conn.pending[tag] = Call(parser, tag.decode())
    conn.ask_parsers = ASK_PARSERS
    return conn


def test_decoding_tables_are_empty_by_default() -> None:
    conn = AMPConnection()
    assert conn.pending == {}
    assert dict(conn.ask_parsers) == {}
    assert conn.decode_values is True
    assert AMPConnection().pending is not conn.pending


def test_answers_to_pending_calls_are_decoded_and_leave_pending() -> None:
    conn = decoding(b"1", b"2", b"3")
    one, two, three = conn.pending.values()
    conn.receive_data(sum_answer(b"2", b"-5") + sum_answer(b"1"))
    events = conn.events_received()
    assert events == [(two, {"total": -5}), (one, {"total": 94})]
    assert all(type(event) is tuple for event in events)
    assert conn.pending == {b"3": three}
    # Answered once: a second answer for the tag is left to the I/O layer.
    conn.receive_data(sum_answer(b"1") + sum_answer(b"3", b"0"))
    assert conn.events_received() == [
        Answer(b"1", {b"_answer": b"1", b"total": b"94"}),
        (three, {"total": 0}),
    ]
    assert conn.pending == {}
    assert conn.state is State.OPEN


def test_answer_to_a_pending_call_without_a_parser_is_an_answer() -> None:
    conn = decoding(b"1", parser=None)
    call = conn.pending[b"1"]
    conn.receive_data(sum_answer(b"1"))
    assert conn.events_received() == [Answer(b"1", ANSWER_BOX)]
    assert conn.pending == {b"1": call}


def test_answer_for_a_tag_not_pending_is_an_answer() -> None:
    conn = decoding(b"1")
    conn.receive_data(sum_answer(b"2") + sum_answer(b"11") + sum_answer(b""))
    assert conn.events_received() == [
        Answer(b"2", {b"_answer": b"2", b"total": b"94"}),
        Answer(b"11", {b"_answer": b"11", b"total": b"94"}),
        Answer(b"", {b"_answer": b"", b"total": b"94"}),
    ]
    assert list(conn.pending) == [b"1"]


@pytest.mark.parametrize(
    "box",
    [
        encode_box({b"_answer": b"1", b"total": b"x"}),
        encode_box({b"_answer": b"1", b"total": b""}),
        encode_box({b"_answer": b"1"}),
        encode_box({b"_answer": b"1", b"total": b"1", b"zzz": b"extra"}),
        encode_box({b"_answer": b"1", b"Z": b"first", b"total": b"1"}),
        # Out of order, and repeated.
        pair(b"_answer", b"1") + pair(b"x", b"1") + pair(b"total", b"5") + b"\x00\x00",
        pair(b"_answer", b"1") + pair(b"total", b"5") + pair(b"total", b"6") + b"\x00\x00",
        pair(b"_answer", b"1") + pair(b"total", b"5") + pair(b"_answer", b"1") + b"\x00\x00",
        pair(b"_answer", b"1") + pair(b"total", b"5") + pair(b"_error", b"1") + b"\x00\x00",
    ],
)
def test_answer_the_parser_refuses_is_the_answer_of_the_general_path(box: bytes) -> None:
    conn = decoding(b"1")
    call = conn.pending[b"1"]
    conn.receive_data(box)
    [event] = conn.events_received()
    assert isinstance(event, Answer)
    assert [event] == general_events(box)
    # The call is still pending for that answer, so the next answer decodes.
    assert conn.pending == {b"1": call}
    conn.receive_data(sum_answer(b"1", b"7"))
    assert conn.events_received() == [(call, {"total": 7})]
    assert conn.pending == {}


def test_parser_that_raises_anything_leaves_the_box_to_the_general_path() -> None:
    def broken(data: bytes, offset: int) -> tuple[dict[str, object], int]:
        raise RuntimeError("not this one")

    conn = decoding(b"1", parser=broken)
    conn.receive_data(sum_answer(b"1") + SUM_ASK)
    assert conn.events_received() == [Answer(b"1", ANSWER_BOX), (HANDLER, b"1", {"a": 13, "b": 81})]
    assert list(conn.pending) == [b"1"]
    conn = decoding()
    conn.ask_parsers = {b"Sum": (broken, HANDLER)}
    conn.receive_data(SUM_ASK)
    assert conn.events_received() == [Ask(b"1", b"Sum", SUM_ASK_BOX)]


def test_calls_to_commands_with_parsers_are_decoded() -> None:
    conn = decoding()
    conn.receive_data(SUM_ASK + sum_ask(b"ff", b"-1", b"0"))
    events: list[Any] = conn.events_received()
    assert events == [(HANDLER, b"1", {"a": 13, "b": 81}), (HANDLER, b"ff", {"a": -1, "b": 0})]
    assert all(type(event) is tuple for event in events)
    assert events[0][0] is HANDLER
    assert conn.pending == {}


@pytest.mark.parametrize(
    "box",
    [
        # Another command, and a command that starts like Sum.
        {b"_ask": b"1", b"_command": b"Other", b"a": b"1", b"b": b"2"},
        {b"_ask": b"1", b"_command": b"Sums", b"a": b"1", b"b": b"2"},
        {b"_ask": b"1", b"_command": b"Su", b"a": b"1", b"b": b"2"},
        # No answer wanted: no _ask.
        {b"_command": b"Sum", b"a": b"1", b"b": b"2"},
        # A key between _ask and _command.
        {b"_ask": b"1", b"_b": b"", b"_command": b"Sum", b"a": b"1", b"b": b"2"},
        # Arguments the parser refuses.
        {b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"x"},
        {b"_ask": b"1", b"_command": b"Sum", b"a": b"1"},
        {b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"2", b"c": b"3"},
    ],
)
def test_other_calls_are_asks(box: dict[bytes, bytes]) -> None:
    conn = decoding()
    conn.receive_data(encode_box(box))
    conn.receive_data(SUM_ASK)
    assert conn.events_received() == [
        Ask(box.get(b"_ask"), box[b"_command"], box),
        (HANDLER, b"1", {"a": 13, "b": 81}),
    ]


@pytest.mark.parametrize(
    "box",
    [
        pair(b"_ask", b"1") + pair(b"_command", b"Sum") + pair(b"b", b"2") + pair(b"a", b"1"),
        pair(b"_ask", b"1") + pair(b"_command", b"Sum") + pair(b"a", b"1") + pair(b"a", b"1"),
        pair(b"_ask", b"1")
        + pair(b"_command", b"Sum")
        + pair(b"a", b"1")
        + pair(b"b", b"2")
        + pair(b"_command", b"Other"),
        pair(b"_ask", b"1")
        + pair(b"_command", b"Sum")
        + pair(b"a", b"1")
        + pair(b"b", b"2")
        + pair(b"_answer", b"3"),
        pair(b"_ask", b"1")
        + pair(b"_command", b"Sum")
        + pair(b"a", b"1")
        + pair(b"b", b"2")
        + pair(b"_error", b"3")
        + pair(b"_error_code", b"C")
        + pair(b"_error_description", b"D"),
    ],
)
def test_calls_the_parser_refuses_give_the_events_of_the_general_path(box: bytes) -> None:
    conn = decoding()
    conn.receive_data(box + b"\x00\x00")
    conn.receive_data(SUM_ASK)
    events = conn.events_received()
    assert events[-1] == (HANDLER, b"1", {"a": 13, "b": 81})
    [reference] = general_events(box + b"\x00\x00")
    assert type(events[0]) is type(reference)
    assert events[:-1] == [reference]


def test_decode_values_false_gives_every_box_as_it_came() -> None:
    conn = decoding(b"1")
    call = conn.pending[b"1"]
    conn.decode_values = False
    data = sum_answer(b"1") + SUM_ASK
    conn.receive_data(data)
    assert conn.events_received() == [Answer(b"1", ANSWER_BOX), Ask(b"1", b"Sum", SUM_ASK_BOX)]
    assert conn.pending == {b"1": call}
    conn.decode_values = True
    conn.receive_data(data)
    assert conn.events_received() == [(call, {"total": 94}), (HANDLER, b"1", {"a": 13, "b": 81})]
    assert conn.pending == {}


def without_text_hint(message: str) -> str:
    """An error message without its hint that the stream looks like text."""
    return re.sub(r"; the data starts with .*, which is text, not AMP$", "", message)


def as_without_parsers(
    events: list[object], reference: list[object], calls: dict[bytes, Call], cut: bool = False
) -> None:
    """
    Check ``events`` (with parsers) against ``reference`` (the general path's).

    A decoded answer must be the answer to its pending call, with the values
    Sum decodes from the box; a decoded call, a Sum call with the values Sum
    decodes; a failure, the same failure. Anything not decoded is the same event.
    With ``cut``, the data came in two reads: a bad stream's hint that it looks
    like text is then made from the bytes that had arrived when it failed, so it
    may differ from the whole stream's (b"A " looks like text, b"A \\x00" not).
    """
    assert len(events) == len(reference), (events, reference)
    answered: set[bytes] = set()
    for event, expected in zip(events, reference, strict=True):
        if type(event) is tuple and len(event) == 2:
            call, values = event
            assert isinstance(expected, Answer)
            assert calls[expected.tag] is call
            assert expected.tag not in answered
            answered.add(expected.tag)
            assert values == Sum._decode_response(expected.box)
        elif type(event) is tuple:
            handler, tag, values = event
            assert handler is HANDLER
            assert isinstance(expected, Ask)
            assert (expected.tag, expected.command) == (tag, b"Sum")
            assert values == Sum._decode_arguments(expected.box)
        elif isinstance(event, Failure):
            assert isinstance(expected, Failure)
            if cut:
                assert without_text_hint(str(event.error)) == without_text_hint(str(expected.error))
            else:
                assert str(event.error) == str(expected.error)
        else:
            assert type(event) is type(expected)
            assert event == expected


def check_decoding(
    data: bytes, tags: tuple[bytes, ...], cut: int = 0, **limits: int
) -> list[object]:
    """Feed ``data`` (in two reads at ``cut``) with parsers; compare with the general path."""
    conn = decoding(*tags, **limits)
    calls = dict(conn.pending)
    if cut:
        conn.receive_data(data[:cut])
    conn.receive_data(data[cut:])
    events: list[Any] = conn.events_received()
    as_without_parsers(events, general_events(data, **limits), calls, cut=bool(cut))
    # The calls answered by a decoded answer left pending; the others are there.
    decoded = {id(event[0]) for event in events if type(event) is tuple and len(event) == 2}
    assert conn.pending == {tag: call for tag, call in calls.items() if id(call) not in decoded}
    return events


def test_a_read_of_mixed_boxes_keeps_their_order() -> None:
    other = {b"_ask": b"8", b"_command": b"Other"}
    data = (
        sum_answer(b"1", b"1")
        + sum_answer(b"2", b"x")
        + SUM_ASK
        + encode_box(other)
        + sum_answer(b"3", b"3")
        + sum_ask(b"9", b"2", b"2")
        + sum_answer(b"4", b"4")
        + encode_box(ERROR_BOX)
        + sum_answer(b"5", b"5")
        + SUM_ASK
    )
    events = check_decoding(data, (b"1", b"2", b"4", b"5"))
    assert [type(event) for event in events[:7]] == [
        tuple,
        Answer,
        tuple,
        Ask,
        Answer,
        tuple,
        tuple,
    ]
    assert events[7] == ErrorAnswer(b"2", b"ZERO", b"div by zero!", ERROR_BOX)
    # Split in two reads at every point: the same boxes, in the same order.
    for cut in range(1, len(data)):
        check_decoding(data, (b"1", b"2", b"4", b"5"), cut)


def test_decoded_boxes_before_a_fault_come_before_the_failure() -> None:
    conn = decoding(b"1")
    call = conn.pending[b"1"]
    conn.receive_data(sum_answer(b"1") + SUM_ASK + b"\x00\x00" + sum_ask(b"2"))
    [answered, called, failure] = conn.events_received()
    assert answered == (call, {"total": 94})
    assert called == (HANDLER, b"1", {"a": 13, "b": 81})
    assert isinstance(failure, Failure)
    [*_, reference] = general_events(sum_answer(b"1") + SUM_ASK + b"\x00\x00")
    assert isinstance(reference, Failure)
    assert str(failure.error) == str(reference.error)
    assert conn.state is State.CLOSED


def test_a_box_split_over_two_reads_comes_whole() -> None:
    answer = sum_answer(b"1")
    for data in (answer, SUM_ASK):
        for cut in range(1, len(data)):
            conn = decoding(b"1", b"2")
            one, two = conn.pending.values()
            conn.receive_data(data[:cut])
            assert conn.events_received() == []
            # The end of the box goes through the general decoder, with what follows.
            conn.receive_data(data[cut:] + sum_answer(b"2"))
            first, second = conn.events_received()
            assert first in (
                Answer(b"1", ANSWER_BOX),
                (one, {"total": 94}),
                Ask(b"1", b"Sum", SUM_ASK_BOX),
                (HANDLER, b"1", {"a": 13, "b": 81}),
            )
            assert second in (
                Answer(b"2", {b"_answer": b"2", b"total": b"94"}),
                (two, {"total": 94}),
            )
            # Back on a box boundary: the next read decodes.
            conn.receive_data(SUM_ASK)
            assert conn.events_received() == [(HANDLER, b"1", {"a": 13, "b": 81})]
            assert conn.state is State.OPEN


# ANSWER_BOX: 2 keys, 23 bytes without its end marker; SUM_ASK: 4 keys, 38 bytes.
@pytest.mark.parametrize(
    "limits",
    [
        {"max_keys": 1},
        {"max_keys": 2},
        {"max_keys": 3},
        {"max_keys": 4},
        {"max_keys": 5},
        {"max_box_size": 22},
        {"max_box_size": 23},
        {"max_box_size": 24},
        {"max_box_size": 25},
        {"max_box_size": 37},
        {"max_box_size": 38},
        {"max_box_size": 39},
        {"max_box_size": 40},
    ],
)
def test_decoding_keeps_the_limits_of_the_decoder(limits: dict[str, int]) -> None:
    check_decoding(sum_answer(b"1") + SUM_ASK + sum_answer(b"2"), (b"1", b"2"), **limits)
    check_decoding(SUM_ASK + sum_answer(b"1") + SUM_ASK, (b"1",), **limits)


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (sum_answer(b"1"), {"max_keys": 1}, "box at stream offset 0 has more than 1 keys"),
        (SUM_ASK, {"max_keys": 3}, "box at stream offset 0 has more than 3 keys"),
        (
            sum_answer(b"1"),
            {"max_box_size": 22},
            "box at stream offset 0 is over the limit of 22 bytes (key b'total' brings it to 23)",
        ),
        (
            SUM_ASK,
            {"max_box_size": 37},
            "box at stream offset 0 is over the limit of 37 bytes (key b'b' brings it to 38)",
        ),
    ],
)
def test_a_box_over_a_limit_fails_as_without_parsers(
    data: bytes, limits: dict[str, int], message: str
) -> None:
    conn = decoding(b"1", **limits)
    conn.receive_data(data)
    [failure] = conn.events_received()
    assert isinstance(failure, Failure)
    assert str(failure.error) == message
    [reference] = general_events(data, **limits)
    assert str(reference.error) == message  # type: ignore[attr-defined]
    assert conn.state is State.CLOSED


def test_answer_over_the_key_count_of_its_values_is_not_merged_with_the_next() -> None:
    # Maybe's parser gives 2 values (both None) for an answer with 1 key: with
    # max_keys=2 the box is within the limit but its values count is not.
    conn = AMPConnection(max_keys=2)
    conn.pending[b"1"] = call = Call(Maybe._parse_response)
    data = encode_box({b"_answer": b"1"}) + encode_box({b"_answer": b"2"})
    conn.receive_data(data)
    assert (
        conn.events_received()
        == general_events(data, max_keys=2)
        == [
            Answer(b"1", {b"_answer": b"1"}),
            Answer(b"2", {b"_answer": b"2"}),
        ]
    )
    assert conn.pending == {b"1": call}


# send_call and send


def test_send_call_takes_a_tag_fills_the_slot_and_expects_the_answer() -> None:
    conn = AMPConnection()
    parts, slot = Sum._encode_ask({"a": 13, "b": 81})
    call = Call(Sum._parse_response)
    assert conn.send_call(parts, slot, call) == b"1"
    assert parts[slot] == b"\x00\x011"
    assert conn.pending == {b"1": call}
    assert conn.data_to_send() == [SUM_ASK]
    # Its answer is decoded for it.
    conn.receive_data(sum_answer(b"1"))
    assert conn.events_received() == [(call, {"total": 94})]
    assert conn.pending == {}


def test_send_call_shares_the_tag_counter() -> None:
    conn = AMPConnection()
    calls = [Call(None, str(n)) for n in range(4)]
    assert conn.next_tag() == b"1"
    parts, slot = Sum._encode_ask({"a": 1, "b": 2})
    assert conn.send_call(parts, slot, calls[0]) == b"2"
    conn.skip_tag()
    assert conn.send_call(list(parts), slot, calls[1]) == b"4"
    assert conn.next_tag() == b"5"
    for _ in range(10):
        conn.next_tag()
    assert conn.send_call(parts, slot, calls[2]) == b"10"
    assert parts[slot] == b"\x00\x0210"
    assert conn.pending == {b"2": calls[0], b"4": calls[1], b"10": calls[2]}
    sent = conn.data_to_send()
    assert [box[b"_ask"] for box in BoxDecoder().receive_data(b"".join(sent))] == [
        b"2",
        b"4",
        b"10",
    ]
    assert len(sent) == 3


def test_send_call_queues_after_what_is_queued() -> None:
    conn = AMPConnection()
    assert conn.send(b"first") == 1
    parts, slot = Sum._encode_ask({"a": 13, "b": 81})
    conn.send_call(parts, slot, Call(None))
    assert conn.queued == 2
    assert conn.send(b"last") == 3
    assert conn.data_to_send() == [b"first", SUM_ASK, b"last"]
    assert conn.send(b"again") == 1


def test_send_returns_how_many_pieces_are_queued() -> None:
    conn = AMPConnection()
    assert [conn.send(b"x") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert conn.queued == 5
    conn.data_to_send()
    assert conn.send(b"y") == 1


# Property: with parsers, the events are those of the general path.

sum_boxes = st.one_of(
    # Sum answers, mostly for the pending tags, with good and bad totals.
    st.builds(
        sum_answer,
        st.sampled_from([b"1", b"2", b"3", b"9"]),
        st.sampled_from([b"5", b"-12", b"x", b"", b"1.5"]),
    ),
    # Sum calls, and calls to other commands.
    st.builds(
        lambda tag, a, command: sum_ask(tag, a, b"2", command),
        st.sampled_from([b"1", b"ff", b""]),
        st.sampled_from([b"1", b"x"]),
        st.sampled_from([b"Sum", b"Other"]),
    ),
    st.just(encode_box(ERROR_BOX)),
    # Anything: random pairs, from the keys that matter.
    st.lists(
        st.tuples(
            st.sampled_from([b"_ask", b"_answer", b"_command", b"_error", b"a", b"b", b"total"]),
            st.sampled_from([b"1", b"2", b"Sum", b"x", b""]),
        ),
        max_size=5,
    ).map(lambda pairs: b"".join(pair(k, v) for k, v in pairs) + b"\x00\x00"),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(sum_boxes, max_size=8),
    st.sampled_from(
        [{}, {"max_keys": 2}, {"max_keys": 4}, {"max_box_size": 23}, {"max_box_size": 38}]
    ),
    st.integers(min_value=0, max_value=300),
    st.binary(max_size=3),
)
@example(boxes=[], limits={}, cut=1, tail=b"A \x00")  # the text hint, with the stream cut
def test_decoding_matches_the_general_path(
    boxes: list[bytes], limits: dict[str, int], cut: int, tail: bytes
) -> None:
    data = b"".join(boxes) + tail
    check_decoding(data, (b"1", b"2", b"3"), **limits)
    check_decoding(data, (b"1", b"2", b"3"), min(cut, len(data)), **limits)


# Stopping at a box boundary (StartTLS, protocol switching)


def stop_events(conn: AMPConnection) -> list[Any]:
    return [(type(e).__name__, getattr(e, "tag", None)) for e in conn.events_received()]


def test_stop_after_answer_keeps_the_bytes_after_it_undecoded() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"2")
    stream = (
        encode_box({b"_answer": b"1", b"x": b"y"})
        + encode_box({b"_answer": b"2"})
        + b"GET / HTTP/1.0\r\n"
    )
    conn.receive_data(stream)
    assert stop_events(conn) == [("Answer", b"1"), ("Answer", b"2")]
    assert conn.stopped
    conn.receive_data(b"more raw bytes")
    assert conn.events_received() == []
    assert conn.state is State.OPEN
    assert conn.resume() == b"GET / HTTP/1.0\r\nmore raw bytes"
    assert not conn.stopped


def test_stop_after_answer_fed_one_byte_at_a_time() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    stream = encode_box({b"_ask": b"7", b"_command": b"Hi"}) + encode_box({b"_answer": b"1"})
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
    conn.receive_data(b"\x00\x00rest")
    assert stop_events(conn) == [("Ask", b"7"), ("Answer", b"1")]
    assert conn.resume() == b"\x00\x00rest"


def test_stop_after_answer_when_a_box_was_already_partly_received() -> None:
    conn = AMPConnection()
    answer = encode_box({b"_answer": b"5", b"value": b"v" * 300})
    conn.receive_data(answer[:7])  # inside the first pair
    conn.stop_after_answer(b"5")
    conn.receive_data(answer[7:] + b"tail")
    assert stop_events(conn) == [("Answer", b"5")]
    assert conn.resume() == b"tail"


def test_an_empty_remainder_is_empty() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    conn.receive_data(encode_box({b"_answer": b"1"}))
    assert conn.stopped
    assert conn.resume() == b""


def test_an_error_answer_does_not_stop_decoding() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    error = encode_box({b"_error": b"1", b"_error_code": b"X", b"_error_description": b"no"})
    conn.receive_data(error + encode_box({b"_answer": b"2"}))
    assert stop_events(conn) == [("ErrorAnswer", b"1"), ("Answer", b"2")]
    assert not conn.stopped
    assert conn.resume() == b""
    # Decoding goes on as usual, fast path included.
    conn.receive_data(encode_box({b"_answer": b"3"}))
    assert stop_events(conn) == [("Answer", b"3")]


def test_answers_to_other_tags_do_not_stop_decoding() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"10")
    conn.receive_data(encode_box({b"_answer": b"1"}) + encode_box({b"_answer": b"100"}))
    assert stop_events(conn) == [("Answer", b"1"), ("Answer", b"100")]
    assert not conn.stopped


def test_bad_input_before_the_stop_fails_as_usual() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    conn.receive_data(encode_box({b"_answer": b"9"}) + b"\x00\x00")
    events = conn.events_received()
    assert isinstance(events[0], Answer)
    assert isinstance(events[1], Failure)
    assert "empty box" in str(events[1].error)
    assert conn.state is State.CLOSED


def test_a_key_over_the_limit_before_the_stop_fails_as_usual() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    conn.receive_data(b"\x01\x00" + b"k" * 256)
    (event,) = conn.events_received()
    assert isinstance(event, Failure)
    assert "over the AMP limit" in str(event.error)


def test_stop_between_boxes_is_immediate() -> None:
    conn = AMPConnection()
    conn.receive_data(encode_box({b"_answer": b"1"}))
    conn.stop()
    assert conn.stopped
    conn.receive_data(encode_box({b"_answer": b"2"}))
    assert stop_events(conn) == [("Answer", b"1")]
    conn.stop()  # already stopped: nothing changes
    assert conn.resume() == encode_box({b"_answer": b"2"})


def test_stop_inside_a_box_waits_for_its_end() -> None:
    conn = AMPConnection()
    box = encode_box({b"_answer": b"1"})
    conn.receive_data(box[:4])
    conn.stop()
    assert not conn.stopped
    conn.receive_data(box[4:] + b"\x16\x03\x01")
    assert stop_events(conn) == [("Answer", b"1")]
    assert conn.resume() == b"\x16\x03\x01"


def test_resume_hands_back_bytes_that_can_be_decoded_again() -> None:
    conn = AMPConnection()
    conn.stop_after_answer(b"1")
    tail = encode_box({b"_answer": b"2"})
    conn.receive_data(encode_box({b"_answer": b"1"}) + tail[:3])
    conn.events_received()
    rest = conn.resume()
    conn.receive_data(rest + tail[3:])
    assert stop_events(conn) == [("Answer", b"2")]
