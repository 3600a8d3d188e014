"""
Observers: what a connection tells about itself, besides its calls.

[`Middleware`][asyncio_amp.Middleware] sees calls. A metrics integration also
wants what no call shows: connections opening and closing, the bytes read and
written, the peer breaking the protocol, and the flow-control limits being hit.
A middleware that also derives from :class:`Observer` gets those events from
every connection it is installed on: the protocol picks the observers out of
its middleware when the middleware is set (``AMPProtocol.middleware``).

Cost: the protocol keeps one attribute, ``None`` without observers, and tests
it once per read (``data_received``) and once per write (``_flush``); the other
events happen off the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._errors import ProtocolError

__all__: list[str] = []

# The protocol is typed Any here: _protocol imports this module, not the reverse.
AMPProtocol = Any

# The limits an observer hears about (``limit_hit``'s ``limit``).
MAX_RESPONDERS = "max_responders"
MAX_PENDING_CALLS = "max_pending_calls"


class Observer:
    """
    The connection events a middleware may observe: override the ones it needs.

    Each method gets the [`AMPProtocol`][asyncio_amp.AMPProtocol] of the
    connection. They run on the event loop, inside the protocol's callbacks: keep
    them short, and never raise.
    """

    def connection_made(self, protocol: AMPProtocol) -> None:
        """The connection is made."""

    def connection_lost(self, protocol: AMPProtocol) -> None:
        """The connection is closed (once per connection made)."""

    def bytes_received(self, protocol: AMPProtocol, count: int) -> None:
        """``count`` bytes were read from the peer."""

    def bytes_sent(self, protocol: AMPProtocol, count: int) -> None:
        """``count`` bytes were handed to the transport for the peer."""

    def protocol_failure(self, protocol: AMPProtocol, error: ProtocolError) -> None:
        """The peer broke the protocol (or a limit of it); the connection closes."""

    def limit_hit(self, protocol: AMPProtocol, limit: str) -> None:
        """
        A call waits for a limit: ``"max_responders"`` (a call of the peer waits
        for a place) or ``"max_pending_calls"`` (a call of ours waits to be sent).
        """


class Observers(Observer):
    """Several observers as one, in order."""

    __slots__ = ("items",)

    def __init__(self, items: tuple[Observer, ...]) -> None:
        self.items = items

    def connection_made(self, protocol: AMPProtocol) -> None:
        for item in self.items:
            item.connection_made(protocol)

    def connection_lost(self, protocol: AMPProtocol) -> None:
        for item in self.items:
            item.connection_lost(protocol)

    def bytes_received(self, protocol: AMPProtocol, count: int) -> None:
        for item in self.items:
            item.bytes_received(protocol, count)

    def bytes_sent(self, protocol: AMPProtocol, count: int) -> None:
        for item in self.items:
            item.bytes_sent(protocol, count)

    def protocol_failure(self, protocol: AMPProtocol, error: ProtocolError) -> None:
        for item in self.items:
            item.protocol_failure(protocol, error)

    def limit_hit(self, protocol: AMPProtocol, limit: str) -> None:
        for item in self.items:
            item.limit_hit(protocol, limit)


def observer_of(middleware: Iterable[object]) -> Observer | None:
    """The observers among ``middleware``, as one; ``None`` if there are none."""
    found = tuple(item for item in middleware if isinstance(item, Observer))
    if not found:
        return None
    return found[0] if len(found) == 1 else Observers(found)
