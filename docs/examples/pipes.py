"""A parent process starts a child that serves AMP on its standard I/O, and calls it."""

import asyncio
import os
import sys

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


# --8<-- [start:child]
class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        print(f"adding {a} and {b}")  # stdout carries AMP: this goes to stderr
        return {"total": a + b}


async def child() -> None:
    # Serve the parent on stdin and stdout until it closes the connection.
    await amp.serve_stdio(Calculator)


# --8<-- [end:child]


# --8<-- [start:parent]
async def parent() -> None:
    # One pipe to the child's stdin, one from its stdout.
    child_stdin, to_child = os.pipe()
    from_child, child_stdout = os.pipe()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "child", stdin=child_stdin, stdout=child_stdout
    )
    os.close(child_stdin)  # the child's ends are the child's now
    os.close(child_stdout)
    async with await amp.connect_pipes(from_child, to_child) as calculator:
        print(await calculator.call_remote(Sum, a=13, b=81))
        print(await calculator.call_remote(Sum, a=1, b=2))
    # Closing the connection closed the child's stdin: its serve_stdio() returns.
    print("the child exited with", await asyncio.wait_for(process.wait(), 10))


# --8<-- [end:parent]


if __name__ == "__main__":
    asyncio.run(child() if sys.argv[1:] == ["child"] else parent())
