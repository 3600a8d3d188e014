"""
Calls in both directions on one connection.

The client answers ``Progress`` calls from the server while the server works on
the client's ``Render`` call: a responder may itself ``await self.call_remote``
on the connection it is answering. Run it with ``python examples/bidirectional.py``.
"""

from __future__ import annotations

import asyncio

import asyncio_amp as amp


class Render(amp.Command):
    """Client → server: render a job in a number of steps."""

    arguments = [("job", amp.String()), ("steps", amp.Integer())]
    response = [("result", amp.String())]


class Progress(amp.Command):
    """Server → client: report progress; the client says whether to go on."""

    arguments = [("job", amp.String()), ("done", amp.Integer()), ("total", amp.Integer())]
    response = [("go_on", amp.Boolean())]


class RenderServer(amp.AMPProtocol):
    @Render.responder
    async def render(self, job: str, steps: int) -> dict[str, str]:
        for step in range(1, steps + 1):
            await asyncio.sleep(0)  # the real work would go here
            answer = await self.call_remote(Progress, job=job, done=step, total=steps)
            if not answer["go_on"]:
                return {"result": f"{job}: stopped by the client after {step} of {steps} steps"}
        return {"result": f"{job}: all {steps} steps rendered"}


class RenderClient(amp.AMPProtocol):
    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.stop_after = stop_after

    @Progress.responder
    def progress(self, job: str, done: int, total: int) -> dict[str, bool]:
        print(f"  client: {job} is at step {done}/{total}")
        return {"go_on": done < self.stop_after}


async def main() -> list[str]:
    server = await amp.serve(RenderServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    results = []
    async with await amp.connect(
        "127.0.0.1", port, protocol_factory=lambda: RenderClient(stop_after=3)
    ) as client:
        for job, steps in [("teapot", 2), ("cathedral", 5)]:
            answer = await client.call_remote(Render, job=job, steps=steps)
            print(f"server: {answer['result']}")
            results.append(answer["result"])
    server.close()
    await server.wait_closed()
    return results


if __name__ == "__main__":
    asyncio.run(main())
