"""
The ``asyncio-amp`` command: call, serve, decode and proxy AMP from a shell.

``call`` sends one command and prints the answer; ``serve`` runs a user's
`AMPProtocol` subclass as a server; ``decode`` prints the boxes of a raw
AMP byte stream; ``proxy`` forwards a connection and prints every box on it.
Standard library only, like the rest of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import IO, Any, NoReturn

from ._arguments import (
    AmpList,
    Argument,
    BigBytes,
    BigString,
    Boolean,
    Bytes,
    DateTime,
    Descriptor,
    ListOf,
    String,
)
from ._cli_output import (
    BoxScanner,
    HexError,
    HexReader,
    LogWriter,
    ScannedBox,
    looks_like_hex,
    say,
)
from ._commands import Command, RawCommand
from ._errors import ConnectionLostError, ProtocolError, RemoteAmpError, TooLongError
from ._network import connect, serve
from ._protocol import AMPProtocol
from ._wire import (
    ANSWER,
    ASK,
    COMMAND,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    RESERVED_KEYS,
)

__all__ = ["main"]

PROG = "asyncio-amp"

# Exit statuses: one per kind of failure, so that scripts can tell them apart.
EXIT_OK = 0
EXIT_REMOTE_ERROR = 1  # call: the peer answered with an error; decode: malformed stream
EXIT_USAGE = 2  # bad command line, arguments, module or file (argparse's own status)
EXIT_CONNECT = 3  # could not connect (refused, unknown host, TLS handshake failed)
EXIT_TIMEOUT = 4  # no answer within --timeout
EXIT_LOST = 5  # the connection closed before the answer, or the answer was not valid AMP
EXIT_INTERRUPTED = 130  # Ctrl-C

# How much of a long value the human-readable output shows (--full shows all).
SHOW_LIMIT = 200

logger = logging.getLogger("asyncio_amp.cli")


class UsageError(Exception):
    """A mistake on the command line: reported as one line, exit status 2."""


# Showing values


def show_bytes(value: bytes, limit: int | None = SHOW_LIMIT) -> str:
    """
    Show a wire value readably: text as text, anything else as a bytes literal.

    Printable UTF-8 text is shown bare; text with control characters or edge spaces
    as a quoted ``str``; other bytes as a ``b'...'`` literal. Over ``limit``
    characters, the rest is replaced by a count of the bytes in the value.
    """
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        shown = repr(value)
    elif text and text.isprintable() and text == text.strip() and not _looks_quoted(text):
        shown = text
    else:
        shown = repr(text)
    if limit is not None and len(shown) > limit:
        shown = f"{shown[:limit]}… ({len(value):,} bytes)"
    return shown


def _looks_quoted(text: str) -> bool:
    return text[0] in "'\"" or (text[:2] in ("b'", 'b"'))


def json_bytes(value: bytes) -> Any:
    """A wire value for JSON: the text if it is UTF-8, else ``{"base64": ...}``."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


def json_value(value: Any) -> Any:
    """A decoded Python value (of any built-in AMP type) for JSON."""
    if isinstance(value, bytes):
        return json_bytes(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    return str(value)  # Decimal, Path and custom types: their text


def show_value(value: Any, limit: int | None = SHOW_LIMIT) -> str:
    """A decoded Python value for people."""
    if isinstance(value, bytes):
        return show_bytes(value, limit)
    if isinstance(value, str):
        return show_bytes(value.encode("utf-8"), limit)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list | tuple | Mapping):
        return json.dumps(json_value(value), ensure_ascii=False)
    return str(value)


def box_summary(items: Mapping[bytes, bytes]) -> tuple[str, str | None, str | None]:
    """
    Say what a box is: ``(kind, command, tag)``.

    ``kind`` is ``call``, ``call (no answer)``, ``answer``, ``error`` or ``not AMP``
    (a box with none of the keys that make it one).
    """
    tag = items.get(ANSWER)
    if tag is not None:
        return "answer", None, _text(tag)
    tag = items.get(ERROR)
    if tag is not None:
        return "error", None, _text(tag)
    command = items.get(COMMAND)
    if command is not None:
        ask = items.get(ASK)
        if ask is None:
            return "call (no answer)", _text(command), None
        return "call", _text(command), _text(ask)
    return "not AMP", None, None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def _user_fields(items: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    return {key: value for key, value in items.items() if key not in RESERVED_KEYS}


def _error_text(items: Mapping[bytes, bytes]) -> str:
    code = _text(items.get(ERROR_CODE, b"?"))
    description = show_bytes(items.get(ERROR_DESCRIPTION, b""))
    return f"{code}: {description}"


# Parsing command-line values


def parse_address(text: str, what: str, *, default_host: str | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``PORT`` alone if a host is implied)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise UsageError(f"{what} must be HOST:PORT, not {text!r}")
        host, port_text = default_host, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise UsageError(f"{what} {text!r} has no host")
        host = default_host
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"{what} {text!r}: the port must be a number") from None
    if not 0 <= port <= 65_535:
        raise UsageError(f"{what} {text!r}: the port must be 0 to 65535")
    return host, port


def split_pair(text: str) -> tuple[str, str]:
    """Split ``key=value`` at the first ``=``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"arguments are key=value, not {text!r}")
    return key, value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def parse_typed(argument: Argument[Any], text: str) -> Any:
    """
    Turn command-line text into a value of ``argument``'s type.

    Text types take the text as it is, booleans take true/false (yes/no, on/off,
    1/0), DateTime takes ISO 8601 with a UTC offset, ListOf and AmpList take JSON,
    and every other single-key type parses the text as its wire form.

    Raises:
        ValueError: The text is not a value of that type.
    """
    if isinstance(argument, String):
        return text
    if isinstance(argument, Bytes):
        return text.encode("utf-8")
    if isinstance(argument, Boolean):
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected true or false, not {text!r}")
    if isinstance(argument, DateTime):
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"expected an ISO 8601 date and time like 2026-11-26T10:30:00+00:00, not {text!r}"
            ) from None
        if moment.tzinfo is None:
            raise ValueError(f"{text!r} needs a UTC offset, like +00:00 or Z")
        return moment
    if isinstance(argument, ListOf | AmpList):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON list: {exc}") from None
        return _from_json(argument, data)
    if isinstance(argument, Descriptor):
        raise ValueError("a Descriptor (a file descriptor) cannot be given on the command line")
    if isinstance(argument, BigString):
        return text
    if isinstance(argument, BigBytes):
        return text.encode("utf-8")
    if argument.multi_key:
        raise ValueError(f"a {type(argument).__name__} value cannot be given as text")
    return argument.from_bytes(text.encode("utf-8"))


def _from_json(argument: Argument[Any], data: Any) -> Any:
    """Convert a JSON value to ``argument``'s type (elements of lists, AmpList fields)."""
    if isinstance(argument, ListOf):
        if not isinstance(data, list):
            raise ValueError(f"expected a JSON list, not {json.dumps(data)}")
        return [_from_json(argument.element, item) for item in data]
    if isinstance(argument, AmpList):
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise ValueError("expected a JSON list of objects")
        fields = {name: field for _, name, field in argument._fields}
        rows = []
        for row in data:
            converted = {}
            for name, value in row.items():
                if name not in fields:
                    raise ValueError(f"{name!r} is not a field (fields: {', '.join(fields)})")
                converted[name] = None if value is None else _from_json(fields[name], value)
            rows.append(converted)
        return rows
    if isinstance(data, str):
        return parse_typed(argument, data)
    if isinstance(data, bool):
        return parse_typed(argument, "true" if data else "false")
    if isinstance(data, int | float):
        return parse_typed(argument, json.dumps(data))
    return parse_typed(argument, json.dumps(data))


# Loading the user's code


def _import(module_name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None


def _attribute(target: Any, path: str, spec: str) -> Any:
    for part in path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"{spec}: {part!r} not found") from None
    return target


def load_commands(spec: str) -> dict[str, type[Command]]:
    """
    Import ``MODULE[:NAME]`` and return its Command classes by wire and class name.

    ``NAME`` may be one Command class, or an object (a class, a module) whose
    attributes are Command classes; without it, every Command class in the module.
    """
    module_name, _, name = spec.partition(":")
    if not module_name:
        raise UsageError(f"--commands must be MODULE or MODULE:NAME, not {spec!r}")
    target = _import(module_name)
    if name:
        target = _attribute(target, name, spec)
    if isinstance(target, type) and issubclass(target, Command):
        found = [target]
    else:
        found = [
            value
            for value in vars(target).values()
            if isinstance(value, type) and issubclass(value, Command) and value is not Command
        ]
    if not found:
        raise UsageError(f"{spec} has no Command classes")
    commands: dict[str, type[Command]] = {}
    for command in found:
        commands.setdefault(command.__name__, command)
        commands[command.wire_name.decode("utf-8", "backslashreplace")] = command
    return commands


def load_protocol(spec: str) -> type[AMPProtocol]:
    """Import ``MODULE:ProtocolClass`` and check that it is an AMPProtocol subclass."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise UsageError(f"the server must be given as MODULE:ProtocolClass, not {spec!r}")
    target = _attribute(_import(module_name), name, spec)
    if not (isinstance(target, type) and issubclass(target, AMPProtocol)):
        raise UsageError(f"{spec} is {target!r}, not an AMPProtocol subclass")
    return target


# TLS


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's TLS context from --tls, --cafile, --cert/--key and --insecure."""
    if not (args.tls or args.cafile or args.cert or args.insecure):
        return None
    try:
        context = ssl.create_default_context(cafile=args.cafile)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from --certfile, --keyfile and --cafile (client certs)."""
    if not args.certfile:
        if args.keyfile or args.cafile:
            raise UsageError("--keyfile and --cafile need --certfile")
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
        if args.cafile:
            context.load_verify_locations(args.cafile)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the TLS files: {exc}") from None
    return context


# call


def _resolve_call(
    args: argparse.Namespace,
) -> tuple[type[Command] | None, str, dict[str, Any], dict[str, str]]:
    """Work out the command and its values before connecting: mistakes exit with 2."""
    pairs = [split_pair(text) for text in args.values]
    for key, value in pairs:
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(f"{key}={value}")
                raise UsageError(f"{shown!r}: the command line is not UTF-8 text") from None
    if not args.commands:
        raw: dict[str, str] = {}
        for key, value in pairs:
            if key in raw:
                raise UsageError(f"{key!r} is given twice")
            raw[key] = value
        try:  # check the keys and sizes now, not after connecting
            RawCommand(args.command, raw, not args.no_answer)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return None, args.command, {}, raw
    commands = load_commands(args.commands)
    command = commands.get(args.command)
    if command is None:
        known = ", ".join(sorted({c.__name__ for c in commands.values()}))
        raise UsageError(f"no command {args.command!r} in {args.commands} (it has: {known})")
    by_name = command._arguments_schema.by_name
    by_key = {field.key.decode("utf-8", "replace"): field for field in by_name.values()}
    values: dict[str, Any] = {}
    for key, text in pairs:
        field = by_name.get(key) or by_key.get(key)
        if field is None:
            known = ", ".join(by_name) or "none"
            raise UsageError(f"{command.__name__} has no argument {key!r} (arguments: {known})")
        if field.name in values:
            raise UsageError(f"{key!r} is given twice")
        try:
            values[field.name] = parse_typed(field.argument, text)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise UsageError(f"{key}={text!r}: {exc}") from None
    missing = [name for name, field in by_name.items() if not field.optional and name not in values]
    if missing:
        raise UsageError(f"{command.__name__} needs {', '.join(f'{m}=...' for m in missing)}")
    if args.no_answer and command.requires_answer:
        # The same command, sent without _ask.
        command = type(
            command.__name__,
            (command,),
            {"requires_answer": False, "command_name": command.command_name},
        )
    return command, command.__name__, values, {}


async def _call(args: argparse.Namespace) -> int:
    command, name, values, raw = _resolve_call(args)
    tls = client_tls(args)
    if args.unix:
        where = args.unix
        host, port = None, None
    else:
        host, port = parse_address(args.target, "the target")
        where = f"{host}:{port}"
    out = sys.stdout
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            if args.unix:
                protocol = await connect(path=args.unix, ssl=tls)
            else:
                protocol = await connect(
                    host, port, ssl=tls, server_hostname=args.server_hostname if tls else None
                )
    except TimeoutError:
        return _fail(EXIT_TIMEOUT, f"no connection to {where} within {timeout:g} s")
    except (OSError, ssl.SSLError) as exc:
        return _fail(EXIT_CONNECT, _place_error("cannot connect to", host, where, exc))
    try:
        async with asyncio.timeout_at(deadline):
            if command is not None:
                future = protocol.call_remote(command, **values)
            else:
                future = protocol.call_remote_box(name, raw, requires_answer=not args.no_answer)
            answer = await future
            if answer is None:
                protocol.close()
                await protocol.wait_closed()
                return EXIT_OK
    except RemoteAmpError as exc:
        return _remote_error(args, name, exc.error_code, exc.description)
    except TimeoutError:
        return _fail(EXIT_TIMEOUT, f"no answer to {name} from {where} within {timeout:g} s")
    except TooLongError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (ConnectionLostError, ProtocolError) as exc:
        cause = exc.__cause__
        detail = f" ({cause})" if cause is not None and str(cause) else ""
        return _fail(EXIT_LOST, f"{exc}{detail}")
    except Exception as exc:
        # An error code the command maps to an exception class of the user's.
        code = command._error_code_for(exc) if command is not None else None
        if code is None:
            raise
        return _remote_error(args, name, code[0].decode("utf-8", "replace"), str(exc))
    finally:
        protocol.close()
    if command is None:
        shown = {_text(key): value for key, value in answer.items()}
        if args.json:
            print(json.dumps({k: json_bytes(v) for k, v in shown.items()}, ensure_ascii=False))
        else:
            for key, value in shown.items():
                print(f"{key}: {show_bytes(value, None if args.full else SHOW_LIMIT)}", file=out)
    elif args.json:
        print(json.dumps(json_value(answer), ensure_ascii=False), file=out)
    else:
        for key, value in answer.items():
            print(f"{key}: {show_value(value, None if args.full else SHOW_LIMIT)}", file=out)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1):
            await protocol.wait_closed()
    return EXIT_OK


def _remote_error(args: argparse.Namespace, name: str, code: str, description: str) -> int:
    if args.json:
        error = {"code": code, "description": description}
        print(json.dumps({"error": error}, ensure_ascii=False))
    hint = ""
    if code == "UNKNOWN" and not args.commands:
        # Often a value the server could not decode: untyped values are sent as text.
        hint = (
            " (the values were sent as text; if the server expects other types, "
            "give them with --commands MODULE)"
        )
    return _fail(EXIT_REMOTE_ERROR, f"{name} failed: {code}: {description}{hint}")


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        detail = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc))
        return f"TLS handshake failed: {detail}"
    if isinstance(exc, socket.gaierror):  # its errno is the resolver's, not errno's
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _place_error(doing: str, host: str | None, where: str, exc: BaseException) -> str:
    """Say why connecting to (or listening on) ``where`` failed: ``doing`` says which."""
    if isinstance(exc, socket.gaierror) and host is not None:
        return f"cannot resolve host {host!r}: {_os_error(exc)}"
    return f"{doing} {where}: {_os_error(exc)}"


def _fail(status: int, message: str) -> int:
    sys.stdout.flush()  # what was printed comes first, even through a pipe
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


# serve


# serve's options for the limits of AMPProtocol: (name, type, metavar, default shown).
LIMIT_OPTIONS = (
    ("max_box_size", int, "BYTES", "16 MiB"),
    ("max_keys", int, "N", "1024"),
    ("max_responders", int, "N", "100"),
    ("max_pending_calls", int, "N", "1000"),
    ("close_timeout", float, "SECONDS", "10"),
)


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The limits given on the command line, checked by AMPProtocol itself."""
    given = {name: getattr(args, name) for name, *_ in LIMIT_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    probe = AMPProtocol()
    for name, value in given.items():
        try:
            setattr(probe, name, value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--{name.replace('_', '-')}: {exc}") from None
    return given


def _logged(cls: type[AMPProtocol], live: set[AMPProtocol]) -> type[AMPProtocol]:
    """
    The user's protocol class, logging each connection at INFO.

    Each connection is in ``live`` from when it is made until it is lost, so that
    shutdown reaches every open one and a closed one is not kept.
    """

    def connection_made(self: AMPProtocol, transport: asyncio.BaseTransport) -> None:
        live.add(self)
        cls.connection_made(self, transport)
        logger.info("connection from %s", self.peer)

    def connection_lost(self: AMPProtocol, exc: Exception | None) -> None:
        live.discard(self)
        cls.connection_lost(self, exc)
        logger.info("connection from %s closed%s", self.peer, f": {exc}" if exc else "")

    namespace = {
        "connection_made": connection_made,
        "connection_lost": connection_lost,
        "__qualname__": cls.__qualname__,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (cls,), namespace)


async def _serve(args: argparse.Namespace) -> int:
    cls = load_protocol(args.app)
    tls = server_tls(args)
    limits = _limits(args)
    live: set[AMPProtocol] = set()
    factory = _logged(cls, live)
    try:
        if args.unix:
            server = await serve(factory, path=args.unix, ssl=tls, **limits)
            where = args.unix
        else:
            server = await serve(factory, args.host, args.port, ssl=tls, **limits)
            where = ", ".join(_format_sockname(s.getsockname()) for s in server.sockets)
    except OSError as exc:
        target = args.unix or f"{args.host}:{args.port}"
        host = None if args.unix else args.host
        return _fail(EXIT_CONNECT, _place_error("cannot listen on", host, target, exc))
    scheme = " with TLS" if tls else ""
    logger.info("serving %s on %s%s (press Ctrl-C to stop)", args.app, where, scheme)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        stop.clear()
        still_open = [protocol for protocol in live if not protocol.closed]
        logger.info(
            "shutting down: %d open connection%s, grace period %g s (Ctrl-C again to stop now)",
            len(still_open),
            "" if len(still_open) == 1 else "s",
            args.grace,
        )
        # Every connection shuts down through shutdown(grace), at once.
        server.close(grace=args.grace)
        shutdowns = asyncio.ensure_future(server.wait_closed())
        interrupt = asyncio.ensure_future(stop.wait())
        waiters: set[asyncio.Future[Any]] = {shutdowns, interrupt}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not shutdowns.done():
            logger.info("stopping now")
            server.abort_clients()
            await shutdowns
        interrupt.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, args.grace)):
                await server.wait_closed()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if args.unix:
            with contextlib.suppress(OSError):
                os.unlink(args.unix)
    logger.info("stopped")
    return EXIT_OK


def _format_sockname(name: Any) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else name[0]
        return f"{host}:{name[1]}"
    return str(name)


# decode


# How much of one box decode and proxy keep to show it (its keys and values, each pair
# counted with its cost as Python objects): past this, a box is "too big to show" and
# skipped to its end, so that memory stays bounded whatever the input.
DECODE_SHOW_LIMIT = 4 << 20
PROXY_SHOW_LIMIT = 1 << 20

# decode reads its input in pieces of this size.
READ_SIZE = 1 << 16


def parse_hex(text: str) -> bytes:
    """
    Read a hex dump: plain hex digits (spaces, newlines, colons and ``0x`` ignored),
    or the output of ``xxd`` or ``hexdump -C`` (offsets and text columns dropped).

    Raises:
        UsageError: The text is not hex.
    """
    reader = HexReader()
    try:
        return b"".join(reader.feed(text) + reader.end())
    except HexError as exc:
        raise UsageError(str(exc)) from None


def _chunks(source: str, binary_stdin: IO[bytes]) -> Iterator[bytes]:
    """The input of decode, in pieces as they can be read."""
    if source == "-":
        stream: IO[bytes] = binary_stdin
        close = False
    else:
        try:
            stream = open(source, "rb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {_os_error(exc)}") from None
        close = True
    try:
        read = getattr(stream, "read1", stream.read)
        while chunk := read(READ_SIZE):
            yield chunk
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {_os_error(exc)}") from None
    finally:
        if close:
            stream.close()


def _hex_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The bytes of a hex dump read in pieces."""
    reader = HexReader()
    text = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        for chunk in chunks:
            yield from reader.feed(text.decode(chunk))
        yield from reader.feed(text.decode(b"", final=True))
        yield from reader.end()
    except HexError as exc:
        raise UsageError(str(exc)) from None


def _box_header(box: ScannedBox) -> str:
    items = dict(box.items)
    kind, command, tag = box_summary(items)
    head = f"box {box.number} at byte {box.offset} ({box.length} bytes): {kind}"
    if command is not None:
        head += f" {command}"
    if tag is not None:
        head += f", tag {tag}"
    if kind == "error":
        head += f": {_error_text(items)}"
    if box.too_big:
        head += f" (too big to show: {box.keys:,} keys)"
    return head


def _box_json(box: ScannedBox) -> dict[str, Any]:
    items = dict(box.items)
    kind, command, tag = box_summary(items)
    record: dict[str, Any] = {
        "box": box.number,
        "offset": box.offset,
        "length": box.length,
        "kind": kind,
        "command": command,
        "tag": tag,
        "fields": {_text(key): json_bytes(value) for key, value in box.items},
    }
    if box.too_big:
        record["too_big"] = True
        record["keys"] = box.keys
    if len(items) != len(box.items):
        counts = collections.Counter(key for key, _ in box.items)
        record["duplicate_keys"] = sorted(_text(k) for k, n in counts.items() if n > 1)
    return record


def _print_box(box: ScannedBox, args: argparse.Namespace, out: IO[str]) -> None:
    if args.json:
        print(json.dumps(_box_json(box), ensure_ascii=False), file=out)
        return
    if box.number > 1:
        print(file=out)
    print(_box_header(box), file=out)
    limit = None if args.full else SHOW_LIMIT
    seen: set[bytes] = set()
    for key, value in box.items:
        note = "  (again: the last one counts)" if key in seen else ""
        seen.add(key)
        print(f"  {show_bytes(key)}: {show_bytes(value, limit)}{note}", file=out)


def _decode(args: argparse.Namespace, stdin: IO[bytes], out: IO[str]) -> int:
    chunks = _chunks(args.file, stdin)
    if args.hex:
        chunks = _hex_chunks(chunks)
    scanner = BoxScanner(show_limit=DECODE_SHOW_LIMIT)
    first = b""
    size = 0
    for chunk in chunks:
        if len(first) < 4096:
            first += chunk[: 4096 - len(first)]
        size += len(chunk)
        for box in scanner.feed(chunk):
            if box.complete:
                _print_box(box, args, out)
        out.flush()  # each box as soon as it is whole
        if scanner.error is not None:
            break
    problem = scanner.end()
    out.flush()
    if problem is not None:
        if not args.hex and looks_like_hex(first):
            problem += "; the input looks like a hex dump: try --hex"
        return _fail(EXIT_REMOTE_ERROR, f"malformed AMP stream: {problem}")
    if not size:
        print(f"{PROG}: the input is empty", file=sys.stderr)
    return EXIT_OK


# proxy

# How many bytes of log lines may wait for a slow reader of the proxy's output;
# past this, lines are dropped (and counted) rather than holding up forwarding.
LOG_QUEUE_LIMIT = 1 << 20
# At shutdown, how long the log may take to go out, and how long a connection's
# unsent bytes may take before it is cut.
LOG_FLUSH_TIMEOUT = 1.0
CLOSE_TIMEOUT = 5.0


class _ProxyLog:
    """Prints the boxes of proxied connections, pairing each answer with its call."""

    def __init__(self, write: Callable[[str], None], *, as_json: bool, full: bool) -> None:
        self.write = write
        self.as_json = as_json
        self.limit = None if full else 80
        # (connection, direction of the call) -> tag -> (time sent, command)
        self.calls: dict[tuple[int, str], dict[bytes, tuple[float, str]]] = {}

    def forget(self, conn: int) -> None:
        """Drop what is kept of a closed connection's unanswered calls."""
        for direction in ("C->S", "S->C"):
            self.calls.pop((conn, direction), None)

    def event(self, conn: int, text: str, **fields: Any) -> None:
        now = time.time()
        if self.as_json:
            record = {"time": _iso(now), "conn": conn, "event": text, **fields}
            self.write(json.dumps(record, ensure_ascii=False))
        else:
            self.write(f"{_clock(now)} #{conn} {text}")

    def box(
        self, conn: int, direction: str, items: Mapping[bytes, bytes], *, too_big: int = 0
    ) -> None:
        """Log one box; ``too_big``: it was too big to show, and had this many keys."""
        now = time.time()
        moment = time.monotonic()
        kind, command, tag_text = box_summary(items)
        reverse = "S->C" if direction == "C->S" else "C->S"
        latency = None
        if kind == "call" and tag_text is not None:
            assert command is not None
            self.calls.setdefault((conn, direction), {})[items[ASK]] = (moment, command)
        elif kind in ("answer", "error"):
            tag = items[ANSWER] if kind == "answer" else items[ERROR]
            sent = self.calls.get((conn, reverse), {}).pop(tag, None)
            if sent is not None:
                latency = (moment - sent[0]) * 1000
                command = sent[1]
        fields = _user_fields(items)
        if self.as_json:
            record: dict[str, Any] = {
                "time": _iso(now),
                "conn": conn,
                "direction": direction,
                "kind": kind,
                "command": command,
                "tag": tag_text,
            }
            if kind in ("answer", "error"):
                record["latency_ms"] = None if latency is None else round(latency, 3)
            if kind == "error":
                record["error_code"] = _text(items.get(ERROR_CODE, b""))
                record["error_description"] = _text(items.get(ERROR_DESCRIPTION, b""))
            record["fields"] = {_text(k): json_bytes(v) for k, v in fields.items()}
            if too_big:
                record["too_big"] = True
                record["keys"] = too_big
            self.write(json.dumps(record, ensure_ascii=False))
            return
        parts = [_clock(now), f"#{conn}", direction, kind]
        if kind.startswith("call"):
            parts.append(command or "?")
        if tag_text is not None:
            parts.append(f"tag={tag_text}")
        if kind in ("answer", "error"):
            if latency is None:
                parts.append("(no call with this tag seen)")
            else:
                parts.append(f"{command} {latency:.3f} ms")
        if kind == "error":
            parts.append(_error_text(items))
        if too_big:
            parts.append(f"(too big to show: {too_big:,} keys)")
        else:
            parts.extend(
                f"{show_bytes(key)}={show_bytes(value, self.limit)}"
                for key, value in fields.items()
            )
        self.write(" ".join(parts))


def _clock(now: float) -> str:
    return datetime.datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")


def _iso(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat()


async def _pump(
    conn: int,
    direction: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    log: _ProxyLog,
) -> None:
    """Forward bytes from ``reader`` to ``writer`` unchanged, printing the boxes they hold."""
    # No limits on what passes: a proxy shows what passes, it does not police it.
    # Only what is kept to show a box is bounded (PROXY_SHOW_LIMIT).
    scanner = BoxScanner(show_limit=PROXY_SHOW_LIMIT)
    parsing = True
    while True:
        data = await reader.read(256 * 1024)
        if not data:
            break
        writer.write(data)
        if parsing:
            for box in scanner.feed(data):
                if not box.complete:
                    log.event(
                        conn,
                        f"{direction} box too big to show (box {box.number} at byte "
                        f"{box.offset}): skipping to its end",
                        direction=direction,
                        box=box.number,
                    )
                else:
                    too_big = box.keys if box.too_big else 0
                    log.box(conn, direction, dict(box.items), too_big=too_big)
            if scanner.error is not None:
                parsing = False
                log.event(
                    conn,
                    f"{direction} malformed AMP, forwarding the rest unparsed: {scanner.error}",
                    direction=direction,
                    error=scanner.error,
                )
        await writer.drain()
    if parsing:
        problem = scanner.end()
        if problem is not None:
            log.event(conn, f"{direction} {problem}", direction=direction, error=problem)
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _proxy_connection(
    conn: int,
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    log: _ProxyLog,
) -> None:
    peer = _format_sockname(client_writer.get_extra_info("peername"))
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        error = _place_error("cannot connect to", target[0], f"{target[0]}:{target[1]}", exc)
        log.event(conn, f"from {peer}: {error}", peer=peer, error=_os_error(exc))
        client_writer.transport.abort()
        return
    except asyncio.CancelledError:
        client_writer.transport.abort()
        raise
    log.event(conn, f"open {peer} -> {target[0]}:{target[1]}", peer=peer)
    pumps = [
        asyncio.ensure_future(_pump(conn, "C->S", client_reader, server_writer, log)),
        asyncio.ensure_future(_pump(conn, "S->C", server_reader, client_writer, log)),
    ]
    reason = ""
    cut = False
    try:
        pending: set[asyncio.Future[None]] = set(pumps)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [task for task in done if task.exception() is not None]
            if failed:
                reason = f": {_os_error(failed[0].exception())}"  # type: ignore[arg-type]
                break
    except asyncio.CancelledError:
        cut = True  # the proxy is stopping
        raise
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        writers = (client_writer, server_writer)
        for writer in writers:
            if reason or cut:
                writer.transport.abort()
            else:
                writer.close()
        if not (reason or cut):
            # Unsent bytes get CLOSE_TIMEOUT to go out (a peer may not read).
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    for writer in writers:
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
            except TimeoutError:
                for writer in writers:
                    writer.transport.abort()
        log.forget(conn)
        if cut:
            log.event(conn, "closed: the proxy is stopping", error="the proxy is stopping")
    log.event(conn, f"closed{reason}", **({"error": reason[2:]} if reason else {}))


def _proxy_output(as_json: bool, full: bool) -> tuple[_ProxyLog, LogWriter]:
    """The proxy's log, written to standard output without ever holding up forwarding."""
    sys.stdout.flush()

    def closed(reason: str) -> None:
        say(f"{PROG} proxy: {reason}: no more log lines; still forwarding")

    writer = LogWriter(sys.stdout.fileno(), limit=LOG_QUEUE_LIMIT, on_closed=closed)
    return _ProxyLog(writer.write, as_json=as_json, full=full), writer


async def _proxy(args: argparse.Namespace) -> int:
    listen = parse_address(args.listen, "LISTEN", default_host="127.0.0.1")
    target = parse_address(args.target, "TARGET")
    count = 0
    # Each connection runs as a task of its own, apart from the one asyncio gives the
    # accept callback: cancelling that one makes asyncio log a traceback.
    connections: set[asyncio.Task[None]] = set()
    logs: list[_ProxyLog] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        task = asyncio.ensure_future(_proxy_connection(count, reader, writer, target, logs[0]))
        connections.add(task)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            connections.discard(task)

    try:
        server = await asyncio.start_server(accept, *listen)
    except OSError as exc:
        where = f"{listen[0]}:{listen[1]}"
        return _fail(EXIT_CONNECT, _place_error("cannot listen on", listen[0], where, exc))
    # No connection is handled before the next await: the log is there in time.
    log, output = _proxy_output(args.json, args.full)
    logs.append(log)
    where = ", ".join(_format_sockname(s.getsockname()) for s in server.sockets)
    say(f"{PROG} proxy: listening on {where}, forwarding to {target[0]}:{target[1]}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.close()
        for task in list(connections):
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await server.wait_closed()
        await asyncio.to_thread(output.close, LOG_FLUSH_TIMEOUT)
    say(f"{PROG} proxy: stopped")
    return EXIT_OK


# The command line


def _port_number(text: str) -> int:
    """argparse's type for a TCP port: 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the port must be a number, not {text!r}") from None
    if not 0 <= port <= 65_535:
        raise argparse.ArgumentTypeError(f"the port must be 0 to 65535, not {port}")
    return port


def _seconds(text: str) -> float:
    """argparse's type for a duration: a number of seconds, 0 or more."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, not {text!r}")
    return seconds


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


CALL_EXAMPLES = """\
examples:
  asyncio-amp call 127.0.0.1:7000 Sum a=13 b=81
  asyncio-amp call 127.0.0.1:7000 Sum a=13 b=81 --commands myapp.commands
  asyncio-amp call 127.0.0.1:7000 Divide numerator=1 denominator=0 --commands myapp --json
  asyncio-amp call --unix /run/app.sock Notify message=hello --no-answer
  asyncio-amp call example.com:7443 Ping --tls --cafile ca.pem

Without --commands every value is sent as UTF-8 text and the answer is shown as
it came (text as text, other bytes as b'...'). With --commands the values are
checked and converted by the command's argument types: Integer, Float and
Decimal take numbers, Boolean true/false, DateTime ISO 8601 with an offset,
ListOf and AmpList JSON, text and bytes types the text as it is.

exit status:
  0  the answer came (or, with --no-answer, the call was sent)
  1  the peer answered with an error (its code and description are printed)
  2  bad command line or arguments
  3  could not connect (refused, unknown host, TLS failure)
  4  timed out
  5  the connection closed before the answer came, or the answer was not valid
"""

SERVE_EXAMPLES = """\
examples:
  asyncio-amp serve myapp.server:Calculator --port 7000
  asyncio-amp serve myapp.server:Calculator --host 0.0.0.0 --port 7000 -v
  asyncio-amp serve myapp.server:Calculator --unix /run/app.sock
  asyncio-amp serve myapp.server:Calculator --port 7443 --certfile cert.pem --keyfile key.pem

The current directory is on the import path. Each connection is logged at INFO,
every box at DEBUG (-v). SIGINT (Ctrl-C) or SIGTERM stops accepting, refuses new
calls with SHUTDOWN, and lets running responders finish for --grace seconds;
a second Ctrl-C stops at once.
"""

DECODE_EXAMPLES = """\
examples:
  asyncio-amp decode capture.bin
  asyncio-amp decode --hex dump.txt
  xxd capture.bin | asyncio-amp decode --hex
  printf '00045f61736b0001310008...' | asyncio-amp decode --hex --json

The input is a raw AMP byte stream (one direction of a connection), or with
--hex a hex dump: plain hex digits (xxd -p), or the output of xxd or hexdump -C.
Each box is printed as a block of key: value lines as soon as it is read; a box
over 4 MiB is shown as too big, without its fields. A malformed stream prints
the boxes before the break, then where it breaks and why, and exits with status 1.
"""

PROXY_EXAMPLES = """\
examples:
  asyncio-amp proxy 7001 127.0.0.1:7000
  asyncio-amp proxy 127.0.0.1:7001 backend.internal:7000 --json > traffic.jsonl

Clients connect to LISTEN; each connection is forwarded to TARGET byte for byte.
Every box is printed with the time, the connection number, its direction (C->S
from the client, S->C from the server), its kind and tag; answers name their call
and its latency. A malformed stream is still forwarded unchanged, and said so.
The log never holds up forwarding: a box over 1 MiB is shown without its fields,
lines a slow reader cannot take are dropped (and counted), and if the reader goes
away the proxy goes on forwarding without a log.
"""


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
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    call = sub.add_parser(
        "call",
        help="call a command on a server and print the answer",
        description="Call one AMP command and print its answer.",
        usage=f"{PROG} call [options] (HOST:PORT | --unix PATH) COMMAND [key=value ...]",
        epilog=CALL_EXAMPLES,
        formatter_class=_Formatter,
    )
    call.add_argument(
        "words", nargs="+", metavar="HOST:PORT COMMAND key=value", help=argparse.SUPPRESS
    )
    call.add_argument(
        "--commands",
        metavar="MODULE[:NAME]",
        help="import Command classes from MODULE (or MODULE:NAME) to type the values and answer",
    )
    call.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    call.add_argument(
        "--no-answer", action="store_true", help="send the call without _ask and exit once sent"
    )
    call.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up after this long, connecting included (default 10; 0: wait forever)",
    )
    call.add_argument("--full", action="store_true", help="show long values whole")
    call.add_argument("--unix", metavar="PATH", help="connect to a UNIX socket instead of TCP")
    tls = call.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="connect with TLS")
    tls.add_argument("--cafile", metavar="FILE", help="trust this CA bundle (implies --tls)")
    tls.add_argument("--cert", metavar="FILE", help="client certificate (PEM, implies --tls)")
    tls.add_argument("--key", metavar="FILE", help="the client certificate's key, if separate")
    tls.add_argument(
        "--server-hostname", metavar="NAME", help="the name to check in the server's certificate"
    )
    tls.add_argument(
        "--insecure", action="store_true", help="do not check the server's certificate"
    )

    serve_parser = sub.add_parser(
        "serve",
        help="run an AMPProtocol subclass as a server",
        description="Run an AMP server from MODULE:ProtocolClass, an AMPProtocol subclass.",
        epilog=SERVE_EXAMPLES,
        formatter_class=_Formatter,
    )
    serve_parser.add_argument("app", metavar="MODULE:ProtocolClass")
    serve_parser.add_argument(
        "--host", default="127.0.0.1", help="the interface to listen on (default 127.0.0.1)"
    )
    serve_parser.add_argument(
        "--port",
        type=_port_number,
        default=7000,
        help="the TCP port (default 7000; 0: any free port)",
    )
    serve_parser.add_argument("--unix", metavar="PATH", help="listen on a UNIX socket instead")
    serve_parser.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="how long running responders may take to finish at shutdown (default 10)",
    )
    serve_parser.add_argument("--certfile", metavar="FILE", help="serve TLS with this certificate")
    serve_parser.add_argument("--keyfile", metavar="FILE", help="the certificate's key")
    serve_parser.add_argument(
        "--cafile", metavar="FILE", help="require client certificates signed by this CA"
    )
    serve_parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (pip install 'asyncio-amp[uvloop]')"
    )
    limits = serve_parser.add_argument_group("limits (per connection; see AMPProtocol)")
    for name, kind, metavar, default in LIMIT_OPTIONS:
        limits.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            metavar=metavar,
            help=f"default {default}",
        )
    serve_parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every box sent and received (DEBUG)"
    )
    serve_parser.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only"
    )

    decode = sub.add_parser(
        "decode",
        help="print the boxes of a raw AMP byte stream",
        description="Print the boxes of a raw AMP byte stream (a capture, a hex dump).",
        epilog=DECODE_EXAMPLES,
        formatter_class=_Formatter,
    )
    decode.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the input (default: standard input)"
    )
    decode.add_argument("--hex", action="store_true", help="the input is a hex dump")
    decode.add_argument("--json", action="store_true", help="print one JSON object per box")
    decode.add_argument("--full", action="store_true", help="show long values whole")

    proxy = sub.add_parser(
        "proxy",
        help="forward connections and print every box both ways",
        description="A logging man-in-the-middle: forward each connection to TARGET "
        "and print every box in both directions.",
        epilog=PROXY_EXAMPLES,
        formatter_class=_Formatter,
    )
    proxy.add_argument(
        "listen", metavar="LISTEN", help="[HOST:]PORT to listen on (default host 127.0.0.1)"
    )
    proxy.add_argument("target", metavar="TARGET", help="HOST:PORT of the server")
    proxy.add_argument("--json", action="store_true", help="print one JSON object per line")
    proxy.add_argument(
        "--uvloop", action="store_true", help="run on uvloop (pip install 'asyncio-amp[uvloop]')"
    )
    proxy.add_argument("--full", action="store_true", help="show long values whole")
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)  # pragma: no cover - the parser is ours


def _call_words(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Split call's words into the target, the command name and its key=value pairs."""
    parser = _subparser(parser, "call")
    words: list[str] = list(args.words)
    if args.unix is None:
        if len(words) < 2:
            _usage(parser, "call needs HOST:PORT and COMMAND (or --unix PATH and COMMAND)")
        args.target = words.pop(0)
    else:
        args.target = None
    args.command = words.pop(0)
    if "=" in args.command:
        _usage(parser, f"the command name comes before the arguments, not {args.command!r}")
    args.values = words


def _usage(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)


def _configure_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%H:%M:%S")
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
            _call_words(args, parser)
            _configure_logging(logging.ERROR)
            return asyncio.run(_call(args))
        if args.subcommand == "serve":
            level = (
                logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
            )
            _configure_logging(level)
            return _run(_serve(args), uvloop=args.uvloop)
        if args.subcommand == "decode":
            return _decode(args, sys.stdin.buffer, sys.stdout)
        _configure_logging(logging.WARNING)
        return _run(_proxy(args), uvloop=args.uvloop)
    except UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): stop quietly.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_OK
