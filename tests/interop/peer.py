"""Asyncio driver for the Twisted reference peer (``twisted_peer.py``).

Tests start the peer with ``await TwistedPeer.start()``, send it requests with
``await peer.request(op, **fields)`` and wait for its unsolicited events with
``await peer.wait_event(name, **match)``.  Values crossing the JSON boundary use
the conventions implemented by :func:`encode_value` / :func:`decode_value`:

* ints, bools, strings and ``None`` stand for themselves;
* bytes are ``{"$bytes": "<hex>"}``;
* floats are ``{"$float": "<repr>"}`` (so nan and the infinities survive);
* raw AMP boxes (``dict[bytes, bytes]``) are ``{"$box": {"<hex key>": "<hex value>"}}``;
* ``decimal.Decimal`` is ``{"$decimal": "<str(d)>"}`` (every special survives);
* an aware ``datetime`` is ``{"$datetime": "<isoformat>"}`` (offset included);
* a path is ``{"$path": "<text>"}``: a ``pathlib.Path`` here, a ``FilePath`` in the peer.

Argument types in the ``encode``/``decode``/``to_box``/``from_box`` requests are
Twisted's names (``"Unicode"`` is our String, ``"String"`` our Bytes, plus
``"Decimal"``, ``"DateTime"``, ``"Path"``, ``"BigBytes"``, ``"BigString"``),
``{"ListOf": <type>}`` or ``{"AmpList": [["<name>", <type>, <optional>], ...]}``.

Every wait is bounded; the default timeout is multiplied by the environment
variable ``AMP_TEST_TIME_SCALE`` (a float, default 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import json
import os
import pathlib
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

PEER_SCRIPT = Path(__file__).resolve().parent / "twisted_peer.py"

DEFAULT_TIMEOUT = 10.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
STDERR_TAIL = 8000


def time_scale() -> float:
    """The factor applied to every timeout (env ``AMP_TEST_TIME_SCALE``)."""
    raw = os.environ.get("AMP_TEST_TIME_SCALE", "")
    try:
        scale = float(raw) if raw else 1.0
    except ValueError:
        return 1.0
    return scale if scale > 0 else 1.0


def scaled(seconds: float) -> float:
    return seconds * time_scale()


# ---------------------------------------------------------------------------
# JSON value conventions
# ---------------------------------------------------------------------------


def encode_box(box: dict[bytes, bytes]) -> dict[str, Any]:
    """``{"$box": ...}`` for a raw box, even an empty one."""
    return {"$box": {bytes(k).hex(): bytes(v).hex() for k, v in box.items()}}


def encode_value(value: Any) -> Any:
    """Turn a Python value into its JSON representation.

    A non-empty dict whose keys are all bytes is treated as a raw box; use
    :func:`encode_box` to force that for an empty box.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"$float": repr(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat(timespec="microseconds")}
    if isinstance(value, pathlib.PurePath):
        return {"$path": str(value)}
    if isinstance(value, dict):
        if value and all(isinstance(k, (bytes, bytearray)) for k in value):
            return encode_box(value)
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    raise TypeError(f"cannot JSON-encode {value!r}")


def decode_value(value: Any) -> Any:
    """Turn a JSON representation back into a Python value."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == "$bytes":
                return bytes.fromhex(inner)
            if key == "$float":
                return float(inner)
            if key == "$box":
                return {bytes.fromhex(k): bytes.fromhex(v) for k, v in inner.items()}
            if key == "$decimal":
                return decimal.Decimal(inner)
            if key == "$datetime":
                return datetime.datetime.fromisoformat(inner)
            if key == "$path":
                return pathlib.Path(inner)
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class PeerError(Exception):
    """The peer answered a request with ``"ok": false``.

    ``type`` is the exception class name seen by Twisted (e.g.
    ``"ZeroDivisionError"``, ``"UnknownRemoteError"``, ``"ConnectionDone"``),
    ``code`` the AMP error code when there is one, ``description`` the text.
    """

    def __init__(self, type: str, code: str | None, description: str) -> None:
        super().__init__(f"{type} (code={code!r}): {description}")
        self.type = type
        self.code = code
        self.description = description


class PeerProcessError(RuntimeError):
    """The peer process died, misbehaved or did not answer in time."""


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


class TwistedPeer:
    """A running ``twisted_peer.py`` subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_file: IO[bytes]) -> None:
        self._process = process
        self._stderr_file = stderr_file
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._event_waiters: list[tuple[str, dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed_reason: str | None = None
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read_loop(), name="twisted-peer-reader")

    # -- life cycle --------------------------------------------------------------

    @classmethod
    async def start(cls) -> TwistedPeer:
        """Spawn the peer and wait (at most 20 s, scaled) for its ready event."""
        stderr_file = tempfile.TemporaryFile(prefix="twisted-peer-", suffix=".log")  # noqa: SIM115
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PEER_SCRIPT),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr_file,
                limit=1 << 30,
            )
        except BaseException:
            stderr_file.close()
            raise
        peer = cls(process, stderr_file)
        try:
            async with asyncio.timeout(scaled(START_TIMEOUT)):
                await asyncio.shield(peer._ready)
        except TimeoutError:
            await peer._kill()
            raise PeerProcessError(peer._with_stderr("peer did not become ready")) from None
        except BaseException:
            await peer._kill()
            raise
        return peer

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def stop(self) -> None:
        """Ask the peer to quit; kill it if it does not exit in time."""
        try:
            if self._process.returncode is None and self._closed_reason is None:
                with contextlib.suppress(PeerError, PeerProcessError, TimeoutError):
                    await self.request("quit", time_limit=STOP_TIMEOUT)
            try:
                async with asyncio.timeout(scaled(STOP_TIMEOUT)):
                    await self._process.wait()
            except TimeoutError:
                pass
        finally:
            await self._kill()

    async def __aenter__(self) -> TwistedPeer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _kill(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(scaled(STOP_TIMEOUT)):
                    await self._process.wait()
        if self._process.stdin is not None:
            self._process.stdin.close()
            with contextlib.suppress(Exception):
                await self._process.stdin.wait_closed()
        if not self._reader.done():
            self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        self._fail_all("peer stopped")
        if not self._stderr_file.closed:
            self._stderr_file.close()

    # -- diagnostics -------------------------------------------------------------------

    def stderr_text(self) -> str:
        """What the peer wrote to stderr so far (its Twisted log), last part only."""
        if self._stderr_file.closed:
            return "<stderr no longer available>"
        try:
            self._stderr_file.flush()
            size = self._stderr_file.seek(0, os.SEEK_END)
            self._stderr_file.seek(max(0, size - STDERR_TAIL))
            data = self._stderr_file.read()
        except (OSError, ValueError):
            return "<stderr unreadable>"
        return data.decode("utf-8", "replace")

    def _with_stderr(self, message: str) -> str:
        return (
            f"{message} (peer pid {self._process.pid}, returncode "
            f"{self._process.returncode})\n--- peer stderr ---\n{self.stderr_text()}"
        )

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        reason = "peer closed its stdout"
        try:
            while True:
                line = await stdout.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    reason = f"peer wrote a line that is not JSON: {line[:200]!r}"
                    break
                self._dispatch(message)
        except (OSError, ValueError) as exc:  # e.g. a line longer than the limit
            reason = f"error reading peer stdout: {exc!r}"
        finally:
            self._fail_all(reason)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            future = self._pending.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if "event" not in message:
            return
        if message["event"] == "ready" and not self._ready.done():
            self._ready.set_result(None)
        self.events.append(message)
        for waiter in list(self._event_waiters):
            name, match, future = waiter
            if not future.done() and _matches(message, name, match):
                future.set_result(message)

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PeerProcessError(self._with_stderr(reason)))
        self._pending.clear()
        for _, _, future in self._event_waiters:
            if not future.done():
                future.set_exception(PeerProcessError(self._with_stderr(reason)))
        if not self._ready.done():
            self._ready.set_exception(PeerProcessError(self._with_stderr(reason)))
            # Retrieve it so an unobserved failure is never logged.
            self._ready.exception()

    # -- requests ----------------------------------------------------------------------

    async def request(self, op: str, *, time_limit: float = DEFAULT_TIMEOUT, **fields: Any) -> Any:
        """Send one request and return its result (values decoded).

        Raises :class:`PeerError` if the peer replies ``ok: false`` and
        :class:`PeerProcessError` if it dies or does not answer within
        ``time_limit`` seconds (scaled by ``AMP_TEST_TIME_SCALE``).  ``fields`` are
        sent as given except that Python values (bytes, floats, boxes) are
        encoded with :func:`encode_value`.
        """
        if self._closed_reason is not None:
            raise PeerProcessError(self._with_stderr(f"peer is gone: {self._closed_reason}"))
        stdin = self._process.stdin
        assert stdin is not None
        self._next_id += 1
        request_id = self._next_id
        message = {"id": request_id, "op": op, **{k: encode_value(v) for k, v in fields.items()}}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            line = json.dumps(message, allow_nan=False, separators=(",", ":")) + "\n"
            stdin.write(line.encode("utf-8"))
            async with asyncio.timeout(scaled(time_limit)):
                await stdin.drain()
                reply = await future
        except TimeoutError:
            raise PeerProcessError(
                self._with_stderr(f"no reply to {op!r} request {request_id} in time")
            ) from None
        except (ConnectionError, BrokenPipeError) as exc:
            raise PeerProcessError(self._with_stderr(f"cannot write to peer: {exc!r}")) from None
        finally:
            self._pending.pop(request_id, None)
        if reply.get("ok"):
            return decode_value(reply.get("result"))
        error = reply.get("error") or {}
        raise PeerError(
            str(error.get("type")),
            error.get("code"),
            str(error.get("description")),
        )

    async def wait_event(
        self, event: str, *, time_limit: float = DEFAULT_TIMEOUT, **match: Any
    ) -> dict[str, Any]:
        """Return the first event named ``event`` whose fields equal ``match``.

        Events already received count: the earliest matching one in
        :attr:`events` is returned immediately.
        """
        for message in self.events:
            if _matches(message, event, match):
                return message
        if self._closed_reason is not None:
            raise PeerProcessError(self._with_stderr(f"peer is gone: {self._closed_reason}"))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter = (event, match, future)
        self._event_waiters.append(waiter)
        try:
            async with asyncio.timeout(scaled(time_limit)):
                return await future
        except TimeoutError:
            raise PeerProcessError(
                self._with_stderr(f"no {event!r} event matching {match!r} in time")
            ) from None
        finally:
            self._event_waiters.remove(waiter)

    # -- conveniences --------------------------------------------------------------------

    async def listen(self) -> int:
        """Start an AMP server on 127.0.0.1; return its port."""
        result = await self.request("listen")
        return int(result["port"])

    async def connect(self, port: int) -> int:
        """Connect an AMP client to 127.0.0.1:port; return its connection id."""
        result = await self.request("connect", port=port)
        return int(result["conn"])

    async def listen_tls(
        self,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str] | None = None,
    ) -> int:
        """Start an AMP server over TLS on 127.0.0.1; return its port.

        ``cert`` and ``key`` are PEM files; with ``ca`` (a PEM file), clients must
        present a certificate that this CA signed.
        """
        fields: dict[str, Any] = {"cert": os.fspath(cert), "key": os.fspath(key)}
        if ca is not None:
            fields["ca"] = os.fspath(ca)
        result = await self.request("listen_tls", **fields)
        return int(result["port"])

    async def connect_tls(
        self,
        port: int,
        *,
        ca: str | os.PathLike[str],
        hostname: str,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
    ) -> int:
        """Connect an AMP client over TLS to 127.0.0.1:port; return its connection id.

        The server's certificate must be signed by ``ca`` (a PEM file) and match
        ``hostname``; ``cert`` and ``key`` (PEM files) are a client certificate.
        The id comes once TCP is connected: a failed handshake is a ``lost`` event.
        """
        fields: dict[str, Any] = {"port": port, "ca": os.fspath(ca), "hostname": hostname}
        if cert is not None and key is not None:
            fields.update(cert=os.fspath(cert), key=os.fspath(key))
        result = await self.request("connect_tls", **fields)
        return int(result["conn"])

    async def call(self, conn: int, command: str, **args: Any) -> Any:
        """``callRemote`` a command on a connection; return the decoded response."""
        return await self.request("call", conn=conn, command=command, args=args)


def _matches(message: dict[str, Any], event: str, match: dict[str, Any]) -> bool:
    if message.get("event") != event:
        return False
    return all(key in message and message[key] == value for key, value in match.items())
