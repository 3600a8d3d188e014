"""Twisted AMP over standard I/O, for ``test_twisted_stdio.py``.

This program imports only Twisted and the standard library; it must never import
``asyncio_amp``. It runs in one of two roles:

* ``child [--greet]``: speaks AMP on its own stdin and stdout with
  ``twisted.internet.stdio.StandardIO``. It answers Sum, Echo, CallBack (by
  calling the parent's Sum) and Quit (then closes the connection). With
  ``--greet`` it calls the parent's Hello as soon as it starts, and sends the
  greeting back with Notify. It exits when the connection ends.
* ``parent PROGRAM [ARGUMENTS...]``: spawns PROGRAM with ``reactor.spawnProcess``
  and speaks AMP over the child's stdin and stdout, as ampoule's process pool
  does: it calls the child's Sum, CallBack (answering the child's Sum calls) and
  Stray, closes the child's stdin, and prints one JSON line with the answers and
  the child's exit status.

Logs go to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.stdio import StandardIO
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols import amp
from twisted.python.failure import Failure

reactor: Any = _reactor


class Sum(amp.Command):
    commandName = b"Sum"
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Echo(amp.Command):
    commandName = b"Echo"
    arguments = [(b"data", amp.String())]
    response = [(b"data", amp.String())]


class CallBack(amp.Command):
    commandName = b"CallBack"
    arguments = [(b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"total", amp.Integer())]


class Hello(amp.Command):
    commandName = b"Hello"
    arguments = [(b"name", amp.Unicode())]
    response = [(b"greeting", amp.Unicode())]


class Notify(amp.Command):
    commandName = b"Notify"
    arguments = [(b"message", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = False


class Stray(amp.Command):
    commandName = b"Stray"
    arguments = [(b"text", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []


class Quit(amp.Command):
    commandName = b"Quit"
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []


# ---------------------------------------------------------------------------
# The child: AMP on this process's stdin and stdout
# ---------------------------------------------------------------------------


class ChildAMP(amp.AMP):
    def __init__(self, greet: bool) -> None:
        super().__init__()
        self.greet = greet

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.greet:
            self.callRemote(Hello, name="twisted child").addCallback(
                lambda answer: self.callRemote(Notify, message=answer["greeting"])
            )

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        if reactor.running:
            reactor.stop()

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, Any]:
        return {"data": data}

    @CallBack.responder
    def call_back(self, a: int, b: int) -> Deferred[dict[str, Any]]:
        return self.callRemote(Sum, a=a, b=b)

    @Quit.responder
    def quit(self) -> dict[str, Any]:
        reactor.callLater(0, self.transport.loseConnection)
        return {}


# ---------------------------------------------------------------------------
# The parent: AMP over a child process's stdin and stdout
# ---------------------------------------------------------------------------


class ToChild:
    """The transport AMP writes to: the child's stdin."""

    def __init__(self, process: ChildProcess) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        self.process.transport.writeToChild(0, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.process.transport.closeStdin()

    def getPeer(self) -> str:
        return f"child process {self.process.transport.pid}"

    def getHost(self) -> str:
        return "parent process"


class ParentAMP(amp.AMP):
    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, Any]:
        return {"total": a + b}


class ChildProcess(ProcessProtocol):
    """Feeds the child's stdout to AMP; reports how the child ended."""

    def __init__(self) -> None:
        self.amp = ParentAMP()
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self.amp.makeConnection(ToChild(self))  # type: ignore[arg-type]

    def outReceived(self, data: bytes) -> None:
        self.amp.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        self.amp.connectionLost(reason)
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            self.ended.callback(reason.value.exitCode)  # type: ignore[union-attr]
        else:
            self.ended.callback(-1)


@inlineCallbacks
def run_parent(argv: list[str]) -> Any:
    child = ChildProcess()
    reactor.spawnProcess(child, argv[0], argv, env=None, childFDs={0: "w", 1: "r", 2: "r"})
    result: dict[str, Any] = {}
    try:
        result["sum"] = yield child.amp.callRemote(Sum, a=13, b=81)
        result["call_back"] = yield child.amp.callRemote(CallBack, a=2, b=3)
        result["stray"] = yield child.amp.callRemote(Stray, text="from twisted")
        result["sum_after"] = yield child.amp.callRemote(Sum, a=1, b=1)
    except Exception as exc:  # reported, then the child is stopped all the same
        result["error"] = f"{type(exc).__name__}: {exc}"
    child.amp.transport.loseConnection()
    result["exit"] = yield child.ended
    print(json.dumps(result), flush=True)
    reactor.stop()


def main() -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    role, *rest = sys.argv[1:]
    if role == "child":
        StandardIO(ChildAMP(greet="--greet" in rest))
    elif role == "parent":
        reactor.callWhenRunning(run_parent, rest)
    else:
        raise SystemExit(f"unknown role {role!r}")
    reactor.run()


if __name__ == "__main__":
    main()
