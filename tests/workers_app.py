"""
An AMP application for the tests of ``asyncio-amp serve --workers N``.

Each answer says which worker process gave it. ``Hold`` tells the caller, with
a ``Started`` call back, that its responder runs, then sleeps: a call known to be
in flight; ``Block`` does the same, then blocks the worker's event loop. Importing this module fails in a process whose parent is not the
process named by ``AMP_TEST_ONLY_CHILD_OF`` (when it is set): a supervisor
started by the test loads it, and its workers crash at start.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import asyncio_amp as amp

_parent = os.environ.get("AMP_TEST_ONLY_CHILD_OF")
if _parent is not None and os.getppid() != int(_parent):
    print("workers_app: crashing at start, as the test asked", file=sys.stderr)
    sys.exit(3)


class Pid(amp.Command):
    response = [("pid", amp.Integer())]


class Started(amp.Command):
    arguments = [("pid", amp.Integer())]
    requires_answer = False


class Hold(amp.Command):
    arguments = [("seconds", amp.Float())]
    response = [("pid", amp.Integer())]


class Block(amp.Command):
    """Block the worker's event loop: a worker that cannot even see SIGTERM."""

    arguments = [("seconds", amp.Float())]
    requires_answer = False


class Server(amp.AMPProtocol):
    """The server: ``asyncio-amp serve workers_app:Server --workers N``."""

    @Pid.responder
    def pid(self) -> dict[str, int]:
        return {"pid": os.getpid()}

    @Hold.responder
    async def hold(self, seconds: float) -> dict[str, int]:
        await self.call_remote(Started, pid=os.getpid())
        await asyncio.sleep(seconds)
        return {"pid": os.getpid()}

    @Block.responder
    async def block(self, seconds: float) -> None:
        await self.call_remote(Started, pid=os.getpid())
        await asyncio.sleep(0)  # the call above is written on this turn of the loop
        time.sleep(seconds)  # noqa: ASYNC251  # blocking the loop is the point
