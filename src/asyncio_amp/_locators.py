"""
Locators: responders that live outside the protocol class, and the fallback for
calls that nobody answers.

How a call from the peer finds its responder:

1. The protocol's own ``@Command.responder`` methods: the class's table, looked
   up by the protocol itself (the fast path, which this module never slows).
2. :meth:`AMPProtocol.locate_responder`, consulted only when that table misses.
   By default it tries each locator given as ``locators=[...]``, in order: any
   object whose class has ``@Command.responder`` methods. A subclass may
   override it to find responders some other way (dynamic dispatch).
3. :meth:`AMPProtocol.unhandled_command`, with the command's name and its raw
   argument box. It returns a raw answer box or raises ``RemoteAmpError``; by
   default it answers ``UNHANDLED``, as Twisted does.

Whatever answers, it is run like a responder of the protocol's own: it holds a
place under ``max_responders``, lends it while it calls the peer back on the same
connection, runs in a fresh copy of the connection's context, and its errors map
to error answers the same way. The responders of locators (when
``locate_responder`` is not overridden) are also given to the connection, so that
their calls are decoded straight from the received bytes like the protocol's own.

This plays the roles of Twisted's ``CommandLocator`` (responders on another
object), ``SimpleStringLocator`` (``amp_NAME`` methods that take and return raw
boxes) and txampext's ``ComposedLocator`` (several locators in order).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ._commands import RESPONDER_ATTRIBUTE, Command, encode_unhandled_error, encode_unknown_error
from ._errors import RemoteAmpError
from ._wire import ANSWER, ASK, BOX_END, COMMAND, MAX_VALUE_LENGTH, RESERVED_KEYS, Box, encode_items

if TYPE_CHECKING:
    from ._connection import Ask

# The protocol is typed Any here: _protocol imports this module, not the reverse.
AMPProtocol = Any

__all__: list[str] = []

logger = logging.getLogger("asyncio_amp")

#: A responder as the protocol runs it: its Command (or what stands for one), the
#: bound responder, and whether calling it makes a coroutine.
Entry = tuple[Any, Callable[..., Any], bool]


def responders_of(locator: object) -> dict[bytes, Entry]:
    """
    The ``@Command.responder`` methods of ``locator``'s class, bound to it.

    As for a protocol class, a subclass's method overrides its base's, and the
    methods are looked up on the object, so an override without the decorator
    still answers.

    Returns:
        Command wire names to entries.
    """
    table: dict[bytes, tuple[type[Command], str]] = {}
    for klass in reversed(type(locator).__mro__):
        for attribute, value in vars(klass).items():
            commands = getattr(value, RESPONDER_ATTRIBUTE, None)
            if commands:
                for command in commands:
                    table[command.wire_name] = (command, attribute)
    entries: dict[bytes, Entry] = {}
    for name, (command, attribute) in table.items():
        bound = getattr(locator, attribute)
        entries[name] = (command, bound, inspect.iscoroutinefunction(bound))
    return entries


class Located:
    """
    The locators of one protocol: their responders, in order, and their parsers.

    Built when the locators are set, so that a call finds its responder with one
    dict lookup.
    """

    __slots__ = ("ask_parsers", "locators", "table")

    def __init__(
        self,
        locators: Iterable[object],
        own_table: Mapping[bytes, Any],
        own_parsers: Mapping[bytes, Any],
    ) -> None:
        self.locators = tuple(locators)
        table: dict[bytes, Entry] = {}
        for locator in reversed(self.locators):  # the first locator wins
            if locator is None or isinstance(locator, str | bytes | type):
                raise TypeError(
                    f"a locator is an object with @Command.responder methods, not {locator!r}"
                )
            table.update(responders_of(locator))
        # The protocol's own responders come first: theirs are never consulted here.
        self.table = {name: entry for name, entry in table.items() if name not in own_table}
        parsers: dict[bytes, Any] = {
            name: (entry[0]._parse_arguments, entry)
            for name, entry in self.table.items()
            if entry[0]._parse_arguments is not None
        }
        parsers.update(own_parsers)
        #: For the connection: its own parsers and those of the locators' commands.
        self.ask_parsers = parsers


F = TypeVar("F", bound=Callable[..., Any])

# Marks AMPProtocol's own locate_responder and unhandled_command: an override
# lacks it.
_DEFAULT_HOOK = "__amp_default_hook__"


def default_hook(method: F) -> F:
    """Mark one of AMPProtocol's default hooks, so that an override can be told apart."""
    setattr(method, _DEFAULT_HOOK, True)
    return method


def is_default_hook(method: object) -> bool:
    """Whether ``method`` is one of AMPProtocol's default hooks, not an override."""
    return getattr(method, _DEFAULT_HOOK, False) is True


def default_locate(protocol: AMPProtocol, name: bytes) -> Callable[..., Any] | None:
    """What ``AMPProtocol.locate_responder`` returns unless overridden."""
    own = protocol._responder_table.get(name)
    if own is not None:
        responder: Callable[..., Any] = getattr(protocol, own[1])
        return responder
    located: Located | None = protocol._locators
    if located is not None:
        entry = located.table.get(name)
        if entry is not None:
            return entry[1]
    return None


def locate(protocol: AMPProtocol, event: Ask) -> Entry | None:
    """
    The entry that answers ``event``, a call the protocol's own table misses.

    It is a located responder, or ``unhandled_command`` standing in for one. When
    the answer is already settled (the default ``UNHANDLED``, or a
    ``locate_responder`` that fails), it is sent here and ``None`` is returned.
    """
    name = event.command
    tag = event.tag
    cls = type(protocol)
    if is_default_hook(cls.locate_responder):
        located: Located | None = protocol._locators
        entry = None if located is None else located.table.get(name)
        if entry is not None:
            return entry
    else:
        try:
            responder = protocol.locate_responder(name)
            entry = None if responder is None else _entry_for(name, responder)
        except Exception as exc:
            logger.error(
                "%s.locate_responder(%r) for %s failed (%s: %s)%s",
                cls.__qualname__,
                name,
                protocol._peer,
                type(exc).__name__,
                exc,
                "; answering UNKNOWN" if tag is not None else "",
                exc_info=exc,
            )
            protocol._responded(None if tag is None else encode_unknown_error(tag))
            return None
        if entry is not None:
            return entry
    if is_default_hook(cls.unhandled_command) and protocol._incoming is None:
        # (With incoming middleware, the default unhandled_command answers
        # UNHANDLED below, at the end of the middleware chain.)
        logger.warning(
            "%s called %r, which has no responder%s",
            protocol._peer,
            name,
            "; answering UNHANDLED" if tag is not None else "",
        )
        protocol._responded(None if tag is None else encode_unhandled_error(tag, name))
        return None
    box = {key: value for key, value in event.box.items() if key not in (ASK, COMMAND)}
    stand_in = _Unhandled(name)
    unhandled = protocol.unhandled_command
    if inspect.iscoroutinefunction(unhandled):
        return stand_in, functools.partial(_unhandled_async, unhandled, name, box), True
    return stand_in, functools.partial(_unhandled_call, unhandled, name, box), False


def _entry_for(name: bytes, responder: Callable[..., Any]) -> Entry:
    """The entry of a responder that ``locate_responder`` returned for ``name``."""
    if not callable(responder):
        raise TypeError(f"it returned {responder!r}, which is not callable")
    for command in getattr(responder, RESPONDER_ATTRIBUTE, ()):
        if command.wire_name == name:
            return command, responder, inspect.iscoroutinefunction(responder)
    raise TypeError(
        f"it returned {responder!r}, which is not marked as the responder of a Command "
        f"named {name!r} (@Command.responder)"
    )


class _ErrorAnswer(Exception):
    """An error answer that ``unhandled_command`` asked for, with its wire code."""

    def __init__(self, code: bytes, description: str) -> None:
        super().__init__(description)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


def _error_answer(exc: RemoteAmpError) -> _ErrorAnswer | None:
    code = exc.error_code
    wire = code if isinstance(code, bytes) else str(code).encode("utf-8", "replace")
    if len(wire) > MAX_VALUE_LENGTH:
        return None  # not an answer that can go: the general path answers UNKNOWN
    return _ErrorAnswer(wire, str(exc.description))


def _unhandled_call(
    unhandled: Callable[[bytes, Box], Any], name: bytes, box: Box
) -> Box | Awaitable[Box]:
    try:
        result = unhandled(name, box)
    except RemoteAmpError as exc:
        answer = _error_answer(exc)
        if answer is None:
            raise
        raise answer from exc
    if inspect.isawaitable(result):
        return _awaited(result)
    return result  # type: ignore[no-any-return]


async def _unhandled_async(
    unhandled: Callable[[bytes, Box], Awaitable[Box]], name: bytes, box: Box
) -> Box:
    return await _awaited(unhandled(name, box))


async def _awaited(result: Awaitable[Box]) -> Box:
    try:
        return await result
    except RemoteAmpError as exc:
        answer = _error_answer(exc)
        if answer is None:
            raise
        raise answer from exc


class _Unhandled:
    """
    What stands for a Command while ``unhandled_command`` answers a call.

    It has what the protocol's responder machinery asks of a Command: no
    arguments to decode, a raw answer box to encode, and the error answers that
    ``unhandled_command`` raises as ``RemoteAmpError``.
    """

    __slots__ = ("__qualname__", "name")

    _uses_descriptors = False
    _plain_answer = None
    close_after_answer = False

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.__qualname__ = f"unhandled_command({name!r})"

    @staticmethod
    def _fast_arguments(box: Mapping[bytes, bytes]) -> dict[str, Any]:
        return {}  # the box goes to unhandled_command as it came

    _decode_arguments = _fast_arguments

    def _encode_answer(self, tag: bytes, values: Mapping[Any, Any]) -> bytes:
        """Encode a raw answer box; raises if it breaks AMP's rules or limits."""
        if not isinstance(values, Mapping):
            raise TypeError(
                f"unhandled_command returned {type(values).__name__}, not a dict of bytes to bytes"
            )
        items: list[tuple[bytes, bytes]] = []
        for key, value in values.items():
            if type(key) is not bytes:
                raise TypeError(f"answer keys are bytes, not {type(key).__name__}: {key!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"{key!r} is a reserved AMP key, not a response key")
            if type(value) is not bytes:
                raise TypeError(
                    f"answer values are bytes, not {type(value).__name__} (key {key!r})"
                )
            items.append((key, value))
        items.append((ANSWER, tag))
        parts: list[bytes] = []
        encode_items(sorted(items), parts)  # checks every length
        parts.append(BOX_END)
        return b"".join(parts)

    @staticmethod
    def _error_code_for(exc: BaseException) -> tuple[bytes, bool] | None:
        if isinstance(exc, _ErrorAnswer):
            return exc.code, False
        return None
