"""
Write the seed corpus, fuzzing/corpus/: a few small valid AMP streams.

Each file is a stream followed by the control bytes that fuzz_input.py reads from
its end (``b"\\x00"``: fed whole, with the defaults). Both targets share the
files. Run ``python fuzzing/make_corpus.py`` after changing this list.
"""

from __future__ import annotations

import pathlib

from fuzz_input import BYTEWISE, CHUNKED

from asyncio_amp._wire import encode_box

# Option bits of fuzz_server.py, repeated here so that this script needs no event loop.
CALLS = 0x08
FEW_RESPONDERS = 0x10
PAUSE_WRITING = 0x20
DEBUG_LOG = 0x40
MORE = 0x80
SHUTDOWN = 0x02
CANCEL = 0x04


def ask(tag: bytes | None, command: bytes, **values: bytes) -> bytes:
    box = {b"_command": command, **{k.encode(): v for k, v in values.items()}}
    if tag is not None:
        box[b"_ask"] = tag
    return encode_box(box)


def controls(options: int, *values: tuple[int, int]) -> bytes:
    """The trailer for ``options`` and the (size, value) parameters in the order they are taken."""
    trailer = bytes([options])
    for size, value in values:
        trailer = value.to_bytes(size, "big") + trailer
    return trailer


SUM_A = ask(b"a", b"Sum", a=b"40", b=b"2")
ROWS = encode_box({b"name": b"a", b"count": b"1"}) + encode_box({b"name": b"b"})

SEEDS = {
    "sum_ask": ask(b"1", b"Sum", a=b"1", b=b"2") + controls(0),
    "answer_to_own_call": encode_box({b"_answer": b"1", b"total": b"3"}) + controls(CALLS),
    "error_answer": encode_box(
        {b"_error": b"3", b"_error_code": b"UNKNOWN", b"_error_description": b"Unknown Error"}
    )
    + controls(CALLS),
    "amplist_ask": ask(b"a", b"Tally", rows=ROWS) + controls(0),
    "mixed_asks_chunked": (
        ask(b"2", b"Echo", data=b"\x00\xff", text=b"hi")
        + ask(b"3", b"Join", items=b"\x00\x01x\x00\x02yz")
        + ask(None, b"Note", text=b"n")
        + ask(b"4", b"Blob", data=b"abc", **{"data.2": b"def"})
        + controls(CHUNKED, (1, 2), (2, 7), (2, 40), (2, 61))
    ),
    "errors_bytewise": (
        ask(b"5", b"Divide", numerator=b"1", denominator=b"0")
        + ask(b"6", b"Crash", how=b"boom")
        + ask(b"7", b"Stamp", when=b"2010-12-25T00:00:00.000000-00:00", amount=b"1.10")
        + ask(b"8", b"Nope")
        + controls(BYTEWISE | FEW_RESPONDERS | PAUSE_WRITING | DEBUG_LOG, (1, 0), (1, 3))
    ),
    "bad_answers_then_fatal": (
        ask(b"1", b"Crash", how=b"answer")
        + ask(b"2", b"Crash", how=b"none")
        + ask(b"3", b"Crash", how=b"fatal")
        + ask(b"4", b"Sum", a=b"1", b=b"1")
        + controls(0)
    ),
    "cancelled_call_then_shutdown": (
        # The answer to the cancelled Echo call is dropped; the second chunk
        # comes after shutdown() has started.
        encode_box({b"_answer": b"3", b"data": b"late"})
        + encode_box({b"_answer": b"1", b"total": b"3"})
        + SUM_A
        + ask(b"b", b"Sum", a=b"1", b=b"2")
        + controls(CALLS | CHUNKED | MORE, (1, 0), (2, 89), (1, SHUTDOWN | CANCEL), (1, 1))
    ),
}


def main() -> None:
    directory = pathlib.Path(__file__).parent / "corpus"
    directory.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (directory / name).write_bytes(data)


if __name__ == "__main__":
    main()
