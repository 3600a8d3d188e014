"""A Client over three servers: calls spread over them, and outlive a server that goes away."""

import asyncio
import collections

import asyncio_amp as amp


# --8<-- [start:commands]
class Where(amp.Command):
    """Which server answered. Running it twice does no harm."""

    arguments = [("n", amp.Integer())]
    response = [("server", amp.String())]
    idempotent = True  # the Client may send it again if its connection is lost


class Deposit(amp.Command):
    """Not idempotent: sent twice, it would deposit twice."""

    arguments = [("amount", amp.Integer())]
    response = [("server", amp.String())]


# --8<-- [end:commands]


class Server(amp.AMPProtocol):
    def here(self) -> str:
        assert self.transport is not None
        return str(self.transport.get_extra_info("sockname")[0])

    @Where.responder
    async def where(self, n: int) -> dict[str, str]:
        await asyncio.sleep(0.05)
        return {"server": self.here()}

    @Deposit.responder
    async def deposit(self, amount: int) -> dict[str, str]:
        await asyncio.sleep(0.05)
        return {"server": self.here()}


HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


async def main() -> None:
    # Three servers on one port, on three loopback addresses.
    first = await amp.serve(Server, HOSTS[0], 0)
    port = first.sockets[0].getsockname()[1]
    servers = [first] + [await amp.serve(Server, host, port) for host in HOSTS[1:]]

    # --8<-- [start:client]
    async def discover(name: str) -> list[str]:
        # Service discovery: the addresses of the servers behind a name. By
        # default the Client asks DNS (every A and AAAA record of the name).
        return ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

    client = amp.Client(f"bank.internal:{port}", resolver=discover, backoff_max=0.1)
    async with client:
        # Concurrent calls go to the connection with the fewest calls in flight.
        answers = await asyncio.gather(*(client.call_remote(Where, n=n) for n in range(30)))
        print(sorted(collections.Counter(a["server"] for a in answers).items()))
        # --8<-- [end:client]

        # --8<-- [start:lost]
        where = [client.call_remote(Where, n=n) for n in range(6)]
        deposits = [client.call_remote(Deposit, amount=10) for _ in range(6)]
        await asyncio.sleep(0.01)
        servers[0].abort_clients()  # 127.0.0.1 drops its connections mid-call

        # The idempotent calls were sent again, to the other servers.
        answered = await asyncio.gather(*where)
        print("Where:", sorted(collections.Counter(a["server"] for a in answered).items()))
        # The others failed, only those that were on the lost connection.
        outcomes = await asyncio.gather(*deposits, return_exceptions=True)
        print(
            "Deposit:",
            sorted(
                collections.Counter(
                    type(o).__name__ if isinstance(o, Exception) else o["server"] for o in outcomes
                ).items()
            ),
        )
        stats = client.stats()
        print({key: stats[key] for key in ("calls", "retries", "losses")})
        # --8<-- [end:lost]

        # --8<-- [start:back]
        # The client reconnects after a backoff (here at most 0.1 s), and
        # calls spread over all three servers again.
        await asyncio.sleep(0.5)
        answers = await asyncio.gather(*(client.call_remote(Where, n=n) for n in range(30)))
        print(sorted(collections.Counter(a["server"] for a in answers).items()))
    # Leaving the block drained the calls in flight and closed every connection.
    # --8<-- [end:back]

    try:
        await client.call_remote(Where, n=0)
    except amp.NoConnectionError as error:
        print(f"{type(error).__name__}: {error}")

    for server in servers:
        server.close()
        await server.wait_closed()


asyncio.run(main())
