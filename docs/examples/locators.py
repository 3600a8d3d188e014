"""A gateway: a locator answers one command, and every other call goes on to a backend."""

import asyncio

import asyncio_amp as amp


class Greet(amp.Command):
    arguments = [("name", amp.String())]
    response = [("greeting", amp.String())]


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Divide(amp.Command):
    arguments = [("numerator", amp.Integer()), ("denominator", amp.Integer())]
    response = [("result", amp.Float())]
    errors = {ZeroDivisionError: "ZERO_DIVISION"}


class Calculator(amp.AMPProtocol):
    """The backend: a plain AMP server."""

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Divide.responder
    def divide(self, numerator: int, denominator: int) -> dict[str, float]:
        return {"result": numerator / denominator}


# --8<-- [start:gateway]
class Greeter:
    """A locator: any object with responders."""

    @Greet.responder
    def greet(self, name: str) -> dict[str, str]:
        return {"greeting": f"hello {name}, from the gateway"}


class Gateway(amp.AMPProtocol):
    """Answers Greet with its locator, and forwards every other command to the backend."""

    def __init__(self, backend: amp.AMPProtocol) -> None:
        super().__init__(locators=[Greeter()])
        self.backend = backend

    async def unhandled_command(self, name: bytes, box: dict[bytes, bytes]) -> dict[bytes, bytes]:
        # The call goes on as it came. The backend's answer box comes back as it
        # is, and so does its error: call_remote_box raises it as a RemoteAmpError,
        # which unhandled_command answers with the same code and description.
        return await self.backend.call_remote_box(name, box)


# --8<-- [end:gateway]


async def main() -> None:
    async with await amp.serve(Calculator, "127.0.0.1", 0) as backend_server:
        backend_port = backend_server.sockets[0].getsockname()[1]
        async with await amp.connect("127.0.0.1", backend_port) as backend:
            # --8<-- [start:serve]
            gateway = await amp.serve(lambda: Gateway(backend), "127.0.0.1", 0)
            # --8<-- [end:serve]
            async with gateway:
                port = gateway.sockets[0].getsockname()[1]
                async with await amp.connect("127.0.0.1", port) as client:
                    print(await client.call_remote(Greet, name="ann"))
                    print(await client.call_remote(Sum, a=13, b=81))
                    try:
                        await client.call_remote(Divide, numerator=1, denominator=0)
                    except ZeroDivisionError as exc:
                        print("ZeroDivisionError:", exc)
                    try:
                        await client.call_remote_box("Sqrt", {"x": "2"})
                    except amp.UnhandledCommandError as exc:
                        print(exc.error_code, exc.description)


asyncio.run(main())
