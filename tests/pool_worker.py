"""Worker classes for the process pool's tests: they run in child processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import pathlib
import signal
import sys
import time
from typing import Any

import asyncio_amp as amp


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Pid(amp.Command):
    arguments: list[tuple[str, amp.Argument[Any]]] = []
    response = [("pid", amp.Integer())]


class Sleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("pid", amp.Integer())]


class IdempotentSleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("pid", amp.Integer())]
    idempotent = True


class Spin(amp.Command):
    """Hold the CPU (a plain responder: the worker's loop is blocked)."""

    arguments = [("seconds", amp.Float())]
    response = [("pid", amp.Integer())]


class Die(amp.Command):
    """End the worker: "exit" (os._exit(3)), "kill" (SIGKILL), "segv" (a segfault)."""

    arguments = [("how", amp.Unicode())]
    response: list[tuple[str, amp.Argument[Any]]] = []


class Say(amp.Command):
    """Print a line on stdout and one on stderr."""

    arguments = [("text", amp.Unicode())]
    response: list[tuple[str, amp.Argument[Any]]] = []


class Env(amp.Command):
    arguments = [("name", amp.Unicode())]
    response = [("value", amp.Unicode()), ("cwd", amp.Unicode()), ("path", amp.Unicode())]


class Fail(amp.Command):
    arguments: list[tuple[str, amp.Argument[Any]]] = []
    response: list[tuple[str, amp.Argument[Any]]] = []
    errors = {ValueError: b"BAD_VALUE"}


class AskParent(amp.Command):
    """The worker calls the parent's Sum and answers with the total."""

    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class Echo(amp.Command):
    arguments = [("data", amp.BigBytes())]
    response = [("data", amp.BigBytes()), ("length", amp.Integer())]


class ReadFd(amp.Command):
    """Read what the given descriptor holds, and answer with a new pipe's read end."""

    arguments = [("fd", amp.Descriptor())]
    response = [("data", amp.Bytes()), ("reply", amp.Descriptor())]


class Hooks(amp.Command):
    arguments: list[tuple[str, amp.Argument[Any]]] = []
    response = [("started", amp.Boolean())]


class Worker(amp.AMPProtocol):
    """The usual worker: every command above."""

    started = False

    async def worker_started(self) -> None:
        self.started = True
        marker = os.environ.get("POOL_TEST_STOPPED")
        if marker:
            self.marker = pathlib.Path(marker)

    def worker_stopping(self) -> None:  # a plain function works too
        marker = getattr(self, "marker", None)
        if marker is not None:
            with open(marker, "a") as file:
                file.write(f"{os.getpid()}\n")

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    @Pid.responder
    def pid(self) -> dict[str, int]:
        return {"pid": os.getpid()}

    @Sleep.responder
    @IdempotentSleep.responder
    async def sleep(self, seconds: float) -> dict[str, int]:
        await asyncio.sleep(seconds)
        return {"pid": os.getpid()}

    @Spin.responder
    def spin(self, seconds: float) -> dict[str, int]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return {"pid": os.getpid()}

    @Die.responder
    def die(self, how: str) -> dict[str, Any]:
        sys.stderr.write(f"dying by {how}\n")
        sys.stderr.flush()
        if how == "exit":
            os._exit(3)
        elif how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segv":
            ctypes.string_at(0)
        return {}

    @Say.responder
    def say(self, text: str) -> dict[str, Any]:
        print(f"out: {text}")
        print(f"err: {text}", file=sys.stderr)
        return {}

    @Env.responder
    def env(self, name: str) -> dict[str, str]:
        return {
            "value": os.environ.get(name, ""),
            "cwd": os.getcwd(),
            "path": os.pathsep.join(sys.path),
        }

    @Fail.responder
    def fail(self) -> dict[str, Any]:
        raise ValueError("nope")

    @AskParent.responder
    async def ask_parent(self, a: int, b: int) -> dict[str, int]:
        answer = await self.call_remote(Sum, a=a, b=b)
        return {"total": answer["total"]}

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, Any]:
        return {"data": data, "length": len(data)}

    @ReadFd.responder
    def read_fd(self, fd: int) -> dict[str, Any]:
        with os.fdopen(fd, "rb") as file:
            data = file.read()
        read_end, write_end = os.pipe()
        os.write(write_end, b"from " + str(os.getpid()).encode())
        os.close(write_end)
        return {"data": data, "reply": read_end}

    @Hooks.responder
    def hooks(self) -> dict[str, bool]:
        return {"started": self.started}


class IgnoresTerm(Worker):
    """A worker that ignores SIGTERM: only SIGKILL ends it."""

    async def worker_started(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BrokenAtStart(Worker):
    """A worker whose worker_started always fails."""

    async def worker_started(self) -> None:
        print("about to fail", file=sys.stderr)
        raise RuntimeError("this worker cannot start")


class FailsOnce(Worker):
    """Fails at its first start (os._exit), as long as $POOL_TEST_MARKER does not exist."""

    def worker_started(self) -> None:
        marker = pathlib.Path(os.environ["POOL_TEST_MARKER"])
        if not marker.exists():
            marker.write_text("failed once")
            os._exit(7)


class SlowStart(Worker):
    async def worker_started(self) -> None:
        await asyncio.sleep(float(os.environ.get("POOL_TEST_START_DELAY", "60")))


class DiesAfterReady(Worker):
    """Ready, then dead 50 ms later, before any call: a crash loop all the same."""

    async def worker_started(self) -> None:
        asyncio.get_running_loop().call_later(0.05, os._exit, 5)
