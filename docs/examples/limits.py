"""Limits on what a peer may make us hold, and a graceful shutdown."""

import asyncio

import asyncio_amp as amp


class Work(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("done", amp.Boolean())]


class Worker(amp.AMPProtocol):
    running = 0
    peak = 0

    @Work.responder
    async def work(self, seconds: float) -> dict[str, bool]:
        Worker.running += 1
        Worker.peak = max(Worker.peak, Worker.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            Worker.running -= 1
        return {"done": True}


async def main() -> None:
    # --8<-- [start:serve]
    server = await amp.serve(
        Worker,
        "127.0.0.1",
        0,
        max_box_size=1024 * 1024,  # refuse boxes over 1 MiB
        max_keys=64,  # and boxes of more than 64 keys
        max_responders=4,  # run at most 4 responders per connection at once
        close_timeout=5,  # give a peer 5 s to read our last bytes on close()
    )
    # --8<-- [end:serve]
    port = server.sockets[0].getsockname()[1]

    # 20 calls at once: the server runs 4 at a time and leaves the rest unread.
    async with await amp.connect("127.0.0.1", port) as client:
        await asyncio.gather(*(client.call_remote(Work, seconds=0.02) for _ in range(20)))
    print("responders at once, at most:", Worker.peak)

    # max_pending_calls holds our own calls back: at most 2 wait for an answer.
    Worker.peak = 0
    async with await amp.connect("127.0.0.1", port, max_pending_calls=2) as client:
        await asyncio.gather(*(client.call_remote(Work, seconds=0.02) for _ in range(20)))
    print("calls in flight at once, at most:", Worker.peak)

    # --8<-- [start:shutdown]
    client = await amp.connect("127.0.0.1", port)
    slow = client.call_remote(Work, seconds=0.2)
    await client.call_remote(Work, seconds=0)  # so the server has started the slow call

    server.close(grace=2)  # stop listening, and shut every connection down
    await asyncio.sleep(0)  # let the shutdown start

    try:
        await client.call_remote(Work, seconds=0)
    except amp.UnknownRemoteError as exc:
        print("a new call during the shutdown:", exc.error_code)
    print("the call already running:", await slow)
    await server.wait_closed()  # every connection is closed
    await client.wait_closed()
    print("client connection closed:", client.closed)
    # --8<-- [end:shutdown]


asyncio.run(main())
