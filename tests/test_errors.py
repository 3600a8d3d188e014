"""Tests for the exceptions: the tree, attributes, messages and pickling."""

from __future__ import annotations

import copy
import pickle

import pytest

from asyncio_amp._arguments import Integer
from asyncio_amp._commands import Command
from asyncio_amp._connection import AMPConnection, Failure
from asyncio_amp._errors import (
    AmpError,
    ConnectionLostError,
    ProtocolError,
    RemoteAmpError,
    TooLongError,
    UnhandledCommandError,
    UnknownRemoteError,
)
from asyncio_amp._wire import BoxDecoder, encode_box

# The tree


def test_every_exception_is_an_amp_error() -> None:
    for exc_type in (
        TooLongError,
        ProtocolError,
        ConnectionLostError,
        RemoteAmpError,
        UnknownRemoteError,
        UnhandledCommandError,
    ):
        assert issubclass(exc_type, AmpError)
    assert issubclass(AmpError, Exception)


def test_too_long_error_is_a_value_error() -> None:
    assert issubclass(TooLongError, ValueError)
    assert isinstance(TooLongError(b"k", 300, 255, is_key=True), ValueError)


def test_connection_lost_error_is_a_connection_error() -> None:
    assert issubclass(ConnectionLostError, ConnectionError)
    assert isinstance(ConnectionLostError("closed"), OSError)


def test_remote_errors_are_remote_amp_errors() -> None:
    assert issubclass(UnknownRemoteError, RemoteAmpError)
    assert issubclass(UnhandledCommandError, RemoteAmpError)
    assert not issubclass(UnknownRemoteError, UnhandledCommandError)
    assert not issubclass(UnhandledCommandError, UnknownRemoteError)


def test_local_and_remote_faults_are_different_types() -> None:
    assert not issubclass(ProtocolError, RemoteAmpError)
    assert not issubclass(RemoteAmpError, ProtocolError)
    assert not issubclass(TooLongError, ProtocolError)
    assert not issubclass(ProtocolError, ValueError)
    assert not issubclass(RemoteAmpError, ValueError)
    assert not issubclass(ConnectionLostError, ProtocolError)


# TooLongError


def test_too_long_error_for_a_key() -> None:
    exc = TooLongError(b"k" * 300, 300, 255, is_key=True)
    assert (exc.key, exc.length, exc.limit, exc.is_key) == (b"k" * 300, 300, 255, True)
    assert str(exc) == f"key {b'k' * 40 + b'...'!r} is 300 bytes; AMP allows at most 255"


def test_too_long_error_for_a_value() -> None:
    exc = TooLongError(b"data", 65_536, 65_535, is_key=False)
    assert (exc.key, exc.length, exc.limit, exc.is_key) == (b"data", 65_536, 65_535, False)
    assert str(exc) == "value of key b'data' is 65536 bytes; AMP allows at most 65535"


def test_too_long_error_shows_a_key_of_40_bytes_whole() -> None:
    exc = TooLongError(b"k" * 40, 70_000, 65_535, is_key=False)
    assert str(exc) == f"value of key {b'k' * 40!r} is 70000 bytes; AMP allows at most 65535"


def test_too_long_error_repr_works() -> None:
    # Twisted's TooLong cannot repr itself when it has no value; ours always can.
    exc = TooLongError(b"k", 300, 255, is_key=True)
    assert repr(exc).startswith("TooLongError(")
    assert "300 bytes" in repr(exc)


def test_too_long_error_needs_is_key_by_keyword() -> None:
    with pytest.raises(TypeError):
        TooLongError(b"k", 300, 255, True)  # type: ignore[misc]


@pytest.mark.parametrize("is_key", [True, False])
def test_too_long_error_pickles(is_key: bool) -> None:
    exc = TooLongError(b"\xffkey", 70_000, 65_535, is_key=is_key)
    copied = pickle.loads(pickle.dumps(exc))
    assert type(copied) is TooLongError
    assert (copied.key, copied.length, copied.limit, copied.is_key) == (
        b"\xffkey",
        70_000,
        65_535,
        is_key,
    )
    assert str(copied) == str(exc)
    assert copied.args == exc.args


def test_too_long_error_copies() -> None:
    exc = TooLongError(b"k", 300, 255, is_key=True)
    copied = copy.copy(exc)
    assert (copied.key, copied.is_key, str(copied)) == (b"k", True, str(exc))


# RemoteAmpError


def test_remote_amp_error_attributes_and_message() -> None:
    exc = RemoteAmpError("ZERO", "div by zero!", "Sum")
    assert (exc.error_code, exc.description, exc.command) == ("ZERO", "div by zero!", "Sum")
    assert str(exc) == "peer answered ZERO: div by zero! (command 'Sum')"


def test_remote_amp_error_without_a_command() -> None:
    exc = RemoteAmpError("ZERO", "div by zero!")
    assert exc.command is None
    assert str(exc) == "peer answered ZERO: div by zero!"


def test_remote_amp_error_with_an_empty_description_still_says_what_happened() -> None:
    exc = UnknownRemoteError("X", "")
    assert str(exc) == "peer answered X: "
    assert "X" in str(exc)


@pytest.mark.parametrize("exc_type", [RemoteAmpError, UnknownRemoteError, UnhandledCommandError])
@pytest.mark.parametrize("command", [None, "Sum"])
def test_remote_amp_errors_pickle(exc_type: type[RemoteAmpError], command: str | None) -> None:
    exc = exc_type("C\\xff", "d\ufffd", command)
    copied = pickle.loads(pickle.dumps(exc))
    assert type(copied) is exc_type
    assert (copied.error_code, copied.description, copied.command) == ("C\\xff", "d\ufffd", command)
    assert str(copied) == str(exc)


def test_remote_amp_error_subclass_copies_as_itself() -> None:
    class Mine(RemoteAmpError):
        pass

    exc = Mine("C", "d", "Cmd")
    copied = copy.deepcopy(exc)
    assert type(copied) is Mine
    assert (copied.error_code, copied.description, copied.command) == ("C", "d", "Cmd")


@pytest.mark.parametrize("exc_type", [AmpError, ProtocolError, ConnectionLostError])
def test_plain_errors_pickle(exc_type: type[AmpError]) -> None:
    copied = pickle.loads(pickle.dumps(exc_type("what happened")))
    assert type(copied) is exc_type
    assert str(copied) == "what happened"


# Messages of the exceptions the sans-I/O layers raise


class Cmd(Command):
    response = [("total", Integer())]
    errors = {KeyError: "KEY"}


def _protocol_errors() -> list[ProtocolError]:
    errors: list[ProtocolError] = []
    for data, limits in [
        (b"\x00\x00", {}),
        (b"\x01\x00", {}),
        (b"GET / HTTP/1.0\r\n\r\n", {}),
        (b"\x00\x01a\x00\x05", {"max_box_size": 4}),
        (b"\x00\x01a\x00\x00\x00\x01b\x00\x00", {"max_keys": 1}),
    ]:
        _, error = BoxDecoder(**limits).receive_data_partial(data)
        assert error is not None
        errors.append(error)
    decoder = BoxDecoder()
    decoder.receive_data(b"\x00\x01a")
    end = decoder.end_of_stream()
    assert end is not None
    errors.append(end)
    for box in ({b"a": b"1"}, {b"_error": b"1"}, {b"_error": b"1", b"_error_code": b"C"}):
        conn = AMPConnection()
        conn.receive_data(encode_box(box))
        [event] = conn.events_received()
        assert isinstance(event, Failure)
        errors.append(event.error)
    with pytest.raises(ProtocolError) as info:
        Cmd._decode_response({b"_answer": b"1"})
    errors.append(info.value)
    return errors


@pytest.mark.parametrize("error", _protocol_errors(), ids=str)
def test_protocol_errors_say_what_happened(error: ProtocolError) -> None:
    message = str(error)
    assert message
    assert any(word in message for word in ("box", "key", "stream", "_error", "answer")), message


@pytest.mark.parametrize(
    ("code", "description"),
    [(b"UNHANDLED", b"Unhandled Command: b'Cmd'"), (b"UNKNOWN", b"Unknown Error"), (b"??", b"")],
)
def test_remote_errors_built_for_callers_say_what_happened(code: bytes, description: bytes) -> None:
    exc = Cmd._exception_for(code, description)
    assert isinstance(exc, RemoteAmpError)
    assert str(exc).startswith(f"peer answered {code.decode()}: {description.decode()}")
    assert "Cmd" in str(exc)


def test_too_long_errors_from_encoding_say_what_happened() -> None:
    with pytest.raises(TooLongError) as info:
        encode_box({b"v": b"x" * 65_536})
    assert str(info.value) == "value of key b'v' is 65536 bytes; AMP allows at most 65535"
    with pytest.raises(TooLongError) as info:
        encode_box({b"k" * 256: b""})
    assert str(info.value).startswith("key b'kkkk")
    assert str(info.value).endswith("is 256 bytes; AMP allows at most 255")
