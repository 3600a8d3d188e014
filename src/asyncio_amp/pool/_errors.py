"""The exceptions of the process pool."""

from __future__ import annotations

from .._errors import AmpError

__all__ = ["PoolClosedError", "WorkerCrashedError"]


class WorkerCrashedError(AmpError):
    """
    The worker process that ran a call died, or was killed, before answering it.

    It is raised for the calls a worker had in flight when it crashed (SIGKILL,
    ``os._exit``, a segfault, the OOM killer...), for the other calls of a worker
    killed because one of its calls was cancelled or timed out, and for the
    calls that waited while workers kept dying at start (a crash loop).

    Attributes:
        pid: The worker's process id, or ``None`` if none was started.
        returncode: The worker's exit status as ``subprocess`` gives it: negative
            for a signal (``-9`` is SIGKILL), ``None`` if it had not exited.
        output: The last lines the worker wrote to its stdout and stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.returncode = returncode
        self.output = output


class PoolClosedError(AmpError):
    """
    The pool is closed, or closing: it takes no new call.

    Also raised for the calls still waiting in the queue when
    [`ProcessPool.close`][asyncio_amp.pool.ProcessPool.close] is called, and for
    the running calls that the end of its grace period cuts short.
    """
