"""A command whose answer closes the connection (Twisted's QuitBox)."""

import asyncio

import asyncio_amp as amp


# --8<-- [start:command]
class Shutdown(amp.Command):
    response = [("served", amp.Integer())]
    close_after_answer = True  # the worker closes the connection once it has answered


class Work(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("square", amp.Integer())]


class Worker(amp.AMPProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    @Work.responder
    def work(self, n: int) -> dict[str, int]:
        self.served += 1
        return {"square": n * n}

    @Shutdown.responder
    def shutdown_worker(self) -> dict[str, int]:
        return {"served": self.served}


# --8<-- [end:command]


async def main() -> None:
    async with await amp.serve(Worker, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = await amp.connect("127.0.0.1", port)
        # --8<-- [start:call]
        print(await client.call_remote(Work, n=7))
        print(await client.call_remote(Shutdown))  # the answer still comes
        await client.wait_closed()  # then the worker closes the connection
        print("closed:", client.closed)
        # --8<-- [end:call]


asyncio.run(main())
