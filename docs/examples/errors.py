"""How exceptions cross the wire: mapped, fatal, unexpected and unhandled."""

import asyncio

import asyncio_amp as amp


# --8<-- [start:command]
class OutOfStockError(Exception):
    pass


class DiscontinuedError(OutOfStockError):
    """A subclass travels under its base class's code."""


class CorruptDatabaseError(Exception):
    pass


class Order(amp.Command):
    arguments = [("item", amp.String()), ("quantity", amp.Integer())]
    response = [("order_id", amp.Integer())]
    errors = {OutOfStockError: "OUT_OF_STOCK"}
    fatal_errors = {CorruptDatabaseError: "CORRUPT_DATABASE"}
    # --8<-- [end:command]


class Refund(amp.Command):
    """A command the shop does not answer: it has no responder for it."""

    arguments = [("order_id", amp.Integer())]


class Shop(amp.AMPProtocol):
    stock = {"teapot": 3, "kettle": 0, "samovar": 0}

    @Order.responder
    def order(self, item: str, quantity: int) -> dict[str, int]:
        if item == "ledger":
            raise CorruptDatabaseError("the ledger cannot be read")
        if item == "samovar":
            raise DiscontinuedError("samovars are no longer made")
        if item not in self.stock:
            raise KeyError(item)  # not mapped: the caller gets UNKNOWN
        if self.stock[item] < quantity:
            raise OutOfStockError(f"only {self.stock[item]} {item}(s) left")
        self.stock[item] -= quantity
        return {"order_id": 1}


async def main() -> None:
    server = await amp.serve(Shop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await amp.connect("127.0.0.1", port)

    print(await client.call_remote(Order, item="teapot", quantity=1))

    # A mapped exception is raised again on the caller's side, with its message.
    for item in ["kettle", "samovar"]:
        try:
            await client.call_remote(Order, item=item, quantity=1)
        except OutOfStockError as exc:
            print(f"{item}: {type(exc).__name__}: {exc}")

    # Anything else the responder raises becomes UNKNOWN; its details stay in
    # the server's log. The connection stays open.
    try:
        await client.call_remote(Order, item="spoon", quantity=1)
    except amp.UnknownRemoteError as exc:
        print(f"spoon: {exc.error_code}: {exc.description}")

    # No responder for the command: UNHANDLED.
    try:
        await client.call_remote(Refund, order_id=1)
    except amp.UnhandledCommandError as exc:
        print(f"refund: {exc.error_code}: {exc.description}")

    # A fatal error is raised like any other, then the server closes the connection.
    try:
        await client.call_remote(Order, item="ledger", quantity=1)
    except CorruptDatabaseError as exc:
        print(f"ledger: {type(exc).__name__}: {exc}")
    await client.wait_closed()
    try:
        await client.call_remote(Order, item="teapot", quantity=1)
    except amp.ConnectionLostError as exc:
        print(f"after the fatal error: {type(exc).__name__}")

    server.close()
    await server.wait_closed()


asyncio.run(main())
