"""The pool's options: checked values, and the worker's command line and environment."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping

from .._protocol import AMPProtocol

__all__: list[str] = []


def worker_target(worker: type[AMPProtocol] | str) -> tuple[str, str | None]:
    """The ``module:Class`` a worker runs, and the parent's script if it lives there."""
    if isinstance(worker, str):
        module, colon, qualname = worker.partition(":")
        if not colon or not module or not qualname:
            raise ValueError(f"worker must be 'module:Class', not {worker!r}")
        target = worker
    elif isinstance(worker, type) and issubclass(worker, AMPProtocol):
        module, qualname = worker.__module__, worker.__qualname__
        if "<locals>" in qualname:
            raise ValueError(f"{qualname} is defined in a function: a worker must be importable")
        target = f"{module}:{qualname}"
    else:
        raise TypeError(f"worker must be an AMPProtocol subclass or 'module:Class', not {worker!r}")
    main = None
    if module in ("__main__", "__mp_main__"):
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        target = f"__main__:{qualname}"
    return target, main


def argv(target: str, main: str | None, sys_path: list[str], fd: int) -> list[str]:
    """The command line of a worker (see ``_child``) whose socket is descriptor ``fd``."""
    command = [sys.executable, "-m", "asyncio_amp.pool", target]
    command += ["--fd", str(fd), "--parent", str(os.getpid())]
    for entry in sys_path:
        command += ["--path", entry]
    for entry in sys.path:
        if entry:
            command += ["--parent-path", os.path.abspath(entry)]
    if main is not None:
        command += ["--main", os.path.abspath(main)]
    return command


def environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The workers' environment: the parent's, updated with ``extra``."""
    env = dict(os.environ)
    if extra:
        env.update(extra)
    # This package must be importable by `python -m asyncio_amp.pool`, even
    # when the parent found it through its own sys.path.
    root = str(pathlib.Path(__file__).resolve().parent.parent.parent)
    paths = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root + (os.pathsep + paths if paths else "")
    return env


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


def seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, not {value!r}")
    return float(value)
