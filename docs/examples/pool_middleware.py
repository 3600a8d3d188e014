"""Middleware on a process pool: count the calls both ways, refuse a command."""

import asyncio
import collections

import asyncio_amp as amp
from asyncio_amp.pool import ProcessPool


class Square(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("value", amp.Integer())]


class Shutdown(amp.Command):  # something no caller of this pool may ask
    arguments: list = []
    response: list = []


class Log(amp.Command):
    arguments = [("text", amp.Unicode())]
    response: list = []


class Worker(amp.AMPProtocol):
    @Square.responder
    async def square(self, n: int) -> dict[str, int]:
        if n == 3:
            await self.call_remote(Log, text="three!")  # a call to the parent
        return {"value": n * n}


class Parent(amp.AMPProtocol):
    @Log.responder
    def log(self, text: str) -> dict[str, str]:
        print(f"a worker says {text}")
        return {}


# --8<-- [start:middleware]
class Count(amp.Middleware):
    """Counts the calls to the workers (outgoing) and from them (incoming)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict:
        self.calls[f"to a worker: {call.name}"] += 1
        return await call_next(call)

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict:
        self.calls[f"from a worker: {call.name}"] += 1
        return await call_next(call)


class Refuse(amp.Middleware):
    """Refuses a command before it reaches any worker."""

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict:
        if call.command is Shutdown:
            raise PermissionError(f"{call.name} is not for callers of this pool")
        return await call_next(call)


async def main() -> None:
    count = Count()
    async with ProcessPool(
        Worker, min_workers=2, parent_protocol=Parent, middleware=[count, Refuse()]
    ) as pool:
        answers = await asyncio.gather(*(pool.call_remote(Square, n=n) for n in range(5)))
        print([answer["value"] for answer in answers])
        try:
            await pool.call_remote(Shutdown)
        except PermissionError as error:
            print(f"refused: {error}")
    print(sorted(count.calls.items()))


# --8<-- [end:middleware]

if __name__ == "__main__":  # the workers import this file, without running main()
    asyncio.run(main())
