"""Values over 65,535 bytes, and lists of values, in one call."""

import asyncio
import hashlib

import asyncio_amp as amp


class Upload(amp.Command):
    arguments = [("name", amp.String()), ("data", amp.BigBytes())]
    response = [("sha256", amp.String())]


class Echo(amp.Command):
    arguments = [("data", amp.Bytes())]
    response = [("data", amp.Bytes())]


class Stats(amp.Command):
    arguments = [("words", amp.ListOf(amp.String()))]
    response = [
        ("counts", amp.AmpList([("word", amp.String()), ("length", amp.Integer())])),
    ]


class Store(amp.AMPProtocol):
    @Upload.responder
    def upload(self, name: str, data: bytes) -> dict[str, str]:
        return {"sha256": hashlib.sha256(data).hexdigest()}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        return {"data": data}

    @Stats.responder
    def stats(self, words: list[str]) -> dict[str, list[dict[str, object]]]:
        return {"counts": [{"word": word, "length": len(word)} for word in words]}


async def main() -> None:
    # The default max_box_size (16 MiB) bounds what one call may carry; this
    # server accepts boxes of up to 64 MiB.
    server = await amp.serve(Store, "127.0.0.1", 0, max_box_size=64 * 1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    async with await amp.connect("127.0.0.1", port) as client:
        # BigBytes: any size, split over several keys on the wire.
        data = bytes(range(256)) * 80_000  # 20,480,000 bytes
        answer = await client.call_remote(Upload, name="blob", data=data)
        print("20 MB upload intact:", answer["sha256"] == hashlib.sha256(data).hexdigest())

        # Bytes: one AMP value, so at most 65,535 bytes. A longer one is refused
        # before anything is sent, and the connection stays usable.
        try:
            await client.call_remote(Echo, data=b"x" * 70_000)
        except amp.TooLongError as exc:
            print(f"TooLongError: {exc}")
        print(await client.call_remote(Echo, data=b"still connected"))

        # ListOf and AmpList: a whole list in one value (65,535 bytes in all).
        print(await client.call_remote(Stats, words=["amp", "asyncio"]))

    server.close()
    await server.wait_closed()


asyncio.run(main())
