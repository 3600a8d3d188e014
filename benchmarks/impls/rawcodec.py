"""
A minimal hand-written AMP codec: the floor that the raw implementation uses.

It writes exactly the bytes Twisted and asyncio-amp write for ``Sum``, ``Echo``
and ``BigEcho`` (keys sorted, 2-byte big-endian lengths, an empty key to end a
box) and parses any box properly, but it has no library logic: no schema, no
checks beyond framing, no error boxes, no limits.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BoxBuffer",
    "answer_for",
    "encode_answer_big",
    "encode_ask_big",
    "encode_box",
    "encode_echo_ask",
    "encode_sum_ask",
    "join_big",
    "parse_boxes",
]

_END = b"\x00\x00"
_PREFIX = [n.to_bytes(2, "big") for n in range(1024)]
_CHUNK = 65_535


def _prefix(n: int) -> bytes:
    return _PREFIX[n] if n < 1024 else n.to_bytes(2, "big")


_ASK = b"\x00\x04_ask"
_ANSWER = b"\x00\x07_answer"
_SUM_MIDDLE = b"\x00\x08_command\x00\x03Sum\x00\x01a"
_SUM_B = b"\x00\x01b"
_ECHO_MIDDLE = b"\x00\x08_command\x00\x04Echo\x00\x04data"
_DATA = b"\x00\x04data"
_TOTAL = b"\x00\x05total"


def encode_box(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode any box given as (key, value) pairs, in sorted key order."""
    parts = []
    for key, value in sorted(items):
        parts += (_prefix(len(key)), key, _prefix(len(value)), value)
    parts.append(_END)
    return b"".join(parts)


def encode_sum_ask(tag: bytes, a: int, b: int) -> bytes:
    """The ``Sum`` call box: ``_ask``, ``_command``, ``a``, ``b``."""
    ta = b"%d" % a
    tb = b"%d" % b
    return b"".join(
        (_ASK, _PREFIX[len(tag)], tag, _SUM_MIDDLE, _PREFIX[len(ta)], ta, _SUM_B,
         _PREFIX[len(tb)], tb, _END)
    )  # fmt: skip


def encode_echo_ask(tag: bytes, data: bytes) -> bytes:
    """The ``Echo`` call box: ``_ask``, ``_command``, ``data``."""
    return b"".join((_ASK, _PREFIX[len(tag)], tag, _ECHO_MIDDLE, _prefix(len(data)), data, _END))


def _chunk_items(data: bytes) -> list[tuple[bytes, bytes]]:
    # data, data.2, data.3, ...: 65,535 bytes each (one empty "data" for b"").
    view = memoryview(data)
    count = max(1, -(-len(data) // _CHUNK))
    return [
        (b"data" if i == 0 else b"data.%d" % (i + 1), view[i * _CHUNK : (i + 1) * _CHUNK])
        for i in range(count)
    ]


def _encode_chunked(head: list[tuple[bytes, bytes]], data: bytes) -> bytes:
    parts: list[bytes | memoryview] = []
    for key, value in sorted(head + _chunk_items(data), key=lambda item: item[0]):
        parts += (_prefix(len(key)), key, _prefix(len(value)), value)
    parts.append(_END)
    return b"".join(parts)


def encode_ask_big(tag: bytes, data: bytes) -> bytes:
    """The ``BigEcho`` call box, ``data`` split over ``data``, ``data.2``, …"""
    return _encode_chunked([(b"_ask", tag), (b"_command", b"BigEcho")], data)


def encode_answer_big(tag: bytes, data: bytes) -> bytes:
    """The ``BigEcho`` answer box."""
    return _encode_chunked([(b"_answer", tag)], data)


def join_big(box: dict[bytes, bytes]) -> bytes:
    """Join ``data``, ``data.2``, … of a box."""
    chunks = [box[b"data"]]
    for i in range(2, len(box) + 2):
        chunk = box.get(b"data.%d" % i)
        if chunk is None:
            break
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def answer_for(box: dict[bytes, bytes]) -> bytes:
    """The server's answer to a ``Sum``, ``Echo`` or ``BigEcho`` call box."""
    tag = box[b"_ask"]
    command = box[b"_command"]
    if command == b"Sum":
        total = b"%d" % (int(box[b"a"]) + int(box[b"b"]))
        return b"".join((_ANSWER, _PREFIX[len(tag)], tag, _TOTAL, _PREFIX[len(total)], total, _END))
    if command == b"Echo":
        data = box[b"data"]
        return b"".join((_ANSWER, _PREFIX[len(tag)], tag, _DATA, _prefix(len(data)), data, _END))
    if command == b"BigEcho":
        return encode_answer_big(tag, join_big(box))
    raise ValueError(f"unknown command {command!r}")


def parse_boxes(data: bytes) -> list[dict[bytes, bytes]]:
    """Parse complete boxes from ``data`` (the in-process codec floor); no partial box kept."""
    boxes = []
    box: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    for _ in range(end):  # every round consumes at least two bytes
        if end - pos < 2:
            break
        klen = (data[pos] << 8) | data[pos + 1]
        if klen == 0:
            boxes.append(box)
            box = {}
            pos += 2
            continue
        vpos = pos + 2 + klen
        stop = vpos + 2 + ((data[vpos] << 8) | data[vpos + 1])
        box[data[pos + 2 : vpos]] = data[vpos + 2 : stop]
        pos = stop
    return boxes


class BoxBuffer:
    """
    The receive buffer of a raw ``BufferedProtocol``: bytes in, complete boxes out.

    Reads go straight into a preallocated ``bytearray`` (``get_buffer``). After
    each read, :meth:`feed` parses the unparsed bytes in one pass, keeping the
    pairs of an unfinished box, so only an unfinished pair (at most 65,797
    bytes) is ever looked at twice. A small read is copied out once and sliced
    (cheaper than slicing the bytearray); a large one is sliced from the buffer
    directly, so a big value is copied once. The buffer is rewound whenever it
    is fully consumed, and grows if a pair does not fit.
    """

    __slots__ = ("box", "buf", "end", "pos", "view")

    def __init__(self, size: int = 256 * 1024) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pos = 0  # first unparsed byte: the start of an unfinished pair
        self.end = 0  # end of the received bytes
        self.box: dict[bytes, bytes] = {}  # the complete pairs of the unfinished box

    def get_buffer(self) -> memoryview:
        """Room for the next read (at least 64 KiB)."""
        if len(self.buf) - self.end < 65_536:
            kept = self.end - self.pos
            if self.pos:
                self.buf[:kept] = self.buf[self.pos : self.end]
                self.pos = 0
                self.end = kept
            if len(self.buf) - kept < 65_536:
                bigger = bytearray(2 * len(self.buf))
                bigger[:kept] = self.buf[:kept]
                self.buf = bigger
                self.view = memoryview(bigger)
        return self.view[self.end :]

    def feed(self, nbytes: int, boxes: list[dict[bytes, bytes]]) -> None:
        """Account for ``nbytes`` just read; append the boxes they complete to ``boxes``."""
        self.end += nbytes
        base = self.pos
        if self.end - base <= 16_384:
            data: bytes | bytearray = self.view[base : self.end].tobytes()
            done, self.box = _parse(data, 0, len(data), self.box, boxes, None)
        else:
            stop, self.box = _parse(self.buf, base, self.end, self.box, boxes, self.view)
            done = stop - base
        if self.pos + done == self.end:
            self.pos = self.end = 0
        else:
            self.pos += done


def _parse(
    data: bytes | bytearray,
    pos: int,
    end: int,
    box: dict[bytes, bytes],
    boxes: list[dict[bytes, bytes]],
    view: memoryview | None,
) -> tuple[int, dict[bytes, bytes]]:
    # Parse data[pos:end] into boxes; return where the unfinished pair starts and the
    # unfinished box.
    # With a view, keys and values are copied out of it (data is then the bytearray).
    for _ in range(end - pos):  # every round consumes at least two bytes
        if end - pos < 2:
            break
        klen = (data[pos] << 8) | data[pos + 1]
        if klen == 0:
            if not box:
                raise ValueError("empty box")
            boxes.append(box)
            box = {}
            pos += 2
            continue
        if klen > 255:
            raise ValueError(f"key length {klen}: this is not AMP")
        vpos = pos + 2 + klen
        if end - vpos < 2:
            break
        stop = vpos + 2 + ((data[vpos] << 8) | data[vpos + 1])
        if stop > end:
            break
        if view is None:
            box[data[pos + 2 : vpos]] = data[vpos + 2 : stop]  # type: ignore[index]
        else:
            box[view[pos + 2 : vpos].tobytes()] = view[vpos + 2 : stop].tobytes()
        pos = stop
    return pos, box
