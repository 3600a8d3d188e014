"""Tests for the sans-I/O connection: bytes in, events out; tags; the send queue."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
