"""CPU work in a process pool: calls, a timeout that kills the work, a crash, a call back."""

import asyncio
import os

import asyncio_amp as amp
from asyncio_amp.pool import ProcessPool, WorkerCrashedError


# --8<-- [start:worker]
class Fib(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("value", amp.Integer())]


class Crash(amp.Command):
    arguments: list = []
    response: list = []


class Progress(amp.Command):
    arguments = [("done", amp.Integer())]
    response: list = []


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class MathWorker(amp.AMPProtocol):  # runs in each worker process
    async def worker_started(self) -> None:
        pass  # open files, load models...: once per worker

    @Fib.responder
    async def fib(self, n: int) -> dict[str, int]:
        await self.call_remote(Progress, done=n)  # a call back to the parent
        return {"value": fib(n)}  # holds the worker's CPU, not the parent's

    @Crash.responder
    def crash(self) -> dict[str, int]:
        os._exit(3)


# --8<-- [end:worker]


# --8<-- [start:parent]
reported: list[int] = []


class Parent(amp.AMPProtocol):  # answers the workers' calls
    @Progress.responder
    def progress(self, done: int) -> dict[str, int]:
        reported.append(done)
        return {}


async def main() -> None:
    async with ProcessPool(
        MathWorker, min_workers=1, max_workers=2, parent_protocol=Parent, output="log"
    ) as pool:
        print(await pool.call_remote(Fib, n=25))

        # A call that takes too long: its worker is killed, and a new one starts.
        try:
            async with asyncio.timeout(1.0):
                await pool.call_remote(Fib, n=80)
        except TimeoutError:
            print("fib(80) timed out; its worker was killed")

        # A crash fails the call that was running, nothing else.
        try:
            await pool.call_remote(Crash)
        except WorkerCrashedError as error:
            print(f"crashed: {error.returncode=}")

        answers = await asyncio.gather(*(pool.call_remote(Fib, n=n) for n in (10, 20)))
        print([answer["value"] for answer in answers])
        stats = pool.stats()
        print({key: stats[key] for key in ("completed", "failed", "crashed")})
    print(f"the workers reported: {sorted(reported)}")


# --8<-- [end:parent]

if __name__ == "__main__":  # the workers import this file, without running main()
    asyncio.run(main())
