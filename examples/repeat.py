"""
The example from the original asyncio-amp README, as it was written there.

A server repeats a text; a client made with plain ``loop.create_connection``
asks it to. Run it with ``python examples/repeat.py``. The README's copy
listens on port 8765; this one takes any free port, so that it runs beside
anything else (the tests check that both make the same calls).
"""

from __future__ import annotations

import asyncio

import asyncio_amp
from asyncio_amp import Command, Integer, String


class RepeatCommand(Command):
    arguments = [("text", String()), ("times", Integer())]
    response = [("text", String())]


class MyRepeatProtocol(asyncio_amp.AMPProtocol):
    @RepeatCommand.responder
    def repeat(self, text: str, times: int) -> dict[str, str]:
        return {"text": text * times}


async def main(host: str = "localhost", port: int = 0) -> str:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MyRepeatProtocol, host, port)
    port = server.sockets[0].getsockname()[1]

    transport, protocol = await loop.create_connection(asyncio_amp.AMPProtocol, host, port)
    result = await protocol.call_remote(RepeatCommand(text="Hello world", times=4))
    print(result["text"])

    transport.close()
    server.close()
    await server.wait_closed()
    text: str = result["text"]
    return text


if __name__ == "__main__":
    asyncio.run(main())
