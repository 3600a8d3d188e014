"""The newer argument types against Twisted: both directions over TCP, and byte for byte.

EchoTypes carries Decimal, DateTime, Path (``FilePath`` on Twisted's side), ListOf and
AmpList; BigEcho carries BigBytes and BigString, which Twisted does not ship, so the peer
implements the convention by hand (``name``, ``name.2``, ... in chunks of 65,535 bytes).
Each call is checked three ways: the values that come back, the values the other side
decoded, and the bytes on the wire against Twisted's own serialization of the same box.

The codec tests ask the peer to encode and decode single values (``encode``/``decode``,
``to_box``/``from_box``) and compare with ours, on edge values and hypothesis values.

Where we differ from Twisted on purpose, the test says so in its name
(``..._twisted_..._we_refuse``) and checks the difference itself:

* ListOf and AmpList: Twisted silently drops trailing bytes that do not make a whole
  element (``b'\\x00\\x02ab\\x00\\x05xy'`` -> ``[b'ab']``); we refuse them.
* DateTime offsets with seconds: Twisted floors them (+90 s -> ``+00:01``, -90 s ->
  ``-00:02``); we refuse them.
* DateTime parsing: Twisted reads the fields with ``int()`` at fixed positions, so it
  accepts ``+ 1:00``, ``+01:60`` (as +02:00), any separators, signs in fields; we accept
  only the exact form.
* Decimal of a non-Decimal: Twisted raises ValueError, we raise TypeError.
* Path: Twisted's FilePath makes a relative path absolute in its own directory; we keep
  the path as sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import functools
import math
import pathlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from commands import BigEcho, EchoTypes, RecordingProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peer import PeerError, TwistedPeer

import asyncio_amp as amp
from helpers import LONG, client, loop_factory, running_server

D = decimal.Decimal
CHUNK = 65_535


def tz(minutes: int) -> dt.timezone:
    return dt.timezone(dt.timedelta(minutes=minutes))


def canon(value: Any) -> Any:
    """A comparable form: Decimals by str (NaN != NaN), floats by repr, datetimes with offset."""
    if isinstance(value, D):
        return ("Decimal", str(value))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat(), value.utcoffset())
    if isinstance(value, pathlib.PurePath):
        return ("Path", str(value))
    if isinstance(value, list):
        return [canon(v) for v in value]
    if isinstance(value, dict):
        return {k: canon(v) for k, v in value.items()}
    return (type(value), value)


def kv(key: bytes, value: bytes) -> bytes:
    return len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value


def ask_bytes(command: type[amp.Command], tag: bytes, values: dict[str, Any]) -> bytes:
    parts, slot = command._encode_ask(values)
    parts[slot] = len(tag).to_bytes(2, "big") + tag
    return b"".join(parts)


def chunk_keys(name: bytes, size: int) -> set[bytes]:
    count = max(1, -(-size // CHUNK))
    return {name} | {name + b".%d" % n for n in range(2, count + 1)}


@functools.cache
def patterned(size: int) -> bytes:
    """Bytes whose every 65,535-byte chunk differs, so a misplaced chunk shows."""
    return bytes((i * 7 + i // CHUNK) % 251 for i in range(size))


# Values

ECHO_TYPES_CASES: list[dict[str, Any]] = [
    {
        "dec": D("-sNaN"),
        "when": dt.datetime(9876, 1, 23, 12, 34, 56, 54321, tz(-83)),
        "path": pathlib.Path("/tmp/xé"),
        "ints": [1, 22, 333, -(2**70)],
        "texts": ["é", "", "\U0001f40d", "a\x00b"],
        "decs": [D("Infinity"), D("-Infinity"), D("NaN"), D("-NaN"), D("sNaN"), D("-0")],
        "times": [
            dt.datetime(2010, 12, 25, tzinfo=dt.UTC),
            dt.datetime(2010, 12, 25, 1, 2, 3, 4, tz(330)),
            dt.datetime(2010, 12, 25, tzinfo=tz(-419)),
            dt.datetime(5, 6, 7, 8, 9, 10, 999999, tz(1439)),
        ],
        "rows": [{"a": 7, "b": "hi"}, {"a": 9}],
    },
    {
        "dec": D("1.10"),
        "when": dt.datetime(2010, 12, 25, tzinfo=dt.UTC),
        "path": pathlib.Path("/"),
        "ints": [],
        "texts": [],
        "decs": [],
        "times": [],
        "rows": [],
        "maybe": D("1E+2"),
    },
    {
        "dec": D("-0"),
        "when": dt.datetime(5, 1, 1, tzinfo=tz(-1439)),
        "path": pathlib.Path("/a b/\U0001f40d/é"),
        "ints": [0],
        "texts": ["x" * 300],
        "decs": [D("1.10"), D("1E+2"), D("3.141E-7"), D("NaN123")],
        "times": [dt.datetime(1, 1, 1, tzinfo=tz(1))],
        "rows": [{"a": -1, "b": ""}, {"a": 2**64, "b": "ünï"}],
        "maybe": D("sNaN"),
    },
]

ECHO_TYPES_NAMES = [name for name, _ in EchoTypes.arguments]


def full(case: dict[str, Any]) -> dict[str, Any]:
    """The case as it decodes: absent optional values are None, AmpList rows complete."""
    result = {name: case.get(name) for name in ECHO_TYPES_NAMES}
    result["rows"] = [{"a": row["a"], "b": row.get("b")} for row in case["rows"]]
    return result


BIG_CASES: list[tuple[int, str]] = [
    (0, ""),
    (1, "é"),
    (CHUNK, "a" * (CHUNK - 1) + "é" + "b"),  # é straddles the first boundary
    (CHUNK + 1, "a" * (CHUNK - 2) + "\U0001f40d"),  # the snake is split 2 + 2
    (200_000, "é€" * 40_000),  # 200,000 bytes of text: characters straddle every boundary
    (3_000_000, "x" * (CHUNK - 3) + "\U0001f40d" * 10),
]


# Sessions


class TypesProtocol(RecordingProtocol):
    """Our side of the connection: answers both commands and records the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @EchoTypes.responder
    async def echo_types(self, **values: Any) -> dict[str, Any]:
        self.calls.append(("EchoTypes", values))
        await asyncio.sleep(0)
        return values

    @BigEcho.responder
    def big_echo(self, data: bytes, text: str) -> dict[str, Any]:
        self.calls.append(("BigEcho", {"data": data, "text": text}))
        return {"data": data, "text": text}


@dataclass
class Session:
    peer: TwistedPeer
    proto: TypesProtocol
    # The connection's id on the Twisted side.
    conn: int

    async def twisted_box(
        self, command: str, kind: str, tag: bytes, values: dict[str, Any]
    ) -> bytes:
        """The bytes Twisted writes for this call ("ask") or answer ("answer")."""
        result = await self.peer.request(
            "encode_box", command=command, kind=kind, tag=tag.decode(), args=values
        )
        return bytes.fromhex(result["hex"])

    async def received(self) -> list[dict[str, Any]]:
        """What the Twisted side's responders got on this connection."""
        result: list[dict[str, Any]] = await self.peer.request(
            "received", conn=self.conn, time_limit=30
        )
        return result


@asynccontextmanager
async def twisted_server() -> AsyncIterator[Session]:
    """A Twisted server on 127.0.0.1 and our client connected to it."""
    peer = await TwistedPeer.start()
    try:
        port = await peer.listen()
        async with client(port, TypesProtocol) as proto:
            assert isinstance(proto, TypesProtocol)
            accepted = await peer.wait_event("accepted")
            yield Session(peer, proto, int(accepted["conn"]))
    finally:
        await peer.stop()


async def wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(LONG):
        while not condition():  # noqa: ASYNC110 - polling state that no event reports
            await asyncio.sleep(0.005)


@asynccontextmanager
async def twisted_client() -> AsyncIterator[Session]:
    """Our server on 127.0.0.1 and a Twisted client connected to it."""
    peer = await TwistedPeer.start()
    try:
        async with running_server(TypesProtocol) as (_, port, protocols):
            conn = await peer.connect(port)
            await wait_for(lambda: len(protocols) == 1)
            proto = protocols[0]
            assert isinstance(proto, TypesProtocol)
            yield Session(peer, proto, conn)
    finally:
        await peer.stop()


# EchoTypes both ways


async def test_echo_types_our_client_twisted_server() -> None:
    async with twisted_server() as s:
        for case in ECHO_TYPES_CASES:
            async with asyncio.timeout(LONG):
                answer = await s.proto.call_remote(EchoTypes, **case)
            assert canon(answer) == canon(full(case))
            assert isinstance(answer["path"], pathlib.Path)
            assert answer["when"].utcoffset() == case["when"].utcoffset()

        # What Twisted decoded from our bytes (FilePath reported as its path).
        received = await s.received()
        assert [r["command"] for r in received] == ["EchoTypes"] * len(ECHO_TYPES_CASES)
        assert [canon(r["args"]) for r in received] == [canon(full(c)) for c in ECHO_TYPES_CASES]

        # Our asks are the bytes Twisted writes for the same calls, and Twisted's answers
        # are the bytes we write for the same answers.
        tags = [b"%x" % n for n in range(1, len(ECHO_TYPES_CASES) + 1)]
        expected_asks = [
            await s.twisted_box("EchoTypes", "ask", tag, case)
            for tag, case in zip(tags, ECHO_TYPES_CASES, strict=True)
        ]
        assert bytes(s.proto.sent) == b"".join(expected_asks)
        our_answers = [
            EchoTypes._encode_answer(tag, case)
            for tag, case in zip(tags, ECHO_TYPES_CASES, strict=True)
        ]
        assert bytes(s.proto.received) == b"".join(our_answers)
        first = s.proto.sent_boxes()[0]
        assert first[b"when"] == b"9876-01-23T12:34:56.054321-01:23"
        assert first[b"rows"] == (
            b"\x00\x01a\x00\x017\x00\x01b\x00\x02hi\x00\x00\x00\x01a\x00\x019\x00\x00"
        )
        assert b"maybe" not in first


async def test_echo_types_twisted_client_our_server() -> None:
    async with twisted_client() as s:
        for case in ECHO_TYPES_CASES:
            answer = await s.peer.call(s.conn, "EchoTypes", **case)
            assert canon(answer) == canon(full(case))

        # What our responder got from Twisted's bytes.
        assert [name for name, _ in s.proto.calls] == ["EchoTypes"] * len(ECHO_TYPES_CASES)
        assert [canon(values) for _, values in s.proto.calls] == [
            canon(full(c)) for c in ECHO_TYPES_CASES
        ]
        assert all(isinstance(values["path"], pathlib.Path) for _, values in s.proto.calls)

        tags = [b"%x" % n for n in range(1, len(ECHO_TYPES_CASES) + 1)]
        assert bytes(s.proto.received) == b"".join(
            ask_bytes(EchoTypes, tag, case)
            for tag, case in zip(tags, ECHO_TYPES_CASES, strict=True)
        )
        expected_answers = [
            await s.twisted_box("EchoTypes", "answer", tag, full(case))
            for tag, case in zip(tags, ECHO_TYPES_CASES, strict=True)
        ]
        assert bytes(s.proto.sent) == b"".join(expected_answers)


async def test_bytes_only_twisted_accepts_are_refused_by_our_server_which_stays_up() -> None:
    base = {
        b"dec": b"1",
        b"when": b"2010-12-25T00:00:00.000000-00:00",
        b"path": b"/p",
        b"ints": b"",
        b"texts": b"",
        b"decs": b"",
        b"times": b"",
        b"rows": b"",
    }
    async with twisted_client() as s:
        for key, bad in [
            (b"ints", b"\x00\x011\x00"),  # Twisted: [1]
            (b"texts", b"\x00\x02ab\x00\x05xy"),  # Twisted: ["ab"]
            (b"rows", b"\x00\x01a\x00\x011"),  # Twisted: []
            (b"when", b"2010-12-25T00:00:00.000000+ 1:00"),  # Twisted: +01:00
            (b"times", b"\x00\x202010-12-25T00:00:00.000000+01:60"),  # Twisted: +02:00
        ]:
            with pytest.raises(PeerError) as info:
                await s.peer.request(
                    "call_raw", conn=s.conn, command="EchoTypes", box={**base, key: bad}
                )
            assert (info.value.code, info.value.description) == ("UNKNOWN", "Unknown Error")
        assert s.proto.calls == []
        answer = await s.peer.request("call_raw", conn=s.conn, command="EchoTypes", box=base)
        assert answer == {b"_answer": b"6", **base}
        assert not [e for e in s.peer.events if e.get("event") == "lost"]


# BigEcho both ways


async def test_big_echo_our_client_twisted_server() -> None:
    async with twisted_server() as s:
        for size, text in BIG_CASES:
            data = patterned(size)
            async with asyncio.timeout(LONG):
                answer = await s.proto.call_remote(BigEcho, data=data, text=text)
            assert answer["data"] == data
            assert answer["text"] == text

        asks = s.proto.sent_boxes()
        answers = s.proto.received_boxes()
        for (size, text), ask, reply in zip(BIG_CASES, asks, answers, strict=True):
            text_size = len(text.encode("utf-8"))
            assert set(ask) == {b"_ask", b"_command"} | chunk_keys(b"data", size) | chunk_keys(
                b"text", text_size
            )
            assert set(reply) == {b"_answer"} | chunk_keys(b"data", size) | chunk_keys(
                b"text", text_size
            )
        received = await s.received()
        assert [(r["args"]["data"], r["args"]["text"]) for r in received] == [
            (patterned(size), text) for size, text in BIG_CASES
        ]

        # Byte for byte with Twisted's serialization of the same boxes.
        tags = [b"%x" % n for n in range(1, len(BIG_CASES) + 1)]
        values = [{"data": patterned(size), "text": text} for size, text in BIG_CASES]
        expected = [
            await s.twisted_box("BigEcho", "ask", tag, value)
            for tag, value in zip(tags, values, strict=True)
        ]
        assert bytes(s.proto.sent) == b"".join(expected)
        assert bytes(s.proto.received) == b"".join(
            BigEcho._encode_answer(tag, value) for tag, value in zip(tags, values, strict=True)
        )


async def test_big_echo_twisted_client_our_server() -> None:
    async with twisted_client() as s:
        for size, text in BIG_CASES:
            data = patterned(size)
            answer = await s.peer.request(
                "call",
                conn=s.conn,
                command="BigEcho",
                args={"data": data, "text": text},
                time_limit=30,
            )
            assert answer["data"] == data
            assert answer["text"] == text
        assert s.proto.calls == [
            ("BigEcho", {"data": patterned(size), "text": text}) for size, text in BIG_CASES
        ]
        tags = [b"%x" % n for n in range(1, len(BIG_CASES) + 1)]
        values = [{"data": patterned(size), "text": text} for size, text in BIG_CASES]
        assert bytes(s.proto.received) == b"".join(
            ask_bytes(BigEcho, tag, value) for tag, value in zip(tags, values, strict=True)
        )
        expected = [
            await s.twisted_box("BigEcho", "answer", tag, value)
            for tag, value in zip(tags, values, strict=True)
        ]
        assert bytes(s.proto.sent) == b"".join(expected)


# Codecs, one value at a time


@pytest.fixture
def codec_peer() -> Any:
    """A Twisted peer on a private event loop, shared by all examples of one test."""
    with asyncio.Runner(debug=True, loop_factory=loop_factory) as runner:
        peer = runner.run(TwistedPeer.start())
        try:
            yield Codec(runner, peer)
        finally:
            runner.run(peer.stop())


class Codec:
    """Twisted's encoding and decoding of single values, called synchronously."""

    def __init__(self, runner: asyncio.Runner, peer: TwistedPeer) -> None:
        self.runner = runner
        self.peer = peer

    def request(self, op: str, **fields: Any) -> Any:
        return self.runner.run(self.peer.request(op, **fields))

    def encode(self, spec: Any, value: Any) -> bytes:
        return bytes.fromhex(self.request("encode", type=spec, value=value)["hex"])

    def decode(self, spec: Any, data: bytes) -> Any:
        return self.request("decode", type=spec, hex=data.hex())

    def decode_or_none(self, spec: Any, data: bytes) -> Any:
        """Twisted's value, or None if Twisted raises (any exception that means 'bad input')."""
        try:
            return self.decode(spec, data)
        except PeerError as exc:
            assert exc.type in BAD_INPUT_ERRORS, exc
            return None

    def check(self, ours: amp.Argument[Any], spec: Any, value: Any) -> bytes:
        """Both sides encode ``value`` to the same bytes, and decode those bytes alike."""
        data = ours.to_bytes(value)
        assert data == self.encode(spec, value), (spec, value)
        assert canon(ours.from_bytes(data)) == canon(self.decode(spec, data)), (spec, value)
        return data


BAD_INPUT_ERRORS = {"ValueError", "TypeError", "UnicodeDecodeError", "InvalidOperation", "KeyError"}

CODEC_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.builds(
        lambda sign, digits, exp: D((sign, tuple(digits), exp)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=30),
        st.integers(-40, 40),
    ),
)
DATETIMES = st.datetimes(timezones=st.integers(-1439, 1439).map(tz))
_COMPONENT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=8,
).filter(lambda part: part not in {".", ".."})
ABSOLUTE_PATHS = st.lists(_COMPONENT, max_size=4).map(
    lambda parts: pathlib.Path("/" + "/".join(parts))
)

# Our type, Twisted's name for it, values.
SCALARS: dict[str, tuple[amp.Argument[Any], str, st.SearchStrategy[Any]]] = {
    "Integer": (amp.Integer(), "Integer", st.integers(-(2**80), 2**80)),
    "Float": (amp.Float(), "Float", st.floats()),
    "Boolean": (amp.Boolean(), "Boolean", st.booleans()),
    "String": (amp.String(), "Unicode", st.text(max_size=20)),
    "Bytes": (amp.Bytes(), "String", st.binary(max_size=20)),
    "Decimal": (amp.Decimal(), "Decimal", DECIMALS),
    "DateTime": (amp.DateTime(), "DateTime", DATETIMES),
    "Path": (amp.Path(), "Path", ABSOLUTE_PATHS),
}

EDGE_VALUES: dict[str, list[Any]] = {
    "Integer": [0, -1, 2**70],
    "Float": [math.nan, math.inf, -0.0, 0.1],
    "Boolean": [True, False],
    "String": ["", "é", "\U0001f40d"],
    "Bytes": [b"", bytes(range(256))],
    "Decimal": [
        D(t)
        for t in [
            "Infinity",
            "-Infinity",
            "NaN",
            "-NaN",
            "sNaN",
            "-sNaN",
            "-0",
            "0",
            "1.10",
            "1E+2",
        ]
    ]
    + [D("3.141E-7"), D("NaN123"), D("-0E-8"), D("123456789012345678901234567890.1")],
    "DateTime": [
        dt.datetime(2010, 12, 25, tzinfo=dt.UTC),
        dt.datetime(2010, 12, 25, tzinfo=tz(0)),
        dt.datetime(9876, 1, 23, 12, 34, 56, 54321, tz(-83)),
        dt.datetime(2010, 12, 25, 1, tzinfo=tz(330)),
        dt.datetime(2010, 12, 25, 1, tzinfo=tz(-419)),
        dt.datetime(5, 1, 1, tzinfo=tz(60)),
        dt.datetime(2000, 2, 29, 23, 59, 59, 999999, tz(-1)),
        dt.datetime(1, 1, 1, tzinfo=tz(1439)),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tz(-1439)),
        dt.datetime(2020, 1, 1, 0, 0, 0, 1, tz(1)),
    ],
    "Path": [pathlib.Path("/tmp/xé"), pathlib.Path("/"), pathlib.Path("/a b/\U0001f40d")],
}


@pytest.mark.parametrize("kind", ["Decimal", "DateTime", "Path"])
def test_scalar_codec_matches_twisted(codec_peer: Codec, kind: str) -> None:
    ours, spec, values = SCALARS[kind]
    for value in EDGE_VALUES[kind]:
        codec_peer.check(ours, spec, value)

    @CODEC_SETTINGS
    @given(value=values)
    def check(value: Any) -> None:
        codec_peer.check(ours, spec, value)

    check()


def test_decimal_and_datetime_exact_bytes_agree_with_twisted(codec_peer: Codec) -> None:
    for text in ["Infinity", "-Infinity", "NaN", "-NaN", "sNaN", "-sNaN", "-0", "1.10", "1E+2"]:
        assert codec_peer.encode("Decimal", D(text)) == text.encode()
    for value, data in [
        (dt.datetime(2010, 12, 25, tzinfo=dt.UTC), b"2010-12-25T00:00:00.000000-00:00"),
        (dt.datetime(2010, 12, 25, 1, tzinfo=tz(330)), b"2010-12-25T01:00:00.000000+05:30"),
        (dt.datetime(2010, 12, 25, 1, tzinfo=tz(-419)), b"2010-12-25T01:00:00.000000-06:59"),
        (dt.datetime(5, 2, 3, 4, 5, 6, 7, tz(60)), b"0005-02-03T04:05:06.000007+01:00"),
    ]:
        assert codec_peer.encode("DateTime", value) == data == amp.DateTime().to_bytes(value)
    # Both zero-offset spellings read as UTC on both sides.
    for data in [b"2010-12-25T00:00:00.000000+00:00", b"2010-12-25T00:00:00.000000-00:00"]:
        theirs = codec_peer.decode("DateTime", data)
        ours = amp.DateTime().from_bytes(data)
        assert theirs == ours == dt.datetime(2010, 12, 25, tzinfo=dt.UTC)
        assert theirs.utcoffset() == ours.utcoffset() == dt.timedelta(0)
    assert codec_peer.encode("Path", pathlib.Path("/tmp/xé")) == b"/tmp/x\xc3\xa9"


@CODEC_SETTINGS
@given(text=st.text(alphabet="0123456789+-._eEinfatyNIFATYsS ", max_size=10))
def test_decimal_decoding_agrees_with_twisted(codec_peer: Codec, text: str) -> None:
    data = text.encode("ascii")
    try:
        ours: D | None = amp.Decimal().from_bytes(data)
    except ValueError:
        ours = None
    theirs = codec_peer.decode_or_none("Decimal", data)
    assert canon(ours) == canon(theirs), data


@CODEC_SETTINGS
@given(value=DATETIMES)
def test_datetime_decoding_of_every_exact_form_agrees_with_twisted(
    codec_peer: Codec, value: dt.datetime
) -> None:
    data = amp.DateTime().to_bytes(value)
    theirs = codec_peer.decode("DateTime", data)
    ours = amp.DateTime().from_bytes(data)
    assert canon(ours) == canon(theirs) == canon(value)
    # A +00:00 spelling too.
    if data.endswith(b"-00:00"):
        plus = data[:-6] + b"+00:00"
        assert canon(amp.DateTime().from_bytes(plus)) == canon(codec_peer.decode("DateTime", plus))


_TRICKY = b"0123456789 +-_:.Tx"


@CODEC_SETTINGS
@given(
    value=DATETIMES,
    edits=st.lists(
        st.tuples(st.integers(0, 31), st.sampled_from(list(_TRICKY))), min_size=1, max_size=3
    ),
)
def test_datetime_we_accept_a_subset_of_what_twisted_accepts(
    codec_peer: Codec, value: dt.datetime, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(amp.DateTime().to_bytes(value))
    for position, byte in edits:
        data[position] = byte
    try:
        ours: dt.datetime | None = amp.DateTime().from_bytes(bytes(data))
    except ValueError:
        ours = None
    theirs = codec_peer.decode_or_none("DateTime", bytes(data))
    if ours is not None:
        assert canon(ours) == canon(theirs)
    elif theirs is not None:
        # Twisted read bytes that are not an exact encoding of its value.
        assert codec_peer.encode("DateTime", theirs) != bytes(data).replace(b"+00:00", b"-00:00")


def test_datetime_offset_seconds_twisted_floors_we_refuse(codec_peer: Codec) -> None:
    for seconds, floored in [(90, b"+00:01"), (-90, b"-00:02"), (3600 + 59, b"+01:00")]:
        value = dt.datetime(2010, 1, 1, tzinfo=dt.timezone(dt.timedelta(seconds=seconds)))
        assert codec_peer.encode("DateTime", value) == b"2010-01-01T00:00:00.000000" + floored
        with pytest.raises(ValueError, match="offset"):
            amp.DateTime().to_bytes(value)


LENIENT_DATETIMES = [
    (b"2010-12-25T00:00:00.000000+ 1:00", dt.datetime(2010, 12, 25, tzinfo=tz(60))),
    (b"2010-12-25T00:00:00.000000+01:60", dt.datetime(2010, 12, 25, tzinfo=tz(120))),
    (b"2010- 1-25T00:00:00.000000+01:00", dt.datetime(2010, 1, 25, tzinfo=tz(60))),
    (b"2010-12-25 00:00:00.000000+01:00", dt.datetime(2010, 12, 25, tzinfo=tz(60))),
    (b"2010/12/25T00:00:00.000000+01:00", dt.datetime(2010, 12, 25, tzinfo=tz(60))),
    (b"+010-12-25T00:00:00.000000+01:00", dt.datetime(10, 12, 25, tzinfo=tz(60))),
    (b"2010-12-25T00:00:00.-00000+01:00", dt.datetime(2010, 12, 25, tzinfo=tz(60))),
]


def test_datetime_lenient_forms_twisted_accepts_we_refuse(codec_peer: Codec) -> None:
    for data, twisted_reads in LENIENT_DATETIMES:
        theirs = codec_peer.decode("DateTime", data)
        assert canon(theirs) == canon(twisted_reads), data
        with pytest.raises(ValueError):
            amp.DateTime().from_bytes(data)


MALFORMED_DATETIMES = [
    b"2010-12-25T00:00:00.000000+24:00",
    b"2010-12-25T00:00:00.000000-24:00",
    b"2010-12-25T00:00:00.000000*01:00",
    b"2010-13-25T00:00:00.000000-00:00",
    b"2010-02-30T00:00:00.000000-00:00",
    b"2010-12-25T00:00:00.00000-00:00",
    b"2010-12-25T00:00:00.000000-00:00\n",
    b"",
]


def test_datetime_malformed_bytes_both_refuse(codec_peer: Codec) -> None:
    for data in MALFORMED_DATETIMES:
        assert codec_peer.decode_or_none("DateTime", data) is None, data
        with pytest.raises(ValueError):
            amp.DateTime().from_bytes(data)


def test_decimal_of_other_types_twisted_value_error_we_type_error(codec_peer: Codec) -> None:
    with pytest.raises(PeerError) as info:
        codec_peer.encode("Decimal", 1.5)
    assert info.value.type == "ValueError"
    with pytest.raises(TypeError):
        amp.Decimal().to_bytes(1.5)  # type: ignore[arg-type]


def test_relative_path_twisted_makes_absolute_we_keep(codec_peer: Codec) -> None:
    theirs = codec_peer.decode("Path", b"rel/x")
    assert theirs.is_absolute() and str(theirs).endswith("/rel/x")
    assert amp.Path().from_bytes(b"rel/x") == pathlib.Path("rel/x")


# ListOf


@pytest.mark.parametrize("kind", list(SCALARS))
def test_listof_codec_matches_twisted(codec_peer: Codec, kind: str) -> None:
    element, spec, values = SCALARS[kind]
    ours, theirs = amp.ListOf(element), {"ListOf": spec}
    assert codec_peer.check(ours, theirs, []) == b""
    codec_peer.check(ours, theirs, EDGE_VALUES[kind])

    @CODEC_SETTINGS
    @given(value=st.lists(values, max_size=8))
    def check(value: list[Any]) -> None:
        codec_peer.check(ours, theirs, value)

    check()


def test_listof_exact_bytes_agree_with_twisted(codec_peer: Codec) -> None:
    data = b"\x00\x011\x00\x0222\x00\x03333"
    assert codec_peer.encode({"ListOf": "Integer"}, [1, 22, 333]) == data
    assert amp.ListOf(amp.Integer()).to_bytes([1, 22, 333]) == data
    assert codec_peer.decode({"ListOf": "Integer"}, data) == [1, 22, 333]
    nested = [[D("1.10")], []]
    codec_peer.check(
        amp.ListOf(amp.ListOf(amp.Decimal())), {"ListOf": {"ListOf": "Decimal"}}, nested
    )


def test_listof_trailing_bytes_twisted_drops_we_refuse(codec_peer: Codec) -> None:
    for data, twisted_reads in [
        (b"\x00\x02ab\x00\x05xy", [b"ab"]),
        (b"\x00\x02ab\x00", [b"ab"]),
        (b"\x00", []),
        (b"\x00\x05ab", []),
    ]:
        assert codec_peer.decode({"ListOf": "String"}, data) == twisted_reads
        with pytest.raises(ValueError):
            amp.ListOf(amp.Bytes()).from_bytes(data)


@CODEC_SETTINGS
@given(data=st.binary(max_size=30))
def test_listof_decoding_we_agree_or_twisted_dropped_a_tail(codec_peer: Codec, data: bytes) -> None:
    theirs = codec_peer.decode({"ListOf": "String"}, data)
    try:
        ours = amp.ListOf(amp.Bytes()).from_bytes(data)
    except ValueError:
        # Twisted read only a strict prefix of the bytes.
        prefix = amp.ListOf(amp.Bytes()).to_bytes(theirs)
        assert len(prefix) < len(data) and data.startswith(prefix)
    else:
        assert ours == theirs


# AmpList

ROWS_SPEC = {"AmpList": [["a", "Integer", False], ["b", "Unicode", True]]}
ROWS = amp.AmpList([("a", amp.Integer()), ("b", amp.String(optional=True))])
OPTIONAL_SPEC = {"AmpList": [["b", "Unicode", True], ["c", "Decimal", True]]}
OPTIONALS = amp.AmpList([("b", amp.String(optional=True)), ("c", amp.Decimal(optional=True))])


def test_amplist_codec_matches_twisted_on_edge_values(codec_peer: Codec) -> None:
    data = codec_peer.check(ROWS, ROWS_SPEC, [{"a": 7, "b": "hi"}, {"a": 9}])
    assert data == b"\x00\x01a\x00\x017\x00\x01b\x00\x02hi\x00\x00\x00\x01a\x00\x019\x00\x00"
    assert codec_peer.check(ROWS, ROWS_SPEC, []) == b""
    # An element with every field absent is a bare box end, on both sides.
    assert codec_peer.check(OPTIONALS, OPTIONAL_SPEC, [{}]) == b"\x00\x00"
    assert codec_peer.decode(OPTIONAL_SPEC, b"\x00\x00") == [{"b": None, "c": None}]
    assert OPTIONALS.from_bytes(b"\x00\x00") == [{"b": None, "c": None}]
    codec_peer.check(OPTIONALS, OPTIONAL_SPEC, [{}, {"c": D("-sNaN")}, {"b": ""}, {}])
    # Nested, and with the newer types inside.
    nested_spec = {
        "AmpList": [
            ["inner", ROWS_SPEC, False],
            ["when", "DateTime", True],
            ["path", "Path", True],
            ["decs", {"ListOf": "Decimal"}, True],
        ]
    }
    nested = amp.AmpList(
        [
            ("inner", ROWS),
            ("when", amp.DateTime(optional=True)),
            ("path", amp.Path(optional=True)),
            ("decs", amp.ListOf(amp.Decimal(), optional=True)),
        ]
    )
    codec_peer.check(
        nested,
        nested_spec,
        [
            {
                "inner": [{"a": 1}, {"a": 2, "b": "é"}],
                "when": dt.datetime(5, 1, 1, tzinfo=tz(-419)),
                "path": pathlib.Path("/x"),
                "decs": [D("1.10"), D("NaN")],
            },
            {"inner": []},
        ],
    )


def test_amplist_unterminated_box_twisted_drops_we_refuse(codec_peer: Codec) -> None:
    for data, twisted_reads in [
        (b"\x00\x01a\x00\x011", []),
        (b"\x00\x01a\x00\x011\x00\x00\x00\x01a\x00\x012", [{"a": 1, "b": None}]),
    ]:
        assert codec_peer.decode(ROWS_SPEC, data) == twisted_reads
        with pytest.raises(ValueError):
            ROWS.from_bytes(data)


RANDOM_SPEC = {
    "AmpList": [
        ["i", "Integer", False],
        ["s", "Unicode", True],
        ["d", "Decimal", True],
        ["t", "DateTime", True],
        ["l", {"ListOf": "String"}, True],
    ]
}
RANDOM_ROWS = amp.AmpList(
    [
        ("i", amp.Integer()),
        ("s", amp.String(optional=True)),
        ("d", amp.Decimal(optional=True)),
        ("t", amp.DateTime(optional=True)),
        ("l", amp.ListOf(amp.Bytes(), optional=True)),
    ]
)


@st.composite
def random_row(draw: st.DrawFn) -> dict[str, Any]:
    result: dict[str, Any] = {"i": draw(st.integers())}
    for name, values in [
        ("s", st.text(max_size=8)),
        ("d", DECIMALS),
        ("t", DATETIMES),
        ("l", st.lists(st.binary(max_size=4), max_size=3)),
    ]:
        if draw(st.booleans()):
            result[name] = draw(values)
    return result


@CODEC_SETTINGS
@given(value=st.lists(random_row(), max_size=4))
def test_amplist_codec_matches_twisted(codec_peer: Codec, value: list[dict[str, Any]]) -> None:
    codec_peer.check(RANDOM_ROWS, RANDOM_SPEC, value)


# BigBytes and BigString against the peer's hand-written convention


@pytest.mark.parametrize(
    ("ours", "spec"), [(amp.BigBytes(), "BigBytes"), (amp.BigString(), "BigString")]
)
def test_big_to_box_and_from_box_match_the_twisted_implementation(
    codec_peer: Codec, ours: amp.Argument[Any], spec: str
) -> None:
    def value_of(size: int) -> Any:
        return patterned(size) if spec == "BigBytes" else "é" * (size // 2) + "x" * (size % 2)

    for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 11 * CHUNK + 3]:
        value = value_of(size)
        box: dict[bytes, bytes] = {}
        ours.to_box(b"big", value, box)
        theirs = codec_peer.request("to_box", type=spec, name="big", value=value)
        assert {k: bytes(v) for k, v in box.items()} == theirs
        assert ours.from_box(b"big", theirs) == value
        assert codec_peer.request("from_box", type=spec, name="big", box=theirs) == value
