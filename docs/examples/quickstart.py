"""A command, a server that answers it, and a client that calls it."""

import asyncio

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


async def main() -> None:
    async with await amp.serve(Calculator, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with await amp.connect("127.0.0.1", port) as client:
            answer = await client.call_remote(Sum, a=13, b=81)
            print(answer)  # {'total': 94}


asyncio.run(main())
