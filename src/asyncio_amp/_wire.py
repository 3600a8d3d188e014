"""
The AMP box codec: wire keys, limits, [`encode_box`][] and an incremental [`BoxDecoder`][].

A box is a sequence of key/value pairs. Each key and each value is written as a
2-byte big-endian length followed by that many bytes; an empty key (``\\x00\\x00``)
ends the box. Keys are 1 to 255 bytes, values 0 to 65,535 bytes. Like Twisted we
write keys in sorted byte order, and like the protocol says we accept any order.

This module does no I/O and imports nothing from asyncio.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType

from ._errors import ProtocolError, TooLongError

__all__ = [
    "ACCELERATED",
    "Box",
    "BoxDecoder",
    "encode_box",
    "parse_boxes",
]

Box = dict[bytes, bytes]
"""A decoded box: wire keys to wire values, both bytes."""

# Reserved keys (Twisted's ASK, ANSWER, COMMAND, ERROR, ERROR_CODE, ERROR_DESCRIPTION).
ASK = b"_ask"
ANSWER = b"_answer"
COMMAND = b"_command"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"
RESERVED_KEYS = frozenset({ASK, ANSWER, COMMAND, ERROR, ERROR_CODE, ERROR_DESCRIPTION})

# Error codes with a meaning of their own.
UNKNOWN_ERROR_CODE = b"UNKNOWN"
UNHANDLED_ERROR_CODE = b"UNHANDLED"
UNKNOWN_ERROR_DESCRIPTION = b"Unknown Error"

# The key length is written in 2 bytes but AMP caps it at one byte's worth, so that
# a stream that is not AMP (an HTTP request: b"GE" = 18245) is caught at once.
MAX_KEY_LENGTH = 255
# The largest number a 2-byte length prefix can hold.
MAX_VALUE_LENGTH = 65_535

# Receiving limits. AMP itself has none, so a peer could send a box of any number
# of keys; these defaults bound the memory one box may take (16 MiB is room for a
# BigString of 16 MB split over 256 keys) and the number of dict entries built.
DEFAULT_MAX_BOX_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_KEYS = 1024

# Length prefixes of the small lengths that keys and most values have, computed once:
# a table lookup is about 3 times cheaper than int.to_bytes on the encoding hot path.
_PREFIX_TABLE_SIZE = 1024
PREFIXES = tuple(n.to_bytes(2, "big") for n in range(_PREFIX_TABLE_SIZE))
BOX_END = b"\x00\x00"


def length_prefix(n: int) -> bytes:
    """Return the 2-byte big-endian length prefix of ``n`` (0 to 65,535)."""
    return PREFIXES[n] if n < _PREFIX_TABLE_SIZE else n.to_bytes(2, "big")


# The wire form (length prefix and key) of the keys encode_items has checked, so that
# the usual keys are checked and prefixed once, not in every box. Bounded, so that
# boxes with ever new keys (a proxy re-encodes what its peers send) cannot grow it:
# past the bound, new keys take the general way every time.
_KEY_HEADS: dict[bytes, bytes] = {}
_KEY_HEADS_SIZE = 1024


def check_key(key: bytes) -> None:
    """
    Check that ``key`` can be sent as an AMP key.

    Raises:
        TypeError: ``key`` is not bytes.
        ValueError: ``key`` is empty (an empty key ends a box).
        TooLongError: ``key`` is over 255 bytes.
    """
    if type(key) is not bytes:
        raise TypeError(f"AMP keys are bytes, not {type(key).__name__}: {key!r}")
    if not key:
        raise ValueError("AMP keys cannot be empty: an empty key ends a box")
    if len(key) > MAX_KEY_LENGTH:
        raise TooLongError(key, len(key), MAX_KEY_LENGTH, is_key=True)


def encode_items(items: Iterable[tuple[bytes, bytes]], parts: list[bytes]) -> None:
    """Append the wire form of sorted ``items`` to ``parts``, checking every length."""
    heads = _KEY_HEADS
    prefixes = PREFIXES
    for key, given in items:
        # The usual pair, as in encode_box: a key already checked, a short bytes value.
        if (
            type(key) is bytes
            and key in heads
            and type(given) is bytes
            and (n := len(given)) < _PREFIX_TABLE_SIZE
        ):
            parts += (prefixes[len(key)], key, prefixes[n], given)
            continue
        check_key(key)
        if len(heads) < _KEY_HEADS_SIZE:
            heads[key] = prefixes[len(key)] + key
        value = given
        if type(value) is bytes:
            n = len(value)
        elif isinstance(value, memoryview):
            # Chunks of a big value: written as they are, copied only by the final join
            # (which needs them contiguous).
            n = value.nbytes
            if not value.c_contiguous:
                value = value.tobytes()
        elif isinstance(value, bytearray):
            value = bytes(value)
            n = len(value)
        else:
            raise TypeError(f"AMP values are bytes, not {type(value).__name__} (key {key!r})")
        if n > MAX_VALUE_LENGTH:
            raise TooLongError(key, n, MAX_VALUE_LENGTH, is_key=False)
        parts.append(PREFIXES[len(key)])
        parts.append(key)
        parts.append(PREFIXES[n] if n < _PREFIX_TABLE_SIZE else n.to_bytes(2, "big"))
        parts.append(value)


# The pure-Python encode_items, whichever one the name encode_items is bound to in the end
# (see the accelerator at the bottom of this module).
python_encode_items = encode_items


def encode_box(box: Mapping[bytes, bytes]) -> bytes:
    """
    Serialize one box, keys in sorted order, terminator included.

    Args:
        box: Wire keys to wire values.

    Returns:
        The box's bytes, exactly as Twisted's ``AmpBox.serialize`` writes them.

    Raises:
        TypeError: A key or value is not bytes.
        ValueError: A key is empty.
        TooLongError: A key is over 255 bytes or a value over 65,535 bytes.
    """
    parts: list[bytes] = []
    heads = _KEY_HEADS
    prefixes = PREFIXES
    for key in sorted(box):
        value = box[key]
        # The usual pair: a key met before (so already checked) and a short bytes value.
        if (
            type(key) is bytes
            and (head := heads.get(key)) is not None
            and type(value) is bytes
            and (n := len(value)) < _PREFIX_TABLE_SIZE
        ):
            parts += (head, prefixes[n], value)
            continue
        # Anything else: encode_items checks it (and keeps its key once checked).
        python_encode_items(((key, value),), parts)
    parts.append(BOX_END)
    return b"".join(parts)


def text_head(data: bytes) -> bytes | None:
    """The first bytes of ``data`` if they look like text (an HTTP request...), else ``None``."""
    head = data[:24]
    if head[:1].isalpha() and all(32 <= c < 127 or c in b"\r\n\t" for c in head):
        return head
    return None


def _describe_start(data: bytes) -> str:
    """Say what a stream that fails at its first bytes looks like, for the error message."""
    head = text_head(data)
    if head is not None:
        return f"; the data starts with {head!r}, which is text, not AMP"
    return ""


class BoxDecoder:
    """
    Turn a byte stream into boxes, incrementally.

    Feed it bytes as they arrive with [`receive_data`][]; it returns the boxes
    completed by those bytes. A partial box is kept between calls: each complete
    key/value pair is moved into the box being built as soon as it has arrived, so
    only one partial pair (at most 65,797 bytes) is ever buffered, and a stream fed
    one byte at a time is still decoded in time proportional to its length.

    After a [`ProtocolError`][] the decoder is broken: every later call raises
    the same error.

    Args:
        max_box_size: The most bytes the keys and values of one box may take on
            the wire, their length prefixes included (the 2-byte end marker is not
            counted). Checked as soon as a value's length is known, before its
            bytes are buffered.
        max_keys: The most keys one box may have.
    """

    __slots__ = (
        "_box",
        "_box_size",
        "_error",
        "_max_box_size",
        "_max_keys",
        "_need",
        "_offset",
        "_rest",
    )

    def __init__(
        self,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._max_box_size = 0
        self._max_keys = 0
        self.max_box_size = max_box_size
        self.max_keys = max_keys
        # The box being built, and the bytes received but not yet parsed (the start
        # of an incomplete pair). Both are created when first needed (the buffer is
        # dropped when empty), so that a connection that never got data holds neither.
        self._box: Box | None = None
        # Wire bytes of the complete pairs already in self._box.
        self._box_size = 0
        self._rest: bytearray | None = None
        # How many bytes self._rest must hold before parsing can make progress.
        self._need = 0
        # Stream offset of the first byte of self._rest, for error messages.
        self._offset = 0
        self._error: ProtocolError | None = None

    # Public methods

    @property
    def max_box_size(self) -> int:
        """The most bytes the keys and values of one box may take (settable)."""
        return self._max_box_size

    @max_box_size.setter
    def max_box_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_box_size must be a positive int, not {value!r}")
        self._max_box_size = value

    @property
    def max_keys(self) -> int:
        """The most keys one box may have (settable)."""
        return self._max_keys

    @max_keys.setter
    def max_keys(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_keys must be a positive int, not {value!r}")
        self._max_keys = value

    @property
    def in_box(self) -> bool:
        """``True`` if part of a box has been received and its end has not."""
        return bool(self._box) or bool(self._rest)

    @property
    def buffered(self) -> int:
        """Bytes received that belong to the unfinished box."""
        return self._box_size + (len(self._rest) if self._rest else 0)

    def receive_data(self, data: bytes) -> list[Box]:
        """
        Parse ``data`` and return the boxes it completes, in order.

        Raises:
            ProtocolError: The stream is not valid AMP or breaks a limit. The boxes
                completed before the bad bytes are lost to the caller; use
                [`receive_data_partial`][] to keep them.
        """
        if self._rest or self._error is not None:
            found, error = self.receive_data_partial(data)
            if error is not None:
                raise error
            return found
        if _scan_boxes is not None and not self._box:
            # The compiled accelerator, for a read of whole boxes: _parse's first step
            # (see there), inline.
            boxes, pos = _scan_boxes(data, 0, self._max_box_size, self._max_keys)
            if pos == len(data):
                self._offset += pos
                return boxes
        # receive_data_partial, inline for a read that starts on a pair boundary.
        boxes = []
        try:
            self._parse(data, boxes)
        except ProtocolError as exc:
            self._error = exc
            self._box = None
            self._box_size = 0
            self._rest = None
            raise
        return boxes

    def receive_data_partial(self, data: bytes) -> tuple[list[Box], ProtocolError | None]:
        """
        Parse ``data``; return the boxes it completes and the error that stopped it, if any.

        The boxes that came before bad bytes are returned with the error, so a
        connection can act on everything the peer sent correctly before it failed.
        """
        if self._error is not None:
            return [], self._error
        boxes: list[Box] = []
        try:
            if not self._rest:
                self._parse(data, boxes)
            else:
                start = self._complete_pair(data, boxes)
                if 0 <= start < len(data):
                    self._parse(data, boxes, start)
        except ProtocolError as exc:
            self._error = exc
            self._box = None
            self._box_size = 0
            self._rest = None
            return boxes, exc
        return boxes, None

    def end_of_stream(self) -> ProtocolError | None:
        """
        Report whether the stream stopped in the middle of a box.

        Returns:
            A [`ProtocolError`][] describing the unfinished box, or ``None`` if
            the stream ended on a box boundary.
        """
        if self._error is None and self.in_box:
            return ProtocolError(
                f"the stream ended inside a box ({self.buffered} bytes of it received, "
                f"{len(self._box or ())} complete keys)"
            )
        return None

    # Private methods

    @property
    def _at_boundary(self) -> bool:
        """``True`` if the decoder is between boxes and not broken (nothing is buffered)."""
        return not self._box and not self._rest and self._error is None

    def _skip(self, nbytes: int) -> None:
        """
        Account for ``nbytes`` of whole boxes that were parsed without the decoder.

        Only valid at a box boundary (:attr:`_at_boundary`); it keeps the stream
        offsets of later error messages right.
        """
        self._offset += nbytes

    def _complete_pair(self, data: bytes, boxes: list[Box]) -> int:
        """
        Complete the buffered partial pair with just the bytes of ``data`` it needs.

        So the rest of the data is parsed where it is, not copied. Each round
        parses at least one more part of the pair (its key length, its key and
        value length, its value). Returns where the rest of ``data`` starts, or
        -1 if all of it went into the buffer.
        """
        start = 0
        rest = self._rest
        while rest:
            take = self._need - len(rest)
            if take > len(data) - start:
                rest += memoryview(data)[start:] if start else data
                return -1
            rest += memoryview(data)[start : start + take]
            start += take
            self._rest = None
            self._parse(bytes(rest), boxes)
            rest = self._rest
        return start

    def _parse(self, data: bytes, boxes: list[Box], start: int = 0) -> None:
        # The hot loop: one iteration per key/value pair, from data[start] (the next
        # byte of the stream). Errors are built out of line.
        box = self._box
        if box is None:
            box = {}
        size = self._box_size
        max_box_size = self._max_box_size
        max_keys = self._max_keys
        if start:
            self._offset -= start  # stream offsets are counted from data[0] while parsing
        if _scan_boxes is not None and not box:
            # The compiled accelerator takes the whole boxes at the start (it mirrors
            # the one-pass block below); the loop goes on from where it stopped.
            found, pos = _scan_boxes(data, start, max_box_size, max_keys)
            boxes += found
        else:
            pos = start
        end = len(data)
        self._need = 2
        while end - pos >= 2:
            if not box:
                # At the start of a box, take its pairs in one pass, and check the
                # limits once for all of them: the checks below, pair by pair, all
                # pass for them if they are within the limits (a box has at most as
                # many keys as pairs). A whole box is done; if the pass stopped
                # before the end (at a fault or at the end of the data), the loop
                # below goes on from there, or parses the box again, pair by pair,
                # if the limits do not hold.
                p = pos
                pairs = 0
                try:
                    while not data[p] and (klen := data[p + 1]):
                        vpos = p + 2 + klen
                        stop = vpos + 2 + (data[vpos] << 8 | data[vpos + 1])
                        if stop > end:
                            break  # incomplete: copy nothing of a long value
                        box[data[p + 2 : vpos]] = data[vpos + 2 : stop]
                        pairs += 1
                        p = stop
                    # At the end marker, or at a key over 255, or at a pair cut short.
                    if (
                        not data[p]
                        and not data[p + 1]
                        and pairs
                        and p - pos <= max_box_size
                        and pairs <= max_keys
                    ):
                        boxes.append(box)
                        box = {}
                        pos = p + 2
                        continue
                except IndexError:
                    pass
                if pairs and p - pos <= max_box_size and pairs <= max_keys:
                    size = p - pos
                    pos = p
                    continue
                box = {}
            # Lengths by indexing: cheaper than a struct call. A key length's first
            # byte is 0, or the key is over MAX_KEY_LENGTH (255).
            if data[pos]:
                raise self._error_at(pos, "key", data)
            klen = data[pos + 1]
            if not klen:
                if not box:
                    raise self._error_at(pos, "empty")
                boxes.append(box)
                box = {}
                size = 0
                pos += 2
                continue
            vpos = pos + 2 + klen
            if end - vpos < 2:
                self._need = vpos + 2 - pos
                break
            stop = vpos + 2 + (data[vpos] << 8 | data[vpos + 1])
            pair = stop - pos
            if size + pair > max_box_size or len(box) >= max_keys:
                raise self._error_at(pos, "limit", data, size, pair, box)
            if stop > end:
                self._need = pair
                break
            box[data[pos + 2 : vpos]] = data[vpos + 2 : stop]
            size += pair
            pos = stop
        # The empty box left after a complete one is kept for the next read.
        self._box = box
        self._box_size = size
        self._offset += pos
        if pos < end:
            self._rest = bytearray(memoryview(data)[pos:] if pos else data)

    def _error_at(
        self,
        pos: int,
        what: str,
        data: bytes = b"",
        size: int = 0,
        pair: int = 0,
        box: Box | None = None,
    ) -> ProtocolError:
        offset = self._offset + pos
        if what == "empty":
            return ProtocolError(
                f"empty box at stream offset {offset}: a box needs at least one key"
            )
        klen = (data[pos] << 8) | data[pos + 1]
        if what == "key":
            return ProtocolError(
                f"key length {klen} at stream offset {offset} is over the AMP limit of "
                f"{MAX_KEY_LENGTH}" + _describe_start(data[pos:])
            )
        assert box is not None
        if size + pair > self._max_box_size:
            return ProtocolError(
                f"box at stream offset {offset - size} is over the limit of "
                f"{self._max_box_size} bytes (key {data[pos + 2 : pos + 2 + klen]!r} brings "
                f"it to {size + pair})"
            )
        return ProtocolError(
            f"box at stream offset {offset - size} has more than {self._max_keys} keys"
        )


# The pure-Python BoxDecoder, whichever class the name BoxDecoder is bound to in the end
# (see the accelerator at the bottom of this module).
PythonBoxDecoder = BoxDecoder


def parse_boxes(data: bytes) -> list[Box]:
    """
    Parse a complete AMP byte stream into its boxes.

    Raises:
        ProtocolError: ``data`` is not valid AMP, or it ends inside a box.
    """
    # One pass over a stream of well-formed boxes. At the first thing that is not
    # (a fault, or the end of the data inside a box), the stream is parsed again by
    # _parse_boxes_reference, which reports it as an incremental read would.
    if type(data) is not bytes:
        return _parse_boxes_reference(data)
    boxes: list[Box] = []
    box: Box = {}
    pos = 0
    end = len(data)
    try:
        while pos < end:
            if data[pos]:
                break  # a key length over 255
            # The data ends inside a box if an index goes past its end (IndexError)
            # or a value is cut short (the loop ends with that box unfinished).
            klen = data[pos + 1]
            if not klen:
                if not box:
                    break  # an empty box
                boxes.append(box)
                box = {}
                pos += 2
                continue
            kpos = pos + 2
            vpos = kpos + klen
            vstart = vpos + 2
            stop = vstart + (data[vpos] << 8 | data[vpos + 1])
            box[data[kpos:vpos]] = data[vstart:stop]
            pos = stop
        else:
            if not box:
                return boxes
    except IndexError:
        pass
    return _parse_boxes_reference(data)


def _parse_boxes_reference(data: bytes) -> list[Box]:
    """[`parse_boxes`][] through a [`BoxDecoder`][]: what the one-pass parse falls back to."""
    # Limits no stream of len(data) bytes can reach: parse_boxes has none.
    decoder = PythonBoxDecoder(max_box_size=len(data) + 1, max_keys=len(data) + 1)
    boxes = decoder.receive_data(data)
    error = decoder.end_of_stream()
    if error is not None:
        raise error
    return boxes


def parse_nested_boxes(data: bytes) -> list[Box]:
    """
    Parse boxes nested in one value (an AmpList): empty boxes allowed, nothing left over.

    Raises:
        ValueError: ``data`` is not a whole number of boxes.
    """
    boxes: list[Box] = []
    box: Box = {}
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 2:
            raise ValueError(f"nested boxes: 1 stray byte at offset {pos}")
        klen = (data[pos] << 8) | data[pos + 1]
        pos += 2
        if klen == 0:
            boxes.append(box)
            box = {}
            continue
        if klen > MAX_KEY_LENGTH:
            raise ValueError(f"nested boxes: key length {klen} at offset {pos - 2} is over 255")
        vpos = pos + klen
        if vpos + 2 > end:
            raise ValueError(f"nested boxes: truncated key at offset {pos - 2}")
        vlen = (data[vpos] << 8) | data[vpos + 1]
        stop = vpos + 2 + vlen
        if stop > end:
            raise ValueError(f"nested boxes: truncated value at offset {vpos}")
        box[data[pos:vpos]] = data[vpos + 2 : stop]
        pos = stop
    if box:
        raise ValueError("nested boxes: the last box has no end")
    return boxes


# The optional compiled accelerator (_speedups.c). It mirrors the functions above for the
# usual input and hands everything else to them, so the behaviour is the same either way.
# ASYNCIO_AMP_NO_EXTENSIONS=1 (read once, at import) forces the pure-Python code, as
# aiohttp's AIOHTTP_NO_EXTENSIONS does.
_speedups: ModuleType | None = None
if not os.environ.get("ASYNCIO_AMP_NO_EXTENSIONS"):
    try:
        from . import _speedups  # type: ignore[attr-defined, no-redef]  # built by setup.py
    except ImportError:  # not built: no compiler where the package was installed
        _speedups = None

ACCELERATED: bool = _speedups is not None
"""``True`` if the compiled box codec is in use, ``False`` if the pure-Python one is."""

# The pure-Python codec under names of its own: the reference the accelerator mirrors.
python_encode_box = encode_box
python_parse_boxes = parse_boxes

_scan_boxes: Callable[[bytes, int, int, int], tuple[list[Box], int]] | None = None
if _speedups is not None:
    _speedups.setup(encode_box, encode_items, _parse_boxes_reference, PREFIXES)
    _scan_boxes = _speedups.scan_boxes
    encode_box = _speedups.encode_box
    encode_items = _speedups.encode_items
    parse_boxes = _speedups.parse_boxes
    # The decoder as a C type that mirrors the class above, method by method; the class
    # stays available as PythonBoxDecoder.
    _speedups.setup_decoder(ProtocolError, _describe_start)
    BoxDecoder = _speedups.BoxDecoder  # type: ignore[misc]  # the same API, in C
