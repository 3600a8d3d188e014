"""
asyncio-amp: AMP (Asynchronous Messaging Protocol) for asyncio.

Define a [`Command`][] once; answer it in an [`AMPProtocol`][] subclass
with ``@Command.responder``; call it with ``await protocol.call_remote(...)``.
The wire format is Twisted's ``twisted.protocols.amp``, byte for byte.
"""

from __future__ import annotations

from ._arguments import (
    AmpList,
    Argument,
    BigBytes,
    BigString,
    Boolean,
    Bytes,
    DateTime,
    Decimal,
    Descriptor,
    Float,
    Integer,
    ListOf,
    Path,
    String,
    Unicode,
)
from ._client import Client
from ._commands import Command
from ._errors import (
    AmpError,
    ConnectionLostError,
    NoConnectionError,
    ProtocolError,
    ProtocolSwitchedError,
    RemoteAmpError,
    TooLongError,
    UnhandledCommandError,
    UnknownRemoteError,
)
from ._middleware import AccessLog, Call, CallNext, Middleware
from ._network import connect, serve
from ._pipes import connect_pipes, serve_stdio
from ._protocol import AMPProtocol
from ._server import Server
from ._switch import ProtocolSwitchCommand
from ._tls import StartTLS
from ._wire import ACCELERATED, Box, BoxDecoder, encode_box, parse_boxes

__version__ = "0.1.0"
"""The version of asyncio-amp, as text."""

__all__ = [
    "ACCELERATED",
    "AMPProtocol",
    "AccessLog",
    "AmpError",
    "AmpList",
    "Argument",
    "BigBytes",
    "BigString",
    "Boolean",
    "Box",
    "BoxDecoder",
    "Bytes",
    "Call",
    "CallNext",
    "Client",
    "Command",
    "ConnectionLostError",
    "DateTime",
    "Decimal",
    "Descriptor",
    "Float",
    "Integer",
    "ListOf",
    "Middleware",
    "NoConnectionError",
    "Path",
    "ProtocolError",
    "ProtocolSwitchCommand",
    "ProtocolSwitchedError",
    "RemoteAmpError",
    "Server",
    "StartTLS",
    "String",
    "TooLongError",
    "UnhandledCommandError",
    "Unicode",
    "UnknownRemoteError",
    "__version__",
    "connect",
    "connect_pipes",
    "encode_box",
    "parse_boxes",
    "serve",
    "serve_stdio",
]
