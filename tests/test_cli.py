"""
The asyncio-amp command, run as a real subprocess against real servers on 127.0.0.1.

Servers are ``asyncio-amp serve cli_app:Calculator`` (this directory's
``cli_app.py``) or plain asyncio servers in the test process; the Twisted
server is in ``interop/test_twisted_cli.py``. The command runs as
``python -m asyncio_amp``, and once as the installed ``asyncio-amp`` script.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import sys

import pytest
import trustme

import asyncio_amp as amp
from asyncio_amp.cli import _common, proxy
from cli_helpers import background, free_port, proxied, run_cli, served
from helpers import HOST, LONG, port_of

# The loop of the test process does not matter here: run each test once.
pytestmark = pytest.mark.asyncio_loop_only

# --help and the entry points


@pytest.mark.parametrize("subcommand", ["call", "serve", "decode", "proxy"])
async def test_every_subcommand_has_help_with_examples(subcommand: str) -> None:
    result = await run_cli(subcommand, "--help")
    assert result.status == 0
    assert "examples:" in result.out
    assert f"asyncio-amp {subcommand} " in result.out


async def test_top_level_help_and_version() -> None:
    result = await run_cli("--help")
    assert result.status == 0
    for subcommand in ("call", "serve", "decode", "proxy"):
        assert subcommand in result.out
    version = await run_cli("--version")
    assert (version.status, version.out.strip()) == (0, f"asyncio-amp {amp.__version__}")
    nothing = await run_cli()
    assert nothing.status == 2
    assert "usage:" in nothing.err and "Traceback" not in nothing.err


async def test_installed_console_script() -> None:
    script = pathlib.Path(sys.executable).parent / "asyncio-amp"
    assert script.exists(), "the asyncio-amp script is not installed next to the interpreter"
    async with served() as (_, port):
        # The script itself puts the working directory on the import path for --commands.
        result = await run_cli(
            "call", f"{HOST}:{port}", "Sum", "a=2", "b=3", "--commands", "cli_app",
            command=[str(script)],
        )  # fmt: skip
    assert (result.status, result.out) == (0, "total: 5\n")


# call: values as text, against our server


async def test_call_sends_text_and_prints_the_answer() -> None:
    async with served() as (_, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=13", "b=81")
        assert (result.status, result.out, result.err) == (0, "total: 94\n", "")
        as_json = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2", "--json")
        assert json.loads(as_json.out) == {"total": "3"}
        # Options may come anywhere among the words.
        mixed = await run_cli("call", "--json", f"{HOST}:{port}", "Sum", "--full", "a=1", "b=1")
        assert json.loads(mixed.out) == {"total": "2"}


async def test_call_remote_errors_exit_1_with_code_and_description() -> None:
    async with served() as (_, port):
        unhandled = await run_cli("call", f"{HOST}:{port}", "Nope")
        assert unhandled.status == 1
        assert (
            unhandled.err
            == "asyncio-amp: error: Nope failed: UNHANDLED: Unhandled Command: b'Nope'\n"
        )
        unknown = await run_cli("call", f"{HOST}:{port}", "Boom", "--json")
        assert unknown.status == 1
        assert json.loads(unknown.out) == {
            "error": {"code": "UNKNOWN", "description": "Unknown Error"}
        }
        mapped = await run_cli("call", f"{HOST}:{port}", "Divide", "numerator=1", "denominator=0")
        assert mapped.status == 1
        assert "ZERO_DIVISION: division by zero" in mapped.err
        # A value the server cannot decode is its error, not ours: UNKNOWN.
        bad = await run_cli("call", f"{HOST}:{port}", "Sum", "a=x", "b=1")
        assert (bad.status, bad.out) == (1, "")
        assert "UNKNOWN" in bad.err


async def test_call_no_answer_sends_without_ask() -> None:
    async with served() as (_, port):
        sent = await run_cli(
            "call", f"{HOST}:{port}", "Note", "text=fire and forget", "--no-answer"
        )
        assert (sent.status, sent.out, sent.err) == (0, "", "")
        # A command whose class says requires_answer = False needs no flag.
        typed = await run_cli(
            "call", f"{HOST}:{port}", "Note", "text=typed", "--commands", "cli_app"
        )
        assert (typed.status, typed.out) == (0, "")
        notes = await run_cli("call", f"{HOST}:{port}", "Notes", "--commands", "cli_app", "--json")
        assert json.loads(notes.out) == {"notes": ["fire and forget", "typed"]}


# call: typed with --commands


async def test_call_with_commands_types_every_value() -> None:
    async with served() as (_, port):
        result = await run_cli(
            "call", f"{HOST}:{port}", "describe-values", "--commands", "cli_app", "--json",
            "text=héllo wörld", "data=raw", "flag=yes", "ratio=0.25", "price=12.50",
            "when=2026-11-26T10:30:00.5+01:00", "numbers=[3, 1, 2]",
            'rows=[{"name": "a", "n": 1}, {"name": "b"}]', "big=" + "x" * 70_000,
            "path=/tmp/x", "max-size=7",
        )  # fmt: skip
        assert result.status == 0, result.err
        assert json.loads(result.out) == {
            "text": "héllo wörld",
            "data": "raw",
            "flag": True,
            "ratio": 0.25,
            "price": "12.50",
            "when": "2026-11-26T10:30:00.500000+01:00",
            "numbers": [3, 1, 2],
            "rows": [{"name": "a", "n": 1}, {"name": "b", "n": None}],
            "big_size": 70_000,
            "path": "PosixPath('/tmp/x')",
            "max_size": 7,
        }
        # The class name works as well as the wire name, and Python names as wire names.
        human = await run_cli(
            "call", f"{HOST}:{port}", "Describe", "--commands", "cli_app:Describe",
            "text=t", "data=d", "flag=false", "ratio=1", "price=1", "when=2026-01-01T00:00:00Z",
            "numbers=[]", "rows=[]", "max_size=1",
        )  # fmt: skip
        assert human.status == 0, human.err
        lines = human.out.splitlines()
        assert "flag: False" in lines
        assert "when: 2026-01-01T00:00:00+00:00" in lines
        assert "numbers: []" in lines
        assert "max_size: 1" in lines


async def test_call_typed_mapped_error() -> None:
    async with served() as (_, port):
        result = await run_cli(
            "call", f"{HOST}:{port}", "Divide", "numerator=1", "denominator=0",
            "--commands", "cli_app", "--json",
        )  # fmt: skip
        assert result.status == 1
        assert json.loads(result.out) == {
            "error": {"code": "ZERO_DIVISION", "description": "division by zero"}
        }
        assert result.err == "asyncio-amp: error: Divide failed: ZERO_DIVISION: division by zero\n"


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["Sum", "a=x", "b=1"], "a='x': invalid literal for int()"),
        (["Sum", "a=1"], "Sum needs b=..."),
        (["Sum", "a=1", "b=2", "c=3"], "Sum has no argument 'c' (arguments: a, b)"),
        (["Sum", "a=1", "a=2", "b=1"], "'a' is given twice"),
        (["Sum", "a"], "arguments are key=value, not 'a'"),
        (["Missing"], "no command 'Missing' in cli_app (it has: "),
        (["describe-values", "flag=maybe"], "expected true or false, not 'maybe'"),
        (["describe-values", "when=2026-01-01T00:00:00"], "needs a UTC offset"),
        (["describe-values", "numbers=[1,"], "expected a JSON list"),
        (["describe-values", 'numbers=[1, "x"]'], "invalid literal for int()"),
        (["describe-values", 'rows=[{"nope": 1}]'], "'nope' is not a field"),
    ],
)
async def test_call_bad_arguments_exit_2_before_connecting(words: list[str], message: str) -> None:
    # Nothing listens on the port: the mistake is found before connecting.
    result = await run_cli("call", f"{HOST}:{free_port()}", *words, "--commands", "cli_app")
    assert result.status == 2, result
    assert message in result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "localhost", "Sum"], "the target must be HOST:PORT, not 'localhost'"),
        (["call", "127.0.0.1:x", "Sum"], "the port must be a number"),
        (
            ["call", "127.0.0.1:1", "Sum", "--commands", "no_such_module"],
            "cannot import 'no_such_module'",
        ),
        (["call", "127.0.0.1:1", "Sum", "--commands", "cli_app:Nothing"], "'Nothing' not found"),
        (
            ["call", "127.0.0.1:1", "Sum", "--commands", "cli_app:NotAProtocol"],
            "has no Command classes",
        ),
        (["call", "127.0.0.1:1"], "call needs HOST:PORT and COMMAND"),
        (["call", "127.0.0.1:1", "a=1"], "the command name comes before the arguments"),
        (["call", "127.0.0.1:1", "Sum", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["call", "127.0.0.1:1", "Sum", "--cafile", "/nonexistent/ca.pem"],
            "cannot load the TLS files",
        ),
        (["call", "127.0.0.1:1", "Sum", "_ask=1"], "reserved AMP key"),
        (
            ["call", "127.0.0.1:1", "Sum", "a=" + "x" * 70_000],
            "70000 bytes; AMP allows at most 65535",
        ),
        (["decode", "a", "b"], "unrecognized arguments: b"),
        (["decode", "/nonexistent/file"], "cannot read /nonexistent/file"),
        (["serve", "no_such_module:App"], "cannot import 'no_such_module'"),
        (["serve", "cli_app"], "MODULE:ProtocolClass"),
        (["serve", "cli_app:NotAProtocol"], "not an AMPProtocol subclass"),
        (["serve", "cli_app:Calculator", "--max-keys", "0"], "--max-keys: max_keys must be"),
        (["serve", "cli_app:Calculator", "--close-timeout", "-1"], "--close-timeout:"),
        (["proxy", "x:y", "127.0.0.1:1"], "the port must be a number"),
        (["proxy", "0", "nohost"], "TARGET must be HOST:PORT"),
    ],
)
async def test_user_mistakes_are_one_line_exit_2(args: list[str], message: str) -> None:
    result = await run_cli(*args)
    assert result.status == 2, result
    assert message in result.err, result.err
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1].startswith("asyncio-amp")


# call: failures that are not mistakes


async def test_call_connection_refused_exits_3() -> None:
    port = free_port()
    result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
    assert result.status == 3
    assert (
        result.err == f"asyncio-amp: error: cannot connect to {HOST}:{port}: Connection refused\n"
    )


async def test_call_timeout_exits_4() -> None:
    async with served() as (_, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sleep", "seconds=30", "--timeout", "0.3")
        assert result.status == 4
        assert result.err == (
            f"asyncio-amp: error: no answer to Sleep from {HOST}:{port} within 0.3 s\n"
        )


async def test_call_connection_closed_before_the_answer_exits_5() -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(hang_up, HOST, 0)
    async with server:
        result = await run_cli("call", f"{HOST}:{port_of(server)}", "Sum", "a=1", "b=2")
        assert result.status == 5
        assert "closed before Sum was answered" in result.err
        assert amp.parse_boxes(got.get_nowait()) == [
            {b"_ask": b"1", b"_command": b"Sum", b"a": b"1", b"b": b"2"}
        ]


async def test_call_invalid_answer_exits_5() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(garbage, HOST, 0)
    async with server:
        result = await run_cli("call", f"{HOST}:{port_of(server)}", "Sum", "a=1", "b=2")
        assert result.status == 5
        assert "which is text, not AMP" in result.err


# call and serve over UNIX sockets and TLS


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="UNIX sockets only")
async def test_serve_and_call_over_a_unix_socket(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    async with background("serve", "cli_app:Calculator", "--unix", path) as server:
        await server.line(r"serving cli_app:Calculator on .*amp\.sock")
        result = await run_cli("call", "--unix", path, "Sum", "a=4", "b=5")
        assert (result.status, result.out) == (0, "total: 9\n")
        assert await server.stop() == 0
    assert not os.path.exists(path)  # noqa: ASYNC240  # removed by the server


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="UNIX sockets only")
async def test_serve_refuses_a_unix_socket_a_live_server_answers_on(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "amp.sock")
    async with background("serve", "cli_app:Calculator", "--unix", path) as first:
        await first.line(r"serving cli_app:Calculator on .*amp\.sock")
        async with background("serve", "cli_app:Calculator", "--unix", path) as second:
            await second.line(rf"cannot listen on {re.escape(path)}: Address already in use")
            async with asyncio.timeout(LONG):
                assert await second.process.wait() == 3
        result = await run_cli("call", "--unix", path, "Sum", "a=4", "b=5")
        assert (result.status, result.out) == (0, "total: 9\n")
        assert await first.stop() == 0


async def test_serve_and_call_over_tls(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert(HOST, "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    async with served("--certfile", str(tmp_path / "server.pem")) as (server, port):
        assert any("with TLS" in line for line in server.err)
        ok = await run_cli(
            "call", f"{HOST}:{port}", "Sum", "a=1", "b=2", "--cafile", str(tmp_path / "ca.pem")
        )
        assert (ok.status, ok.out) == (0, "total: 3\n"), ok.err
        untrusted = await run_cli(
            "call", f"{HOST}:{port}", "Sum", "a=1", "b=2", "--cafile", str(tmp_path / "other.pem")
        )
        assert untrusted.status == 3
        assert untrusted.err.startswith(
            f"asyncio-amp: error: cannot connect to {HOST}:{port}: TLS handshake failed: "
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
        ), untrusted.err
        insecure = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2", "--insecure")
        assert (insecure.status, insecure.out) == (0, "total: 3\n")
        plain = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2", "--timeout", "2")
        assert plain.status in (4, 5), plain


# serve


async def test_serve_logs_connections_and_stops_on_sigint() -> None:
    async with served() as (server, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
        assert result.status == 0
        await server.line(rf"INFO connection from {HOST}:\d+ closed")
        assert not any("DEBUG" in line for line in server.err)
        assert await server.stop(signal.SIGINT) == 0
        assert any("shutting down: 0 open connections" in line for line in server.err)
        assert server.err[-1].endswith("INFO stopped")
        assert "Traceback" not in "\n".join(server.err)


async def test_serve_verbose_logs_every_box() -> None:
    async with served("-v") as (server, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
        assert result.status == 0
        await server.line(r"DEBUG < .*b'_command': b'Sum'")
        await server.line(r"DEBUG > .*_answer")


async def test_serve_sigterm_lets_running_responders_finish() -> None:
    async with served("--grace", "5") as (server, port):
        slow = asyncio.ensure_future(run_cli("call", f"{HOST}:{port}", "Sleep", "seconds=0.5"))
        await server.line(r"INFO connection from")
        await asyncio.sleep(0.1)
        assert await server.stop(signal.SIGTERM) == 0
        result = await slow
        assert (result.status, result.out) == (0, "slept: 0.5\n")
        assert any("shutting down: 1 open connection," in line for line in server.err)
    # The server is gone.
    refused = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
    assert refused.status == 3


async def test_serve_grace_period_is_bounded() -> None:
    async with served("--grace", "0.3") as (server, port):
        slow = asyncio.ensure_future(run_cli("call", f"{HOST}:{port}", "Sleep", "seconds=30"))
        await server.line(r"INFO connection from")
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await server.stop(signal.SIGTERM) == 0
        assert loop.time() - started < LONG / 2
        result = await slow
        assert result.status == 5


async def test_serve_port_in_use_exits_3() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("serve", "cli_app:Calculator", "--port", str(port))
    assert result.status == 3
    assert f"cannot listen on 127.0.0.1:{port}" in result.err


async def test_serve_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    async with served("--uvloop") as (_, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
        assert (result.status, result.out) == (0, "total: 3\n")


# decode


def sample_stream() -> bytes:
    return b"".join(
        amp.encode_box(box)
        for box in [
            {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"},
            {b"_answer": b"1", b"total": b"94"},
            {
                b"_error": b"2",
                b"_error_code": b"UNHANDLED",
                b"_error_description": b"Unhandled Command: b'Nope'",
            },
            {b"_command": b"Log", b"bin": b"\x00\x01\xff", b"message": "héllo\nworld".encode()},
        ]
    )


SAMPLE_TEXT = """\
box 1 at byte 0 (40 bytes): call Sum, tag 1
  _ask: 1
  _command: Sum
  a: 13
  b: 81

box 2 at byte 40 (25 bytes): answer, tag 1
  _answer: 1
  total: 94

box 3 at byte 65 (85 bytes): error, tag 2: UNHANDLED: Unhandled Command: b'Nope'
  _error: 2
  _error_code: UNHANDLED
  _error_description: Unhandled Command: b'Nope'

box 4 at byte 150 (50 bytes): call (no answer) Log
  _command: Log
  bin: b'\\x00\\x01\\xff'
  message: 'héllo\\nworld'
"""


async def test_decode_a_file_and_stdin(tmp_path: pathlib.Path) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(sample_stream())
    from_file = await run_cli("decode", str(capture))
    assert (from_file.status, from_file.out, from_file.err) == (0, SAMPLE_TEXT, "")
    from_stdin = await run_cli("decode", stdin=sample_stream())
    assert from_stdin.out == SAMPLE_TEXT
    dash = await run_cli("decode", "-", stdin=sample_stream())
    assert dash.out == SAMPLE_TEXT


async def test_decode_json_lines() -> None:
    result = await run_cli("decode", "--json", stdin=sample_stream())
    records = [json.loads(line) for line in result.out.splitlines()]
    assert [(r["box"], r["offset"], r["kind"], r["command"], r["tag"]) for r in records] == [
        (1, 0, "call", "Sum", "1"),
        (2, 40, "answer", None, "1"),
        (3, 65, "error", None, "2"),
        (4, 150, "call (no answer)", "Log", None),
    ]
    assert records[3]["fields"] == {
        "_command": "Log",
        "bin": {"base64": "AAH/"},
        "message": "héllo\nworld",
    }


def xxd_format(data: bytes) -> str:
    """What ``xxd`` prints: offset, 8 groups of 2 bytes, two spaces, the text column."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{offset:08x}: {groups:<39}  {text}")
    return "\n".join(lines) + "\n"


def hexdump_c_format(data: bytes) -> str:
    """What ``hexdump -C`` prints: offset, 16 bytes in two halves, the text between bars."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        left = " ".join(f"{c:02x}" for c in chunk[:8])
        right = " ".join(f"{c:02x}" for c in chunk[8:])
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{offset:08x}  {left:<23}  {right:<23}  |{text}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "dump",
    [
        lambda data: data.hex(),
        lambda data: " ".join(f"{c:02X}" for c in data) + "\n",
        lambda data: "\n".join(data[i : i + 7].hex(":") for i in range(0, len(data), 7)),
        lambda data: ", ".join(f"0x{c:02x}" for c in data),
        xxd_format,
        hexdump_c_format,
    ],
    ids=["plain", "spaced-upper", "colons", "0x-list", "xxd", "hexdump-C"],
)
async def test_decode_hex_dumps(dump: object) -> None:
    assert callable(dump)
    result = await run_cli("decode", "--hex", stdin=dump(sample_stream()).encode())
    assert (result.status, result.out) == (0, SAMPLE_TEXT), result.err


@pytest.mark.parametrize("tool", [["xxd"], ["hexdump", "-C"], ["od", "-An", "-tx1"]])
async def test_decode_the_output_of_real_dump_tools(
    tool: list[str], tmp_path: pathlib.Path
) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    capture = tmp_path / "capture.bin"
    capture.write_bytes(sample_stream())
    dumped = await run_cli(str(capture), command=tool)
    assert dumped.status == 0
    result = await run_cli("decode", "--hex", stdin=dumped.out.encode())
    assert (result.status, result.out) == (0, SAMPLE_TEXT), result.err


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (
            b"GET / HTTP/1.1\r\n",
            "box 5: the key length 18245 at byte 200 is over the AMP limit of 255; the bytes there are text",
        ),
        (b"\x00\x00", "box 5 at byte 200 is empty"),
        (b"\x00\x01a\x00\x05ab", "the value of b'a' at byte 203 needs 5 bytes, and only 2 follow"),
        (
            b"\x00\x01a",
            "the stream ends inside box 5 (starting at byte 200), in the key at byte 200",
        ),
        (
            b"\x00\x01a\x00\x01b",
            "the stream ends inside box 5, which starts at byte 200 (6 bytes of it, 1 complete keys)",
        ),
        (
            b"\x00",
            "the stream ends inside box 5, which starts at byte 200 (1 bytes of it, 0 complete keys)",
        ),
    ],
)
async def test_decode_says_where_a_malformed_stream_breaks(tail: bytes, message: str) -> None:
    result = await run_cli("decode", stdin=sample_stream() + tail)
    assert result.status == 1
    # Every box before the break is printed.
    assert result.out == SAMPLE_TEXT
    assert result.err.startswith("asyncio-amp: error: malformed AMP stream: ")
    assert message in result.err
    assert result.err.count("\n") == 1


async def test_decode_shows_duplicate_keys_and_long_values() -> None:
    stream = (
        b"\x00\x08_command\x00\x01A" + b"\x00\x01k\x00\x011" + b"\x00\x01k\x00\x012"
        + b"\x00\x04long" + (1000).to_bytes(2, "big") + b"y" * 1000 + b"\x00\x00"
    )  # fmt: skip
    result = await run_cli("decode", stdin=stream)
    assert result.status == 0
    lines = result.out.splitlines()
    assert lines[2:4] == ["  k: 1", "  k: 2  (again: the last one counts)"]
    assert lines[4] == "  long: " + "y" * 200 + "… (1,000 bytes)"
    full = await run_cli("decode", "--full", stdin=stream)
    assert full.out.splitlines()[4] == "  long: " + "y" * 1000
    as_json = await run_cli("decode", "--json", stdin=stream)
    assert json.loads(as_json.out)["duplicate_keys"] == ["k"]


async def test_decode_bad_hex_is_a_usage_error() -> None:
    for dump, message in [(b"zz", "line 1 of the hex dump has 'z'"), (b"abc", "odd number")]:
        result = await run_cli("decode", "--hex", stdin=dump)
        assert result.status == 2
        assert message in result.err


async def test_decode_empty_input() -> None:
    result = await run_cli("decode", stdin=b"")
    assert (result.status, result.out) == (0, "")
    assert "the input is empty" in result.err


# proxy


async def test_proxy_prints_calls_and_answers_with_latency() -> None:
    async with served() as (_, port), proxied(port) as (proxy, listen):
        result = await run_cli("call", f"{HOST}:{listen}", "Sum", "a=13", "b=81")
        assert (result.status, result.out) == (0, "total: 94\n")
        failed = await run_cli("call", f"{HOST}:{listen}", "Divide", "numerator=1", "denominator=0")
        assert failed.status == 1
        await run_cli("call", f"{HOST}:{listen}", "Note", "text=hi", "--no-answer")
        await proxy.line(r"#3 closed", stream="out")
    lines = proxy.out
    clock = r"\d\d:\d\d:\d\d\.\d{6}"
    expected = [
        rf"{clock} #1 open 127\.0\.0\.1:\d+ -> 127\.0\.0\.1:{port}$",
        rf"{clock} #1 C->S call Sum tag=1 a=13 b=81$",
        rf"{clock} #1 S->C answer tag=1 Sum \d+\.\d{{3}} ms total=94$",
        rf"{clock} #1 closed$",
        rf"{clock} #2 open ",
        rf"{clock} #2 C->S call Divide tag=1 denominator=0 numerator=1$",
        rf"{clock} #2 S->C error tag=1 Divide \d+\.\d{{3}} ms ZERO_DIVISION: division by zero$",
        rf"{clock} #2 closed$",
        rf"{clock} #3 open ",
        rf"{clock} #3 C->S call \(no answer\) Note text=hi$",
        rf"{clock} #3 closed$",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.match(pattern, line), (line, pattern)


async def test_proxy_json_lines() -> None:
    async with served() as (_, port), proxied(port, "--json") as (proxy, listen):
        result = await run_cli("call", f"{HOST}:{listen}", "Sum", "a=1", "b=2")
        assert result.status == 0
        await proxy.line(r'"event": "closed"', stream="out")
    records = [json.loads(line) for line in proxy.out]
    call, answer = (r for r in records if "kind" in r)
    assert (call["direction"], call["kind"], call["command"], call["tag"]) == (
        "C->S",
        "call",
        "Sum",
        "1",
    )
    assert call["fields"] == {"a": "1", "b": "2"}
    assert (answer["direction"], answer["kind"], answer["command"]) == ("S->C", "answer", "Sum")
    assert answer["latency_ms"] >= 0
    assert answer["fields"] == {"total": "3"}


async def test_proxy_pairs_answers_with_pipelined_calls() -> None:
    async with served() as (_, port), proxied(port) as (proxy, listen):
        async with await amp.connect(HOST, listen) as client:
            answers = await asyncio.gather(
                *(client.call_remote_box("Sum", {"a": str(i), "b": "1"}) for i in range(20))
            )
            assert answers == [{b"total": str(i + 1).encode()} for i in range(20)]
        await proxy.line(r"#1 closed", stream="out")
    answer_lines = [line for line in proxy.out if " answer " in line]
    assert len(answer_lines) == 20
    for line in answer_lines:
        found = re.search(r"answer tag=(\w+) Sum [\d.]+ ms total=(\d+)", line)
        assert found, line
        # The answer to tag t (hex) is (t - 1) + 1: it was paired with its own call.
        assert int(found.group(1), 16) == int(found.group(2))


async def test_proxy_forwards_malformed_bytes_unchanged() -> None:
    received = bytearray()
    done = asyncio.Event()
    reply = b"\x00\x07_answer\x00\x011" + b"\xff\xfe not amp at all"

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
            if len(received) >= len(garbage):
                writer.write(reply)
                await writer.drain()
        writer.close()
        done.set()

    garbage = (
        amp.encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"1"}) + bytes(range(256)) * 4
    )
    server = await asyncio.start_server(target, HOST, 0)
    async with server, proxied(port_of(server)) as (proxy, listen):
        reader, writer = await asyncio.open_connection(HOST, listen)
        writer.write(garbage)
        await writer.drain()
        async with asyncio.timeout(LONG):
            back = await reader.readexactly(len(reply))
        writer.write_eof()
        async with asyncio.timeout(LONG):
            await done.wait()
            assert await reader.read() == b""
        writer.close()
        await proxy.line(r"#1 closed", stream="out")
    assert bytes(received) == garbage
    assert back == reply
    text = "\n".join(proxy.out)
    assert "C->S call Sum tag=1 a=1" in text
    assert "C->S malformed AMP, forwarding the rest unparsed" in text
    assert "S->C malformed AMP, forwarding the rest unparsed" in text


async def test_proxy_target_down_closes_the_client() -> None:
    dead = free_port()
    async with proxied(dead) as (proxy, listen):
        result = await run_cli("call", f"{HOST}:{listen}", "Sum", "a=1", "b=2")
        assert result.status == 5
        await proxy.line(
            rf"#1 from 127\.0\.0\.1:\d+: cannot connect to 127\.0\.0\.1:{dead}", stream="out"
        )


async def test_proxy_stops_on_sigterm_with_connections_open() -> None:
    async with (
        served() as (_, port),
        proxied(port) as (proxy, listen),
        await amp.connect(HOST, listen) as client,
    ):
        assert await client.call_remote_box("Sum", {"a": "1", "b": "1"}) == {b"total": b"2"}
        assert await proxy.stop(signal.SIGTERM) == 0
        async with asyncio.timeout(LONG):
            await client.wait_closed()
    assert proxy.err[-1] == "asyncio-amp proxy: stopped"


# Unit checks of the value display


def test_show_bytes() -> None:
    assert _common.show_bytes(b"plain text") == "plain text"
    assert _common.show_bytes(b"") == "''"
    assert _common.show_bytes(b" padded") == "' padded'"
    assert _common.show_bytes(b"'quoted'") == "\"'quoted'\""
    assert _common.show_bytes(b"b'x'") == "\"b'x'\""
    assert _common.show_bytes(b"\x00\xff") == "b'\\x00\\xff'"
    assert _common.show_bytes("é".encode()) == "é"
    assert _common.show_bytes(b"a" * 10, limit=4) == "aaaa… (10 bytes)"


def test_json_value() -> None:
    import datetime
    import decimal

    value = {
        "b": b"\xff",
        "t": b"ok",
        "d": decimal.Decimal("1.50"),
        "f": float("nan"),
        "i": float("inf"),
        "when": datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC),
        "p": pathlib.PurePosixPath("/x"),
        "l": [1, None, True],
    }
    assert _common.json_value(value) == {
        "b": {"base64": "/w=="},
        "t": "ok",
        "d": "1.50",
        "f": "nan",
        "i": "inf",
        "when": "2026-01-02T00:00:00+00:00",
        "p": "/x",
        "l": [1, None, True],
    }


def test_parse_address() -> None:
    assert _common.parse_address("127.0.0.1:7000", "x") == ("127.0.0.1", 7000)
    assert _common.parse_address("[::1]:7000", "x") == ("::1", 7000)
    assert _common.parse_address("7001", "x", default_host="127.0.0.1") == ("127.0.0.1", 7001)
    assert _common.parse_address(":7001", "x", default_host="127.0.0.1") == ("127.0.0.1", 7001)
    for bad in ("host", ":1", "h:70000", "h:-1"):
        with pytest.raises(_common.UsageError):
            _common.parse_address(bad, "x")


async def test_call_typed_no_answer_sends_the_typed_box_without_ask() -> None:
    got = bytearray()
    closed = asyncio.Event()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            got.extend(data)
        writer.close()
        closed.set()

    server = await asyncio.start_server(record, HOST, 0)
    async with server:
        result = await run_cli(
            "call", f"{HOST}:{port_of(server)}", "describe-values", "--commands", "cli_app",
            "--no-answer", "text=t", "data=d", "flag=on", "ratio=2", "price=1.5",
            "when=2026-11-26T10:30:00+00:00", "numbers=[1]", "rows=[]",
        )  # fmt: skip
        assert (result.status, result.out, result.err) == (0, "", "")
        async with asyncio.timeout(LONG):
            await closed.wait()
    assert amp.parse_boxes(bytes(got)) == [
        {
            b"_command": b"describe-values",
            b"text": b"t",
            b"data": b"d",
            b"flag": b"True",
            b"ratio": b"2.0",
            b"price": b"1.5",
            b"when": b"2026-11-26T10:30:00.000000-00:00",  # UTC, as Twisted writes it
            b"numbers": b"\x00\x011",
            b"rows": b"",
        }
    ]


async def test_serve_limits_apply_to_each_connection() -> None:
    async with served("--max-box-size", "200") as (server, port):
        ok = await run_cli("call", f"{HOST}:{port}", "Sum", "a=1", "b=2")
        assert (ok.status, ok.out) == (0, "total: 3\n")
        big = await run_cli("call", f"{HOST}:{port}", "Sum", "a=" + "1" * 300, "b=2")
        assert big.status == 5
        await server.line(r"WARNING closing the connection with .*over the limit of 200 bytes")


def test_proxy_log_pairs_answers_and_forgets_closed_connections() -> None:
    lines: list[str] = []
    log = proxy._ProxyLog(lines.append, as_json=False, full=False)
    log.box(1, "C->S", {b"_ask": b"1", b"_command": b"Sum", b"a": b"1"})
    log.box(1, "C->S", {b"_ask": b"2", b"_command": b"Sum", b"a": b"2"})
    log.box(1, "S->C", {b"_answer": b"2", b"total": b"3"})
    log.box(1, "S->C", {b"_answer": b"9"})
    assert re.search(r"#1 S->C answer tag=2 Sum \d+\.\d{3} ms total=3$", lines[2])
    assert lines[3].endswith("#1 S->C answer tag=9 (no call with this tag seen)")
    # Call 1 was never answered: what is kept of it goes with its connection.
    assert log.calls == {(1, "C->S"): {b"1": log.calls[(1, "C->S")][b"1"]}}
    log.forget(1)
    assert log.calls == {}
