"""
What the pool workloads run in their worker processes, for every implementation.

The worker processes import this module by name (``impls.poolwork``):
asyncio-amp's pool workers its ``Worker`` class, ``ProcessPoolExecutor``'s its
plain functions. ampoule's child is in ``ampoulework.py`` (it needs Twisted).
"""

from __future__ import annotations

from asyncio_amp import AMPProtocol, Command, Integer


def tiny(a: int, b: int) -> int:
    """The tiny call: what it costs is the pool's, not the work's."""
    return a + b


def fib(n: int) -> int:
    """The CPU-bound call: pure Python, no shortcut."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class Sum(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Fib(Command):
    arguments = [("n", Integer())]
    response = [("value", Integer())]


class Worker(AMPProtocol):
    """asyncio-amp's pool worker: plain responders, as an application writes them."""

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": tiny(a, b)}

    @Fib.responder
    def fib(self, n: int) -> dict[str, int]:
        return {"value": fib(n)}
