"""
Flow control: which of the peer's calls may start, what waits, and when to read.

Theory of operation
-------------------

Both sides of an AMP connection call each other over one byte stream, and TCP
is the only brake either side has on the other: a side that stops reading stops
everything the peer sends, its calls *and its answers to our calls*. A
:class:`FlowControl` decides, for one connection, with no loop and no
transport, when the I/O layer may start a responder and when it must stop
reading. The protocol tells it what happens and carries out what it says.

What is bounded, and by what:

* **Working responders**, at most ``max_responders``. A responder *works* from
  its start until it ends, except while it waits for the answers to its own
  calls on this same connection: then it *lends* its place (:meth:`lend`) and
  takes it back when the last of those answers comes (:meth:`reclaim`), even if
  that takes the count over the limit for a while.
* **The peer's calls in our hands**: working, lending and waiting responders
  together, at most ``max_responders + max_queued_calls``. A call that arrives
  while every place is taken, or while writing is paused, or behind other
  waiting calls, waits (``deferred``) in order. Reading stops while calls wait,
  so the peer's further calls stay in TCP, *unless a call of ours waits for an
  answer*: the answer may be behind them in the stream. Then reading goes on,
  and a peer that puts more calls than that in our hands floods us: the
  connection is closed, as for any broken limit. A peer of this library never
  does, as long as its ``max_pending_calls`` (plus the calls its responders
  make back to us, one per call of ours they answer) stays below that sum.
* **Answers** take no place: a responder's place is free as soon as its answer
  is queued, whether the transport can take the answer or not. While writing is
  paused no new responder starts, so what is queued and unwritten is at most
  the answers of the responders already running, plus one read's worth.
* **Our calls on the wire** (:meth:`may_send`): the application's calls, at
  most ``max_pending_calls``; further ones wait in order as their encoded parts.
  Calls that our responders make back to the peer (*nested* calls) do not wait
  for that limit: there is one per lending responder, so the bound above holds
  them. No call goes out while writing is paused, and nothing is written past
  the transport's high-water mark; what is not written waits.

Why no cycle of waits can close. Suppose every responder ends once the calls it
makes on this connection are answered (anything else it waits for is not this
connection's business). Then each wait below points to something that does not
wait, directly or through others, for the one that waits:

1. A call waiting for a place waits for working responders. Those wait on
   nothing of this connection (a responder waiting on the peer lends its
   place), so they end and the call starts.
2. A call or an answer waiting for writing to resume waits for the peer to
   read, and the peer reads while it waits for our answers (rule 4, on its
   side); if it waits for none, nothing it waits for depends on our writing.
3. A nested call never waits for ``max_pending_calls``, so a chain of calls
   back and forth only waits on responders (rule 1) and the wire (rules 2 and
   4). An application's call waiting for ``max_pending_calls`` waits for
   answers to calls on the wire, and those never wait for it: the responders
   that answer them call back, if at all, with nested calls.
4. Answers to our calls are always read: reading never stops while a call of
   ours waits for an answer (:meth:`wants_reading`).

Responders that call the peer back cannot hold the places their nested calls
need (rule 1), and neither side stops reading the other's answers (rule 4):
those were the two ways both sides at their limits used to stop each other
for good.

Idle connections share their state. Until a connection first needs to change
its flow control (a call arrives, writing pauses, a heartbeat goes out), it
holds the :func:`shared_flow` instance for its limits: a :class:`FlowControl` in its
first state that refuses every change. The connection takes its own copy
(:meth:`FlowControl.own`) before the first change, so every count above is still
one connection's, and a server with many idle connections holds none.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, ClassVar, NoReturn

__all__: list[str] = []

# With max_responders, the most calls from the peer that may be in our hands
# while reading cannot stop (answers to our calls may come behind them). More is
# a flood. 10,000 is ten times our default max_pending_calls: a peer of this
# library with its default limits stays far below it.
DEFAULT_MAX_QUEUED_CALLS = 10_000

# The most calls of ours that may wait for their answers at once, by default.
DEFAULT_MAX_PENDING_CALLS = 1000


class Verdict(enum.Enum):
    """What to do with a call that has just arrived."""

    #: Run its responder now (the call holds a place).
    START = "start"
    #: It waits for a place, in order (see :meth:`FlowControl.next_call`).
    DEFER = "defer"
    #: It is one call too many: the peer floods us, close the connection.
    FLOOD = "flood"


class FlowControl:
    """
    The flow-control state of one connection (see the module's theory of operation).

    Attributes are read by the I/O layer on its fast path; change them only
    through the methods.
    """

    __slots__ = (
        "deferred",
        "lending",
        "max_pending_calls",
        "max_queued_calls",
        "max_responders",
        "working",
        "writing_paused",
    )

    #: ``True`` for the read-only instances that idle connections share (see :func:`shared_flow`).
    shared: ClassVar[bool] = False

    def __init__(
        self,
        max_responders: int,
        max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS,
        max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
    ) -> None:
        #: The most responders that may work at once.
        self.max_responders = max_responders
        #: The most calls of the application's that may wait for answers at once.
        self.max_pending_calls = max_pending_calls
        #: The most calls that may wait for a place while reading goes on.
        self.max_queued_calls = max_queued_calls
        #: Responders started and not ended, less those lending their place.
        self.working = 0
        #: Responders that wait for answers from the peer and lent their place.
        self.lending = 0
        #: Calls waiting for a place, oldest first. Created when first needed.
        self.deferred: collections.deque[Any] | tuple[()] = ()
        #: True while the transport's buffer is over its high-water mark.
        self.writing_paused = False

    def __repr__(self) -> str:
        return (
            f"<FlowControl working={self.working}/{self.max_responders} "
            f"lending={self.lending} deferred={len(self.deferred)}"
            f"{' writing-paused' if self.writing_paused else ''}>"
        )

    def own(self) -> FlowControl:
        """A connection's own copy of a :func:`shared_flow` instance; ``self`` if not shared."""
        if not self.shared:
            return self
        return FlowControl(self.max_responders, self.max_queued_calls, self.max_pending_calls)

    # Calls from the peer

    def arrive(self, call: Any) -> Verdict:
        """A call came from the peer: start it, keep it waiting, or refuse the flood."""
        if (
            self.working + self.lending + len(self.deferred)
            >= self.max_responders + self.max_queued_calls
        ):
            return Verdict.FLOOD
        if not self.deferred and not self.writing_paused and self.working < self.max_responders:
            self.working += 1
            return Verdict.START
        if not self.deferred:
            self.deferred = collections.deque()
        self.deferred.append(call)
        return Verdict.DEFER

    def next_call(self) -> Any | None:
        """
        The waiting call that may start now, if any; it then holds a place.

        Call it again until it returns ``None`` after each change that may free
        a place: a responder ended or lent its place, or writing resumed.
        """
        if self.deferred and not self.writing_paused and self.working < self.max_responders:
            self.working += 1
            return self.deferred.popleft()
        return None

    def drop_waiting(self) -> list[Any]:
        """Forget the waiting calls (the connection closes or shuts down) and return them."""
        calls = list(self.deferred)
        self.deferred = ()
        return calls

    # Responders

    def ended(self, *, lending: bool = False) -> None:
        """A responder ended (``lending``: while it still lent its place); its place is free."""
        if lending:
            self.lending -= 1
        else:
            self.working -= 1

    def lend(self) -> None:
        """A working responder now waits for answers from the peer: it lends its place."""
        self.working -= 1
        self.lending += 1

    def reclaim(self) -> None:
        """A lending responder has its answers and works again."""
        self.lending -= 1
        self.working += 1

    # Our calls

    def may_send(self, pending: int, *, nested: bool, behind: bool) -> bool:
        """
        Whether a call of ours may go out now.

        Args:
            pending: How many of our calls wait for their answers.
            nested: One of our responders makes it (it calls the peer back).
            behind: Calls of the application's wait to go out before it.

        A nested call waits only for writing to resume; the application's
        calls also wait for ``max_pending_calls``, in order.
        """
        if self.writing_paused:
            return False
        return nested or (not behind and pending < self.max_pending_calls)

    # Writing and reading

    def pause_writing(self) -> None:
        """The transport's buffer is full: no new responder starts."""
        self.writing_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained: waiting calls may start (see :meth:`next_call`)."""
        self.writing_paused = False

    def wants_reading(self, awaiting_answers: bool) -> bool:
        """
        Whether the transport should be read now.

        Args:
            awaiting_answers: A call of ours waits for its answer.

        Reading stops only to hold back the peer's calls (calls wait for a
        place, or writing is paused), and never while an answer is expected.
        """
        return awaiting_answers or not (self.deferred or self.writing_paused)


class _SharedFlowControl(FlowControl):
    """A FlowControl in its first state, shared by idle connections: read-only."""

    __slots__ = ()

    shared = True

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise RuntimeError(
            f"cannot set {name}: a shared FlowControl is read-only (take own() first)"
        )


# The shared instances, by limits. Few sets of limits are in use at once; past
# this many, connections get their own instance from the start.
MAX_SHARED = 64
_shared: dict[tuple[int, int, int], FlowControl] = {}


def shared_flow(
    max_responders: int,
    max_queued_calls: int = DEFAULT_MAX_QUEUED_CALLS,
    max_pending_calls: int = DEFAULT_MAX_PENDING_CALLS,
) -> FlowControl:
    """
    The flow control of an idle connection with these limits, shared and read-only.

    The connection calls :meth:`FlowControl.own` before its first change.
    """
    key = (max_responders, max_queued_calls, max_pending_calls)
    flow = _shared.get(key)
    if flow is None:
        if len(_shared) >= MAX_SHARED:
            return FlowControl(*key)
        model = FlowControl(*key)
        flow = object.__new__(_SharedFlowControl)
        for name in FlowControl.__slots__:
            object.__setattr__(flow, name, getattr(model, name))
        _shared[key] = flow
    return flow
