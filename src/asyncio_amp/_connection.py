"""
The sans-I/O AMP connection: bytes in, events out; boxes in, bytes out.

Theory of operation
-------------------

An :class:`AMPConnection` is one side of one AMP connection, with no socket,
loop or clock. The I/O layer feeds it what it reads (:meth:`receive_data`) and
takes what it must write (:meth:`data_to_send`). In between, the connection:

* decodes the byte stream into boxes (:class:`BoxDecoder`), and classifies each
  box, in Twisted's order, as an answer (``_answer``), an error answer
  (``_error``) or a call (``_command``): :class:`Answer`, :class:`ErrorAnswer`
  and :class:`Ask` events;
* hands out tags: a lowercase hexadecimal counter from 1, which goes up for
  every call, including calls that want no answer (as in Twisted, so tags have
  gaps). Tags are never reused on a connection. A peer's tags are opaque bytes,
  echoed as they came;
* keeps the calls that wait for answers, by tag (:attr:`AMPConnection.pending`);
* queues the encoded boxes to send.

Decoding straight to values. Boxes usually come in one layout: keys sorted, as
Twisted and we send them, so an answer starts with ``_answer`` and a call with
``_ask`` then ``_command``. For those, the I/O layer can hand the connection
parsers (built per Command, opaque here) that read the values straight from the
bytes: one carried by each pending call for its answer, and a table of them by
command name for the peer's calls (:attr:`AMPConnection.ask_parsers`). An answer
or a call a parser takes comes as a plain tuple, ``(call, values)`` or
``(handler, tag, values)``, with no box built; the call leaves ``pending``. Any
box a parser refuses goes the box way, so faults are reported as without them.

It has two states, in :class:`State`: ``OPEN`` and ``CLOSED``. Bad input from the
peer does not raise: the connection moves to ``CLOSED``, records the
:class:`ProtocolError` in :attr:`error`, and emits a final :class:`Failure`
event after the events of every box the peer sent correctly before it. The I/O
layer then logs the reason and closes the transport. When the transport closes
for any reason, :meth:`connection_lost` moves the connection to ``CLOSED`` too,
and anything that arrives afterwards is ignored.

The connection knows boxes and tags, not Commands: resolving calls and running
responders is the I/O layer's work.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ProtocolError
from ._wire import (
    ANSWER,
    ASK,
    COMMAND,
    DEFAULT_MAX_BOX_SIZE,
    DEFAULT_MAX_KEYS,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    MAX_KEY_LENGTH,
    PREFIXES,
    Box,
    BoxDecoder,
)

__all__: list[str] = []


class State(enum.Enum):
    """The states of a connection."""

    OPEN = "open"
    CLOSED = "closed"


# Events are slotted but not frozen: a frozen dataclass's __init__ costs three
# times as much (measured: 670 ns against 210 ns), and one is built per box.
# Treat them as read-only.


@dataclass(slots=True)
class Ask:
    """The peer calls a command. ``tag`` is ``None`` when it wants no answer."""

    tag: bytes | None
    command: bytes
    box: Box


@dataclass(slots=True)
class Answer:
    """The peer answers the call sent with ``tag``."""

    tag: bytes
    box: Box


@dataclass(slots=True)
class ErrorAnswer:
    """The peer answers the call sent with ``tag`` with an error."""

    tag: bytes
    code: bytes
    description: bytes
    box: Box


@dataclass(slots=True)
class Failure:
    """The peer broke the protocol; the connection is closed and must be dropped."""

    error: ProtocolError


# The events of boxes decoded straight to values (see AMPConnection.pending and
# AMPConnection.ask_parsers). Plain tuples: one is built per box, and a tuple
# costs a fifth of a slotted dataclass.
#: An answer to a pending call, decoded: ``(call, values)``.
Answered = tuple[Any, dict[str, Any]]
#: A call from the peer, decoded: ``(handler, tag, values)``.
Called = tuple[Any, bytes, dict[str, Any]]

Event = Ask | Answer | ErrorAnswer | Failure | Answered | Called

#: Decodes the rest of a box from the bytes at an offset: ``parse(data, offset)``
#: returns the values and the offset past the box, and raises if the box is not
#: in the usual layout (see ``Command._parse_arguments``).
Parser = Callable[[bytes, int], tuple[dict[str, Any], int]]

# The first key of the boxes the fast path of AMPConnection.receive_data parses:
# with keys sorted, as Twisted and we send them, an answer starts with _answer,
# an error answer with _error and a call that wants an answer with _ask.
_ANSWER_HEADER = PREFIXES[len(ANSWER)] + ANSWER
_ASK_HEADER = PREFIXES[len(ASK)] + ASK
_ERROR_HEADER = PREFIXES[len(ERROR)] + ERROR
_COMMAND_HEADER = PREFIXES[len(COMMAND)] + COMMAND


def _box_end(data: bytes, pos: int) -> int:
    """
    Where the box whose pairs go on from ``data[pos]`` ends (past its end marker).

    ``pos`` must be at the start of a pair. Returns -1 if the box is incomplete
    or has a key over the limit (the decoder then reports the fault).
    """
    end = len(data)
    while end - pos >= 2:
        klen = data[pos] << 8 | data[pos + 1]
        if not klen:
            return pos + 2
        if klen > MAX_KEY_LENGTH:
            return -1
        vpos = pos + 2 + klen
        if end - vpos < 2:
            return -1
        pos = vpos + 2 + (data[vpos] << 8 | data[vpos + 1])
    return -1


def _classify(box: Box) -> Ask | Answer | ErrorAnswer:
    """Turn a box into an event, checking the keys its kind needs (Twisted's order)."""
    tag = box.get(ANSWER)
    if tag is not None:
        return Answer(tag, box)
    tag = box.get(ERROR)
    if tag is not None:
        code = box.get(ERROR_CODE)
        description = box.get(ERROR_DESCRIPTION)
        if code is None or description is None:
            missing = ERROR_CODE if code is None else ERROR_DESCRIPTION
            raise ProtocolError(f"error answer for tag {tag!r} has no {missing.decode()} key")
        return ErrorAnswer(tag, code, description, box)
    command = box.get(COMMAND)
    if command is not None:
        return Ask(box.get(ASK), command, box)
    keys = sorted(box)[:8]
    raise ProtocolError(
        f"box has none of _command, _answer or _error (its keys: {keys!r}"
        f"{', ...' if len(box) > 8 else ''})"
    )


def _limit(name: str, value: int) -> int:
    """Check a decoder limit as BoxDecoder does, for a decoder not created yet."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


# Stand-ins for the tables when nothing is to be decoded straight to values.
# Only ever read.
_NO_PARSERS: Mapping[bytes, tuple[Parser, Any]] = {}
_NO_CALLS: dict[bytes, Any] = {}


class AMPConnection:
    """
    One side of an AMP connection, without I/O.

    Args:
        max_box_size: The most bytes one received box may take.
        max_keys: The most keys one received box may have.
    """

    __slots__ = (
        "_decoder",
        "_events",
        "_max_box_size",
        "_max_keys",
        "_outgoing",
        "_remainder",
        "_skipped",
        "_stop",
        "_tag_counter",
        "_usual",
        "ask_parsers",
        "decode_values",
        "error",
        "pending",
        "queued_bytes",
        "state",
    )

    def __init__(
        self,
        *,
        max_box_size: int = DEFAULT_MAX_BOX_SIZE,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._max_box_size = _limit("max_box_size", max_box_size)
        self._max_keys = _limit("max_keys", max_keys)
        # The general decoder, created when first needed: the fast path of
        # receive_data takes whole boxes without it, and an idle connection
        # should cost little memory.
        self._decoder: BoxDecoder | None = None
        # Created when first needed, so that an idle connection holds no lists.
        self._events: list[Event] | None = None
        self._outgoing: list[bytes] | None = None
        #: How many bytes are queued to send (see :meth:`data_to_send`).
        self.queued_bytes = 0
        self._tag_counter = 0
        # True while the decoder holds no partial box, so the fast path of
        # receive_data may parse; the bytes it parsed since the decoder last saw any.
        self._usual = True
        self._skipped = 0
        #: Our calls that wait for their answers, by tag: the I/O layer adds each
        #: call it sends (:meth:`send_call`) and takes out each one it resolves.
        #: Each call is a tuple whose first item is a [`Parser`][] for its answer
        #: or ``None``; the rest is the I/O layer's. With a parser, the connection
        #: decodes an answer in the usual layout straight to its values, takes the
        #: call out, and emits ``(call, values)`` instead of an [`Answer`][].
        self.pending: dict[bytes, tuple[Any, ...]] = {}
        # Where decoding stops (see stop_after_answer and stop): the tag of an
        # answer, True for the end of the current box, or None; then the bytes
        # received after that box, kept undecoded until resume().
        self._stop: bytes | bool | None = None
        self._remainder: bytearray | None = None
        #: Parsers for the peer's calls, by command name: ``(parser, handler)``.
        #: A call in the usual layout to a command here is decoded straight to its
        #: values and emitted as ``(handler, tag, values)`` instead of an
        #: [`Ask`][]. Empty by default: every call comes as an [`Ask`][].
        self.ask_parsers: Mapping[bytes, tuple[Parser, Any]] = _NO_PARSERS
        #: ``False`` to have every box come as it was received (in an [`Ask`][]
        #: or an [`Answer`][]) even where a parser could decode it: for logging.
        self.decode_values = True
        #: The state of the connection.
        self.state = State.OPEN
        #: Why the connection failed, if the peer broke the protocol.
        self.error: ProtocolError | None = None

    @property
    def max_box_size(self) -> int:
        """The most bytes one received box may take."""
        return self._max_box_size

    @max_box_size.setter
    def max_box_size(self, value: int) -> None:
        self._max_box_size = _limit("max_box_size", value)
        if self._decoder is not None:
            self._decoder.max_box_size = value

    @property
    def max_keys(self) -> int:
        """The most keys one received box may have."""
        return self._max_keys

    @max_keys.setter
    def max_keys(self, value: int) -> None:
        self._max_keys = _limit("max_keys", value)
        if self._decoder is not None:
            self._decoder.max_keys = value

    # Receiving

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer. Ignored once the connection is closed."""
        if self.state is not State.OPEN:
            return
        events = self._events
        if events is None:
            events = self._events = []
        if self._usual:
            parsed = self._receive_usual(data, events)
            if parsed == len(data):
                self._skipped += parsed
                return
            if parsed:
                data = data[parsed:]
            self._skipped += parsed
        decoder = self._decoder
        if decoder is None:
            decoder = self._new_decoder()
        if self._skipped:
            # The decoder counts stream offsets for its error messages.
            decoder._skip(self._skipped)
            self._skipped = 0
        if self._stop is not None or self._remainder is not None:
            self._receive_stopping(data, events)
            return
        boxes, error = decoder.receive_data_partial(data)
        self._usual = decoder._at_boundary
        for box in boxes:
            try:
                events.append(_classify(box))
            except ProtocolError as exc:
                error = exc
                break
        if error is not None:
            self._fail(error)

    def events_received(self) -> list[Event]:
        """Return the events of the data received so far, and forget them."""
        events = self._events
        if events is None:
            return []
        self._events = None
        return events

    def fail(self, error: ProtocolError) -> None:
        """
        Close the connection because of something the peer did.

        For faults only the I/O layer can see, such as an answer whose tag was
        never sent. Emits a :class:`Failure` event like bad framing does.
        """
        if self.state is State.OPEN:
            self._fail(error)

    def connection_lost(self) -> ProtocolError | None:
        """
        Record that the transport closed.

        Returns:
            A :class:`ProtocolError` if the stream stopped in the middle of a box
            (everything received before that box has been delivered), else ``None``.
        """
        if self.state is not State.OPEN:
            return None
        self.state = State.CLOSED
        if self._decoder is None:
            return None  # nothing was ever buffered: the fast path took every box
        return self._decoder.end_of_stream()

    # Stopping at a box boundary (StartTLS, protocol switching)

    def stop_after_answer(self, tag: bytes) -> None:
        """
        Stop decoding after the answer to the call ``tag``.

        The bytes that follow that answer belong to another layer (TLS, or the
        protocol the connection switches to): they are kept undecoded until
        :meth:`resume`. An error answer to ``tag`` does not stop decoding.
        Until then, reads are decoded box by box (the fast path is off).
        """
        self._stop = tag
        self._usual = False

    def stop(self) -> None:
        """
        Stop decoding at the end of the current box: at once if between boxes.

        What is received after that is kept undecoded until :meth:`resume`.
        """
        self._usual = False
        if self._remainder is not None:
            return
        if self._decoder is None or self._decoder._at_boundary:
            self._stop = None
            self._remainder = bytearray()
        else:
            self._stop = True

    @property
    def stopped(self) -> bool:
        """``True`` once decoding has stopped (see :meth:`stop_after_answer`)."""
        return self._remainder is not None

    def resume(self) -> bytes:
        """
        Decode again, as before any stop; return the bytes kept undecoded.

        Also cancels a stop that has not happened yet. The bytes returned are
        not decoded: the caller passes them on, or back to :meth:`receive_data`.
        """
        remainder = self._remainder
        self._stop = None
        self._remainder = None
        self._usual = self._decoder is None or self._decoder._at_boundary
        return bytes(remainder) if remainder else b""

    # Sending

    def next_tag(self) -> bytes:
        """Take the next tag: lowercase hexadecimal, from 1, never reused."""
        self._tag_counter += 1
        return b"%x" % self._tag_counter

    def skip_tag(self) -> None:
        """Advance the tag counter without sending a tag, as Twisted does for no-answer calls."""
        self._tag_counter += 1

    def send(self, data: bytes) -> int:
        """Queue the bytes of one or more encoded boxes; return how many pieces are queued."""
        self.queued_bytes += len(data)
        outgoing = self._outgoing
        if outgoing is None:
            self._outgoing = [data]
            return 1
        outgoing.append(data)
        return len(outgoing)

    def send_call(self, parts: list[bytes], slot: int, call: tuple[Any, ...]) -> bytes:
        """
        Queue a call box that wants an answer: take a tag and expect its answer.

        ``parts`` are the box's encoded pieces, with the tag's place (length
        prefix and tag) at index ``slot``; ``call`` goes into :attr:`pending`
        under the tag, which is returned.
        """
        n = self._tag_counter = self._tag_counter + 1
        tag = b"%x" % n
        parts[slot] = PREFIXES[len(tag)] + tag
        self.pending[tag] = call
        data = b"".join(parts)
        self.queued_bytes += len(data)
        outgoing = self._outgoing
        if outgoing is None:
            self._outgoing = [data]
        else:
            outgoing.append(data)
        return tag

    def data_to_send(self) -> list[bytes]:
        """Return the queued bytes, in order, and forget them."""
        outgoing = self._outgoing
        if outgoing is None:
            return []
        self._outgoing = None
        self.queued_bytes = 0
        return outgoing

    @property
    def has_data_to_send(self) -> bool:
        """``True`` if bytes are queued."""
        return bool(self._outgoing)

    @property
    def queued(self) -> int:
        """How many pieces of data are queued (usually one box each)."""
        outgoing = self._outgoing
        return 0 if outgoing is None else len(outgoing)

    # Private methods

    def _receive_usual(self, data: bytes, events: list[Event]) -> int:
        """
        Parse the whole boxes at the start of ``data`` that have the usual layout.

        The fast path of :meth:`receive_data`, used when no partial box is
        buffered: an answer whose first key is ``_answer``, an error answer whose
        first key is ``_error`` and that has no ``_answer`` key, or a call whose
        first key is ``_ask`` and that has a ``_command`` key and no ``_answer``
        or ``_error`` key, is turned into its event in the same pass that splits
        it, with the limits checked once per box. An answer to a call in
        :attr:`pending` with a parser, or a call to a command in
        :attr:`ask_parsers` whose second key is ``_command``, is decoded straight
        to its values when the parser takes it. It stops at the first box that is
        anything else: incomplete, malformed, over a limit, an error answer
        without its code or description, a call without ``_ask``. The general
        decoder then takes over from that box, so it reports every fault exactly
        as it would have.

        Returns:
            How many bytes it parsed: the boxes up to there are in ``events``.
        """
        max_box_size = self._max_box_size
        max_keys = self._max_keys
        # The most values a decoded answer (one key besides them: _answer) and a
        # decoded call (two: _ask and _command) may have, under max_keys.
        answer_values = max_keys - 2
        ask_values = max_keys - 3
        pending: dict[bytes, Any] = self.pending if self.decode_values else _NO_CALLS
        ask_parsers = self.ask_parsers if self.decode_values else _NO_PARSERS
        append = events.append
        end = len(data)
        pos = start = 0
        try:
            while pos < end:
                start = pos
                # The length of the first key tells the three headers apart
                # (_answer: 7, _ask: 4, _error: 6); slices and indexing are
                # cheaper here than startswith and struct.
                first_length = data[pos + 1]
                if first_length == 7 and data[pos : pos + 9] == _ANSWER_HEADER:
                    first = ANSWER
                    p = pos + 11
                    stop = p + (data[p - 2] << 8 | data[p - 1])
                    tag = data[p:stop]
                    call = pending.get(tag)
                    if call is not None and (parse := call[0]) is not None:
                        try:
                            values, box_end = parse(data, stop)
                        except Exception:
                            pass  # not the usual layout: the dict path below decides
                        else:
                            if box_end - start <= max_box_size and len(values) <= answer_values:
                                del pending[tag]
                                append((call, values))
                                pos = box_end
                                continue
                elif first_length == 4 and data[pos : pos + 6] == _ASK_HEADER:
                    first = ASK
                    p = pos + 8
                    stop = p + (data[p - 2] << 8 | data[p - 1])
                    tag = data[p:stop]
                    if ask_parsers and data[stop : stop + 10] == _COMMAND_HEADER:
                        p = stop + 12
                        name_end = p + (data[p - 2] << 8 | data[p - 1])
                        entry = ask_parsers.get(data[p:name_end])
                        if entry is not None:
                            try:
                                values, box_end = entry[0](data, name_end)
                            except Exception:
                                pass  # not the usual layout: the dict path below decides
                            else:
                                if box_end - start <= max_box_size and len(values) <= ask_values:
                                    append((entry[1], tag, values))
                                    pos = box_end
                                    continue
                elif data[pos : pos + 8] == _ERROR_HEADER:
                    first = ERROR
                    p = pos + 10
                    stop = p + (data[p - 2] << 8 | data[p - 1])
                    tag = data[p:stop]
                else:
                    break
                box = {first: tag}
                p = stop
                # Until the empty key that ends the box. Lengths by indexing, as in
                # BoxDecoder._parse: an index past the end of the data raises
                # IndexError, the box is incomplete.
                while True:
                    if data[p]:
                        return start  # a key over MAX_KEY_LENGTH (255)
                    klen = data[p + 1]
                    if not klen:
                        break
                    kpos = p + 2
                    vpos = kpos + klen
                    vstart = vpos + 2
                    stop = vstart + (data[vpos] << 8 | data[vpos + 1])
                    if stop > end:
                        return start  # incomplete: copy nothing of a long value
                    box[data[kpos:vpos]] = data[vstart:stop]
                    p = stop
                # Every limit the general decoder checks pair by pair holds if the
                # whole box is within them (it holds the same keys in fewer pairs
                # only when a key repeats: the general decoder then decides).
                if p - start > max_box_size or len(box) >= max_keys:
                    break
                if first is ANSWER:
                    events.append(Answer(box[ANSWER], box))  # a repeated key: the last
                elif first is ERROR:
                    # _classify, inline: an error answer with both its keys, and no
                    # _answer (which would make it an answer).
                    code = box.get(ERROR_CODE)
                    description = box.get(ERROR_DESCRIPTION)
                    if code is None or description is None or ANSWER in box:
                        break
                    events.append(ErrorAnswer(box[ERROR], code, description, box))
                else:
                    command = box.get(COMMAND)
                    if command is None or ANSWER in box or ERROR in box:
                        break
                    events.append(Ask(box[ASK], command, box))
                pos = p + 2
        except IndexError:
            return start
        return pos

    def _receive_stopping(self, data: bytes, events: list[Event]) -> None:
        """
        Decode ``data`` box by box until the stop, and keep the rest undecoded.

        Each box is handed to the decoder alone (its end found by
        :func:`_box_end`), so that nothing past the stop is decoded.
        """
        remainder = self._remainder
        if remainder is not None:
            remainder += data
            return
        decoder = self._decoder
        if decoder is None:
            decoder = self._new_decoder()
        pos = 0
        end = len(data)
        while pos < end:
            rest = decoder._rest
            if rest:
                # The buffered start of a pair comes first: scan from it.
                box_end = _box_end(bytes(rest) + data[pos:], 0)
                if box_end >= 0:
                    box_end += pos - len(rest)
            else:
                box_end = _box_end(data, pos)
            chunk_end = end if box_end < 0 else box_end
            boxes, error = decoder.receive_data_partial(data[pos:chunk_end])
            pos = chunk_end
            for box in boxes:
                try:
                    event = _classify(box)
                except ProtocolError as exc:
                    error = exc
                    break
                events.append(event)
                stop = self._stop
                if stop is True or (type(event) is Answer and event.tag == stop):
                    self._stop = None
                    self._remainder = bytearray(data[pos:])
                    return
            if error is not None:
                self._fail(error)
                return

    def _new_decoder(self) -> BoxDecoder:
        decoder = self._decoder = BoxDecoder(
            max_box_size=self._max_box_size, max_keys=self._max_keys
        )
        return decoder

    def _fail(self, error: ProtocolError) -> None:
        self.state = State.CLOSED
        self.error = error
        if self._events is None:
            self._events = []
        self._events.append(Failure(error))
