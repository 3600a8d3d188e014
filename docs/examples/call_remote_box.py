"""Call commands by name with wire values, without Command classes."""

import asyncio

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Calculator(amp.AMPProtocol):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


async def main() -> None:
    async with await amp.serve(Calculator, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with await amp.connect("127.0.0.1", port) as client:
            # Keys and values are str (sent as UTF-8) or bytes; the answer is the wire box.
            answer = await client.call_remote_box("Sum", {"a": "13", "b": "81"})
            print(answer)  # {b'total': b'94'}
            try:
                await client.call_remote_box("Sqrt", {"x": "2"})
            except amp.UnhandledCommandError as exc:
                print(exc.error_code, exc.description)  # UNHANDLED Unhandled Command: b'Sqrt'


asyncio.run(main())
