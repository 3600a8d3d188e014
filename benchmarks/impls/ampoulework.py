"""ampoule's child for the pool workloads: the same two commands, under Twisted."""

from __future__ import annotations

from ampoule.child import AMPChild
from twisted.protocols import amp

from impls.poolwork import fib, tiny


class Sum(amp.Command):
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Fib(amp.Command):
    arguments = [(b"n", amp.Integer())]
    response = [(b"value", amp.Integer())]


class Child(AMPChild):
    """ampoule's worker: plain responders."""

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": tiny(a, b)}

    @Fib.responder
    def fib(self, n: int) -> dict[str, int]:
        return {"value": fib(n)}
