"""AMP over TLS, with the client proving who it is too (mutual TLS)."""

import asyncio
import ssl
import tempfile
from pathlib import Path

import trustme  # only to make a test certificate authority

import asyncio_amp as amp


class WhoAmI(amp.Command):
    response = [("name", amp.String())]


class Server(amp.AMPProtocol):
    @WhoAmI.responder
    def who_am_i(self) -> dict[str, str]:
        # The client's verified certificate, as the ssl module describes it.
        assert self.transport is not None
        cert = self.transport.get_extra_info("peercert")
        subject = dict(item[0] for item in cert["subject"])
        return {"name": subject.get("commonName", "?")}


def make_certificates(folder: Path) -> None:
    """Write a test CA, a server certificate and a client certificate as PEM files."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server = ca.issue_cert("localhost")
    server.private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    client = ca.issue_cert("client@example.org", common_name="reporting job")
    client.private_key_and_cert_chain_pem.write_to_path(folder / "client.pem")


async def main(folder: Path) -> None:
    # --8<-- [start:contexts]
    # The server: its own certificate, and (for mutual TLS) the CA that
    # signs the clients' certificates.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(folder / "server.pem")
    server_context.load_verify_locations(folder / "ca.pem")
    server_context.verify_mode = ssl.CERT_REQUIRED

    # The client: the CA that signs the server's certificate, and (for mutual
    # TLS) its own certificate.
    client_context = ssl.create_default_context(cafile=folder / "ca.pem")
    client_context.load_cert_chain(folder / "client.pem")
    # --8<-- [end:contexts]

    # --8<-- [start:connect]
    server = await amp.serve(Server, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    async with await amp.connect(
        "127.0.0.1", port, ssl=client_context, server_hostname="localhost"
    ) as client:
        print(await client.call_remote(WhoAmI))
    # --8<-- [end:connect]

    server.close()
    await server.wait_closed()


with tempfile.TemporaryDirectory() as folder:
    make_certificates(Path(folder))
    asyncio.run(main(Path(folder)))
