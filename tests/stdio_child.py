"""
A child process that serves AMP on its standard input and output with serve_stdio.

``tests/test_pipes.py`` starts it with pipes as its stdin and stdout and calls it
through ``connect_pipes``. Its responders also call the parent back and write
stray text to stdout, which must end up on stderr and never in the AMP stream.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class CallBack(amp.Command):
    """The child calls the parent's Sum with these numbers and returns its total."""

    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Stray(amp.Command):
    """The child writes to stdout with print() and with os.write(1, ...)."""

    arguments = [("text", amp.String())]
    response: list[tuple[str, amp.Argument[Any]]] = []


class Quit(amp.Command):
    """The child answers, then closes the connection."""

    response: list[tuple[str, amp.Argument[Any]]] = []


class Child(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @CallBack.responder
    async def call_back(self, a: int, b: int) -> dict[str, int]:
        answer: dict[str, int] = await self.call_remote(Sum, a=a, b=b)
        return answer

    @Stray.responder
    def stray(self, text: str) -> dict[str, Any]:
        print(f"print: {text}")
        os.write(1, f"os.write: {text}\n".encode())
        return {}

    @Quit.responder
    def quit(self) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self.close)
        return {}


async def main() -> None:
    protocol = await amp.serve_stdio(Child)
    print(f"served: closed={protocol.closed}")
    same = os.fstat(1)[:2] == os.fstat(2)[:2]  # the same file: (mode, inode)
    print(f"stdout is stderr again: {same}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
