"""Three `asyncio-amp serve` processes over TLS, and a Client that balances calls over them."""

import asyncio
import collections
import os
import re
import signal
import ssl
import sys
import tempfile
from pathlib import Path

import trustme  # only to make a test certificate authority

import asyncio_amp as amp

HERE = os.path.dirname(os.path.abspath(__file__))  # the directory that holds this module
HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


class Where(amp.Command):
    """Which server answered. Running it twice does no harm."""

    response = [("server", amp.String())]
    idempotent = True


# --8<-- [start:server]
class Server(amp.AMPProtocol):
    """Served by ``asyncio-amp serve scaling:Server`` on each host."""

    @Where.responder
    async def where(self) -> dict[str, str]:
        await asyncio.sleep(0.05)
        assert self.transport is not None
        return {"server": str(self.transport.get_extra_info("sockname")[0])}


# --8<-- [end:server]


async def start_server(host: str, port: int, certs: Path) -> tuple[asyncio.subprocess.Process, int]:
    """Start `asyncio-amp serve` on host:port (0: any); return it and its port once it listens."""
    server = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "asyncio_amp", "serve", "scaling:Server"),
        *("--host", host, "--port", str(port), "--keepalive", "5"),
        *("--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key")),
        cwd=HERE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert server.stderr is not None
    while True:
        line = (await server.stderr.readline()).decode()
        if not line:
            raise SystemExit(f"the server on {host} did not start")
        found = re.search(r" on [\d.]+:(\d+)", line)
        if found:
            return server, int(found.group(1))


async def calls(client: amp.Client, count: int) -> dict[str, int]:
    answers = await asyncio.gather(*(client.call_remote(Where) for _ in range(count)))
    return dict(sorted(collections.Counter(answer["server"] for answer in answers).items()))


async def main() -> None:
    folder = tempfile.TemporaryDirectory()
    certs = Path(folder.name)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(certs / "ca.pem")
    issued = ca.issue_cert("amp.internal")
    issued.cert_chain_pems[0].write_to_path(certs / "server.pem")
    issued.private_key_pem.write_to_path(certs / "server.key")
    servers: list[asyncio.subprocess.Process] = []
    try:
        async with asyncio.timeout(60):
            first, port = await start_server(HOSTS[0], 0, certs)
            servers.append(first)
            for host in HOSTS[1:]:
                servers.append((await start_server(host, port, certs))[0])

            # --8<-- [start:client]
            async def resolve(name: str) -> list[str]:
                # Service discovery: a DNS name with three A records, say.
                return HOSTS

            client = amp.Client(
                f"amp.internal:{port}",
                resolver=resolve,
                ssl=ssl.create_default_context(cafile=certs / "ca.pem"),
                connections_per_address=2,
                keepalive=0.5,
                keepalive_timeout=1.0,
                backoff_max=1.0,
            )
            async with client:
                print("connections:", len(client.connections))
                print("calls answered:", await calls(client, 30))
                # 127.0.0.2 hangs (SIGSTOP): its kernel keeps its sockets open.
                os.kill(servers[1].pid, signal.SIGSTOP)
                while client.stats()["losses"] < 2:
                    await calls(client, 6)  # idempotent: the calls stuck on it go elsewhere
                print("with 127.0.0.2 stopped:", sorted(await calls(client, 30)))
                os.kill(servers[1].pid, signal.SIGCONT)
                while len(client.connections) < 6:  # noqa: ASYNC110  (no event to wait on)
                    await asyncio.sleep(0.1)
                print("after SIGCONT:", await calls(client, 30))
                stats = client.stats()
                # Both connections to 127.0.0.2 were lost; the calls on them were sent again.
                print("lost:", stats["losses"] >= 2, "sent again:", stats["retries"] > 0)
            # --8<-- [end:client]
    finally:
        for server in servers:
            os.kill(server.pid, signal.SIGCONT)
            server.terminate()
            await server.communicate()
        folder.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
