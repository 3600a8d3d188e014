"""
Bounded machinery for the ``asyncio-amp`` command: a box scanner, a hex-dump reader
and a log writer, each holding a bounded amount of memory whatever its input.

Theory of operation:

- `BoxScanner` splits a byte stream into boxes as the bytes come. It buffers at
  most one partial key/value pair (under 66 kB: AMP's lengths are two bytes), and
  keeps the pairs of the box being read up to ``show_limit`` bytes; past that it
  keeps only the first of each reserved key (``_command``, ``_ask``...), which say
  what the box is, and counts the rest as it skips to the end of the box.
- `HexReader` turns a hex dump into bytes line by line, keeping at most one
  partial line (long lines of bare digits are cut between digits).
- `LogWriter` writes lines to a file descriptor from a thread of its own, so that
  a reader that stops (a pipe nobody reads) never holds up the event loop. Its
  queue is bounded: lines that do not fit are dropped and counted, and the count
  is written once there is room again. A reader that closes the pipe ends the log
  (said once on standard error), not the program.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import sys
import threading
from collections.abc import Callable

from .._wire import MAX_KEY_LENGTH, RESERVED_KEYS, text_head

__all__: list[str] = []

# What one kept pair is counted as, on top of its bytes: a tuple and two bytes
# objects cost about this much in CPython, so that a box of many tiny pairs is
# bounded by the memory it really takes.
PAIR_OVERHEAD = 100


class ScannedBox:
    """
    One box of a byte stream: its number, place and pairs in wire order (duplicates too).

    A box over the scanner's ``show_limit`` is ``too_big``: only the first of each
    reserved key is kept in ``items``. Such a box is reported twice: once with
    ``complete`` false when it goes over the limit, then when it ends.
    """

    __slots__ = ("complete", "items", "keys", "length", "number", "offset", "too_big")

    def __init__(
        self,
        number: int,
        offset: int,
        length: int,
        items: list[tuple[bytes, bytes]],
        *,
        keys: int | None = None,
        too_big: bool = False,
        complete: bool = True,
    ) -> None:
        self.number = number
        self.offset = offset
        self.length = length
        self.items = items
        self.keys = len(items) if keys is None else keys
        self.too_big = too_big
        self.complete = complete


class BoxScanner:
    """
    Split a byte stream into boxes incrementally, in bounded memory.

    Feed it bytes with `feed`, which returns the boxes they complete (and a notice
    for a box that goes over ``show_limit``); call `end` at the end of the stream.
    After a malformed box, ``error`` says where the stream breaks and why, and the
    rest of the stream is ignored.
    """

    def __init__(self, *, show_limit: int) -> None:
        self.show_limit = show_limit
        self.error: str | None = None
        self._buffer = bytearray()
        self._base = 0  # the stream offset of _buffer[0]
        self._number = 0  # boxes completed
        self._start = 0  # the stream offset of the box being read
        self._items: list[tuple[bytes, bytes]] = []
        self._keys = 0  # complete keys of the box being read
        self._size = 0  # what its kept pairs are counted as
        self._too_big = False
        self._kept_reserved: set[bytes] = set()

    def feed(self, data: bytes) -> list[ScannedBox]:
        """Take the next bytes of the stream; return the boxes (and notices) they complete."""
        if self.error is not None:
            return []
        found: list[ScannedBox] = []
        buffer = self._buffer
        buffer += data
        end = len(buffer)
        pos = 0
        while end - pos >= 2:
            klen = (buffer[pos] << 8) | buffer[pos + 1]
            if klen == 0:
                if not self._keys:
                    number, start = self._number + 1, self._start
                    self._fail(f"box {number} at byte {start} is empty (an AMP box needs a key)")
                    break
                pos += 2
                found.append(self._finish(self._base + pos))
                continue
            if klen > MAX_KEY_LENGTH:
                head = text_head(bytes(buffer[pos : pos + 24]))
                hint = "" if head is None else f"; the bytes there are text ({head!r}), not AMP"
                self._fail(
                    f"box {self._number + 1}: the key length {klen} at byte {self._base + pos} "
                    f"is over the AMP limit of {MAX_KEY_LENGTH}{hint}"
                )
                break
            vpos = pos + 2 + klen
            if vpos + 2 > end:
                break
            stop = vpos + 2 + ((buffer[vpos] << 8) | buffer[vpos + 1])
            if stop > end:
                break
            self._add(bytes(buffer[pos + 2 : vpos]), bytes(buffer[vpos + 2 : stop]), found)
            pos = stop
        if self.error is None:
            del buffer[:pos]
            self._base += pos
        return found

    def end(self) -> str | None:
        """The stream ended: say why that is malformed (inside a box), or ``None``."""
        if self.error is not None:
            return self.error
        buffer = self._buffer
        if not buffer and not self._keys:
            return None
        number, start = self._number + 1, self._start
        end = self._base + len(buffer)
        if len(buffer) < 2:
            problem = (
                f"the stream ends inside box {number}, which starts at byte {start} "
                f"({end - start} bytes of it, {self._keys} complete keys)"
            )
        else:
            klen = (buffer[0] << 8) | buffer[1]
            vpos = 2 + klen
            if vpos + 2 > len(buffer):
                problem = (
                    f"the stream ends inside box {number} (starting at byte {start}), "
                    f"in the key at byte {self._base}"
                )
            else:
                vlen = (buffer[vpos] << 8) | buffer[vpos + 1]
                problem = (
                    f"the stream ends inside box {number} (starting at byte {start}): the "
                    f"value of {bytes(buffer[2:vpos])!r} at byte {self._base + vpos} needs "
                    f"{vlen} bytes, and only {len(buffer) - vpos - 2} follow"
                )
        self._fail(problem)
        return problem

    # Private methods

    def _fail(self, problem: str) -> None:
        self.error = problem
        self._buffer.clear()
        self._items = []

    def _add(self, key: bytes, value: bytes, found: list[ScannedBox]) -> None:
        self._keys += 1
        if self._too_big:
            if key in RESERVED_KEYS and key not in self._kept_reserved:
                self._kept_reserved.add(key)
                self._items.append((key, value))
            return
        self._items.append((key, value))
        self._size += len(key) + len(value) + PAIR_OVERHEAD
        if self._size > self.show_limit:
            # Keep what says what the box is, drop the rest, and say so now.
            self._too_big = True
            kept: list[tuple[bytes, bytes]] = []
            for k, v in self._items:
                if k in RESERVED_KEYS and k not in self._kept_reserved:
                    self._kept_reserved.add(k)
                    kept.append((k, v))
            self._items = kept
            found.append(
                ScannedBox(
                    self._number + 1,
                    self._start,
                    0,
                    list(kept),
                    keys=self._keys,
                    too_big=True,
                    complete=False,
                )
            )

    def _finish(self, stop: int) -> ScannedBox:
        self._number += 1
        box = ScannedBox(
            self._number, self._start, stop - self._start, self._items,
            keys=self._keys, too_big=self._too_big,
        )  # fmt: skip
        self._items = []
        self._keys = 0
        self._size = 0
        self._too_big = False
        self._kept_reserved = set()
        self._start = stop
        return box


class HexError(ValueError):
    """The text is not a hex dump (the message says which line and why)."""


_XXD_LINE = re.compile(r"^[0-9a-fA-F]+: ")
_HEXDUMP_LINE = re.compile(r"^([0-9a-fA-F]{7,})\s+(.*?)\s*\|")
_OFFSET_ALONE = re.compile(r"^[0-9a-fA-F]{7,}$")
_IGNORED = re.compile(r"0x|[\s:,]", re.IGNORECASE)
_NOT_HEX = re.compile(r"[^0-9a-fA-F]")

# A line longer than this with no newline (a dump of bare digits on one line) is
# read in pieces, so that the reader never holds more than this of it.
LONG_LINE = 1 << 20


class HexReader:
    """
    Turn a hex dump into bytes as its text comes, a line at a time.

    Reads plain hex digits (spaces, newlines, colons, commas and ``0x`` ignored), and
    the output of ``xxd`` and ``hexdump -C`` (offsets and text columns dropped). In
    ``hexdump -C``'s output, ``*`` stands for lines the same as the one before it,
    up to the offset on the next line, and a last line holding only an offset ends it.
    """

    def __init__(self) -> None:
        self._partial = ""
        self._line = 0
        self._nibble = ""  # an odd digit, waiting for the next one
        self._hexdump = False  # seen a line of hexdump -C
        self._previous: tuple[int, bytes] | None = None  # its offset and bytes
        self._star = False

    def feed(self, text: str) -> list[bytes]:
        """Take the next text of the dump; return the bytes of its complete lines."""
        out: list[bytes] = []
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line += 1
            self._read_line(line, out)
        if len(self._partial) > LONG_LINE:
            # Bare digits on one long line: read up to the last separator (or all of it).
            cut = max(self._partial.rfind(" "), self._partial.rfind(","))
            if cut <= 0 or "|" in self._partial or _XXD_LINE.match(self._partial):
                cut = len(self._partial)
            piece, self._partial = self._partial[:cut], self._partial[cut:]
            self._plain(piece, self._line + 1, out)
        return out

    def end(self) -> list[bytes]:
        """The dump ended: return the bytes of its last line."""
        out: list[bytes] = []
        if self._partial:
            self._line += 1
            self._read_line(self._partial, out)
            self._partial = ""
        if self._star:
            raise HexError("the hex dump ends after '*', without the offset where it stops")
        if self._nibble:
            raise HexError("the hex dump has an odd number of digits")
        return out

    # Private methods

    def _read_line(self, line: str, out: list[bytes]) -> None:
        body = line.strip()
        if not body:
            return
        if body == "*":
            if not self._hexdump or self._previous is None or self._star:
                raise HexError(f"line {self._line} of the hex dump has '*' where no line repeats")
            self._star = True
            return
        found = _HEXDUMP_LINE.match(body) if "|" in body else None
        if found is not None:
            offset = int(found.group(1), 16)
            self._repeat_until(offset, out)
            before = len(out)
            self._plain(found.group(2), self._line, out)
            self._hexdump = True
            self._previous = (offset, b"".join(out[before:]))
            return
        if self._hexdump and _OFFSET_ALONE.match(body):  # hexdump -C's last line: the length
            self._repeat_until(int(body, 16), out)
            return
        if _XXD_LINE.match(body):  # xxd: "offset: hex groups  text"
            body = body.split(": ", 1)[1].split("  ", 1)[0]
        self._plain(body, self._line, out)

    def _repeat_until(self, offset: int, out: list[bytes]) -> None:
        if not self._star:
            return
        self._star = False
        assert self._previous is not None
        start, line = self._previous
        gap = offset - start - len(line)
        if not line or gap < 0 or gap % len(line):
            raise HexError(
                f"line {self._line} of the hex dump: offset {offset:#x} does not follow "
                f"the repeated line at {start:#x}"
            )
        count = gap // len(line)
        per_piece = max(1, (1 << 16) // len(line))
        while count:
            times = min(count, per_piece)
            out.append(line * times)
            count -= times

    def _plain(self, body: str, number: int, out: list[bytes]) -> None:
        digits = _IGNORED.sub("", body)
        bad = _NOT_HEX.search(digits)
        if bad is not None:
            raise HexError(f"line {number} of the hex dump has {bad.group()!r}, not hex")
        digits = self._nibble + digits
        if len(digits) % 2:
            digits, self._nibble = digits[:-1], digits[-1]
        else:
            self._nibble = ""
        if digits:
            out.append(bytes.fromhex(digits))


def looks_like_hex(data: bytes) -> bool:
    """Whether the first bytes of an input look like a hex dump rather than AMP."""
    head = data[:4096]
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return False
    reader = HexReader()
    try:
        decoded = reader.feed(text.rsplit("\n", 1)[0] + "\n" if "\n" in text else text)
    except HexError:
        return False
    return bool(decoded) or bool(reader._nibble)


class LogWriter:
    """
    Write lines to a file descriptor without ever blocking the event loop.

    `write` queues a line (it never blocks); a thread of its own writes the queue
    out. At most ``limit`` bytes wait in the queue: lines beyond that are dropped and
    counted, and a line saying how many goes out once there is room again. If the
    reader closes the pipe, the log ends and ``on_closed`` is called once (from the
    writer's thread) with the reason.
    """

    def __init__(
        self, fd: int, *, limit: int, on_closed: Callable[[str], None], name: str = "log"
    ) -> None:
        self.fd = fd
        self.limit = limit
        self.dropped = 0
        self.closed = False
        self._on_closed = on_closed
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._stopping = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queue ``line`` (a newline is added), or count it as dropped if the queue is full."""
        data = (line + "\n").encode("utf-8", "surrogateescape")
        with self._ready:
            if self.closed or self._stopping:
                return
            if self._queued + len(data) > self.limit:
                self.dropped += 1
                return
            if self.dropped:
                self._note_dropped()
            self._queue.append(data)
            self._queued += len(data)
            self._ready.notify()

    def close(self, timeout: float) -> bool:
        """
        Stop taking lines and wait up to ``timeout`` seconds for the queue to go out.

        Returns:
            Whether everything queued was written (or the log had ended already).
        """
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # Private methods

    def _note_dropped(self) -> None:
        """Queue the line that says how many lines were dropped (the lock is held)."""
        note = f"... {self.dropped} log lines dropped: the output is not read fast enough\n"
        self._queue.append(note.encode())
        self._queued += len(note)
        self.dropped = 0

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self.dropped and not self._stopping:
                    self._ready.wait()
                if self.dropped:  # what was queued before went out: say what was not
                    self._note_dropped()
                if not self._queue:
                    return
                chunk = b"".join(self._queue)
                self._queue.clear()
            try:
                view = memoryview(chunk)
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
            except OSError as exc:
                with self._ready:
                    self.closed = True
                    self._queue.clear()
                    self._queued = 0
                reason = "the output was closed" if exc.errno == errno.EPIPE else str(exc)
                self._on_closed(reason)
                return
            with self._ready:
                self._queued -= len(chunk)


def say(message: str) -> None:
    """Write one line to standard error, ignoring a closed one."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)
