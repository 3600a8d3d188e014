"""Protocol switching: after one AMP call, the connection carries another protocol."""

import asyncio

import asyncio_amp as amp


# --8<-- [start:command]
class Shout(amp.ProtocolSwitchCommand):
    """After this call the connection carries raw lines, echoed upper-cased."""

    arguments = [("greeting", amp.Unicode())]


# --8<-- [end:command]


# --8<-- [start:server]
class Shouter(asyncio.Protocol):
    """The server's new protocol: greets, then echoes every byte upper-cased."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.greeting.encode() + b"\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


class Server(amp.AMPProtocol):
    @Shout.responder
    def shout(self, greeting: str) -> Shouter:
        # A protocol instead of a dict: it owns the transport once the answer is written.
        return Shouter(greeting)


# --8<-- [end:server]


# --8<-- [start:client]
class Lines(asyncio.Protocol):
    """The client's new protocol: collects what comes back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"BYE\n"):
            self.done.set_result(bytes(self.received))

    def connection_lost(self, exc: Exception | None) -> None:
        print("the switched connection closed")
        self.closed.set_result(None)


async def main() -> None:
    server = await amp.serve(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await amp.connect("127.0.0.1", port)
    lines = await client.call_remote(Shout, protocol_factory=Lines, greeting="hello")
    print("AMP closed:", client.closed)
    try:
        client.call_remote(Shout, protocol_factory=Lines, greeting="again")
    except amp.ProtocolSwitchedError:
        print("no more AMP calls on this connection")
    lines.transport.write(b"raw bytes now\nbye\n")
    print((await lines.done).decode(), end="")
    lines.transport.close()
    await lines.closed
    # --8<-- [end:client]
    server.close()
    await server.wait_closed()


asyncio.run(main())
