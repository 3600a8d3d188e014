"""
Commands: the schema of one remote call, checked once when the class is created.

A [`Command`][] subclass names its arguments, its response and the exceptions
it maps to wire error codes. At class creation every name is encoded to wire bytes
and the box layouts are computed, so encoding a call is one pass over the values
and one ``bytes.join``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from ._arguments import (
    Argument,
    Boolean,
    Bytes,
    Float,
    Integer,
    String,
    check_chunk_keys,
    python_name,
    wire_name,
)
from ._errors import (
    ProtocolError,
    RemoteAmpError,
    TooLongError,
    UnhandledCommandError,
    UnknownRemoteError,
)
from ._wire import (
    ANSWER,
    ASK,
    BOX_END,
    COMMAND,
    ERROR,
    ERROR_CODE,
    ERROR_DESCRIPTION,
    MAX_VALUE_LENGTH,
    PREFIXES,
    RESERVED_KEYS,
    UNHANDLED_ERROR_CODE,
    UNKNOWN_ERROR_CODE,
    UNKNOWN_ERROR_DESCRIPTION,
    Box,
    _speedups,
    encode_items,
    length_prefix,
)

__all__ = ["Command"]

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("asyncio_amp")

# The attribute @Command.responder sets on a function: the Command classes it answers.
RESPONDER_ATTRIBUTE = "__amp_responds_to__"

ErrorMap = Mapping[type[BaseException], str | bytes]


def _with_context(exc: TypeError | ValueError, where: str) -> TypeError | ValueError:
    """Return a copy of ``exc`` (as a plain TypeError or ValueError) that says where it happened."""
    kind = TypeError if isinstance(exc, TypeError) else ValueError
    return kind(f"{where}: {exc}")


class _Field:
    """One argument or response key: its wire name, Python name and type."""

    __slots__ = ("argument", "header", "key", "name", "optional")

    def __init__(self, key: bytes, argument: Argument[Any]) -> None:
        self.key = key
        self.name = python_name(key)
        self.argument = argument
        self.optional = argument.optional
        # The key's length prefix and bytes, written once here rather than per call.
        self.header = PREFIXES[len(key)] + key


class _Schema:
    """
    The keys of one box kind (the arguments, or the response) and how to write them.

    ``specials`` are the protocol keys that go in the same box (``_ask`` and
    ``_command``, or ``_answer``): their values are given per box. Keys are
    written in sorted order, so the position of every key, special or not, is
    computed here once.
    """

    __slots__ = ("by_name", "fields", "multi_key", "owner", "steps")

    def __init__(
        self, owner: str, what: str, spec: Iterable[tuple[str | bytes, Argument[Any]]]
    ) -> None:
        self.owner = owner
        fields: list[_Field] = []
        seen: set[bytes] = set()
        for item in spec:
            try:
                name, argument = item
            except (TypeError, ValueError):
                raise TypeError(
                    f"{owner}.{what} holds (name, Argument) pairs, not {item!r}"
                ) from None
            key = wire_name(name, what, owner)
            if not isinstance(argument, Argument):
                raise TypeError(
                    f"{owner}.{what}: {key.decode(errors='replace')!r} needs an Argument "
                    f"instance such as Integer(), not {argument!r}"
                )
            if key in RESERVED_KEYS:
                raise TypeError(f"{owner}.{what}: {key!r} is a key reserved by AMP")
            if key in seen:
                raise TypeError(f"{owner}.{what}: {key!r} appears twice")
            seen.add(key)
            fields.append(_Field(key, argument))
        kind = "argument" if what == "arguments" else "response value"
        check_chunk_keys(((f.key, f.argument) for f in fields), f"{owner}.{what}", kind)
        by_name: dict[str, _Field] = {}
        for field in fields:
            if field.name in by_name:
                raise TypeError(
                    f"{owner}.{what}: {by_name[field.name].key!r} and {field.key!r} "
                    f"both map to the Python name {field.name!r}"
                )
            by_name[field.name] = field
        self.fields = tuple(sorted(fields, key=lambda f: f.key))
        self.by_name = by_name
        self.multi_key = any(f.argument.multi_key for f in fields)
        self.steps: tuple[tuple[bytes, _Field | int], ...] = ()

    def with_specials(self, specials: Sequence[bytes]) -> tuple[tuple[bytes, _Field | int], ...]:
        """Return the write order of the fields and the special keys (by index)."""
        entries: list[tuple[bytes, _Field | int]] = [(f.key, f) for f in self.fields]
        entries += [(key, i) for i, key in enumerate(specials)]
        entries.sort(key=lambda entry: entry[0])
        return tuple((PREFIXES[len(key)] + key, what) for key, what in entries)

    def encode(
        self,
        steps: tuple[tuple[bytes, _Field | int], ...],
        values: Mapping[str, Any],
        specials: list[bytes | None],
        parts: list[bytes],
        box_kind: str,
    ) -> int:
        """
        Append the wire form of ``values`` and ``specials`` to ``parts``.

        A special given as ``None`` is a placeholder (the tag) that the caller fills
        in: the index of its part, which must become the length prefix and the
        tag, is returned (-1 if there is none). So a tag is taken only after the
        whole box has been checked.

        Raises:
            TypeError: An unknown name, a missing required value, or a value of the
                wrong type.
            ValueError: A value that its type cannot represent.
            TooLongError: A value over 65,535 bytes.
        """
        by_name = self.by_name
        for name in values:
            if name not in by_name:
                article = "an" if box_kind[0] in "aeiou" else "a"
                raise TypeError(f"{self.owner}: {name!r} is not {article} {box_kind} name")
        if self.multi_key:
            return self._encode_sorted(steps, values, specials, parts, box_kind)
        slot = -1
        for header, what in steps:
            if type(what) is int:
                special = specials[what]
                if special is None:
                    # The tag: checked and filled in by the caller.
                    parts.append(header)
                    slot = len(parts)
                    parts.append(b"")
                    continue
                value = special
            else:
                field: _Field = what  # type: ignore[assignment]  # the only other kind
                given = values.get(field.name)
                if given is None:
                    if field.optional:
                        continue
                    raise TypeError(f"{self.owner}: {box_kind} {field.name!r} is missing")
                try:
                    value = field.argument.to_bytes(given)
                except TooLongError:
                    raise
                except (TypeError, ValueError) as exc:
                    raise _with_context(exc, f"{self.owner}: {box_kind} {field.name!r}") from exc
            n = len(value)
            if n > MAX_VALUE_LENGTH:
                raise TooLongError(header[2:], n, MAX_VALUE_LENGTH, is_key=False)
            parts.append(header)
            parts.append(length_prefix(n))
            parts.append(value)
        return slot

    def _encode_sorted(
        self,
        steps: tuple[tuple[bytes, _Field | int], ...],
        values: Mapping[str, Any],
        specials: list[bytes | None],
        parts: list[bytes],
        box_kind: str,
    ) -> int:
        # The general path, for types that write several keys: build the box as a
        # dict and sort it, like encode_box.
        box: Box = {}
        for field in self.fields:
            value = values.get(field.name)
            if value is None:
                if field.optional:
                    continue
                raise TypeError(f"{self.owner}: {box_kind} {field.name!r} is missing")
            try:
                field.argument.to_box(field.key, value, box)
            except TooLongError:
                raise
            except (TypeError, ValueError) as exc:
                raise _with_context(exc, f"{self.owner}: {box_kind} {field.name!r}") from exc
        slot_key = None
        for header, what in steps:
            if type(what) is not int:
                continue
            key = header[2:]
            special = specials[what]
            if special is None:
                slot_key = key
                box[key] = b""
            else:
                box[key] = special
        items = sorted(box.items())
        start = len(parts)
        encode_items(items, parts)
        if slot_key is None:
            return -1
        # Each item is four parts: key prefix, key, value prefix, value.
        index = next(i for i, (key, _) in enumerate(items) if key == slot_key)
        return start + 4 * index + 2

    def decode(self, box: Mapping[bytes, bytes], box_kind: str) -> dict[str, Any]:
        """
        Decode the fields of ``box`` to Python values, keyed by Python name.

        Keys the schema does not name are ignored. A missing optional value
        decodes to ``None``.

        Raises:
            KeyError: A required key is missing.
            ValueError: A value does not decode (the error names the key).
        """
        result: dict[str, Any] = {}
        for field in self.fields:
            try:
                value = field.argument.from_box(field.key, box)
            except Exception as exc:
                raise ValueError(
                    f"{self.owner}: {box_kind} {field.name!r} does not decode: {exc}"
                ) from exc
            if value is None and not field.optional:
                raise KeyError(f"{self.owner}: {box_kind} {field.name!r} is missing")
            result[field.name] = value
        return result


class _Fallback(Exception):
    """Raised by compiled code when a value needs the general path (usually to report an error)."""


# How the compiled encoders and decoders handle the built-in types inline, without a
# method call. Only exact instances of these classes qualify: a subclass may override
# to_bytes or from_bytes. {v} is the value, {a} the argument's bound method.
_INLINE_ENCODE = {
    Integer: '(b"%d" % {v}) if type({v}) is int else {a}({v})',
    Bytes: "{v} if type({v}) is bytes else {a}({v})",
    String: '{v}.encode("utf-8") if type({v}) is str else {a}({v})',
    Float: 'repr({v}).encode("ascii") if type({v}) is float else {a}({v})',
}
_INLINE_DECODE = {
    Integer: "int({x})",
    Bytes: "{x}",
    String: '{x}.decode("utf-8")',
    Float: "float({x})",
}


def _compile_encoder(
    name: str,
    steps: tuple[tuple[bytes, _Field | int], ...],
    specials: Sequence[bytes | str | None],
) -> Callable[..., Any]:
    """
    Generate a function that writes one box of a schema, keys in sorted order.

    ``specials`` gives, by index, the value of each special key: constant bytes,
    the name of a parameter of the generated function (the tag of an answer), or
    ``None`` for the tag placeholder of an ask, whose index in the parts the
    function returns with them. The function raises ``_Fallback`` for
    anything unusual (a missing, unknown, mistyped or over-long value); the caller
    then takes the general path, which reports the error precisely. Adjacent
    constant parts are joined here, once.

    Raises:
        _Fallback: The schema has a type that writes several keys.
    """
    namespace: dict[str, Any] = {"_Fallback": _Fallback, "_P": PREFIXES}
    has_optional = any(type(w) is not int and w.optional for _, w in steps)  # type: ignore[union-attr]
    params = [p for p in specials if isinstance(p, str)]
    body: list[str] = ["    count = 0"] if has_optional else []
    pending: list[str] = []  # expressions of parts not yet added to `parts`
    started = False  # whether `parts` exists yet
    constant = b""
    slot: str | None = None
    required = 0

    def const(value: bytes) -> str:
        key = f"_C{len(namespace)}"
        namespace[key] = value
        return key

    def flush_constant() -> None:
        nonlocal constant
        if constant:
            pending.append(const(constant))
            constant = b""

    def flush_pending() -> None:
        nonlocal started
        flush_constant()
        if not started:
            body.append(f"    parts = [{', '.join(pending)}]")
            started = True
        elif pending:
            body.append(f"    parts += ({', '.join(pending)},)")
        pending.clear()

    for index, (header, what) in enumerate(steps):
        if type(what) is int:
            special = specials[what]
            if isinstance(special, bytes):
                constant += header + length_prefix(len(special)) + special
                continue
            constant += header
            flush_constant()
            if special is None:
                if has_optional:
                    flush_pending()
                    slot = "slot"
                    body.append("    slot = len(parts)")
                else:
                    slot = str(len(pending))
                pending.append('b""')
            else:
                pending.append(f"_P[len({special})] + {special}")
            continue
        field: _Field = what  # type: ignore[assignment]  # the only other kind
        if field.argument.multi_key:
            raise _Fallback
        v, p, n = f"v{index}", f"p{index}", f"n{index}"
        namespace[f"_a{index}"] = field.argument.to_bytes
        template = _INLINE_ENCODE.get(type(field.argument), "{a}({v})")
        encode = [
            f"{p} = {template.format(v=v, a=f'_a{index}')}",
            f"{n} = len({p})",
            f"if {n} > {MAX_VALUE_LENGTH}:",
            "    raise _Fallback",
        ]
        prefix = f"_P[{n}] if {n} < {len(PREFIXES)} else {n}.to_bytes(2, 'big')"
        if field.optional:
            flush_pending()
            body.append(f"    {v} = values.get({field.name!r}, values)")
            body.append(f"    if {v} is not values:")
            body.append("        count += 1")
            body.append(f"        if {v} is not None:")
            body += ["            " + line for line in encode]
            body.append(f"            parts += ({const(header)}, {prefix}, {p})")
        else:
            required += 1
            # A missing key raises KeyError: the caller's general path reports it.
            body.append(f"    {v} = values[{field.name!r}]")
            body.append(f"    if {v} is None:")
            body.append("        raise _Fallback")
            body += ["    " + line for line in encode]
            constant += header
            flush_constant()
            pending.append(prefix)
            pending.append(p)
    constant += BOX_END
    flush_pending()
    count = f"count + {required}" if has_optional else str(required)
    body.append(f"    if len(values) != {count}:")
    body.append("        raise _Fallback")
    body.append(f"    return parts, {slot}" if slot is not None else "    return parts")
    source = f"def encode(values{''.join(', ' + p for p in params)}):\n" + "\n".join(body)
    exec(compile(source, f"<encoder of {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace["encode"]
    return _accelerated_encoder(function, steps, specials)


# The kinds of values the compiled accelerator's Encoder encodes itself, as _INLINE_ENCODE
# does (and Boolean.to_bytes for an exact bool); a schema with any other type keeps the
# generated function.
_ENCODER_KINDS = {Integer: 1, Bytes: 2, String: 3, Float: 4, Boolean: 5}


def _accelerated_encoder(
    function: Callable[..., Any],
    steps: tuple[tuple[bytes, _Field | int], ...],
    specials: Sequence[bytes | str | None],
) -> Callable[..., Any]:
    """
    The compiled accelerator's mirror of the generated encoder ``function``, if it is in use.

    Its steps are those of ``_compile_encoder``: runs of constant bytes (adjacent ones
    joined), the tag's slot, a parameter (the tag of an answer), and the fields. It
    calls ``function`` for any value it does not handle itself.
    """
    if _speedups is None:
        return function
    params = [p for p in specials if isinstance(p, str)]
    spec: list[tuple[Any, ...]] = []
    constant = b""
    for header, what in steps:
        if type(what) is int:
            special = specials[what]
            if isinstance(special, bytes):
                constant += header + length_prefix(len(special)) + special
                continue
            spec.append((0, constant + header))
            constant = b""
            spec.append((1,) if special is None else (2, params.index(special)))
            continue
        field: _Field = what  # type: ignore[assignment]  # the only other kind
        kind = _ENCODER_KINDS.get(type(field.argument))
        if kind is None:
            return function
        if constant:
            spec.append((0, constant))
            constant = b""
        spec.append((3, field.name, header, kind, field.optional))
    spec.append((0, constant + BOX_END))
    encoder: Callable[..., Any] = _speedups.Encoder(function, tuple(spec), len(params))
    return encoder


def _compile_decoder(name: str, fields: tuple[_Field, ...]) -> Callable[..., dict[str, Any]]:
    """
    Generate a function that decodes the fields of a box to a dict of Python values.

    It raises ``_Fallback`` (or any other exception) when a value is missing
    or does not decode; the caller then takes the general path to report it.
    """
    namespace: dict[str, Any] = {}
    entries = []
    for index, field in enumerate(fields):
        key = f"_k{index}"
        namespace[key] = field.key
        argument = field.argument
        if argument.multi_key:
            namespace[f"_b{index}"] = argument.from_box
            expr = f"_b{index}({key}, box)"
            if not field.optional:
                expr = f"_need({expr})"
        else:
            namespace[f"_a{index}"] = argument.from_bytes
            template = _INLINE_DECODE.get(type(argument), "_a{i}({x})")
            if field.optional:
                expr = f"(None if (x{index} := box.get({key})) is None else "
                expr += template.format(x=f"x{index}", i=index) + ")"
            else:
                expr = template.format(x=f"box[{key}]", i=index)
        entries.append(f"{field.name!r}: {expr}")
    namespace["_need"] = _need
    source = "def decode(box):\n    return {" + ", ".join(entries) + "}"
    exec(compile(source, f"<decoder of {name}>", "exec"), namespace)
    function: Callable[..., dict[str, Any]] = namespace["decode"]
    return function


def _compile_parser(name: str, fields: tuple[_Field, ...]) -> Callable[..., Any] | None:
    """
    Generate a function that decodes the rest of a box straight from the bytes.

    The function takes the received bytes and the offset of the first pair after
    the special keys, and expects the usual layout: the fields' keys in sorted
    order (an optional one may be absent), then the empty key that ends the box.
    It returns the decoded values and the offset just past the box. Anything else
    (another key, a repeated key, a value that does not decode, bytes that stop
    short) raises, and the caller parses that box the general way, which reports
    any fault exactly.

    Returns ``None`` for a schema with a type that takes several keys.
    """
    if any(field.argument.multi_key for field in fields):
        return None
    namespace: dict[str, Any] = {}
    body: list[str] = []
    for index, field in enumerate(fields):
        header, v = f"_h{index}", f"v{index}"
        namespace[header] = field.header
        namespace[f"_a{index}"] = field.argument.from_bytes
        size = len(field.header)
        template = _INLINE_DECODE.get(type(field.argument), "_a{i}({x})")
        # Slices and indexing: cheaper here than startswith and struct.
        parse = ["p = s + (data[s - 2] << 8 | data[s - 1])"]
        if type(field.argument) not in (Integer, Float):
            # A long value may not be all here yet: do not copy what came of it.
            parse += ["if p > len(data):", "    raise LookupError"]
        parse.append(f"{v} = {template.format(x='data[s:p]', i=index)}")
        body.append(f"    s = p + {size + 2}")
        if field.optional:
            body.append(f"    if data[p : s - 2] == {header}:")
            body += ["        " + line for line in parse]
            body.append("    else:")
            body.append(f"        {v} = None")
        else:
            body.append(f"    if data[p : s - 2] != {header}:")
            body.append("        raise LookupError")
            body += ["    " + line for line in parse]
    # The empty key that ends the box; an IndexError if the bytes stop short.
    body.append("    if data[p] or data[p + 1]:")
    body.append("        raise LookupError")
    entries = ", ".join(f"{field.name!r}: v{index}" for index, field in enumerate(fields))
    body.append(f"    return {{{entries}}}, p + 2")
    source = "def parse(data, p):\n" + "\n".join(body)
    exec(compile(source, f"<parser of {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace["parse"]
    return _accelerated_parser(function, fields)


# The kinds of values the compiled accelerator's Parser decodes itself, as _INLINE_DECODE
# does (0: it calls the argument's from_bytes).
_PARSER_KINDS = {Integer: 1, Bytes: 2, String: 3, Float: 4}


def _accelerated_parser(
    function: Callable[..., Any], fields: tuple[_Field, ...]
) -> Callable[..., Any]:
    """The compiled accelerator's mirror of the generated parser ``function``, if it is in use."""
    if _speedups is None:
        return function
    spec = tuple(
        (
            f.name,
            f.header,
            _PARSER_KINDS.get(type(f.argument), 0),
            f.argument.from_bytes,
            f.optional,
        )
        for f in fields
    )
    parser: Callable[..., Any] = _speedups.Parser(function, spec)
    return parser


def _need(value: Any) -> Any:
    if value is None:
        raise _Fallback
    return value


def _error_map(owner: str, attribute: str, value: object) -> dict[type[BaseException], bytes]:
    items: Iterable[Any]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, Iterable) and not isinstance(value, str | bytes):
        items = value
    else:
        raise TypeError(f"{owner}.{attribute} maps exception classes to codes, not {value!r}")
    result: dict[type[BaseException], bytes] = {}
    for item in items:
        try:
            exc_type, code = item
        except (TypeError, ValueError):
            raise TypeError(
                f"{owner}.{attribute}: expected (exception, code), got {item!r}"
            ) from None
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise TypeError(f"{owner}.{attribute}: {exc_type!r} is not an exception class")
        if isinstance(code, str):
            code = code.encode("utf-8")
        if not isinstance(code, bytes) or not code:
            raise TypeError(
                f"{owner}.{attribute}: the code for {exc_type.__name__} must be a "
                "non-empty str or bytes"
            )
        if code in (UNKNOWN_ERROR_CODE, UNHANDLED_ERROR_CODE):
            raise TypeError(f"{owner}.{attribute}: {code!r} is a code reserved by AMP")
        if len(code) > MAX_VALUE_LENGTH:
            raise TypeError(f"{owner}.{attribute}: the code for {exc_type.__name__} is too long")
        result[exc_type] = code
    return result


class Command:
    """
    A remote command: its name, arguments, response and errors.

    Subclass it and set the class attributes:

        class Sum(Command):
            arguments = [("a", Integer()), ("b", Integer())]
            response = [("total", Integer())]
            errors = {ZeroDivisionError: "ZERO_DIVISION"}

    The schema is checked when the class is created; a mistake raises
    ``TypeError`` there and then.

    Attributes:
        arguments: ``(name, Argument)`` pairs sent with each call.
        response: ``(name, Argument)`` pairs of the answer.
        errors: Exception classes to wire codes (str or bytes). A responder that
            raises one of these (or a subclass) answers with the code and
            ``str(exc)``; the caller gets the class built from that description.
            So each class must accept one ``str`` argument, the description
            (``exc_type(description)``); when that call fails, the caller gets
            a [`RemoteAmpError`][] with the code and description instead, and
            a warning naming the class and the code is logged on the
            ``asyncio_amp`` logger. Inherited and merged along subclasses.
        fatal_errors: Like ``errors``, and the responder's side closes the
            connection after sending the error.
        requires_answer: If false, no ``_ask`` is sent, the peer does not answer,
            and ``call_remote`` completes at once with ``None``.
        close_after_answer: If true, the responder's side closes the connection
            right after writing a successful answer, as Twisted's
            ``responseType = QuitBox`` does; the caller still gets the answer,
            and its other pending calls fail with [`ConnectionLostError`][].
            An error answer leaves the connection open (unless the error is
            fatal), and so does a call sent without ``_ask``.
        idempotent: If true, running the command twice does no harm, so a call
            lost with its connection or its worker may be sent again on
            another one. Nothing changes on the wire.
        command_name: The name on the wire; the class name by default.

    An instance carries the arguments of one call: ``call_remote(Sum(a=1, b=2))``
    is the same as ``call_remote(Sum, a=1, b=2)``.
    """

    arguments: ClassVar[Sequence[tuple[str | bytes, Argument[Any]]]] = ()
    response: ClassVar[Sequence[tuple[str | bytes, Argument[Any]]]] = ()
    errors: ClassVar[ErrorMap] = {}
    fatal_errors: ClassVar[ErrorMap] = {}
    requires_answer: ClassVar[bool] = True
    close_after_answer: ClassVar[bool] = False
    idempotent: ClassVar[bool] = False
    command_name: ClassVar[str | bytes] = "Command"

    # Computed once per class by __init_subclass__.
    wire_name: ClassVar[bytes] = b"Command"
    _arguments_schema: ClassVar[_Schema]
    _response_schema: ClassVar[_Schema]
    _ask_steps: ClassVar[tuple[tuple[bytes, _Field | int], ...]]
    _send_steps: ClassVar[tuple[tuple[bytes, _Field | int], ...]]
    _answer_steps: ClassVar[tuple[tuple[bytes, _Field | int], ...]]
    _command_value: ClassVar[bytes]
    _all_errors: ClassVar[dict[type[BaseException], bytes]] = {}
    _all_fatal_errors: ClassVar[dict[type[BaseException], bytes]] = {}
    _code_to_exception: ClassVar[dict[bytes, type[BaseException]]] = {}
    # Compiled encoders and decoders (None where a type needs the general path).
    _fast_ask: ClassVar[Callable[..., Any] | None] = None
    _fast_answer: ClassVar[Callable[..., Any] | None] = None
    _fast_arguments: ClassVar[Callable[..., dict[str, Any]]]
    _fast_response: ClassVar[Callable[..., dict[str, Any]]]
    # The compiled encoders the protocol may call directly, without a Descriptor
    # exchange: the ask's (only when an answer is required, so it returns the
    # parts and the tag's slot) and the answer's. None where it must go through
    # _encode_ask and _encode_answer.
    _plain_ask: ClassVar[Callable[..., Any] | None] = None
    _plain_answer: ClassVar[Callable[..., Any] | None] = None
    # True if an argument or response value is a Descriptor: the protocol then
    # gives the encoders and decoders its connection's descriptor exchange.
    _uses_descriptors: ClassVar[bool] = False
    # Decode the arguments and the response straight from the received bytes,
    # when the box has the usual layout (see _compile_parser). None where they
    # cannot (several keys per value, descriptors).
    _parse_arguments: ClassVar[Callable[..., Any] | None] = None
    _parse_response: ClassVar[Callable[..., Any] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        owner = cls.__qualname__
        name = cls.__dict__.get("command_name", cls.__name__)
        cls.command_name = name
        cls.wire_name = wire_name(name, "command", owner)
        cls._command_value = length_prefix(len(cls.wire_name)) + cls.wire_name
        cls._arguments_schema = _Schema(owner, "arguments", cls.arguments)
        cls._response_schema = _Schema(owner, "response", cls.response)
        cls._ask_steps = cls._arguments_schema.with_specials((ASK, COMMAND))
        cls._send_steps = cls._arguments_schema.with_specials((COMMAND,))
        cls._answer_steps = cls._response_schema.with_specials((ANSWER,))
        cls._uses_descriptors = any(
            f.argument.uses_descriptors
            for f in (*cls._arguments_schema.fields, *cls._response_schema.fields)
        )
        if not isinstance(cls.requires_answer, bool):
            raise TypeError(f"{owner}.requires_answer must be True or False")
        if not isinstance(cls.close_after_answer, bool):
            raise TypeError(f"{owner}.close_after_answer must be True or False")
        if not isinstance(cls.idempotent, bool):
            raise TypeError(f"{owner}.idempotent must be True or False")
        try:
            if cls.requires_answer:
                cls._fast_ask = _compile_encoder(owner, cls._ask_steps, (None, cls.wire_name))
            else:
                cls._fast_ask = _compile_encoder(owner, cls._send_steps, (cls.wire_name,))
        except _Fallback:
            cls._fast_ask = None
        try:
            cls._fast_answer = _compile_encoder(owner, cls._answer_steps, ("tag",))
        except _Fallback:
            cls._fast_answer = None
        plain = not cls._uses_descriptors
        cls._plain_ask = cls._fast_ask if plain and cls.requires_answer else None
        # An answer that closes the connection takes the general path (_answer_for).
        cls._plain_answer = cls._fast_answer if plain and not cls.close_after_answer else None
        cls._fast_arguments = _compile_decoder(owner, cls._arguments_schema.fields)
        cls._fast_response = _compile_decoder(owner, cls._response_schema.fields)
        cls._parse_arguments = cls._parse_response = None
        if plain:
            cls._parse_arguments = _compile_parser(owner, cls._arguments_schema.fields)
            cls._parse_response = _compile_parser(owner, cls._response_schema.fields)
        # errors and fatal_errors accumulate along the class hierarchy, base first.
        errors: dict[type[BaseException], bytes] = {}
        fatal: dict[type[BaseException], bytes] = {}
        for klass in reversed(cls.__mro__):
            if klass is Command or not issubclass(klass, Command):
                continue
            if "errors" in klass.__dict__:
                errors.update(_error_map(owner, "errors", klass.__dict__["errors"]))
            if "fatal_errors" in klass.__dict__:
                fatal.update(_error_map(owner, "fatal_errors", klass.__dict__["fatal_errors"]))
        cls._all_errors = errors
        cls._all_fatal_errors = fatal
        code_map: dict[bytes, type[BaseException]] = {}
        for exc_type, code in (*errors.items(), *fatal.items()):
            code_map[code] = exc_type
        cls._code_to_exception = code_map

    def __init__(self, **arguments: Any) -> None:
        by_name = self._arguments_schema.by_name
        for name in arguments:
            if name not in by_name:
                raise TypeError(f"{type(self).__qualname__}: {name!r} is not an argument name")
        #: The argument values of this call, by Python name.
        self.values: dict[str, Any] = arguments

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.values.items())
        return f"{type(self).__qualname__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Command)
        return self.values == other.values

    __hash__ = None  # type: ignore[assignment]  # mutable values, like a dict

    # Public methods

    @classmethod
    def responder(cls, function: F) -> F:
        """
        Mark a method of an [`AMPProtocol`][] subclass as this command's responder.

        The method gets the decoded arguments as keyword arguments and returns a
        dict keyed like ``response`` (or a coroutine resolving to one). It is
        returned unchanged, so it can still be called directly.
        """
        if not callable(function):
            raise TypeError(f"{cls.__qualname__}.responder decorates a function, not {function!r}")
        commands: tuple[type[Command], ...] = getattr(function, RESPONDER_ATTRIBUTE, ())
        setattr(function, RESPONDER_ATTRIBUTE, (*commands, cls))
        return function

    # Private methods, used by the protocol

    @classmethod
    def _encode_ask(cls, values: Mapping[str, Any]) -> tuple[list[bytes], int]:
        """
        Encode a call's box, leaving the ``_ask`` tag to be filled in.

        Returns:
            The parts of the box and the index of the tag's part (-1 when no
            answer is required: the box then has no ``_ask``).
        """
        encoder = cls._fast_ask
        if encoder is not None:
            try:
                if cls.requires_answer:
                    result: tuple[list[bytes], int] = encoder(values)
                    return result
                return encoder(values), -1
            except Exception:  # anything unusual: the general path reports it
                pass
        parts: list[bytes] = []
        if cls.requires_answer:
            slot = cls._arguments_schema.encode(
                cls._ask_steps, values, [None, cls.wire_name], parts, "argument"
            )
        else:
            slot = cls._arguments_schema.encode(
                cls._send_steps, values, [cls.wire_name], parts, "argument"
            )
        parts.append(BOX_END)
        return parts, slot

    @classmethod
    def _encode_answer(cls, tag: bytes, values: Mapping[str, Any]) -> bytes:
        """Encode the answer box for ``tag``; raises like ``_Schema.encode``."""
        if not isinstance(values, Mapping):
            raise TypeError(
                f"the responder of {cls.__qualname__} returned {type(values).__name__}, "
                "not a dict keyed like its response"
            )
        encoder = cls._fast_answer
        if encoder is not None:
            try:
                return b"".join(encoder(values, tag))
            except Exception:  # anything unusual: the general path reports it
                pass
        parts: list[bytes] = []
        cls._response_schema.encode(cls._answer_steps, values, [tag], parts, "response")
        parts.append(BOX_END)
        return b"".join(parts)

    @classmethod
    def _decode_arguments(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        try:
            return cls._fast_arguments(box)
        except Exception:  # the general path says what is wrong
            return cls._arguments_schema.decode(box, "argument")

    @classmethod
    def _decode_response(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        try:
            return cls._fast_response(box)
        except Exception:  # the general path says what is wrong
            pass
        try:
            return cls._response_schema.decode(box, "response")
        except (KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ProtocolError(
                f"the peer's answer to {cls.__qualname__} is invalid: {message}"
            ) from exc

    @classmethod
    def _error_code_for(cls, exc: BaseException) -> tuple[bytes, bool] | None:
        """Return the wire code of ``exc`` and whether it is fatal, or ``None`` if unmapped."""
        errors = cls._all_errors
        fatal = cls._all_fatal_errors
        if not errors and not fatal:
            return None
        # Walk the exception's own classes first, so the most specific mapping wins.
        for klass in type(exc).__mro__:
            code = errors.get(klass)
            if code is not None:
                return code, False
            code = fatal.get(klass)
            if code is not None:
                return code, True
        return None

    @classmethod
    def _exception_for(cls, code: bytes, description: bytes) -> BaseException:
        """Build the exception a caller raises for an error answer."""
        text = description.decode("utf-8", "replace")
        code_text = code.decode("utf-8", "backslashreplace")
        exc_type = cls._code_to_exception.get(code)
        if exc_type is not None:
            try:
                return exc_type(text)
            except Exception as exc:  # the class does not take one string argument
                # A mistake in the schema, not in the peer: say so, rather than
                # hand the caller another class without a word.
                logger.warning(
                    "%s maps the error code %r to %s, which cannot be built from one str "
                    "argument (the description): %s: %s; the caller gets a RemoteAmpError "
                    "instead",
                    cls.__qualname__,
                    code_text,
                    exc_type.__qualname__,
                    type(exc).__name__,
                    exc,
                )
                error = RemoteAmpError(code_text, text, cls.__qualname__)
                error.__cause__ = exc
                return error
        if code == UNHANDLED_ERROR_CODE:
            return UnhandledCommandError(code_text, text, cls.__qualname__)
        return UnknownRemoteError(code_text, text, cls.__qualname__)


def encode_error(tag: bytes, code: bytes, description: bytes) -> bytes:
    """Encode an error answer; a description over 65,535 bytes is cut to fit."""
    if len(description) > MAX_VALUE_LENGTH:
        description = description[:MAX_VALUE_LENGTH]
    parts: list[bytes] = []
    encode_items(((ERROR, tag), (ERROR_CODE, code), (ERROR_DESCRIPTION, description)), parts)
    parts.append(BOX_END)
    return b"".join(parts)


def encode_unknown_error(tag: bytes) -> bytes:
    """Encode the generic ``UNKNOWN`` answer, which says nothing about the real cause."""
    return encode_error(tag, UNKNOWN_ERROR_CODE, UNKNOWN_ERROR_DESCRIPTION)


def encode_unhandled_error(tag: bytes, command: bytes) -> bytes:
    """Encode the ``UNHANDLED`` answer with Twisted's description text."""
    return encode_error(tag, UNHANDLED_ERROR_CODE, b"Unhandled Command: " + repr(command).encode())


def _raw_bytes(value: object, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}: {value!r}")


#: The arguments of a call by name: keys and values as ``str`` (sent as UTF-8) or bytes.
RawArguments = (
    Mapping[str, str | bytes] | Mapping[bytes, str | bytes] | Mapping[str | bytes, str | bytes]
)


class RawCommand:
    """
    A call by command name with wire values, for ``AMPProtocol.call_remote_box``.

    It stands in for a `Command` class in the protocol's call machinery:
    the same private methods, with no schema. Text is sent as UTF-8.
    """

    __slots__ = ("_parts", "_slot", "label", "requires_answer", "wire_name")

    _uses_descriptors = False

    def __init__(
        self,
        command: str | bytes,
        arguments: RawArguments | None,
        requires_answer: bool,
    ) -> None:
        name = command if type(command) is bytes else _raw_bytes(command, "the command name")
        if not name:
            raise ValueError("the command name cannot be empty")
        self.wire_name = name
        self.label = name.decode("utf-8", "backslashreplace")
        self.requires_answer = bool(requires_answer)
        items: dict[bytes, bytes] = {}
        for key, value in (arguments or {}).items():
            # bytes as they are: what _raw_bytes returns for them, without its calls.
            wire_key = key if type(key) is bytes else _raw_bytes(key, "an argument key")
            if wire_key in RESERVED_KEYS:
                raise ValueError(f"{wire_key!r} is a reserved AMP key, not an argument")
            if wire_key in items:
                raise ValueError(f"the argument key {wire_key!r} is given twice")
            items[wire_key] = (
                value if type(value) is bytes else _raw_bytes(value, f"the value of {wire_key!r}")
            )
        items[COMMAND] = name
        if self.requires_answer:
            items[ASK] = b""
        ordered = sorted(items.items())
        parts: list[bytes] = []
        encode_items(ordered, parts)
        parts.append(BOX_END)
        slot = -1
        if self.requires_answer:
            # Each pair is 4 parts (key length, key, value length, value); the tag
            # goes into the value part with its length, as Command._encode_ask does.
            index = 4 * ordered.index((ASK, b""))
            parts[index + 2] = b""
            slot = index + 3
        self._parts = parts
        self._slot = slot

    def _encode_ask(self, values: Mapping[str, Any]) -> tuple[list[bytes], int]:
        return self._parts, self._slot

    def _decode_response(self, box: Mapping[bytes, bytes]) -> Box:
        return {key: value for key, value in box.items() if key != ANSWER}

    # The protocol's inline answer path calls this name first.
    _fast_response = _decode_response
    _parse_response = None  # raw answers are boxes: nothing to decode straight to values

    def _exception_for(self, code: bytes, description: bytes) -> BaseException:
        text = description.decode("utf-8", "replace")
        code_text = code.decode("utf-8", "backslashreplace")
        if code == UNHANDLED_ERROR_CODE:
            return UnhandledCommandError(code_text, text, self.label)
        if code == UNKNOWN_ERROR_CODE:
            return UnknownRemoteError(code_text, text, self.label)
        return RemoteAmpError(code_text, text, self.label)
