"""
``asyncio-amp call``: send one command to a server and print its answer.

Without ``--commands`` the values go as UTF-8 text and the answer is shown as it
came; with it, the command's argument types check and convert both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import ssl
import sys
from typing import Any

from .._arguments import (
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
from .._commands import Command, RawCommand
from .._errors import ConnectionLostError, ProtocolError, RemoteAmpError, TooLongError
from .._network import connect
from ._common import (
    EXIT_CONNECT,
    EXIT_LOST,
    EXIT_OK,
    EXIT_REMOTE_ERROR,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    PROG,
    SHOW_LIMIT,
    Formatter,
    UsageError,
    add_client_tls_options,
    client_tls,
    fail,
    import_user_module,
    json_bytes,
    json_value,
    parse_address,
    place_error,
    seconds,
    show_bytes,
    show_value,
    user_attribute,
    wire_text,
)

__all__: list[str] = []

EXAMPLES = """\
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


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``call`` and its options to the command's subparsers."""
    parser = subparsers.add_parser(
        "call",
        help="call a command on a server and print the answer",
        description="Call one AMP command and print its answer.",
        usage=f"{PROG} call [options] (HOST:PORT | --unix PATH) COMMAND [key=value ...]",
        epilog=EXAMPLES,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "words", nargs="+", metavar="HOST:PORT COMMAND key=value", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--commands",
        metavar="MODULE[:NAME]",
        help="import Command classes from MODULE (or MODULE:NAME) to type the values and answer",
    )
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    parser.add_argument(
        "--no-answer", action="store_true", help="send the call without _ask and exit once sent"
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up after this long, connecting included (default 10; 0: wait forever)",
    )
    parser.add_argument("--full", action="store_true", help="show long values whole")
    parser.add_argument("--unix", metavar="PATH", help="connect to a UNIX socket instead of TCP")
    add_client_tls_options(parser)
    return parser


def split_words(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Split call's words into the target, the command name and its key=value pairs."""
    words: list[str] = list(args.words)
    if args.unix is None:
        if len(words) < 2:
            parser.error("call needs HOST:PORT and COMMAND (or --unix PATH and COMMAND)")
        args.target = words.pop(0)
    else:
        args.target = None
    args.command = words.pop(0)
    if "=" in args.command:
        parser.error(f"the command name comes before the arguments, not {args.command!r}")
    args.values = words


# Values from the command line


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


# Typed commands


def load_commands(spec: str) -> dict[str, type[Command]]:
    """
    Import ``MODULE[:NAME]`` and return its Command classes by wire and class name.

    ``NAME`` may be one Command class, or an object (a class, a module) whose
    attributes are Command classes; without it, every Command class in the module.
    """
    module_name, _, name = spec.partition(":")
    if not module_name:
        raise UsageError(f"--commands must be MODULE or MODULE:NAME, not {spec!r}")
    target = import_user_module(module_name)
    if name:
        target = user_attribute(target, name, spec)
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


# Calling


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


async def run(args: argparse.Namespace) -> int:
    """Make the call ``args`` describe and print its answer; return the exit status."""
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
        return fail(EXIT_TIMEOUT, f"no connection to {where} within {timeout:g} s")
    except (OSError, ssl.SSLError) as exc:
        return fail(EXIT_CONNECT, place_error("cannot connect to", host, where, exc))
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
        return fail(EXIT_TIMEOUT, f"no answer to {name} from {where} within {timeout:g} s")
    except TooLongError as exc:
        return fail(EXIT_USAGE, str(exc))
    except (ConnectionLostError, ProtocolError) as exc:
        cause = exc.__cause__
        detail = f" ({cause})" if cause is not None and str(cause) else ""
        return fail(EXIT_LOST, f"{exc}{detail}")
    except Exception as exc:
        # An error code the command maps to an exception class of the user's.
        code = command._error_code_for(exc) if command is not None else None
        if code is None:
            raise
        return _remote_error(args, name, code[0].decode("utf-8", "replace"), str(exc))
    finally:
        protocol.close()
    if command is None:
        shown = {wire_text(key): value for key, value in answer.items()}
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
    return fail(EXIT_REMOTE_ERROR, f"{name} failed: {code}: {description}{hint}")
