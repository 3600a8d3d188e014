"""
``asyncio-amp decode``: print the boxes of a raw AMP byte stream or a hex dump.

Each box is printed as soon as it is read, and memory stays bounded whatever the
input (see ``_output``).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from ._common import (
    EXIT_OK,
    EXIT_REMOTE_ERROR,
    PROG,
    SHOW_LIMIT,
    Formatter,
    UsageError,
    box_summary,
    error_text,
    fail,
    json_bytes,
    os_error,
    show_bytes,
    wire_text,
)
from ._output import BoxScanner, HexError, HexReader, ScannedBox, looks_like_hex

__all__: list[str] = []

EXAMPLES = """\
examples:
  asyncio-amp decode capture.bin
  asyncio-amp decode --hex dump.txt
  xxd capture.bin | asyncio-amp decode --hex
  printf '00045f61736b0001310008...' | asyncio-amp decode --hex --json

The input is a raw AMP byte stream (one direction of a connection), or with
--hex a hex dump: plain hex digits (xxd -p), or the output of xxd or hexdump -C.
Each box is printed as a block of key: value lines as soon as it is read; a box
over 4 MiB is shown as too big, without its fields. A malformed stream prints
the boxes before the break, then where it breaks and why, and exits with status 1.
"""


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``decode`` and its options to the command's subparsers."""
    parser = subparsers.add_parser(
        "decode",
        help="print the boxes of a raw AMP byte stream",
        description="Print the boxes of a raw AMP byte stream (a capture, a hex dump).",
        epilog=EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the input (default: standard input)"
    )
    parser.add_argument("--hex", action="store_true", help="the input is a hex dump")
    parser.add_argument("--json", action="store_true", help="print one JSON object per box")
    parser.add_argument("--full", action="store_true", help="show long values whole")
    return parser


# How much of one box decode keeps to show it (its keys and values, each pair
# counted with its cost as Python objects): past this, a box is "too big to show" and
# skipped to its end, so that memory stays bounded whatever the input.
DECODE_SHOW_LIMIT = 4 << 20

# decode reads its input in pieces of this size.
READ_SIZE = 1 << 16


def parse_hex(text: str) -> bytes:
    """
    Read a hex dump: plain hex digits (spaces, newlines, colons and ``0x`` ignored),
    or the output of ``xxd`` or ``hexdump -C`` (offsets and text columns dropped).

    Raises:
        UsageError: The text is not hex.
    """
    reader = HexReader()
    try:
        return b"".join(reader.feed(text) + reader.end())
    except HexError as exc:
        raise UsageError(str(exc)) from None


def _chunks(source: str, binary_stdin: IO[bytes]) -> Iterator[bytes]:
    """The input of decode, in pieces as they can be read."""
    if source == "-":
        stream: IO[bytes] = binary_stdin
        close = False
    else:
        try:
            stream = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {os_error(exc)}") from None
        close = True
    try:
        read = getattr(stream, "read1", stream.read)
        while chunk := read(READ_SIZE):
            yield chunk
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {os_error(exc)}") from None
    finally:
        if close:
            stream.close()


def _hex_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The bytes of a hex dump read in pieces."""
    reader = HexReader()
    text = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        for chunk in chunks:
            yield from reader.feed(text.decode(chunk))
        yield from reader.feed(text.decode(b"", final=True))
        yield from reader.end()
    except HexError as exc:
        raise UsageError(str(exc)) from None


def _box_header(box: ScannedBox) -> str:
    items = dict(box.items)
    kind, command, tag = box_summary(items)
    head = f"box {box.number} at byte {box.offset} ({box.length} bytes): {kind}"
    if command is not None:
        head += f" {command}"
    if tag is not None:
        head += f", tag {tag}"
    if kind == "error":
        head += f": {error_text(items)}"
    if box.too_big:
        head += f" (too big to show: {box.keys:,} keys)"
    return head


def _box_json(box: ScannedBox) -> dict[str, Any]:
    items = dict(box.items)
    kind, command, tag = box_summary(items)
    record: dict[str, Any] = {
        "box": box.number,
        "offset": box.offset,
        "length": box.length,
        "kind": kind,
        "command": command,
        "tag": tag,
        "fields": {wire_text(key): json_bytes(value) for key, value in box.items},
    }
    if box.too_big:
        record["too_big"] = True
        record["keys"] = box.keys
    if len(items) != len(box.items):
        counts = collections.Counter(key for key, _ in box.items)
        record["duplicate_keys"] = sorted(wire_text(k) for k, n in counts.items() if n > 1)
    return record


def _print_box(box: ScannedBox, args: argparse.Namespace, out: IO[str]) -> None:
    if args.json:
        print(json.dumps(_box_json(box), ensure_ascii=False), file=out)
        return
    if box.number > 1:
        print(file=out)
    print(_box_header(box), file=out)
    limit = None if args.full else SHOW_LIMIT
    seen: set[bytes] = set()
    for key, value in box.items:
        note = "  (again: the last one counts)" if key in seen else ""
        seen.add(key)
        print(f"  {show_bytes(key)}: {show_bytes(value, limit)}{note}", file=out)


def run(args: argparse.Namespace, stdin: IO[bytes], out: IO[str]) -> int:
    """Print the boxes of the stream ``args`` name to ``out``; return the exit status."""
    chunks = _chunks(args.file, stdin)
    if args.hex:
        chunks = _hex_chunks(chunks)
    scanner = BoxScanner(show_limit=DECODE_SHOW_LIMIT)
    first = b""
    size = 0
    for chunk in chunks:
        if len(first) < 4096:
            first += chunk[: 4096 - len(first)]
        size += len(chunk)
        for box in scanner.feed(chunk):
            if box.complete:
                _print_box(box, args, out)
        out.flush()  # each box as soon as it is whole
        if scanner.error is not None:
            break
    problem = scanner.end()
    out.flush()
    if problem is not None:
        if not args.hex and looks_like_hex(first):
            problem += "; the input looks like a hex dump: try --hex"
        return fail(EXIT_REMOTE_ERROR, f"malformed AMP stream: {problem}")
    if not size:
        print(f"{PROG}: the input is empty", file=sys.stderr)
    return EXIT_OK
