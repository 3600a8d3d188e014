"""
The asyncio-amp demo: a server and a client talking AMP over 127.0.0.1.

It shows a call, an error that crosses the wire, a command the server does not
know, a fire-and-forget call, many calls in flight at once, and the server
calling the client back. Run it with ``python examples/demo.py``.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Square(amp.Command):
    arguments = [("x", amp.Integer())]
    response = [("square", amp.Integer())]


class Log(amp.Command):
    arguments = [("message", amp.String())]
    requires_answer = False


class WhoAreYou(amp.Command):
    response = [("name", amp.String())]


class Greet(amp.Command):
    response = [("greeting", amp.String())]


class Shutdown(amp.Command):
    """A command the server does not implement."""


class DemoServer(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        print(f"  server: {a} + {b} = {a + b}")
        return {"total": a + b}

    @Square.responder
    def square(self, x: int) -> dict[str, int]:
        return {"square": x * x}

    @Divide.responder
    async def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        return {"result": numerator / denominator}

    @Log.responder
    def log(self, message: str) -> None:
        print(f"  server: logged {message!r}")

    @Greet.responder
    async def greet(self) -> dict[str, str]:
        answer = await self.call_remote(WhoAreYou)
        print(f"  server: the client says it is {answer['name']!r}")
        return {"greeting": f"Hello, {answer['name']}!"}


class DemoClient(amp.AMPProtocol):
    @WhoAreYou.responder
    def who_are_you(self) -> dict[str, str]:
        return {"name": "demo client"}


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="  log: %(message)s", stream=sys.stdout)
    server = await amp.serve(DemoServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"server: listening on 127.0.0.1:{port}")

    async with await amp.connect("127.0.0.1", port, protocol_factory=DemoClient) as client:
        print("client: Sum(a=13, b=81)")
        print(f"client: got {await client.call_remote(Sum, a=13, b=81)}")

        print("client: Divide(numerator=1, denominator=0)")
        try:
            await client.call_remote(Divide, numerator=1, denominator=0)
        except ZeroDivisionError as exc:
            print(f"client: the server raised ZeroDivisionError({str(exc)!r})")

        print("client: Shutdown()")
        try:
            await client.call_remote(Shutdown)
        except amp.UnhandledCommandError as exc:
            print(f"client: {exc.error_code}: {exc.description}")

        print("client: Log(message='hello') (no answer expected)")
        await client.call_remote(Log, message="hello")

        print("client: 1000 Square calls in flight at once")
        answers = await asyncio.gather(*(client.call_remote(Square, x=i) for i in range(1000)))
        print(f"client: all answered; the squares add up to {sum(a['square'] for a in answers)}")

        print("client: Greet() (the server calls the client back)")
        print(f"client: got {await client.call_remote(Greet)}")

    server.close()
    await server.wait_closed()
    print("server: closed")


if __name__ == "__main__":
    asyncio.run(main())
