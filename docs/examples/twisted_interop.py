"""asyncio-amp and Twisted's AMP, calling each other in both directions.

To keep the example one program, Twisted runs on the same asyncio event loop
(Twisted's asyncio reactor). Usually the Twisted side is a separate program;
the bytes on the wire are the same either way.
"""

import asyncio
import decimal

from twisted.internet import asyncioreactor, endpoints, protocol
from twisted.protocols import amp as tamp

import asyncio_amp as amp


class UnknownSymbolError(Exception):
    pass


# --8<-- [start:ours]
class Quote(amp.Command):
    arguments = [("symbol", amp.String()), ("tags", amp.ListOf(amp.Bytes()))]
    response = [("price", amp.Decimal())]
    errors = {UnknownSymbolError: "UNKNOWN_SYMBOL"}


class Pricer(amp.AMPProtocol):
    @Quote.responder
    def quote(self, symbol: str, tags: list[bytes]) -> dict[str, decimal.Decimal]:
        return {"price": decimal.Decimal("12.50")}
        # --8<-- [end:ours]


# --8<-- [start:theirs]
class TwistedQuote(tamp.Command):
    commandName = b"Quote"  # the wire name of our Quote
    arguments = [(b"symbol", tamp.Unicode()), (b"tags", tamp.ListOf(tamp.String()))]
    response = [(b"price", tamp.Decimal())]
    errors = {UnknownSymbolError: b"UNKNOWN_SYMBOL"}


class TwistedPricer(tamp.AMP):
    @TwistedQuote.responder
    def quote(self, symbol, tags):
        if symbol != "TWST":
            raise UnknownSymbolError(f"no symbol {symbol}")
        return {"price": decimal.Decimal("99.95")}
        # --8<-- [end:theirs]


async def main() -> None:
    loop = asyncio.get_running_loop()
    asyncioreactor.install(loop)
    from twisted.internet import reactor  # noqa: PLC0415  # only once it is installed

    # Our client calls a Twisted server.
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(protocol.Factory.forProtocol(TwistedPricer)).asFuture(loop)
    async with await amp.connect("127.0.0.1", port.getHost().port) as client:
        answer = await client.call_remote(Quote, symbol="TWST", tags=[b"daily"])
        print("Twisted server answered:", answer)
        try:
            await client.call_remote(Quote, symbol="ACME", tags=[])
        except UnknownSymbolError as exc:
            print("Twisted server raised UnknownSymbolError:", exc)
    await port.stopListening().asFuture(loop)

    # A Twisted client calls our server.
    server = await amp.serve(Pricer, "127.0.0.1", 0)
    our_port = server.sockets[0].getsockname()[1]
    client_endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", our_port)
    twisted_client = await endpoints.connectProtocol(client_endpoint, tamp.AMP()).asFuture(loop)
    answer = await twisted_client.callRemote(TwistedQuote, symbol="AMP", tags=[]).asFuture(loop)
    print("our server answered Twisted:", answer)
    twisted_client.transport.loseConnection()
    server.close()
    await server.wait_closed()


asyncio.run(main())
