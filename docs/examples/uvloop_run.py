"""The same server and client, on uvloop."""

import asyncio

import uvloop

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


async def main() -> None:
    print("event loop:", type(asyncio.get_running_loop()).__module__)
    async with await amp.serve(Calculator, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with await amp.connect("127.0.0.1", port) as client:
            print(await client.call_remote(Sum, a=1, b=2))


uvloop.run(main())
