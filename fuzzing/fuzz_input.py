"""
How a fuzz target reads one input: a byte stream, then control bytes read from its end.

The last byte of an input is a set of option bits; each option that is on reads
its parameters from the bytes before it, again from the end (the way libFuzzer's
``FuzzedDataProvider`` reads integers). Whatever is left at the front is the
stream that the target feeds. So a valid AMP stream followed by ``b"\\x00"`` is
fed whole, with the defaults, and the seed corpus stays readable.

This is a few lines of pure Python rather than ``atheris.FuzzedDataProvider`` so
that an input means the same thing with or without atheris: a crash file found by
the fuzzer replays under pytest, where atheris is not installed.
"""

from __future__ import annotations

__all__ = ["FuzzInput", "split"]

# Option bits shared by both targets (fuzz_server.py adds its own above these).
CHUNKED = 0x01  # cut the stream at up to 8 points read from the input
BYTEWISE = 0x02  # feed the stream one byte at a time
SMALL_LIMITS = 0x04  # a small max_keys and max_box_size, read from the input


class FuzzInput:
    """The control values of one input, taken from its end, and the stream before them."""

    __slots__ = ("_data", "_end", "options")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._end = len(data)
        #: The option bits: the input's last byte (0 for an empty input).
        self.options = self.take(1)

    def take(self, nbytes: int) -> int:
        """Take up to ``nbytes`` bytes from the end as a big-endian int (0 once exhausted)."""
        start = max(0, self._end - nbytes)
        value = int.from_bytes(self._data[start : self._end], "big")
        self._end = start
        return value

    def limits(self) -> dict[str, int]:
        """The decoder limits the input asks for, as keyword arguments (empty: the defaults)."""
        if not self.options & SMALL_LIMITS:
            return {}
        return {"max_keys": 1 + self.take(1) % 16, "max_box_size": 1 + self.take(2)}

    def chunk_points(self) -> list[int] | None:
        """
        The offsets to cut the stream at, before :meth:`stream` is called.

        Returns ``None`` for "one byte at a time" and ``[]`` for "whole".
        """
        if self.options & BYTEWISE:
            return None
        if not self.options & CHUNKED:
            return []
        return [self.take(2) for _ in range(1 + self.take(1) % 8)]

    def stream(self) -> bytes:
        """The bytes left once every control value has been taken."""
        return self._data[: self._end]


def split(stream: bytes, points: list[int] | None) -> list[bytes]:
    """Cut ``stream`` at ``points`` (taken modulo its length; ``None``: every byte)."""
    if points is None:
        return [stream[i : i + 1] for i in range(len(stream))] or [b""]
    cuts = sorted({point % (len(stream) + 1) for point in points})
    chunks = []
    start = 0
    for cut in [*cuts, len(stream)]:
        chunks.append(stream[start:cut])
        start = cut
    return chunks
