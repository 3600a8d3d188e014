#!/usr/bin/env python3
"""
Fuzz target: the box decoder, the nested-box parser and every argument type's decoding.

For each input (see ``fuzz_input.py`` for its layout) it checks that:

* ``BoxDecoder`` raises nothing but ``ProtocolError``, and feeding the stream in
  chunks gives the same boxes, the same error and the same leftover state as
  feeding it whole; a broken decoder stays broken;
* the boxes decoded re-encode with ``encode_box`` and parse back to the same
  boxes, and ``parse_boxes`` agrees with the decoder;
* ``parse_nested_boxes`` raises nothing but ``ValueError``, and what it parses
  re-encodes and parses back the same;
* each argument type's ``from_bytes`` raises nothing but ``ValueError`` (which
  includes ``UnicodeDecodeError``), and a decoded value's encoding is stable:
  encoding it, decoding that and encoding again gives the same bytes.

Run it with atheris (``pip install atheris``)::

    python fuzzing/fuzz_decoder.py -runs=1000000 -dict=fuzzing/amp.dict "$(mktemp -d)" \\
        fuzzing/corpus

Without atheris, ``test_one_input`` is an ordinary function: tests/test_fuzzing.py
runs it over the seed corpus and random inputs.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

if __name__ == "__main__":
    import atheris  # type: ignore[import-untyped]  # it ships no type hints

    # Coverage feedback from the package only; the standard library is not instrumented.
    _instrumented: contextlib.AbstractContextManager[Any] = atheris.instrument_imports(
        include=["asyncio_amp"]
    )
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    import asyncio_amp as amp
    from asyncio_amp._errors import ProtocolError
    from asyncio_amp._wire import BoxDecoder, encode_box, parse_boxes, parse_nested_boxes

from fuzz_input import FuzzInput, split

# The values of decoded boxes whose types are tried too, besides the whole stream:
# enough to reach the values of a few keys without slowing every input down.
MAX_VALUES_DECODED = 8


def _simple_types() -> list[amp.Argument[Any]]:
    """An instance of each public argument type that takes no arguments, new ones included."""
    found: dict[type, amp.Argument[Any]] = {}
    for name in amp.__all__:
        cls = getattr(amp, name)
        if isinstance(cls, type) and issubclass(cls, amp.Argument) and cls not in found:
            try:
                found[cls] = cls()
            except (TypeError, NotImplementedError):  # ListOf and AmpList need arguments
                continue
    found.pop(amp.Argument, None)
    return list(found.values())


#: Every built-in argument type, and some compound ones.
ARGUMENT_TYPES: tuple[amp.Argument[Any], ...] = (
    *_simple_types(),
    amp.ListOf(amp.Integer()),
    amp.ListOf(amp.String()),
    amp.ListOf(amp.DateTime()),
    amp.ListOf(amp.ListOf(amp.Bytes())),
    amp.AmpList([("name", amp.String()), ("count", amp.Integer(optional=True))]),
    amp.AmpList(
        [
            ("when", amp.DateTime(optional=True)),
            ("blob", amp.BigBytes(optional=True)),
            ("rows", amp.AmpList([("x", amp.Float())], optional=True)),
        ]
    ),
)


def test_one_input(data: bytes) -> None:
    """Check one input; any exception or failed assertion is a finding."""
    inp = FuzzInput(data)
    points = inp.chunk_points()
    limits = inp.limits()
    stream = inp.stream()
    boxes = check_decoder(stream, split(stream, points), limits)
    check_nested(stream)
    values = [stream]
    for box in boxes:
        values.extend(box.values())
    for value in values[: 1 + MAX_VALUES_DECODED]:
        for argument in ARGUMENT_TYPES:
            check_argument(argument, value)


def check_decoder(
    stream: bytes, chunks: list[bytes], limits: dict[str, int]
) -> list[dict[bytes, bytes]]:
    """Decode ``stream`` whole and in ``chunks``; return the boxes if it is valid AMP."""
    whole = BoxDecoder(**limits)
    whole_error: ProtocolError | None = None
    try:
        boxes = whole.receive_data(stream)
    except ProtocolError as exc:
        whole_error = exc
        boxes = []
        # A broken decoder stays broken, with the same error.
        try:
            whole.receive_data(b"\x00\x01x\x00\x00\x00\x00")
        except ProtocolError as again:
            assert again is exc, (again, exc)
        else:
            raise AssertionError("a broken decoder accepted more data")
        assert whole.end_of_stream() is None

    chunked = BoxDecoder(**limits)
    chunked_boxes: list[dict[bytes, bytes]] = []
    chunked_error: ProtocolError | None = None
    for chunk in chunks:
        got, chunked_error = chunked.receive_data_partial(chunk)
        chunked_boxes += got
        if chunked_error is not None:
            break
    assert (whole_error is None) == (chunked_error is None), (whole_error, chunked_error)
    if whole_error is not None:
        assert str(whole_error), "a ProtocolError with an empty message"
        # The text may differ only in the sample of the stream it quotes, which
        # depends on how much of it had arrived.
        assert str(chunked_error).partition(";")[0] == str(whole_error).partition(";")[0], (
            chunked_error,
            whole_error,
        )
        # receive_data_partial kept the boxes before the error; they match the
        # boxes a whole decoder returns for the stream up to that point.
        assert chunked_boxes == BoxDecoder(**limits).receive_data_partial(stream)[0]
        return []
    assert chunked_boxes == boxes, (chunked_boxes, boxes)
    assert chunked.buffered == whole.buffered
    assert chunked.in_box == whole.in_box
    end_whole, end_chunked = whole.end_of_stream(), chunked.end_of_stream()
    assert (end_whole is None) == (end_chunked is None) == (not whole.in_box)
    assert end_whole is None or str(end_whole) == str(end_chunked)

    for box in boxes:
        assert box, "the decoder returned an empty box"
    wire = b"".join(encode_box(box) for box in boxes)
    assert parse_boxes(wire) == boxes
    if end_whole is None:
        # A complete stream: parse_boxes, which has no limits, reads the same boxes.
        assert parse_boxes(stream) == boxes
    else:
        try:
            parse_boxes(stream)
        except ProtocolError:
            pass
        else:
            raise AssertionError("parse_boxes accepted a stream that ends inside a box")
    return boxes


def check_nested(data: bytes) -> None:
    """parse_nested_boxes: only ValueError, and what parses round-trips."""
    try:
        nested = parse_nested_boxes(data)
    except ValueError as exc:
        assert type(exc) is ValueError, repr(exc)
        assert str(exc)
        return
    assert parse_nested_boxes(b"".join(encode_box(box) for box in nested)) == nested


def check_argument(argument: amp.Argument[Any], data: bytes) -> None:
    """from_bytes raises only ValueError, and a decoded value encodes stably."""
    try:
        value = argument.from_bytes(data)
    except ValueError as exc:
        assert str(exc) or isinstance(exc, UnicodeDecodeError), repr(exc)
        return
    if argument.multi_key:
        box: dict[bytes, bytes] = {}
        argument.to_box(b"k", value, box)
        again = argument.from_box(b"k", box)
        assert again == value, (argument, data, value, again)
        return
    canonical = argument.to_bytes(value)
    assert argument.to_bytes(argument.from_bytes(canonical)) == canonical, (
        argument,
        data,
        canonical,
    )


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
