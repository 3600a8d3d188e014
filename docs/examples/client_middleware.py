"""Middleware on a Client: it runs on every connection the client makes."""

import asyncio
import collections

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Reset(amp.Command):
    response = [("done", amp.Boolean())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Reset.responder
    def reset(self) -> dict[str, bool]:
        return {"done": True}


# --8<-- [start:middleware]
class CountCalls(amp.Middleware):
    """Counts the calls sent, by the server they went to."""

    def __init__(self) -> None:
        self.sent: collections.Counter[str] = collections.Counter()

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        self.sent[call.protocol.peer.rsplit(":", 1)[0]] += 1
        return await call_next(call)


class ReadOnly(amp.Middleware):
    """Refuses to send Reset from this client."""

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, object]:
        if call.command is Reset:
            raise PermissionError(f"{call.name} is not allowed from this client")
        return await call_next(call)


async def calls(port: int) -> None:
    count = CountCalls()
    client = amp.Client([f"127.0.0.1:{port}", f"127.0.0.2:{port}"], middleware=[count, ReadOnly()])
    async with client:
        await asyncio.gather(*(client.call_remote(Sum, a=n, b=1) for n in range(10)))
        try:
            await client.call_remote(Reset)
        except PermissionError as error:
            print("refused:", error)
    print("sent:", dict(sorted(count.sent.items())))
    # --8<-- [end:middleware]


async def main() -> None:
    first = await amp.serve(Calculator, "127.0.0.1", 0)
    port = first.sockets[0].getsockname()[1]
    second = await amp.serve(Calculator, "127.0.0.2", port)
    try:
        await calls(port)
    finally:
        for server in (first, second):
            server.close()
            await server.wait_closed()


asyncio.run(main())
