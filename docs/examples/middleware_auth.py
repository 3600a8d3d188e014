"""An auth middleware: every command is refused until Login succeeds on that connection."""

import asyncio
import weakref
from typing import Any

import asyncio_amp as amp


# --8<-- [start:auth]
class NotLoggedIn(Exception):
    """The connection has not logged in yet."""


class AppCommand(amp.Command):
    # errors accumulate along the class hierarchy: every command declares this one.
    errors = {NotLoggedIn: "NOT_LOGGED_IN"}


class Login(AppCommand):
    arguments = [("user", amp.String()), ("password", amp.String())]
    response = [("welcome", amp.String())]
    errors = {PermissionError: "BAD_PASSWORD"}


class Balance(AppCommand):
    response = [("amount", amp.Integer())]


class LoginRequired(amp.Middleware):
    """Refuse every command but Login until Login succeeds on the same connection."""

    def __init__(self) -> None:
        # One instance serves every connection: the state is kept per connection.
        self.users: weakref.WeakKeyDictionary[amp.AMPProtocol, str] = weakref.WeakKeyDictionary()

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.command is Login:
            answer = await call_next(call)  # raises if the password is wrong
            self.users[call.protocol] = call.arguments["user"]
            return answer
        if call.protocol not in self.users:
            raise NotLoggedIn(f"log in before calling {call.name}")
        return await call_next(call)


# --8<-- [end:auth]


class Bank(amp.AMPProtocol):
    @Login.responder
    def login(self, user: str, password: str) -> dict[str, str]:
        if password != "secret":
            raise PermissionError("wrong password")
        return {"welcome": f"hello {user}"}

    @Balance.responder
    def balance(self) -> dict[str, int]:
        return {"amount": 42}


async def main() -> None:
    # --8<-- [start:serve]
    server = await amp.serve(Bank, "127.0.0.1", 0, middleware=[LoginRequired()])
    # --8<-- [end:serve]
    port = server.sockets[0].getsockname()[1]
    async with server, await amp.connect("127.0.0.1", port) as proto:
        for attempt in (
            proto.call_remote(Balance),
            proto.call_remote(Login, user="ann", password="guess"),
            proto.call_remote(Login, user="ann", password="secret"),
            proto.call_remote(Balance),
        ):
            try:
                print(await attempt)
            except (NotLoggedIn, PermissionError) as exc:
                print(f"{type(exc).__name__}: {exc}")
        # Another connection has not logged in.
        async with await amp.connect("127.0.0.1", port) as other:
            try:
                await other.call_remote(Balance)
            except NotLoggedIn as exc:
                print(f"the other connection: {exc}")


asyncio.run(main())
