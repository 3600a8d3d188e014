"""
Every exception asyncio-amp raises.

The tree:

    AmpError
    ├── TooLongError (also ValueError)          a local key or value is over the AMP limits;
    │                                           raised before anything is sent
    ├── ProtocolError                           the peer sent bytes that are not valid AMP
    ├── ConnectionLostError (also ConnectionError)
    │                                           the connection closed before an answer came
    ├── NoConnectionError (also ConnectionError)
    │                                           a Client had no connection ready to send a call on
    ├── ProtocolSwitchedError                   a call on a connection that switches (or has
    │                                           switched) to another protocol
    └── RemoteAmpError(error_code, description) the peer answered a call with an error
        ├── UnknownRemoteError                  UNKNOWN, or a code the command does not map
        └── UnhandledCommandError               UNHANDLED: the peer has no responder

Local faults and remote faults are different types, as in h11's
``LocalProtocolError`` / ``RemoteProtocolError``. Exceptions that a command maps
in its ``errors`` or ``fatal_errors`` are raised as the mapped class itself, built
from the peer's description, so they are not in this tree.
"""

from __future__ import annotations

__all__ = [
    "AmpError",
    "ConnectionLostError",
    "NoConnectionError",
    "ProtocolError",
    "ProtocolSwitchedError",
    "RemoteAmpError",
    "TooLongError",
    "UnhandledCommandError",
    "UnknownRemoteError",
]


class AmpError(Exception):
    """Base class of every exception asyncio-amp raises."""


class TooLongError(AmpError, ValueError):
    """
    A key or value is longer than AMP allows; nothing was sent.

    Keys are 1 to 255 bytes and values 0 to 65,535 bytes on the wire.

    Attributes:
        key: The offending key (for a value that is too long, the key it belongs to).
        length: The length in bytes that was refused.
        limit: The limit that was broken.
        is_key: ``True`` if the key itself is too long, ``False`` if its value is.
    """

    def __init__(self, key: bytes, length: int, limit: int, *, is_key: bool) -> None:
        self.key = key
        self.length = length
        self.limit = limit
        self.is_key = is_key
        shown = key if len(key) <= 40 else key[:40] + b"..."
        what = "key" if is_key else "value of key"
        super().__init__(f"{what} {shown!r} is {length} bytes; AMP allows at most {limit}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_too_long, (self.key, self.length, self.limit, self.is_key))


def _rebuild_too_long(key: bytes, length: int, limit: int, is_key: bool) -> TooLongError:
    return TooLongError(key, length, limit, is_key=is_key)


class ProtocolError(AmpError):
    """
    The peer sent bytes that are not valid AMP.

    The connection that received them is closed; its pending calls fail with
    [`ConnectionLostError`][] whose ``__cause__`` is this exception.
    """


class ConnectionLostError(AmpError, ConnectionError):
    """
    The connection closed, so the call cannot get an answer.

    Raised by pending calls when the connection is lost, and by
    ``call_remote`` on a connection that is already closed. When the close was
    caused by something specific (bad input, a transport error), that exception
    is chained as ``__cause__``.
    """


class NoConnectionError(AmpError, ConnectionError):
    """
    A [`Client`][asyncio_amp.Client] had no connection ready to send a call on.

    Raised when no connection became ready within the client's
    ``connect_timeout`` (the message says why the last attempt failed), and for
    calls made or still waiting once the client is closing. The call was never
    sent, so it is safe to make again. Like [`ConnectionLostError`][], it is a
    ``ConnectionError``, but not a subclass of it: a call that fails with
    ``NoConnectionError`` was never sent, one that fails with
    ``ConnectionLostError`` may have run.
    """


class ProtocolSwitchedError(AmpError):
    """
    A call on a connection that is switching, or has switched, to another protocol.

    Raised by ``call_remote`` (and ``call_remote_box``) while a
    [`ProtocolSwitchCommand`][] of ours waits for its answer, and once the
    connection has switched; Twisted's ``ProtocolSwitched``. It is also the
    cause of the [`ConnectionLostError`][] that calls still pending fail with
    when the connection switches.
    """


class RemoteAmpError(AmpError):
    """
    The peer answered a call with an error box.

    Attributes:
        error_code: The ``_error_code`` the peer sent, as text.
        description: The ``_error_description`` the peer sent, decoded as UTF-8
            with replacement characters for bad bytes.
        command: The name of the command that failed, if known.
    """

    def __init__(self, error_code: str, description: str, command: str | None = None) -> None:
        self.error_code = error_code
        self.description = description
        self.command = command
        where = f" (command {command!r})" if command is not None else ""
        super().__init__(f"peer answered {error_code}: {description}{where}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.error_code, self.description, self.command))


class UnknownRemoteError(RemoteAmpError):
    """
    The peer failed with an error the command does not map.

    This is what a responder's unexpected exception becomes: the peer sends the
    code ``UNKNOWN`` with a generic description and logs the details locally. A
    code that is neither ``UNKNOWN`` nor in the command's error maps also lands
    here, with ``error_code`` set to the code that was actually sent.
    """


class UnhandledCommandError(RemoteAmpError):
    """The peer has no responder for the command (error code ``UNHANDLED``)."""
