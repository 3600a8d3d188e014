"""StartTLS: a plaintext AMP connection switches to TLS in the middle."""

import asyncio
import ssl
import tempfile
from pathlib import Path

import trustme  # only to make a test certificate authority

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


# --8<-- [start:server]
class Server(amp.AMPProtocol):
    context: ssl.SSLContext | None = None  # set before serving

    def start_tls_context(self) -> ssl.SSLContext | None:
        # The context this side answers StartTLS with, as the TLS server.
        return self.context

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}


# --8<-- [end:server]


async def main(folder: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(folder / "server.pem")
    Server.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    Server.context.load_cert_chain(folder / "server.pem")
    client_context = ssl.create_default_context(cafile=folder / "ca.pem")

    server = await amp.serve(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # --8<-- [start:client]
    async with await amp.connect("127.0.0.1", port) as client:
        print("plaintext:", await client.call_remote(Sum, a=1, b=2), "tls:", client.tls)
        # ssl and server_hostname stay here: only {_ask, _command} goes out.
        await client.call_remote(amp.StartTLS, ssl=client_context, server_hostname="localhost")
        print("over TLS:", await client.call_remote(Sum, a=20, b=22), "tls:", client.tls)
        # A second StartTLS is refused at once.
        try:
            client.call_remote(amp.StartTLS, ssl=client_context, server_hostname="localhost")
        except amp.AmpError as exc:
            print("again:", str(exc).rsplit(": ", 1)[1])
    # --8<-- [end:client]

    # A side without a context answers TLS_ERROR, and the connection goes on.
    async with await amp.connect("127.0.0.1", port) as client:
        Server.context = None
        try:
            await client.call_remote(amp.StartTLS, ssl=client_context)
        except amp.RemoteAmpError as exc:
            print(exc.error_code, exc.description)
        print("still plaintext:", await client.call_remote(Sum, a=2, b=2))

    server.close()
    await server.wait_closed()


with tempfile.TemporaryDirectory() as folder:
    asyncio.run(main(Path(folder)))
