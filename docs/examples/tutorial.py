"""The tutorial's chat service: commands, a server, clients, errors and callbacks."""

# --8<-- [start:commands]
import asyncio

import asyncio_amp as amp


class NameTakenError(Exception):
    """Someone in the room already has this name."""


class NotJoinedError(Exception):
    """The client spoke before joining the room."""


class Join(amp.Command):
    """Client → server: enter the room under a name."""

    arguments = [("name", amp.String())]
    response = [("members", amp.ListOf(amp.String()))]
    errors = {NameTakenError: "NAME_TAKEN"}


class Say(amp.Command):
    """Client → server: send a line to everyone else in the room."""

    arguments = [("text", amp.String())]
    response = [("delivered", amp.Integer())]
    errors = {NotJoinedError: "NOT_JOINED"}


class Message(amp.Command):
    """Server → client: a line that someone said."""

    arguments = [("sender", amp.String()), ("text", amp.String())]
    # No response values: the answer is an empty box that says "received".
    # --8<-- [end:commands]


# --8<-- [start:server]
class ChatServer(amp.AMPProtocol):
    """One connection to the chat server: one client of the room."""

    def __init__(self, room: dict[str, "ChatServer"]) -> None:
        super().__init__()
        self.room = room  # name -> protocol, shared by every connection
        self.name: str | None = None

    @Join.responder
    def join(self, name: str) -> dict[str, list[str]]:
        if name in self.room:
            raise NameTakenError(f"{name!r} is already in the room")
        self.name = name
        self.room[name] = self
        return {"members": sorted(self.room)}

    @Say.responder
    async def say(self, text: str) -> dict[str, int]:
        if self.name is None:
            raise NotJoinedError("join the room first")
        others = [member for member in self.room.values() if member is not self]
        # Call every other client back, at the same time, and wait for them all.
        await asyncio.gather(
            *(member.call_remote(Message, sender=self.name, text=text) for member in others)
        )
        return {"delivered": len(others)}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.name is not None:
            del self.room[self.name]
            # --8<-- [end:server]


# --8<-- [start:client]
class ChatClient(amp.AMPProtocol):
    """A client of the room: it answers the server's Message calls."""

    def __init__(self, me: str) -> None:
        super().__init__()
        self.me = me

    @Message.responder
    def message(self, sender: str, text: str) -> dict[str, object]:
        print(f"[{self.me}'s screen] {sender}: {text}")
        return {}
        # --8<-- [end:client]


# --8<-- [start:main]
async def main() -> None:
    room: dict[str, ChatServer] = {}
    server = await amp.serve(lambda: ChatServer(room), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    alice = await amp.connect("127.0.0.1", port, protocol_factory=lambda: ChatClient("alice"))
    bob = await amp.connect("127.0.0.1", port, protocol_factory=lambda: ChatClient("bob"))
    async with alice, bob:
        try:
            await alice.call_remote(Say, text="is anyone there?")
        except NotJoinedError as exc:
            print(f"alice spoke too soon: {exc}")

        print(await alice.call_remote(Join, name="alice"))
        try:
            await bob.call_remote(Join, name="alice")
        except NameTakenError as exc:
            print(f"bob cannot be alice: {exc}")
        print(await bob.call_remote(Join, name="bob"))

        answer = await alice.call_remote(Say, text="hello, bob")
        print(f"alice's line reached {answer['delivered']} other(s)")

    server.close()
    await server.wait_closed()


asyncio.run(main())
# --8<-- [end:main]
