"""A slow-call logger: calls that take longer than a threshold are logged, both ways."""

import asyncio
import logging
import sys
import time
from typing import Any

import asyncio_amp as amp


# --8<-- [start:slow]
class SlowCalls(amp.Middleware):
    """Log every call, ours or the peer's, that takes longer than ``threshold`` seconds."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.logger = logging.getLogger("myapp.slow")

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        return await self.timed(call, call_next)

    async def outgoing(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        return await self.timed(call, call_next)

    async def timed(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await call_next(call)
        except BaseException as exc:
            error = exc
            raise
        finally:
            took = time.perf_counter() - start
            if took > self.threshold:
                self.logger.warning(
                    "slow %s call %s with %s: %s after more than %g s",
                    call.direction,
                    call.name,
                    call.protocol.peer.split(":")[0],  # (no port: the output is stable)
                    call.outcome(error),
                    self.threshold,
                )


# --8<-- [end:slow]


class Nap(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("slept", amp.Float())]


class Sleeper(amp.AMPProtocol):
    @Nap.responder
    async def nap(self, seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}


async def main() -> None:
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
    slow = SlowCalls(threshold=0.1)
    server = await amp.serve(Sleeper, "127.0.0.1", 0, middleware=[slow])
    port = server.sockets[0].getsockname()[1]
    async with server, await amp.connect("127.0.0.1", port, middleware=[slow]) as proto:
        print(await proto.call_remote(Nap, seconds=0.0))  # fast: nothing logged
        print(await proto.call_remote(Nap, seconds=0.2))  # logged on both sides


asyncio.run(main())
