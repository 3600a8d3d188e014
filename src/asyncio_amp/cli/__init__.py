"""
The ``asyncio-amp`` command: call, serve, decode, proxy and ping AMP from a shell.

``call`` sends one command and prints the answer; ``serve`` runs a user's
`AMPProtocol` subclass as a server; ``decode`` prints the boxes of a raw
AMP byte stream; ``proxy`` forwards a connection and prints every box on it;
``ping`` sends heartbeats and prints their round-trip times.
Each subcommand is a module of this package that adds its own options to the
parser built here. Standard library only, like the rest of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import _supervisor, call, decode, ping, proxy, serve
from ._common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, Formatter, UsageError, fail

__all__ = ["main"]


def _version() -> str:
    try:
        return importlib.metadata.version("asyncio-amp")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncio-amp`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk AMP (the Asynchronous Messaging Protocol) from the command line.",
        epilog="Run 'asyncio-amp COMMAND --help' for the options and examples of each command.",
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for subcommand in (call, serve, decode, proxy, ping):
        subcommand.add_parser(subparsers)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)  # pragma: no cover - the parser is ours


def _configure_logging(level: int, *, pid: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    where = " [%(process)d]" if pid else ""  # serve --workers: which process says it
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s.%(msecs)03d{where} %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("asyncio_amp")
    root.addHandler(handler)
    root.setLevel(level)


def _run(main: Coroutine[Any, Any, int], *, uvloop: bool) -> int:
    """Run ``main`` on a new asyncio loop, or a uvloop one."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if uvloop:
        try:
            module = importlib.import_module("uvloop")
        except ImportError:
            main.close()
            raise UsageError("--uvloop needs uvloop: pip install 'asyncio-amp[uvloop]'") from None
        factory = module.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncio-amp`` command; return its exit status."""
    parser = build_parser()
    # Options may come between call's words: argparse hands the later words back.
    args, extra = parser.parse_known_args(argv)
    options = [word for word in extra if word.startswith("-")]
    if options or (extra and args.subcommand != "call"):
        _subparser(parser, args.subcommand).error(
            f"unrecognized arguments: {' '.join(options or extra)}"
        )
    if extra:
        args.words += extra
    try:
        if args.subcommand == "call":
            call.split_words(args, _subparser(parser, "call"))
            _configure_logging(logging.ERROR)
            return asyncio.run(call.run(args))
        if args.subcommand == "serve":
            level = (
                logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
            )
            _configure_logging(level, pid=bool(args.workers or args.supervisor_fd is not None))
            if args.workers:
                parser = _subparser(parser, "serve")
                return _run(_supervisor.run(args, parser), uvloop=False)
            return _run(serve.run(args), uvloop=args.uvloop)
        if args.subcommand == "decode":
            return decode.run(args, sys.stdin.buffer, sys.stdout)
        if args.subcommand == "ping":
            _configure_logging(logging.ERROR)
            return asyncio.run(ping.run(args))
        _configure_logging(logging.WARNING)
        return _run(proxy.run(args), uvloop=args.uvloop)
    except UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): stop quietly.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
