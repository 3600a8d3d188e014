"""Run a server with ``asyncio-amp serve --workers 2``, and see both processes answer."""

import asyncio
import os
import re
import signal
import sys

import asyncio_amp as amp

HERE = os.path.dirname(os.path.abspath(__file__))  # the directory that holds this module


class WhoAmI(amp.Command):
    response = [("pid", amp.Integer())]


# --8<-- [start:server]
class Server(amp.AMPProtocol):
    """Served by ``asyncio-amp serve workers:Server``: each worker runs its own copy."""

    @WhoAmI.responder
    def who_am_i(self) -> dict[str, int]:
        return {"pid": os.getpid()}


# --8<-- [end:server]


# --8<-- [start:main]
async def main() -> None:
    supervisor = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "asyncio_amp", "serve", "workers:Server"),
        *("--port", "0", "--workers", "2"),
        cwd=HERE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert supervisor.stderr is not None
    async with asyncio.timeout(30):
        # The supervisor says where it serves once every worker listens.
        port = None
        while port is None:
            line = (await supervisor.stderr.readline()).decode()
            if not line:
                raise SystemExit("the server did not start")
            found = re.search(r"on 127\.0\.0\.1:(\d+) with 2 workers", line)
            port = int(found.group(1)) if found else None
        # Each new connection goes to one worker or the other.
        pids = set()
        for _ in range(32):
            async with await amp.connect("127.0.0.1", port) as connection:
                pids.add((await connection.call_remote(WhoAmI))["pid"])
        print(len(pids), "worker processes answered")
        # SIGTERM (or Ctrl-C) drains every worker within --grace, then the supervisor exits.
        supervisor.send_signal(signal.SIGTERM)
        await supervisor.stderr.read()
        print("the supervisor exited with", await supervisor.wait())


# --8<-- [end:main]


if __name__ == "__main__":
    asyncio.run(main())
