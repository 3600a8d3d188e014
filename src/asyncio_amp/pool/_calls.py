"""A call through the pool: its phase, its caller's future, and the link's future."""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Any

from .._commands import Command

if TYPE_CHECKING:
    from ._worker import Worker

__all__: list[str] = []


class Phase(enum.Enum):
    NEW = "new"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class Call:
    """One call through the pool (see the theory of operation)."""

    __slots__ = ("arguments", "command", "future", "idempotent", "inner", "phase", "worker")

    def __init__(
        self, command: type[Command] | Command, arguments: dict[str, Any], future: Any
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.future: asyncio.Future[Any] = future
        self.phase = Phase.NEW
        self.worker: Worker | None = None
        self.inner: asyncio.Future[Any] | None = None
        kind = command if isinstance(command, type) else type(command)
        self.idempotent = kind.idempotent

    @property
    def label(self) -> str:
        kind = self.command if isinstance(self.command, type) else type(self.command)
        return kind.__qualname__


def drop(call: Call) -> None:
    """Forget the link's future of a call that will not be answered through it."""
    inner = call.inner
    if inner is None:
        return
    if inner.done():
        if not inner.cancelled():
            inner.exception()  # retrieved: its error was reported another way
    else:
        inner.cancel()  # its late answer, if any, is dropped
