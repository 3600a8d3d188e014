"""Tests for Command: schema checks, exact box bytes, decoding and error maps (no I/O)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncio_amp._arguments import (
    AmpList,
    Argument,
    BigBytes,
    BigString,
    Boolean,
    Bytes,
    Descriptor,
    Float,
    Integer,
    ListOf,
    String,
    python_name,
)
from asyncio_amp._commands import (
    RESPONDER_ATTRIBUTE,
    Command,
    RawCommand,
    encode_error,
    encode_unhandled_error,
    encode_unknown_error,
)
from asyncio_amp._errors import (
    ProtocolError,
    RemoteAmpError,
    TooLongError,
    UnhandledCommandError,
    UnknownRemoteError,
)
from asyncio_amp._wire import (
    PREFIXES,
    RESERVED_KEYS,
    BoxDecoder,
    encode_box,
    length_prefix,
    parse_boxes,
)


class Sum(Command):
    arguments = [("a", Integer()), ("b", Integer())]
    response = [("total", Integer())]


class Ping(Command):
    pass


class Note(Command):
    arguments = [("text", String())]
    requires_answer = False


class Greet(Command):
    arguments = [("name", String()), ("title", String(optional=True))]
    response = [("greeting", String()), ("count", Integer(optional=True))]


class Upper(Command):
    # b"B" < b"_ask" < b"_b" < b"_command" < b"c": keys on both sides of the specials.
    arguments = [("c", Bytes()), ("B", Integer()), ("_b", Boolean())]
    response = [("a", Integer()), ("Z", Integer())]


class Halves(Argument[bytes]):
    """A value written over two keys, ``key.1`` and ``key.2``."""

    multi_key = True

    def to_box(self, key: bytes, value: bytes, box: dict[bytes, bytes]) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"expected bytes, got {type(value).__name__}")
        if not value:
            raise ValueError("cannot split nothing")
        middle = len(value) // 2
        box[key + b".1"] = value[:middle]
        box[key + b".2"] = value[middle:]

    def from_box(self, key: bytes, box: Mapping[bytes, bytes]) -> bytes | None:
        if key + b".1" not in box:
            return None
        return box[key + b".1"] + box[key + b".2"]


class Split(Command):
    arguments = [("P", Halves()), ("n", Integer()), ("q", Halves(optional=True))]
    response = [("P", Halves()), ("n", Integer(optional=True))]


class SplitNote(Command):
    arguments = [("P", Halves())]
    requires_answer = False


class Short(Argument[bytes]):
    """Bytes of at most 4; refuses longer ones with its own TooLongError."""

    def to_bytes(self, value: bytes) -> bytes:
        if len(value) > 4:
            raise TooLongError(b"short", len(value), 4, is_key=False)
        return value

    def from_bytes(self, data: bytes) -> bytes:
        return data


class ShortSplit(Argument[bytes]):
    """A multi-key type that raises its own TooLongError."""

    multi_key = True

    def to_box(self, key: bytes, value: bytes, box: dict[bytes, bytes]) -> None:
        raise TooLongError(key, len(value), 4, is_key=False)


def define(**attributes: Any) -> type[Command]:
    """Create a Command subclass called Bad with these class attributes."""
    return type("Bad", (Command,), attributes)


def ask(command: type[Command], tag: bytes = b"1", **values: Any) -> bytes:
    """The bytes of a call box, with the tag filled in as the protocol does."""
    parts, slot = command._encode_ask(values)
    if slot >= 0:
        parts[slot] = length_prefix(len(tag)) + tag
    return b"".join(parts)


# Names


def test_command_name_defaults_to_the_class_name() -> None:
    assert Sum.command_name == "Sum"
    assert Sum.wire_name == b"Sum"


def test_command_name_can_be_a_str() -> None:
    class AddThem(Command):
        command_name = "add-them"

    assert AddThem.command_name == "add-them"
    assert AddThem.wire_name == b"add-them"
    assert ask(AddThem) == b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x08add-them\x00\x00"


def test_command_name_can_be_bytes() -> None:
    class Raw(Command):
        command_name = b"\xffraw"

    assert Raw.wire_name == b"\xffraw"
    assert ask(Raw) == b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x04\xffraw\x00\x00"


def test_non_ascii_command_name_is_utf8() -> None:
    class Cafe(Command):
        command_name = "café"

    assert Cafe.wire_name == b"caf\xc3\xa9"


def test_subclass_gets_its_own_default_name() -> None:
    class Base(Command):
        command_name = "base"

    class Child(Base):
        pass

    assert Base.wire_name == b"base"
    assert Child.wire_name == b"Child"
    assert Child.command_name == "Child"


@pytest.mark.parametrize("name", [1, None, ["x"], "", b"", "x" * 256])
def test_bad_command_name_is_refused(name: object) -> None:
    with pytest.raises(TypeError, match="Bad"):

        class Bad(Command):
            command_name = name  # type: ignore[assignment]


def test_unencodable_command_name_is_refused_with_type_error() -> None:
    with pytest.raises(TypeError, match="Bad"):

        class Bad(Command):
            command_name = "bad\ud800"


def test_python_names_of_keywords_and_dashes() -> None:
    class Move(Command):
        arguments = [("from", Integer()), ("to-where", Integer()), ("print", Integer())]

    assert sorted(Move._arguments_schema.by_name) == ["from_", "print", "to_where"]


# Schema checks at class creation


@pytest.mark.parametrize(
    "arguments",
    [
        [("a",)],
        [Integer()],
        [("a", Integer(), "extra")],
        [1],
    ],
)
def test_schema_items_must_be_pairs(arguments: object) -> None:
    with pytest.raises(TypeError, match=r"Bad\.arguments holds \(name, Argument\) pairs"):
        define(arguments=arguments)


@pytest.mark.parametrize("name", [1, None, 2.5])
def test_argument_names_must_be_str_or_bytes(name: object) -> None:
    with pytest.raises(TypeError, match="arguments names are str or bytes"):

        class Bad(Command):
            arguments = [(name, Integer())]  # type: ignore[list-item]


@pytest.mark.parametrize("name", ["", b""])
def test_argument_names_cannot_be_empty(name: str | bytes) -> None:
    with pytest.raises(TypeError, match="cannot be empty"):

        class Bad(Command):
            response = [(name, Integer())]


def test_argument_names_are_at_most_255_bytes() -> None:
    class Fine(Command):
        arguments = [("k" * 255, Integer())]

    assert Fine._arguments_schema.fields[0].key == b"k" * 255
    with pytest.raises(TypeError, match="over 255 bytes"):

        class Bad(Command):
            arguments = [("k" * 256, Integer())]


@pytest.mark.parametrize("value", [Integer, 1, None, "Integer()", int])
def test_argument_types_must_be_argument_instances(value: object) -> None:
    with pytest.raises(TypeError, match=r"'a' needs an Argument instance"):

        class Bad(Command):
            arguments = [("a", value)]  # type: ignore[list-item]


@pytest.mark.parametrize(
    "name", ["_ask", b"_answer", "_command", "_error", "_error_code", b"_error_description"]
)
@pytest.mark.parametrize("where", ["arguments", "response"])
def test_reserved_keys_are_refused(name: str | bytes, where: str) -> None:
    with pytest.raises(TypeError, match="reserved by AMP"):
        define(**{where: [(name, Integer())]})


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(TypeError, match=r"Bad\.arguments: b'a' appears twice"):

        class Bad(Command):
            arguments = [("a", Integer()), (b"a", String())]


@pytest.mark.parametrize(("first", "second"), [("a-b", "a_b"), ("from", "from_"), ("x-y", b"x_y")])
def test_names_with_the_same_python_name_are_refused(first: str, second: str | bytes) -> None:
    with pytest.raises(TypeError, match="both map to the Python name"):

        class Bad(Command):
            response = [(first, Integer()), (second, Integer())]


@pytest.mark.parametrize("where", ["arguments", "response"])
@pytest.mark.parametrize(
    ("schema", "big", "other"),
    [
        ([("data", BigBytes()), ("data.2", Bytes())], b"data", b"data.2"),
        ([("data.2", Bytes()), ("data", BigBytes())], b"data", b"data.2"),
        ([("text", BigString()), ("text.10", Integer(optional=True))], b"text", b"text.10"),
        ([("data", BigBytes()), ("data.3", BigBytes())], b"data", b"data.3"),
        ([("a.2", BigBytes()), ("a.2.7", String())], b"a.2", b"a.2.7"),
        ([(b"d", BigString(optional=True)), (b"d.99999", Bytes())], b"d", b"d.99999"),
    ],
)
def test_keys_that_could_be_chunks_of_a_big_value_are_refused(
    where: str, schema: list[tuple[str | bytes, Argument[Any]]], big: bytes, other: bytes
) -> None:
    # A big value over 65,535 bytes goes under "data", "data.2", ...: another
    # argument under one of those keys would mix with it on the wire.
    with pytest.raises(TypeError) as info:
        define(**{where: schema})
    message = str(info.value)
    assert f".{where}: " in message
    assert repr(other) in message and repr(big) in message, message
    assert "chunk" in message


def test_keys_that_cannot_be_chunks_are_accepted_beside_a_big_value() -> None:
    class Near(Command):
        arguments = [
            ("data", BigBytes()),
            ("data.1", Bytes()),  # the first chunk is "data" itself
            ("data.0", Bytes()),
            ("data.02", Bytes()),  # chunk numbers have no leading zero
            ("data.x", Bytes()),
            ("data2", Bytes()),
            ("data.", Bytes()),
            ("dat.2", Bytes()),
        ]
        # Arguments and response are separate boxes.
        response = [("data.2", Bytes()), ("data.3", BigBytes())]

    names = ("data.1", "data.0", "data.02", "data.x", "data2", "data.", "dat.2")
    values = {name: name.encode() for name in names}  # dots stay in Python names
    big = bytes(200_000)
    data = ask(Near, data=big, **values)
    (box,) = parse_boxes(data)
    assert Near._decode_arguments(box) == {"data": big, **values}


def test_names_may_be_bytes_or_str() -> None:
    class Mixed(Command):
        arguments = [(b"x", Integer()), ("y", Integer())]

    assert ask(Mixed, x=1, y=2) == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Mixed\x00\x01x\x00\x011\x00\x01y\x00\x012\x00\x00"
    )


def test_requires_answer_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="requires_answer must be True or False"):

        class Bad(Command):
            requires_answer = 1  # type: ignore[assignment]


# Errors maps at class creation


class Oops(Exception):
    pass


class BigOops(Oops):
    pass


@pytest.mark.parametrize("errors", ["OOPS", b"OOPS", 5, None])
def test_errors_must_be_a_mapping_or_pairs(errors: object) -> None:
    with pytest.raises(TypeError, match="maps exception classes to codes"):
        define(errors=errors)


@pytest.mark.parametrize("errors", [[Oops], [(Oops,)], [(Oops, "A", "B")]])
def test_errors_items_must_be_pairs(errors: object) -> None:
    with pytest.raises(TypeError, match=r"expected \(exception, code\)"):
        define(errors=errors)


@pytest.mark.parametrize("exc_type", ["Oops", Oops(), int, object])
def test_errors_keys_must_be_exception_classes(exc_type: object) -> None:
    with pytest.raises(TypeError, match="is not an exception class"):

        class Bad(Command):
            fatal_errors = {exc_type: "OOPS"}  # type: ignore[dict-item]


@pytest.mark.parametrize("code", ["", b"", 5, None])
def test_error_codes_must_be_non_empty_str_or_bytes(code: object) -> None:
    with pytest.raises(TypeError, match="the code for Oops must be a non-empty str or bytes"):

        class Bad(Command):
            errors = {Oops: code}  # type: ignore[dict-item]


@pytest.mark.parametrize("code", ["UNKNOWN", b"UNKNOWN", "UNHANDLED", b"UNHANDLED"])
@pytest.mark.parametrize("where", ["errors", "fatal_errors"])
def test_reserved_error_codes_are_refused(code: str | bytes, where: str) -> None:
    with pytest.raises(TypeError, match="is a code reserved by AMP"):
        define(**{where: {Oops: code}})


def test_error_codes_must_fit_in_a_value() -> None:
    class Fine(Command):
        errors = {Oops: b"X" * 65_535}

    assert Fine._all_errors == {Oops: b"X" * 65_535}
    with pytest.raises(TypeError, match="the code for Oops is too long"):

        class Bad(Command):
            errors = {Oops: b"X" * 65_536}


def test_errors_may_be_pairs_and_str_codes_are_utf8() -> None:
    class Pairs(Command):
        errors = [(Oops, "ÖOPS"), (KeyError, b"KEY")]

    assert Pairs._all_errors == {Oops: "ÖOPS".encode(), KeyError: b"KEY"}
    assert Pairs._code_to_exception == {"ÖOPS".encode(): Oops, b"KEY": KeyError}


def test_errors_are_inherited_and_merged() -> None:
    class Base(Command):
        errors = {Oops: "OOPS", KeyError: "KEY"}
        fatal_errors = {MemoryError: "MEMORY"}

    class Child(Base):
        errors = {ValueError: "VALUE", KeyError: "KEY2"}

    class Grandchild(Child):
        fatal_errors = {OSError: "OS"}

    assert Base._all_errors == {Oops: b"OOPS", KeyError: b"KEY"}
    assert Child._all_errors == {Oops: b"OOPS", KeyError: b"KEY2", ValueError: b"VALUE"}
    assert Child._all_fatal_errors == {MemoryError: b"MEMORY"}
    assert Grandchild._all_errors == Child._all_errors
    assert Grandchild._all_fatal_errors == {MemoryError: b"MEMORY", OSError: b"OS"}
    assert Grandchild._code_to_exception == {
        b"OOPS": Oops,
        b"KEY2": KeyError,
        b"VALUE": ValueError,
        b"MEMORY": MemoryError,
        b"OS": OSError,
    }
    # The base is unchanged by its subclasses.
    assert Base._code_to_exception == {b"OOPS": Oops, b"KEY": KeyError, b"MEMORY": MemoryError}


def test_errors_of_a_mixin_that_is_a_command_are_merged() -> None:
    class WithOops(Command):
        errors = {Oops: "OOPS"}

    class WithKey(Command):
        errors = {KeyError: "KEY"}

    class Both(WithOops, WithKey):
        pass

    assert Both._all_errors == {Oops: b"OOPS", KeyError: b"KEY"}


# Command instances


def test_instance_holds_its_arguments() -> None:
    call = Sum(a=1, b=2)
    assert call.values == {"a": 1, "b": 2}
    assert Greet(name="x").values == {"name": "x"}


def test_instance_uses_python_names() -> None:
    class Move(Command):
        arguments = [("from", Integer()), ("to-where", Integer())]

    assert Move(from_=1, to_where=2).values == {"from_": 1, "to_where": 2}
    with pytest.raises(TypeError, match="'to-where' is not an argument name"):
        Move(**{"to-where": 2})


def test_instance_refuses_unknown_names() -> None:
    with pytest.raises(TypeError, match="Sum: 'c' is not an argument name"):
        Sum(a=1, c=2)


def test_instance_repr() -> None:
    assert repr(Sum(a=1, b=2)) == "Sum(a=1, b=2)"
    assert repr(Greet(name="hé")) == "Greet(name='hé')"
    assert repr(Ping()) == "Ping()"


def test_instance_equality() -> None:
    assert Sum(a=1, b=2) == Sum(b=2, a=1)
    assert Sum(a=1, b=2) != Sum(a=1, b=3)
    assert Sum(a=1) != Sum(a=1, b=2)

    class Other(Command):
        arguments = [("a", Integer()), ("b", Integer())]

    assert Sum(a=1, b=2) != Other(a=1, b=2)
    assert Sum(a=1, b=2) != {"a": 1, "b": 2}
    assert Sum.__eq__(Sum(), 1) is NotImplemented


def test_instances_are_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(Sum(a=1, b=2))


# responder


def test_responder_marks_the_function_and_returns_it() -> None:
    def sum_(a: int, b: int) -> dict[str, int]:
        return {"total": a + b}

    assert Sum.responder(sum_) is sum_
    assert getattr(sum_, RESPONDER_ATTRIBUTE) == (Sum,)
    assert Ping.responder(sum_) is sum_
    assert getattr(sum_, RESPONDER_ATTRIBUTE) == (Sum, Ping)
    assert sum_(1, 2) == {"total": 3}


def test_responder_refuses_what_is_not_callable() -> None:
    with pytest.raises(TypeError, match=r"Sum\.responder decorates a function"):
        Sum.responder(42)  # type: ignore[type-var]


# _encode_ask


def test_encode_ask_writes_twisteds_sum_box() -> None:
    assert ask(Sum, a=13, b=81) == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Sum\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00"
    )


def test_encode_ask_leaves_an_empty_slot_for_the_tag() -> None:
    parts, slot = Sum._encode_ask({"a": 13, "b": 81})
    assert parts[slot] == b""
    assert parts[slot - 1] == b"\x00\x04_ask"
    parts[slot] = b"\x00\x03abc"
    assert b"".join(parts).startswith(b"\x00\x04_ask\x00\x03abc\x00\x08_command")


@pytest.mark.parametrize("tag", [b"1", b"a", b"17", b"ffff", b"x" * 300])
def test_encode_ask_takes_any_tag(tag: bytes) -> None:
    data = ask(Sum, tag, a=1, b=2)
    assert parse_boxes(data) == [{b"_ask": tag, b"_command": b"Sum", b"a": b"1", b"b": b"2"}]


def test_encode_ask_without_arguments() -> None:
    assert ask(Ping, b"a") == b"\x00\x04_ask\x00\x01a\x00\x08_command\x00\x04Ping\x00\x00"


def test_encode_ask_without_answer_has_no_ask_key() -> None:
    parts, slot = Note._encode_ask({"text": "hé"})
    assert slot == -1
    assert b"".join(parts) == (b"\x00\x08_command\x00\x04Note\x00\x04text\x00\x03h\xc3\xa9\x00\x00")


def test_encode_ask_sorts_keys_around_the_specials() -> None:
    assert ask(Upper, b"7", c=b"x", B=5, _b=True) == (
        b"\x00\x01B\x00\x015"
        b"\x00\x04_ask\x00\x017"
        b"\x00\x02_b\x00\x04True"
        b"\x00\x08_command\x00\x05Upper"
        b"\x00\x01c\x00\x01x"
        b"\x00\x00"
    )


def test_encode_ask_omits_optional_arguments() -> None:
    expected = b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Greet\x00\x04name\x00\x02Jo\x00\x00"
    assert ask(Greet, name="Jo") == expected
    assert ask(Greet, name="Jo", title=None) == expected
    assert ask(Greet, name="Jo", title="Dr") == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Greet\x00\x04name\x00\x02Jo"
        b"\x00\x05title\x00\x02Dr\x00\x00"
    )


def test_encode_ask_sends_an_empty_value() -> None:
    assert ask(Greet, name="") == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x05Greet\x00\x04name\x00\x00\x00\x00"
    )


def test_encode_ask_uses_python_names_for_wire_names() -> None:
    class Move(Command):
        arguments = [("from", Integer()), ("to-where", Integer())]

    assert ask(Move, from_=1, to_where=2) == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x04Move"
        b"\x00\x04from\x00\x011\x00\x08to-where\x00\x012\x00\x00"
    )


def test_encode_ask_refuses_a_missing_required_argument() -> None:
    with pytest.raises(TypeError) as info:
        Sum._encode_ask({"a": 1})
    assert str(info.value) == "Sum: argument 'b' is missing"
    with pytest.raises(TypeError, match="Sum: argument 'b' is missing"):
        Sum._encode_ask({"a": 1, "b": None})


def test_encode_ask_refuses_an_unknown_argument() -> None:
    with pytest.raises(TypeError, match=r"Sum: 'c' is not an? argument name"):
        Sum._encode_ask({"a": 1, "b": 2, "c": 3})


def test_encode_ask_names_command_and_argument_for_a_wrong_type() -> None:
    with pytest.raises(TypeError) as info:
        Sum._encode_ask({"a": 1, "b": "2"})
    assert str(info.value) == "Sum: argument 'b': expected an int, got str: '2'"
    assert isinstance(info.value.__cause__, TypeError)


def test_encode_ask_names_command_and_argument_for_a_bad_value() -> None:
    with pytest.raises(ValueError, match=r"^Greet: argument 'name': .*surrogate") as info:
        Greet._encode_ask({"name": "\ud800"})
    assert type(info.value) is ValueError
    assert isinstance(info.value.__cause__, UnicodeEncodeError)


def test_encode_ask_refuses_a_value_over_65535_bytes() -> None:
    class Blob(Command):
        arguments = [("data", Bytes()), ("n", Integer())]

    assert ask(Blob, data=b"x" * 65_535, n=1) == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x04Blob"
        b"\x00\x04data\xff\xff" + b"x" * 65_535 + b"\x00\x01n\x00\x011\x00\x00"
    )
    with pytest.raises(TooLongError) as info:
        Blob._encode_ask({"data": b"x" * 65_536, "n": 1})
    exc = info.value
    assert (exc.key, exc.length, exc.limit, exc.is_key) == (b"data", 65_536, 65_535, False)
    assert "b'data'" in str(exc)


def test_encode_ask_lets_an_arguments_own_too_long_error_through() -> None:
    class Tiny(Command):
        arguments = [("s", Short())]

    with pytest.raises(TooLongError) as info:
        Tiny._encode_ask({"s": b"12345"})
    assert (info.value.key, info.value.limit) == (b"short", 4)


def test_encode_ask_with_a_float_and_a_bool() -> None:
    class Mix(Command):
        arguments = [("f", Float()), ("ok", Boolean())]

    assert ask(Mix, f=0.1, ok=False) == (
        b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x03Mix"
        b"\x00\x01f\x00\x030.1\x00\x02ok\x00\x05False\x00\x00"
    )


# _encode_ask and _encode_answer with a multi-key argument


def test_encode_ask_with_a_multi_key_argument() -> None:
    data = ask(Split, b"a", P=b"abcd", n=5)
    assert data == (
        b"\x00\x03P.1\x00\x02ab"
        b"\x00\x03P.2\x00\x02cd"
        b"\x00\x04_ask\x00\x01a"
        b"\x00\x08_command\x00\x05Split"
        b"\x00\x01n\x00\x015"
        b"\x00\x00"
    )
    assert Split._decode_arguments(parse_boxes(data)[0]) == {"P": b"abcd", "n": 5, "q": None}


def test_encode_ask_with_a_multi_key_argument_and_a_long_tag() -> None:
    data = ask(Split, b"1234", P=b"abcd", n=5, q=b"xyz")
    assert parse_boxes(data) == [
        {
            b"P.1": b"ab",
            b"P.2": b"cd",
            b"_ask": b"1234",
            b"_command": b"Split",
            b"n": b"5",
            b"q.1": b"x",
            b"q.2": b"yz",
        }
    ]


def test_encode_ask_without_answer_with_a_multi_key_argument() -> None:
    parts, slot = SplitNote._encode_ask({"P": b"abc"})
    assert slot == -1
    assert b"".join(parts) == (
        b"\x00\x03P.1\x00\x01a\x00\x03P.2\x00\x02bc\x00\x08_command\x00\x09SplitNote\x00\x00"
    )


def test_multi_key_encoding_checks_like_single_key_encoding() -> None:
    with pytest.raises(TypeError, match="Split: argument 'P' is missing"):
        Split._encode_ask({"n": 1})
    with pytest.raises(TypeError, match=r"Split: 'x' is not an? argument name"):
        Split._encode_ask({"P": b"ab", "n": 1, "x": 1})
    with pytest.raises(TypeError, match=r"^Split: argument 'P': expected bytes, got str$"):
        Split._encode_ask({"P": "ab", "n": 1})
    with pytest.raises(ValueError, match=r"^Split: argument 'P': cannot split nothing$"):
        Split._encode_ask({"P": b"", "n": 1})
    with pytest.raises(TypeError, match=r"^Split: argument 'n': expected an int"):
        Split._encode_ask({"P": b"ab", "n": "1"})
    with pytest.raises(TooLongError) as info:
        Split._encode_ask({"P": b"x" * 200_000, "n": 1})
    assert (info.value.key, info.value.length) == (b"P.1", 100_000)


def test_multi_key_encoding_lets_an_arguments_own_too_long_error_through() -> None:
    class Tiny(Command):
        arguments = [("s", ShortSplit())]

    with pytest.raises(TooLongError) as info:
        Tiny._encode_ask({"s": b"12345"})
    assert (info.value.key, info.value.limit) == (b"s", 4)


def test_encode_answer_with_a_multi_key_response() -> None:
    assert Split._encode_answer(b"9", {"P": b"wxyz"}) == (
        b"\x00\x03P.1\x00\x02wx\x00\x03P.2\x00\x02yz\x00\x07_answer\x00\x019\x00\x00"
    )


def test_big_bytes_through_a_command() -> None:
    class Upload(Command):
        arguments = [("data", BigBytes()), ("name", String())]
        response = [("data", BigBytes())]

    value = bytes(range(256)) * 700  # 179,200 bytes: three keys
    data = ask(Upload, b"5", data=value, name="f")
    [box] = parse_boxes(data)
    assert sorted(box) == [b"_ask", b"_command", b"data", b"data.2", b"data.3", b"name"]
    assert data.startswith(
        b"\x00\x04_ask\x00\x015\x00\x08_command\x00\x06Upload\x00\x04data\xff\xff"
    )
    assert Upload._decode_arguments(box) == {"data": value, "name": "f"}
    answer = parse_boxes(Upload._encode_answer(b"5", {"data": value}))[0]
    assert Upload._decode_response(answer) == {"data": value}


class Buffers(Command):
    """Every type that takes a bytes-like value, in a schema the compiled encoder takes."""

    arguments = [("raw", Bytes()), ("maybe", Bytes(optional=True)), ("list", ListOf(Bytes()))]
    response = [("raw", Bytes()), ("list", ListOf(Bytes()))]


class BigBuffers(Command):
    """The same with the multi-key types, which take the general path."""

    arguments = [
        ("raw", Bytes()),
        ("big", BigBytes()),
        ("rows", AmpList([("b", Bytes()), ("big", BigBytes())])),
    ]
    response = [("raw", Bytes()), ("big", BigBytes())]


class BuffersNoAnswer(Buffers):
    requires_answer = False


class BigBuffersNoAnswer(BigBuffers):
    requires_answer = False


def patterned(size: int) -> bytearray:
    return bytearray(bytes(range(256)) * (size // 256 + 1))[:size]


@pytest.mark.parametrize("size", [3, 70_000])
@pytest.mark.parametrize(
    "command", [Buffers, BigBuffers, BuffersNoAnswer, BigBuffersNoAnswer], ids=lambda c: c.__name__
)
def test_encoding_captures_mutable_values_when_called(command: type[Command], size: int) -> None:
    # A call may wait in a queue before it is written: it must send the values as
    # they were when it was called, and leave the caller's buffers free to change.
    small, element, row, big = patterned(100), patterned(10), patterned(200), patterned(size)
    big_schema = issubclass(command, BigBuffers)

    def values(form: Callable[[bytearray], Any]) -> dict[str, Any]:
        if big_schema:
            return {
                "raw": form(small),
                "big": form(big),
                "rows": [{"b": form(row), "big": form(element)}],
            }
        return {"raw": form(small), "maybe": form(row), "list": [form(element)]}

    expected = b"".join(command._encode_ask(values(bytes))[0])
    views: list[memoryview] = []

    def view(buffer: bytearray) -> memoryview:
        views.append(memoryview(buffer))
        return views[-1]

    encoded = [command._encode_ask(values(lambda b: b)), command._encode_ask(values(view))]
    if command._fast_ask is not None:  # the compiled encoder the protocol calls directly
        result = command._fast_ask(values(lambda b: b))
        encoded.append(result if command.requires_answer else (result, -1))
    for v in views:
        v.release()
    for buffer in (small, element, row, big):
        buffer[0] ^= 0xFF
        buffer.extend(b"later")  # a BufferError if an encoded box still held a view of it
    for parts, _ in encoded:
        assert b"".join(parts) == expected


@pytest.mark.parametrize("command", [Buffers, BigBuffers], ids=lambda c: c.__name__)
def test_answers_capture_mutable_values(command: type[Command]) -> None:
    small, element, big = patterned(100), patterned(10), patterned(70_000)
    if command is Buffers:
        given: dict[str, Any] = {"raw": small, "list": [element]}
    else:
        given = {"raw": small, "big": big}
    answer = command._encode_answer(b"1", given)
    expected = command._encode_answer(
        b"1",
        {
            key: [bytes(v) for v in value] if isinstance(value, list) else bytes(value)
            for key, value in given.items()
        },
    )
    for buffer in (small, element, big):
        buffer.extend(b"later")
    assert answer == expected


# _encode_answer


def test_encode_answer_writes_twisteds_answer_box() -> None:
    assert Sum._encode_answer(b"1", {"total": 94}) == (
        b"\x00\x07_answer\x00\x011\x00\x05total\x00\x0294\x00\x00"
    )


def test_encode_answer_of_a_command_without_response() -> None:
    assert Ping._encode_answer(b"2a", {}) == b"\x00\x07_answer\x00\x022a\x00\x00"


def test_encode_answer_puts_keys_that_sort_first_before_answer() -> None:
    # b"Z" < b"_answer" < b"a", as Twisted's sorted() writes them.
    assert Upper._encode_answer(b"1", {"a": 7, "Z": 5}) == (
        b"\x00\x01Z\x00\x015\x00\x07_answer\x00\x011\x00\x01a\x00\x017\x00\x00"
    )


def test_encode_answer_echoes_any_tag() -> None:
    tag = b"\x00\xff tag"
    assert Ping._encode_answer(tag, {}) == b"\x00\x07_answer\x00\x06" + tag + b"\x00\x00"


def test_encode_answer_omits_optional_values() -> None:
    assert Greet._encode_answer(b"1", {"greeting": "hi"}) == (
        b"\x00\x07_answer\x00\x011\x00\x08greeting\x00\x02hi\x00\x00"
    )
    assert Greet._encode_answer(b"1", {"greeting": "hi", "count": 2}) == (
        b"\x00\x07_answer\x00\x011\x00\x05count\x00\x012\x00\x08greeting\x00\x02hi\x00\x00"
    )


def test_encode_answer_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(TypeError) as info:
        Sum._encode_answer(b"1", [("total", 1)])  # type: ignore[arg-type]
    assert str(info.value) == (
        "the responder of Sum returned list, not a dict keyed like its response"
    )


def test_encode_answer_checks_its_values() -> None:
    with pytest.raises(TypeError, match="Sum: response 'total' is missing"):
        Sum._encode_answer(b"1", {})
    with pytest.raises(TypeError, match=r"Sum: 'totl' is not an? response name"):
        Sum._encode_answer(b"1", {"total": 1, "totl": 1})
    with pytest.raises(TypeError, match=r"^Sum: response 'total': expected an int"):
        Sum._encode_answer(b"1", {"total": 1.5})


def test_encode_answer_refuses_a_value_over_65535_bytes() -> None:
    class Blob(Command):
        response = [("data", Bytes())]

    with pytest.raises(TooLongError) as info:
        Blob._encode_answer(b"1", {"data": b"x" * 65_536})
    assert (info.value.key, info.value.length) == (b"data", 65_536)


# _decode_arguments and _decode_response


def test_decode_arguments() -> None:
    box = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
    assert Sum._decode_arguments(box) == {"a": 13, "b": 81}


def test_decode_arguments_uses_python_names() -> None:
    class Move(Command):
        arguments = [("from", Integer()), ("to-where", Integer())]

    assert Move._decode_arguments({b"from": b"1", b"to-where": b"2"}) == {
        "from_": 1,
        "to_where": 2,
    }


def test_decode_arguments_gives_none_for_missing_optional_values() -> None:
    assert Greet._decode_arguments({b"name": b"Jo"}) == {"name": "Jo", "title": None}


def test_decode_arguments_ignores_unknown_keys() -> None:
    box = {b"a": b"1", b"b": b"2", b"c": b"3", b"_answer": b"9", b"\xff": b"\xff"}
    assert Sum._decode_arguments(box) == {"a": 1, "b": 2}


def test_decode_arguments_refuses_a_missing_required_value() -> None:
    with pytest.raises(KeyError) as info:
        Sum._decode_arguments({b"a": b"1"})
    assert info.value.args == ("Sum: argument 'b' is missing",)


def test_decode_arguments_refuses_an_undecodable_value() -> None:
    with pytest.raises(ValueError) as info:
        Sum._decode_arguments({b"a": b"1", b"b": b"x"})
    assert str(info.value).startswith("Sum: argument 'b' does not decode: invalid literal")
    assert type(info.value.__cause__) is ValueError


def test_decode_arguments_reports_any_decoding_exception_as_value_error() -> None:
    # Halves.from_box raises KeyError when the second half is missing.
    with pytest.raises(ValueError, match="Split: argument 'P' does not decode") as info:
        Split._decode_arguments({b"P.1": b"a", b"n": b"1"})
    assert type(info.value.__cause__) is KeyError


def test_decode_response() -> None:
    assert Sum._decode_response({b"_answer": b"1", b"total": b"94"}) == {"total": 94}
    assert Greet._decode_response({b"greeting": b"hi"}) == {"greeting": "hi", "count": None}


def test_decode_response_of_a_missing_value_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        Sum._decode_response({b"_answer": b"1"})
    assert str(info.value) == (
        "the peer's answer to Sum is invalid: Sum: response 'total' is missing"
    )
    assert type(info.value.__cause__) is KeyError


def test_decode_response_of_a_bad_value_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        Greet._decode_response({b"greeting": b"\xff"})
    assert str(info.value).startswith(
        "the peer's answer to Greet is invalid: Greet: response 'greeting' does not decode:"
    )
    assert type(info.value.__cause__) is ValueError


# _error_code_for


class Mapped(Command):
    errors = {LookupError: "LOOKUP", KeyError: "KEY", Oops: "OOPS"}
    fatal_errors = {BigOops: "BIG", MemoryError: "MEMORY"}


def test_error_code_for_unmapped_commands_is_none() -> None:
    assert Sum._error_code_for(KeyError("x")) is None


@pytest.mark.parametrize(
    ("exc", "result"),
    [
        (LookupError(), (b"LOOKUP", False)),
        (KeyError("k"), (b"KEY", False)),
        (IndexError(), (b"LOOKUP", False)),
        (Oops(), (b"OOPS", False)),
        (BigOops(), (b"BIG", True)),
        (MemoryError(), (b"MEMORY", True)),
        (ValueError(), None),
        (Exception(), None),
    ],
)
def test_error_code_for_picks_the_most_specific_class(
    exc: BaseException, result: tuple[bytes, bool] | None
) -> None:
    assert Mapped._error_code_for(exc) == result


def test_error_code_for_subclasses_of_mapped_classes() -> None:
    class MyKeyError(KeyError):
        pass

    class EvenBigger(BigOops):
        pass

    assert Mapped._error_code_for(MyKeyError()) == (b"KEY", False)
    assert Mapped._error_code_for(EvenBigger()) == (b"BIG", True)


def test_error_code_for_a_fatal_only_command() -> None:
    class Fatal(Command):
        fatal_errors = {ValueError: "V"}

    assert Fatal._error_code_for(ValueError()) == (b"V", True)
    assert Fatal._error_code_for(KeyError()) is None


def test_error_code_for_prefers_errors_over_fatal_errors_for_one_class() -> None:
    class Both(Command):
        errors = {Oops: "SOFT"}
        fatal_errors = {Oops: "HARD"}

    assert Both._error_code_for(Oops()) == (b"SOFT", False)


# _exception_for


def test_exception_for_a_mapped_code_builds_the_class() -> None:
    exc = Mapped._exception_for(b"OOPS", b"it went wrong")
    assert type(exc) is Oops
    assert exc.args == ("it went wrong",)
    fatal = Mapped._exception_for(b"BIG", b"very")
    assert type(fatal) is BigOops
    assert fatal.args == ("very",)


def test_exception_for_decodes_the_description_with_replacement() -> None:
    exc = Mapped._exception_for(b"OOPS", b"h\xc3\xa9 \xff\xfe")
    assert exc.args == ("hé \ufffd\ufffd",)


def test_exception_for_unhandled() -> None:
    exc = Sum._exception_for(b"UNHANDLED", b"Unhandled Command: b'Sum'")
    assert type(exc) is UnhandledCommandError
    assert (exc.error_code, exc.description, exc.command) == (
        "UNHANDLED",
        "Unhandled Command: b'Sum'",
        "Sum",
    )


def test_exception_for_unknown() -> None:
    exc = Mapped._exception_for(b"UNKNOWN", b"Unknown Error")
    assert type(exc) is UnknownRemoteError
    assert (exc.error_code, exc.description, exc.command) == ("UNKNOWN", "Unknown Error", "Mapped")


def test_exception_for_an_unmapped_code_keeps_the_wire_code() -> None:
    exc = Sum._exception_for(b"\xffX", b"\xff\xfe")
    assert type(exc) is UnknownRemoteError
    assert exc.error_code == "\\xffX"
    assert exc.description == "\ufffd\ufffd"
    exc = Mapped._exception_for(b"TLS_ERROR", b"TLS not available")
    assert type(exc) is UnknownRemoteError
    assert exc.error_code == "TLS_ERROR"


def test_exception_for_a_class_that_refuses_one_str(caplog: pytest.LogCaptureFixture) -> None:
    class Picky(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(a, b)

    class Strict(Exception):
        def __init__(self, message: str) -> None:
            raise ValueError("no")

    class Refusing(Command):
        errors = {Picky: "PICKY"}
        fatal_errors = {Strict: "STRICT"}

    for code, klass, cause in [(b"PICKY", Picky, TypeError), (b"STRICT", Strict, ValueError)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="asyncio_amp"):
            exc = Refusing._exception_for(code, b"details")
        assert type(exc) is RemoteAmpError
        assert (exc.error_code, exc.description, exc.command) == (
            code.decode(),
            "details",
            Refusing.__qualname__,
        )
        assert type(exc.__cause__) is cause
        # Not silent: one warning says which class and code, and why.
        (record,) = caplog.records
        assert (record.name, record.levelno) == ("asyncio_amp", logging.WARNING)
        message = record.getMessage()
        assert klass.__qualname__ in message, message
        assert repr(code.decode()) in message, message
        assert "one str argument" in message, message
        assert cause.__name__ in message, message


def test_exception_for_builds_any_class_that_takes_one_description(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class WithDefaults(Exception):
        def __init__(self, message: str, retry: int = 3, *, where: str = "here") -> None:
            super().__init__(message)
            self.retry = retry

    class AnyArgs(Exception):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)

    class Several(Command):
        errors = {WithDefaults: "DEFAULTS", AnyArgs: "ANY", OSError: "OS"}

    with caplog.at_level(logging.WARNING, logger="asyncio_amp"):
        for code, klass in [(b"DEFAULTS", WithDefaults), (b"ANY", AnyArgs), (b"OS", OSError)]:
            exc = Several._exception_for(code, b"what happened")
            assert type(exc) is klass
            assert str(exc) == "what happened"
    assert not caplog.records


def test_exception_for_uses_the_subclasss_merged_map() -> None:
    class Child(Mapped):
        errors = {ValueError: "VALUE"}

    assert type(Child._exception_for(b"VALUE", b"v")) is ValueError
    assert type(Child._exception_for(b"KEY", b"k")) is KeyError
    assert type(Mapped._exception_for(b"VALUE", b"v")) is UnknownRemoteError


# Error boxes


def test_encode_error_writes_twisteds_box() -> None:
    assert encode_error(b"1", b"ZERO", b"div by zero!") == (
        b"\x00\x06_error\x00\x011"
        b"\x00\x0b_error_code\x00\x04ZERO"
        b"\x00\x12_error_description\x00\x0cdiv by zero!"
        b"\x00\x00"
    )


def test_encode_error_with_an_empty_description() -> None:
    assert encode_error(b"a", b"E", b"") == (
        b"\x00\x06_error\x00\x01a\x00\x0b_error_code\x00\x01E\x00\x12_error_description\x00\x00\x00\x00"
    )


def test_encode_error_cuts_a_long_description_to_fit() -> None:
    data = encode_error(b"1", b"E", b"d" * 70_000)
    assert parse_boxes(data) == [
        {b"_error": b"1", b"_error_code": b"E", b"_error_description": b"d" * 65_535}
    ]
    data = encode_error(b"1", b"E", b"d" * 65_535)
    assert parse_boxes(data)[0][b"_error_description"] == b"d" * 65_535


def test_encode_unknown_error() -> None:
    assert encode_unknown_error(b"2") == (
        b"\x00\x06_error\x00\x012"
        b"\x00\x0b_error_code\x00\x07UNKNOWN"
        b"\x00\x12_error_description\x00\x0dUnknown Error"
        b"\x00\x00"
    )


def test_encode_unhandled_error() -> None:
    data = encode_unhandled_error(b"1", b"Nope")
    assert data == (
        b"\x00\x06_error\x00\x011"
        b"\x00\x0b_error_code\x00\x09UNHANDLED"
        b"\x00\x12_error_description\x00\x1aUnhandled Command: b'Nope'"
        b"\x00\x00"
    )
    assert parse_boxes(data)[0][b"_error_description"] == b"Unhandled Command: b'Nope'"


def test_encode_unhandled_error_shows_odd_names_as_python_does() -> None:
    box = parse_boxes(encode_unhandled_error(b"1", b"\xff'x"))[0]
    assert box[b"_error_description"] == b'Unhandled Command: b"\\xff\'x"'


# Properties

wire_names = st.binary(min_size=1, max_size=12).filter(lambda name: name not in RESERVED_KEYS)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(wire_names, st.booleans()), max_size=6, unique_by=lambda f: python_name(f[0])
    ),
    st.data(),
)
def test_encoded_boxes_are_what_encode_box_writes(
    fields: list[tuple[bytes, bool]], data: st.DataObject
) -> None:
    # Whatever the names, the precomputed key order is the sorted order Twisted writes.
    command = define(
        arguments=[(name, Bytes(optional=optional)) for name, optional in fields],
        response=[(name, Bytes(optional=optional)) for name, optional in fields],
    )
    values: dict[str, bytes | None] = {}
    box: dict[bytes, bytes] = {}
    for name, optional in fields:
        value = None if optional and data.draw(st.booleans(), "omit") else data.draw(st.binary())
        values[python_name(name)] = value
        if value is not None:
            box[name] = value
    tag = data.draw(st.binary(min_size=1, max_size=4), "tag")
    assert ask(command, tag, **values) == encode_box({**box, b"_ask": tag, b"_command": b"Bad"})
    assert command._encode_answer(tag, values) == encode_box({**box, b"_answer": tag})
    decoded = command._decode_arguments(box)
    assert decoded == {python_name(name): values[python_name(name)] for name, _ in fields}


# RawCommand: the stand-in for a Command class in call_remote_box


def test_raw_command_encodes_sorted_with_a_tag_slot() -> None:
    raw = RawCommand("Sum", {"b": "2", b"A": b"\x00", "z": "é"}, True)
    parts, slot = raw._encode_ask({})
    parts = list(parts)
    parts[slot] = PREFIXES[1] + b"7"
    assert parse_boxes(b"".join(parts)) == [
        {b"A": b"\x00", b"_ask": b"7", b"_command": b"Sum", b"b": b"2", b"z": "é".encode()}
    ]
    assert b"".join(parts) == encode_box(
        {b"A": b"\x00", b"_ask": b"7", b"_command": b"Sum", b"b": b"2", b"z": "é".encode()}
    )
    assert raw.label == "Sum" and raw.wire_name == b"Sum"


def test_raw_command_without_answer_has_no_ask() -> None:
    raw = RawCommand(b"Note", None, False)
    parts, slot = raw._encode_ask({})
    assert slot == -1
    assert b"".join(parts) == encode_box({b"_command": b"Note"})
    raw = RawCommand("Note", {"x": bytearray(b"1"), "y": memoryview(b"2")}, False)
    assert b"".join(raw._encode_ask({})[0]) == encode_box(
        {b"_command": b"Note", b"x": b"1", b"y": b"2"}
    )


def test_raw_command_checks_its_input() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        RawCommand("", None, True)
    with pytest.raises(TypeError, match="the command name must be str or bytes, not int"):
        RawCommand(5, None, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        RawCommand("X", {"_command": "Y"}, True)
    with pytest.raises(ValueError, match="given twice"):
        RawCommand("X", {"k": "1", b"k": "2"}, True)
    with pytest.raises(TypeError, match="the value of b'k' must be str or bytes, not float"):
        RawCommand("X", {"k": 1.5}, True)  # type: ignore[dict-item]
    with pytest.raises(TooLongError):
        RawCommand("X", {"k": b"x" * 65_536}, True)


def test_raw_command_answers_and_errors() -> None:
    raw = RawCommand("Cmd", None, True)
    assert raw._decode_response({b"_answer": b"1", b"x": b"2"}) == {b"x": b"2"}
    unhandled = raw._exception_for(b"UNHANDLED", b"Unhandled Command: b'Cmd'")
    assert type(unhandled) is UnhandledCommandError
    assert (unhandled.error_code, unhandled.command) == ("UNHANDLED", "Cmd")
    unknown = raw._exception_for(b"UNKNOWN", b"Unknown Error")
    assert type(unknown) is UnknownRemoteError
    other = raw._exception_for(b"MY\xff", b"bad \xff text")
    assert type(other) is RemoteAmpError
    assert (other.error_code, other.description) == ("MY\\xff", "bad \ufffd text")


# Parsers: the rest of a box in the usual layout, decoded straight from the bytes


class Shout(String):
    """A String whose decoding is its own: the parser must call it, not inline str."""

    def from_bytes(self, data: bytes) -> str:
        return data.decode("utf-8").upper()


class Mixed(Command):
    # b"ab" < b"b" by bytes, though b"\x00\x01b" < b"\x00\x02ab" with the length prefix.
    arguments = [
        ("b", Integer()),
        ("ab", String()),
        ("raw", Bytes()),
        ("ratio", Float()),
        ("flag", Boolean()),
        ("maybe", Integer(optional=True)),
        ("shout", Shout()),
        ("short", Short(optional=True)),
    ]
    response = [("total", Integer()), ("note", String(optional=True)), ("ok", Boolean())]


class Wide(Command):
    arguments = [("blob", BigBytes()), ("n", Integer())]
    response = [("text", BigString(optional=True))]


class Handed(Command):
    arguments = [("fd", Descriptor()), ("n", Integer())]
    response = [("n", Integer())]


MIXED: dict[str, Any] = {
    "b": -7,
    "ab": "héllo",
    "raw": b"\x00\xff",
    "ratio": 0.5,
    "flag": True,
    "maybe": None,
    "shout": "hey",
    "short": b"abcd",
}


def pair(key: bytes, value: bytes) -> bytes:
    return length_prefix(len(key)) + key + length_prefix(len(value)) + value


def ask_rest(command: type[Command], tag: bytes = b"1", **values: Any) -> tuple[bytes, int]:
    """A call box's bytes and the offset of its first pair after _ask and _command."""
    data = ask(command, tag, **values)
    offset = 2 + 4 + 2 + len(tag) + 2 + 8 + 2 + len(command.wire_name)
    assert data[offset - len(command.wire_name) : offset] == command.wire_name
    return data, offset


def parsed(parser: Any, data: bytes, offset: int) -> dict[str, Any]:
    """What ``parser`` gives for a whole box from ``offset``, checking its end offset."""
    values, end = parser(data, offset)
    assert end == len(data)
    return values  # type: ignore[no-any-return]


def test_parser_reads_the_usual_layout_from_an_offset() -> None:
    rest = (
        pair(b"ab", b"x")
        + pair(b"b", b"12")
        + pair(b"flag", b"False")
        + pair(b"maybe", b"-3")
        + pair(b"ratio", b"1e+100")
        + pair(b"raw", b"")
        + pair(b"short", b"ab")
        + pair(b"shout", b"quiet")
        + b"\x00\x00"
    )
    before, after = b"\x00\x07_answer\x00\x01!", b"\x00\x01\x00\x00\x00\x00"
    values, end = Mixed._parse_arguments(before + rest + after, len(before))  # type: ignore[misc]
    assert end == len(before) + len(rest)
    assert values == {
        "b": 12,
        "ab": "x",
        "raw": b"",
        "ratio": 1e100,
        "flag": False,
        "maybe": -3,
        "shout": "QUIET",
        "short": b"ab",
    }
    assert [type(values[k]) for k in ("b", "ratio", "flag")] == [int, float, bool]


def test_parser_gives_none_for_absent_optional_values() -> None:
    rest = pair(b"ok", b"True") + pair(b"total", b"0") + b"\x00\x00"
    assert parsed(Mixed._parse_response, rest, 0) == {"total": 0, "note": None, "ok": True}
    rest = pair(b"note", b"") + pair(b"ok", b"False") + pair(b"total", b"5") + b"\x00\x00"
    assert parsed(Mixed._parse_response, rest, 0) == {"total": 5, "note": "", "ok": False}


def test_parser_of_a_schema_without_fields_takes_just_the_end() -> None:
    assert Ping._parse_arguments is not None
    assert Ping._parse_response is not None
    assert Ping._parse_arguments(b"xx\x00\x00", 2) == ({}, 4)
    assert Ping._parse_response(b"\x00\x00\x00\x00", 0) == ({}, 2)


@pytest.mark.parametrize(
    "values",
    [
        MIXED,
        {**MIXED, "maybe": 0, "short": None},
        {**MIXED, "ab": "", "raw": b"x" * 300, "ratio": float("inf"), "flag": False},
        {**MIXED, "b": 10**40, "ratio": -0.0, "maybe": -1, "shout": "é"},
    ],
)
@pytest.mark.parametrize("tag", [b"1", b"ff", b"x" * 200])
def test_parse_arguments_of_encoded_calls_is_the_decode_of_the_box(
    values: dict[str, Any], tag: bytes
) -> None:
    data, offset = ask_rest(Mixed, tag, **values)
    [box] = BoxDecoder().receive_data(data)
    expected = Mixed._decode_arguments(box)
    assert parsed(Mixed._parse_arguments, data, offset) == expected
    assert expected == {**values, "shout": values["shout"].upper()}


@pytest.mark.parametrize("tag", [b"1", b"abc"])
@pytest.mark.parametrize(
    "values",
    [
        {"total": 3, "note": None, "ok": True},
        {"total": -3, "note": "n\u00f6te", "ok": False},
        {"total": 0, "note": "", "ok": True},
    ],
)
def test_parse_response_of_encoded_answers_is_the_decode_of_the_box(
    values: dict[str, Any], tag: bytes
) -> None:
    data = Mixed._encode_answer(tag, values)
    [box] = BoxDecoder().receive_data(data)
    offset = 2 + 7 + 2 + len(tag)
    assert data[:offset] == b"\x00\x07_answer" + length_prefix(len(tag)) + tag
    assert parsed(Mixed._parse_response, data, offset) == Mixed._decode_response(box) == values


def test_parsers_of_other_commands_match_their_decoders() -> None:
    data, offset = ask_rest(Sum, b"7", a=13, b=81)
    assert parsed(Sum._parse_arguments, data, offset) == {"a": 13, "b": 81}
    data = Sum._encode_answer(b"7", {"total": 94})
    assert parsed(Sum._parse_response, data, 12) == {"total": 94}
    data, offset = ask_rest(Greet, b"1", name="Ann")
    assert parsed(Greet._parse_arguments, data, offset) == {"name": "Ann", "title": None}


SUM_REST = pair(b"a", b"1") + pair(b"b", b"2") + b"\x00\x00"


@pytest.mark.parametrize(
    "rest",
    [
        # Another key: before, between and after the fields.
        pair(b"Z", b"1") + SUM_REST,
        pair(b"a", b"1") + pair(b"aa", b"0") + pair(b"b", b"2") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"2") + pair(b"c", b"3") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"2") + pair(b"_ask", b"3") + b"\x00\x00",
        # Out of order.
        pair(b"b", b"2") + pair(b"a", b"1") + b"\x00\x00",
        # Repeated.
        pair(b"a", b"1") + pair(b"a", b"1") + pair(b"b", b"2") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"2") + pair(b"b", b"2") + b"\x00\x00",
        # Missing.
        pair(b"a", b"1") + b"\x00\x00",
        pair(b"b", b"2") + b"\x00\x00",
        b"\x00\x00",
        # Values that do not decode.
        pair(b"a", b"x") + pair(b"b", b"2") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"2.5") + b"\x00\x00",
        # No end marker: the next box, or nothing.
        pair(b"a", b"1") + pair(b"b", b"2") + pair(b"_answer", b"1") + b"\x00\x00",
        pair(b"a", b"1") + pair(b"b", b"2"),
        b"",
    ],
)
def test_parser_refuses_what_is_not_the_usual_layout(rest: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any exception: the box goes the general way
        Sum._parse_arguments(b"\x00\x00" + rest, 2)  # type: ignore[misc]


def test_parser_expects_keys_sorted_by_their_bytes() -> None:
    # b"ab" < b"b", though its header (with the length prefix) sorts after.
    data, offset = ask_rest(Mixed, **MIXED)
    assert data[offset:].startswith(pair(b"ab", "héllo".encode()) + pair(b"b", b"-7"))
    swapped = (
        data[:offset]
        + pair(b"b", b"-7")
        + pair(b"ab", "héllo".encode())
        + data[offset + len(pair(b"ab", "héllo".encode()) + pair(b"b", b"-7")) :]
    )
    assert Mixed._decode_arguments(parse_boxes(swapped)[0]) == Mixed._decode_arguments(
        parse_boxes(data)[0]
    )
    with pytest.raises(Exception):  # noqa: B017
        Mixed._parse_arguments(swapped, offset)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"flag", b"true"),
        (b"flag", b"1"),
        (b"ratio", b"half"),
        (b"ab", b"\xff"),
        (b"shout", b"\xc3"),
        (b"b", b"0x10"),
    ],
)
def test_parser_refuses_a_value_that_does_not_decode(key: bytes, value: bytes) -> None:
    data, offset = ask_rest(Mixed, **MIXED)
    box = {**BoxDecoder().receive_data(data)[0], key: value}
    bad = encode_box(box)
    with pytest.raises(Exception):  # noqa: B017
        Mixed._parse_arguments(bad, offset)  # type: ignore[misc]
    with pytest.raises(ValueError, match="does not decode"):
        Mixed._decode_arguments(box)


def test_parser_refuses_every_truncation() -> None:
    for data, offset, parser in [
        (*ask_rest(Mixed, **MIXED), Mixed._parse_arguments),
        (*ask_rest(Mixed, **{**MIXED, "maybe": 5, "short": None}), Mixed._parse_arguments),
        (Mixed._encode_answer(b"1", {"total": 1, "ok": True}), 12, Mixed._parse_response),
        (
            Mixed._encode_answer(b"1", {"total": 1, "note": "x", "ok": True}),
            12,
            Mixed._parse_response,
        ),
    ]:
        assert parser is not None
        assert parser(data, offset)[1] == len(data)
        for cut in range(offset, len(data)):
            with pytest.raises(Exception):  # noqa: B017
                parser(data[:cut], offset)


def test_there_are_no_parsers_for_multi_key_types_or_descriptors() -> None:
    assert Wide._arguments_schema.multi_key
    assert (Wide._parse_arguments, Wide._parse_response) == (None, None)
    assert (Split._parse_arguments, Split._parse_response) == (None, None)
    # Only the side with the multi-key type goes without.
    assert SplitNote._parse_arguments is None
    assert SplitNote._parse_response is not None
    assert Handed._uses_descriptors
    assert (Handed._parse_arguments, Handed._parse_response) == (None, None)


def test_subclass_gets_its_own_parsers() -> None:
    class More(Sum):
        arguments = [*Sum.arguments, ("c", Integer())]

    data, offset = ask_rest(More, a=1, b=2, c=3)
    assert parsed(More._parse_arguments, data, offset) == {"a": 1, "b": 2, "c": 3}
    with pytest.raises(Exception):  # noqa: B017
        Sum._parse_arguments(data, offset)  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(),
    st.text(),
    st.binary(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none() | st.integers(min_value=-(10**30), max_value=10**30),
    st.none() | st.binary(max_size=4),
    st.binary(min_size=1, max_size=8),
)
def test_parse_of_the_encoding_is_the_decode_of_the_box(
    b: int,
    ab: str,
    raw: bytes,
    ratio: float,
    flag: bool,
    maybe: int | None,
    short: bytes | None,
    tag: bytes,
) -> None:
    values = {
        "b": b,
        "ab": ab,
        "raw": raw,
        "ratio": ratio,
        "flag": flag,
        "maybe": maybe,
        "shout": ab,
        "short": short,
    }
    data, offset = ask_rest(Mixed, tag, **values)
    [box] = BoxDecoder(max_box_size=len(data)).receive_data(data)
    assert parsed(Mixed._parse_arguments, data, offset) == Mixed._decode_arguments(box)
    response = {"total": b, "note": None if maybe is None else ab, "ok": flag}
    data = Mixed._encode_answer(tag, response)
    [box] = BoxDecoder(max_box_size=len(data)).receive_data(data)
    assert parsed(Mixed._parse_response, data, 4 + 7 + len(tag)) == Mixed._decode_response(box)


def test_idempotent_is_false_unless_set_and_is_checked_at_class_creation() -> None:
    class Lookup(Command):
        idempotent = True

    class Charge(Command):
        pass

    assert Command.idempotent is False
    assert Lookup.idempotent is True
    assert Charge.idempotent is False
    with pytest.raises(TypeError, match="idempotent must be True or False"):

        class Wrong(Command):
            idempotent = "yes"  # type: ignore[assignment]
