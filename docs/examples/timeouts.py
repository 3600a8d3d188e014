"""Timeouts, cancellation, and a connection that goes away mid-call."""

import asyncio

import asyncio_amp as amp


class Sleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("slept", amp.Float())]


class Crash(amp.Command):
    """The server drops the connection instead of answering."""


class Sleeper(amp.AMPProtocol):
    @Sleep.responder
    async def sleep(self, seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @Crash.responder
    async def crash(self) -> None:
        assert self.transport is not None
        self.transport.abort()


async def main() -> None:
    server = await amp.serve(Sleeper, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with await amp.connect("127.0.0.1", port) as client:
        # A timeout around one call. The server is not told: its responder runs
        # to the end, and the answer that comes later is dropped.
        try:
            async with asyncio.timeout(0.1):
                await client.call_remote(Sleep, seconds=0.5)
        except TimeoutError:
            print("Sleep(0.5) timed out after 0.1 s")

        # asyncio.wait_for works the same way.
        try:
            await asyncio.wait_for(client.call_remote(Sleep, seconds=0.5), timeout=0.1)
        except TimeoutError:
            print("wait_for timed out too")

        # call_remote returns a future: cancel it to forget the call.
        call = client.call_remote(Sleep, seconds=0.5)
        await asyncio.sleep(0.05)
        call.cancel()
        print("cancelled:", call.cancelled())

        # The connection is still fine, and other calls go on concurrently.
        answers = await asyncio.gather(*(client.call_remote(Sleep, seconds=0.01) for _ in range(3)))
        print("three more calls:", [answer["slept"] for answer in answers])

        # The late answers to the calls above arrive while we wait here, and
        # are dropped without a trace.
        await asyncio.sleep(0.6)
        print(await client.call_remote(Sleep, seconds=0))

        # A call still waiting when the connection is lost fails with
        # ConnectionLostError (a ConnectionError, too).
        try:
            await client.call_remote(Crash)
        except amp.ConnectionLostError as exc:
            print(f"{type(exc).__name__}, a ConnectionError: {isinstance(exc, ConnectionError)}")

    # --8<-- [start:deadline]
    # One deadline for connecting and for two calls in a row.
    async with asyncio.timeout(5):
        async with await amp.connect("127.0.0.1", port) as client:
            first = await client.call_remote(Sleep, seconds=0.01)
            second = await client.call_remote(Sleep, seconds=0.02)
    print("both within the deadline:", first, second)
    # --8<-- [end:deadline]

    server.close()
    await server.wait_closed()


asyncio.run(main())
