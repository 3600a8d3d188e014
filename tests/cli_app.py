"""
A small AMP application for the command-line tests: its commands and its server.

The tests run ``asyncio-amp serve cli_app:Calculator`` and ``asyncio-amp call
... --commands cli_app`` with this directory as the working directory.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
from typing import Any

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Sleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("slept", amp.Float())]


class Boom(amp.Command):
    pass


class Note(amp.Command):
    arguments = [("text", amp.String())]
    requires_answer = False


class Notes(amp.Command):
    response = [("notes", amp.ListOf(amp.String()))]


class Describe(amp.Command):
    """Every kind of value the command line can give, echoed back typed."""

    command_name = "describe-values"
    arguments = [
        ("text", amp.String()),
        ("data", amp.Bytes()),
        ("flag", amp.Boolean()),
        ("ratio", amp.Float()),
        ("price", amp.Decimal()),
        ("when", amp.DateTime()),
        ("numbers", amp.ListOf(amp.Integer())),
        ("rows", amp.AmpList([("name", amp.String()), ("n", amp.Integer(optional=True))])),
        ("big", amp.BigBytes(optional=True)),
        ("path", amp.Path(optional=True)),
        ("max-size", amp.Integer(optional=True)),
    ]
    response = [
        ("text", amp.String()),
        ("data", amp.Bytes()),
        ("flag", amp.Boolean()),
        ("ratio", amp.Float()),
        ("price", amp.Decimal()),
        ("when", amp.DateTime()),
        ("numbers", amp.ListOf(amp.Integer())),
        ("rows", amp.AmpList([("name", amp.String()), ("n", amp.Integer(optional=True))])),
        ("big_size", amp.Integer()),
        ("path", amp.String()),
        ("max-size", amp.Integer(optional=True)),
    ]


class Calculator(amp.AMPProtocol):
    """The server the tests start with ``asyncio-amp serve cli_app:Calculator``."""

    notes: list[str] = []  # shared by every connection of the server process

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        return {"result": numerator / denominator}

    @Sleep.responder
    async def sleep(self, seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @Boom.responder
    def boom(self) -> None:
        raise RuntimeError("secret internal detail")

    @Note.responder
    def note(self, text: str) -> None:
        self.notes.append(text)

    @Notes.responder
    def all_notes(self) -> dict[str, list[str]]:
        return {"notes": list(self.notes)}

    @Describe.responder
    def describe(
        self,
        text: str,
        data: bytes,
        flag: bool,
        ratio: float,
        price: decimal.Decimal,
        when: datetime.datetime,
        numbers: list[int],
        rows: list[dict[str, Any]],
        big: bytes | None = None,
        path: Any = None,
        max_size: int | None = None,
    ) -> dict[str, Any]:
        return {
            "text": text,
            "data": data,
            "flag": flag,
            "ratio": ratio,
            "price": price,
            "when": when,
            "numbers": numbers,
            "rows": rows,
            "big_size": len(big or b""),
            "path": repr(path),
            "max_size": max_size,
        }


class NotAProtocol:
    """For the test of a serve target that is not an AMPProtocol subclass."""
