"""
Fuzzing in the test suite: the fuzz targets of fuzzing/ run without atheris, and
garbage goes to a real server over 127.0.0.1.

The two byte-level properties of the hardening issue, "any split of a valid
stream parses to the same boxes" and "any bytes either parse or raise
ProtocolError", are in test_wire.py (test_encoded_boxes_decode_the_same_however_split,
test_arbitrary_bytes_decode_or_raise_protocol_error); here they are checked again
through the fuzz targets, which add the server's side of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import pathlib
import random
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncio_amp import encode_box
from asyncio_amp._wire import Box, BoxDecoder, parse_boxes
from helpers import LONG, LOOP_KINDS, TIME, client, loop_factory, raw_connection, running_server

FUZZING = pathlib.Path(__file__).parent.parent / "fuzzing"
sys.path.insert(0, str(FUZZING))

fuzz_input: Any = importlib.import_module("fuzz_input")
fuzz_decoder: Any = importlib.import_module("fuzz_decoder")
fuzz_server: Any = importlib.import_module("fuzz_server")

SEEDS = sorted((FUZZING / "corpus").iterdir())

# How many random inputs each target gets (a few seconds for both).
RANDOM_INPUTS = 3000


@pytest.fixture
def server_target() -> Iterator[Any]:
    """The server fuzz target; its event loop is closed at the end of the test."""
    try:
        yield fuzz_server
    finally:
        fuzz_server.close_loop()


def mutations(count: int, seed: int = 0) -> Iterator[bytes]:
    """``count`` inputs made from the seed corpus by random edits, and some plain noise."""
    rng = random.Random(seed)
    seeds = [path.read_bytes() for path in SEEDS]
    for _ in range(count):
        if rng.random() < 0.15:
            yield rng.randbytes(rng.randrange(64))
            continue
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(6)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:  # change a byte
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:  # insert a few random bytes
                data[pos:pos] = rng.randbytes(rng.randrange(1, 5))
            elif op == 2:  # cut a slice out
                del data[pos : pos + rng.randrange(1, 12)]
            elif op == 3:  # splice in part of another seed
                other = rng.choice(seeds)
                start = rng.randrange(len(other))
                data[pos:pos] = other[start : start + rng.randrange(1, 40)]
            elif op == 4:  # truncate
                del data[pos:]
            elif data:  # other option bits
                data[-1] = rng.randrange(256)
        yield bytes(data)


# The fuzz targets, without atheris


def test_seed_corpus_is_small_valid_amp() -> None:
    assert 4 <= len(SEEDS) <= 10
    for path in SEEDS:
        data = path.read_bytes()
        assert len(data) < 512
        # Whole boxes, then the few control bytes at the end.
        boxes, error = BoxDecoder().receive_data_partial(data)
        assert boxes, path.name
        assert error is None or error.args[0].startswith("key length"), path.name


@pytest.mark.parametrize("seed", SEEDS, ids=lambda path: path.name)
def test_decoder_target_passes_the_seed_corpus(seed: pathlib.Path) -> None:
    fuzz_decoder.test_one_input(seed.read_bytes())


@pytest.mark.parametrize("seed", SEEDS, ids=lambda path: path.name)
def test_server_target_passes_the_seed_corpus(seed: pathlib.Path, server_target: Any) -> None:
    written = server_target.run_input(seed.read_bytes())
    assert written or seed.name in {"answer_to_own_call", "error_answer"}


REGRESSIONS = sorted((FUZZING / "regressions").iterdir())


@pytest.mark.parametrize("finding", REGRESSIONS, ids=lambda path: path.name)
def test_targets_pass_past_findings(finding: pathlib.Path, server_target: Any) -> None:
    """Inputs the fuzzers once failed on (see fuzzing/README.md) pass both targets."""
    data = finding.read_bytes()
    fuzz_decoder.test_one_input(data)
    server_target.test_one_input(data)


def test_decoder_target_passes_random_inputs() -> None:
    for data in mutations(RANDOM_INPUTS):
        try:
            fuzz_decoder.test_one_input(data)
        except BaseException:
            print(f"failing input: {data.hex()}")
            raise


def test_server_target_passes_random_inputs(server_target: Any) -> None:
    for data in mutations(RANDOM_INPUTS):
        try:
            server_target.test_one_input(data)
        except BaseException:
            print(f"failing input: {data.hex()}")
            raise


def test_decoder_target_detects_a_parser_that_loses_a_box(monkeypatch: pytest.MonkeyPatch) -> None:
    original = fuzz_decoder.parse_boxes
    monkeypatch.setattr(fuzz_decoder, "parse_boxes", lambda data: original(data)[1:])
    sum_ask = (FUZZING / "corpus" / "sum_ask").read_bytes()
    with pytest.raises(AssertionError):
        fuzz_decoder.test_one_input(sum_ask)


def test_server_target_detects_a_server_that_closes_for_no_reason(
    server_target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sum_and_close(self: Any, a: int, b: int) -> dict[str, int]:
        self.close()
        return {"total": a + b}

    monkeypatch.setattr(server_target.FuzzServer, "sum", sum_and_close)
    sum_ask = (FUZZING / "corpus" / "sum_ask").read_bytes()
    with pytest.raises(AssertionError, match="closed for no reason"):
        server_target.run_input(sum_ask)


# Properties of the server, through its fuzz target


def _tag(n: int) -> bytes:
    return b"%x" % n


ask_boxes = st.one_of(
    st.builds(
        lambda a, b: {b"_command": b"Sum", b"a": b"%d" % a, b"b": b"%d" % b},
        st.integers(-(10**20), 10**20),
        st.integers(-5, 5),
    ),
    st.builds(
        lambda n, d: {b"_command": b"Divide", b"numerator": b"%d" % n, b"denominator": b"%d" % d},
        st.integers(-100, 100),
        st.integers(-2, 2),
    ),
    st.builds(lambda data: {b"_command": b"Echo", b"data": data}, st.binary(max_size=40)),
    st.builds(
        lambda items: {
            b"_command": b"Join",
            b"items": b"".join(len(i).to_bytes(2, "big") + i for i in items),
        },
        st.lists(st.text(max_size=5).map(str.encode), max_size=4),
    ),
    st.builds(lambda text: {b"_command": b"Note", b"text": text.encode()}, st.text(max_size=8)),
    st.builds(lambda how: {b"_command": b"Crash", b"how": how}, st.sampled_from([b"x", b"none"])),
    st.just({b"_command": b"Nope"}),
)


def _stream_of_asks(boxes: list[Box]) -> bytes:
    parts = []
    for index, box in enumerate(boxes):
        tag = {} if box[b"_command"] == b"Note" else {b"_ask": _tag(index + 1)}
        parts.append(encode_box({**box, **tag}))
    return b"".join(parts)


def _chunked(cuts: list[int]) -> bytes:
    """The fuzz_input trailer that cuts the stream at ``cuts`` (1 to 8 of them)."""
    trailer = b"".join(cut.to_bytes(2, "big") for cut in reversed(cuts))
    return trailer + bytes([len(cuts) - 1, fuzz_input.CHUNKED])


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(ask_boxes, min_size=1, max_size=8),
    st.lists(st.integers(0, 1000), min_size=1, max_size=8),
)
def test_any_split_of_valid_asks_gets_the_same_answers(boxes: list[Box], cuts: list[int]) -> None:
    stream = _stream_of_asks(boxes)
    try:
        whole = parse_boxes(fuzz_server.run_input(stream + b"\x00"))
        split = parse_boxes(fuzz_server.run_input(stream + _chunked(cuts)))
        bytewise = parse_boxes(fuzz_server.run_input(stream + bytes([fuzz_input.BYTEWISE])))
    finally:
        fuzz_server.close_loop()
    # Async responders may finish in another order; the answers are the same.
    expected = sorted(whole, key=repr)
    assert sorted(split, key=repr) == expected
    assert sorted(bytewise, key=repr) == expected
    assert len(whole) == sum(box[b"_command"] != b"Note" for box in boxes)


# Garbage against a real server over 127.0.0.1

keys = st.one_of(
    st.sampled_from([b"_ask", b"_command", b"_answer", b"_error", b"_error_code", b"a", b"b"]),
    st.binary(min_size=1, max_size=6),
)
values = st.one_of(
    st.sampled_from([b"1", b"2", b"Sum", b"Echo", b"Crash", b"fatal", b"UNKNOWN"]),
    st.binary(max_size=10),
)
# Noise, and boxes (well-framed, but any keys: calls, answers to nothing, empty boxes).
pieces = st.one_of(
    st.binary(max_size=30), st.dictionaries(keys, values, max_size=4).map(encode_box)
)
garbage = st.tuples(
    st.lists(pieces, min_size=1, max_size=6).map(b"".join),
    st.lists(st.integers(0, 200), max_size=4),
)


async def _send_garbage(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` in chunks and half-close; return what the server sent back before closing."""
    async with raw_connection(port) as (reader, writer):
        try:
            for chunk in fuzz_input.split(data, cuts):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(LONG):
                return await reader.read()
        except ConnectionError:
            return b""  # the server closed first and the reset lost its last bytes


async def _garbage_then_calls(connections: list[tuple[bytes, list[int]]]) -> None:
    async with running_server(fuzz_server.FuzzServer) as (server, port, protocols):
        for data, cuts in connections:
            received = await _send_garbage(port, data, cuts)
            for box in parse_boxes(received):
                assert b"_answer" in box or b"_error" in box, box
            assert server.is_serving()
            async with client(port) as peer, asyncio.timeout(LONG):
                assert await peer.call_remote(fuzz_server.Sum, a=40, b=2) == {"total": 42}
                echo = await peer.call_remote(fuzz_server.Echo, data=data[:100], text=None)
                assert echo == {"data": data[:100], "text": None}
        async with asyncio.timeout(LONG):
            for protocol in protocols[::2]:  # the garbage connections
                await protocol.wait_closed()


@pytest.mark.parametrize("kind", LOOP_KINDS)
@settings(max_examples=15, derandomize=True, deadline=None)
@given(st.lists(garbage, min_size=1, max_size=3))
def test_garbage_never_stops_a_server(
    kind: str, connections: list[tuple[bytes, list[int]]]
) -> None:
    with asyncio.Runner(debug=True, loop_factory=lambda: loop_factory(kind)) as runner:
        runner.run(_garbage_then_calls(connections))


# The atheris targets themselves, for a short bounded run (skipped without atheris)


@pytest.mark.parametrize("target", ["fuzz_decoder.py", "fuzz_server.py"])
def test_atheris_bounded_run(target: str, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("atheris")
    command = [
        sys.executable,
        str(FUZZING / target),
        "-runs=2000",
        "-seed=1",
        f"-dict={FUZZING / 'amp.dict'}",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path),
        str(FUZZING / "corpus"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120 * TIME, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 2000 runs" in done.stderr


# Regressions: inputs the fuzzers found

# A Tally ask whose responder finishes in its first step, an Echo ask deferred
# behind it (max_responders=1), then an empty box, which breaks the protocol. The
# server closes the transport, the Tally task finishes before connection_lost
# and starts the deferred Echo responder, and connection_lost cancels that task
# before it runs: the responder's coroutine is never awaited (a RuntimeWarning).
DEFERRED_CALL_THEN_BAD_BOX = bytes.fromhex(
    "00045f61736b00013100085f636f6d6d616e64000554616c6c790004726f777300000000"
    "00045f61736b00013200085f636f6d6d616e6400044563686f0004646174610001780000"
    "0000"
)


# The same bug as the fuzzer found it (crash-7e070460…, 310 bytes, after 177,315
# inputs), minimized by libFuzzer to 69 bytes: the server calls the peer first,
# max_responders=1, a 1-byte high-water mark (every write pauses writing), and two
# chunks: an ask of an unknown command | a Join ask, then a bad key length. The
# UNHANDLED answer is held while writing is paused, so the Join ask is deferred;
# it is started after the close has begun and cancelled before it runs.
FUZZER_INPUT = bytes.fromhex(
    "00045f61736b00013000085f636f6d6d616e6400026869000000045f61736b0001310008"
    "5f636f6d6d616e6400044a6f696e00056974656d7300000000085f000045636879"
)


# The same without the bad box: the peer resets the connection instead, so the
# deferred responder starts on the turn before connection_lost. Not closing in
# _release alone would not fix this one.
DEFERRED_CALL_THEN_RESET = DEFERRED_CALL_THEN_BAD_BOX[:-2] + bytes(
    [fuzz_server.HANG_UP_EARLY, 0, fuzz_server.FEW_RESPONDERS | fuzz_server.MORE]
)


@pytest.mark.parametrize(
    "data",
    [
        # Then max_responders byte 0 (1 responder) and option FEW_RESPONDERS.
        DEFERRED_CALL_THEN_BAD_BOX + bytes([0, fuzz_server.FEW_RESPONDERS]),
        DEFERRED_CALL_THEN_RESET,
        FUZZER_INPUT,
    ],
    ids=["deferred-call-then-bad-box", "deferred-call-then-reset", "fuzzer-minimized"],
)
def test_regression_fuzz_server_no_responder_left_unawaited(
    data: bytes, server_target: Any
) -> None:
    server_target.test_one_input(data)


async def test_regression_no_responder_left_unawaited_when_a_peer_breaks_the_protocol() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with running_server(fuzz_server.FuzzServer, max_responders=1) as (_, port, protocols):
            async with raw_connection(port) as (reader, writer):
                writer.write(DEFERRED_CALL_THEN_BAD_BOX)
                with contextlib.suppress(ConnectionError):
                    async with asyncio.timeout(LONG):
                        await reader.read()
            async with asyncio.timeout(LONG):
                await protocols[0].wait_closed()
        gc.collect()
    assert [str(w.message) for w in caught] == []
