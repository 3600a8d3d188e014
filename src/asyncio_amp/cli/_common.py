"""
What the subcommands of the ``asyncio-amp`` command share: exit statuses, usage
errors, showing wire values, addresses, loading the user's code, and one-line
error messages.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import importlib
import json
import math
import os
import re
import socket
import ssl
import sys
from collections.abc import Mapping
from typing import Any

from .._wire import ANSWER, ASK, COMMAND, ERROR, ERROR_CODE, ERROR_DESCRIPTION, RESERVED_KEYS

__all__: list[str] = []

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
        return "answer", None, wire_text(tag)
    tag = items.get(ERROR)
    if tag is not None:
        return "error", None, wire_text(tag)
    command = items.get(COMMAND)
    if command is not None:
        ask = items.get(ASK)
        if ask is None:
            return "call (no answer)", wire_text(command), None
        return "call", wire_text(command), wire_text(ask)
    return "not AMP", None, None


def wire_text(value: bytes) -> str:
    """A wire key or name as text, undecodable bytes escaped."""
    return value.decode("utf-8", "backslashreplace")


def user_fields(items: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """The pairs of a box other than the reserved ``_command``, ``_ask``... keys."""
    return {key: value for key, value in items.items() if key not in RESERVED_KEYS}


def error_text(items: Mapping[bytes, bytes]) -> str:
    """``CODE: description`` of an error box."""
    code = wire_text(items.get(ERROR_CODE, b"?"))
    description = show_bytes(items.get(ERROR_DESCRIPTION, b""))
    return f"{code}: {description}"


# Addresses


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


# Loading the user's code


def import_user_module(module_name: str) -> Any:
    """Import a module of the user's, the current directory on the path."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise UsageError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None


def user_attribute(target: Any, path: str, spec: str) -> Any:
    """Follow the dotted ``path`` of attributes from ``target`` (``spec`` names it in errors)."""
    for part in path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"{spec}: {part!r} not found") from None
    return target


# Reporting failures


def os_error(exc: BaseException) -> str:
    """The reason an OS or TLS error gives, in a few words."""
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


def place_error(doing: str, host: str | None, where: str, exc: BaseException) -> str:
    """Say why connecting to (or listening on) ``where`` failed: ``doing`` says which."""
    if isinstance(exc, socket.gaierror) and host is not None:
        return f"cannot resolve host {host!r}: {os_error(exc)}"
    return f"{doing} {where}: {os_error(exc)}"


def fail(status: int, message: str) -> int:
    """Print ``message`` as the command's one-line error and return ``status``."""
    sys.stdout.flush()  # what was printed comes first, even through a pipe
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def format_sockname(name: Any) -> str:
    """A socket address as ``HOST:PORT`` (``[::1]:PORT`` for IPv6), or a UNIX path."""
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else name[0]
        return f"{host}:{name[1]}"
    return str(name)


# The command line


def port_number(text: str) -> int:
    """argparse's type for a TCP port: 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the port must be a number, not {text!r}") from None
    if not 0 <= port <= 65_535:
        raise argparse.ArgumentTypeError(f"the port must be 0 to 65535, not {port}")
    return port


def seconds(text: str) -> float:
    """argparse's type for a duration: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, not {text!r}")
    return value


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The help layout of every subcommand: examples kept as written, options aligned."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


# Client TLS, for the subcommands that connect (call, ping)


def add_client_tls_options(parser: argparse.ArgumentParser) -> None:
    """Add the client's TLS options: --tls, --cafile, --cert, --key, --server-hostname..."""
    tls = parser.add_argument_group("TLS")
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
