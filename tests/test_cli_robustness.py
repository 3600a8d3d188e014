"""
The asyncio-amp command under stress: slow and closed output pipes, huge boxes and
inputs, many connections, and the mistakes a new user makes.

Like ``test_cli.py``, every test runs the real command in a subprocess with real
pipes (a pipe nobody reads, a pipe whose read end is closed), against real servers
on 127.0.0.1; one test runs ``serve`` in the test process to count its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import asyncio_amp as amp
from asyncio_amp import cli
from cli_app import Calculator
from cli_helpers import CLI, TESTS, background, free_port, proxied, run_cli, served
from helpers import HOST, LONG, TIME, eventually, port_of

pytestmark = pytest.mark.asyncio_loop_only


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and "Traceback" not in text


# serve: connections are forgotten once closed


async def test_serve_forgets_closed_connections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncio_amp.cli")
    args = cli.build_parser().parse_args(["serve", "cli_app:Calculator", "--port", "0"])
    serving = asyncio.ensure_future(cli.serve.run(args))
    try:
        await eventually(lambda: "serving" in caplog.text, "the server started")
        port = int(re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", caplog.text).group(1))  # type: ignore[union-attr]
        for i in range(300):
            async with asyncio.timeout(LONG):
                client = await amp.connect(HOST, port)
                assert await client.call_remote_box("Sum", {"a": str(i), "b": "1"})
                client.close()
                await client.wait_closed()

        def alive() -> int:
            gc.collect()
            return sum(1 for thing in gc.get_objects() if isinstance(thing, Calculator))

        # Every connection closed: none of their protocols is kept.
        await eventually(lambda: alive() == 0, "the closed connections were forgotten")
    finally:
        if "serving" in caplog.text:
            os.kill(os.getpid(), signal.SIGINT)  # the server's own signal handler stops it
        else:
            serving.cancel()
        async with asyncio.timeout(LONG):
            assert await serving == 0


# proxy: its output never holds up forwarding


async def _read_until(fd: int, marker: bytes) -> bytes:
    """Read the pipe ``fd`` (bounded in time) until ``marker`` comes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    got = bytearray()
    try:
        async with asyncio.timeout(LONG):
            while marker not in got:
                chunk = await reader.read(65536)
                assert chunk, f"the output ended without {marker!r}"
                got += chunk
    finally:
        transport.close()
    return bytes(got)


async def test_proxy_forwards_at_full_speed_when_nobody_reads_its_output() -> None:
    read_end, write_end = os.pipe()
    try:
        async with (
            served() as (_, port),
            proxied(port, "--full", stdout=write_end) as (proxy, listen),
        ):
            os.close(write_end)
            write_end = -1
            big = "1" * 4000  # each line is about 4 kB: the pipe fills in a few calls
            async with await amp.connect(HOST, listen) as client, asyncio.timeout(LONG):
                for _ in range(300):
                    answer = await client.call_remote_box("Sum", {"a": big, "b": "0"})
                    assert answer == {b"total": big.encode()}
            # Once read, the output says how many lines it had to leave out.
            got = await _read_until(read_end, b"log lines dropped")
            read_end = -1
            found = re.search(rb"\.\.\. (\d+) log lines dropped: the output is not read fast", got)
            assert found and int(found.group(1)) > 0
            start = time.monotonic()
            assert await proxy.stop(signal.SIGTERM) == 0
            assert time.monotonic() - start < 3 * TIME
        assert not any("Traceback" in line for line in proxy.err), proxy.err
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


async def test_proxy_stops_on_sigterm_while_its_output_is_not_read() -> None:
    read_end, write_end = os.pipe()
    try:
        async with (
            served() as (_, port),
            proxied(port, "--full", stdout=write_end) as (proxy, listen),
        ):
            big = "1" * 4000
            async with await amp.connect(HOST, listen) as client, asyncio.timeout(LONG):
                for _ in range(100):
                    await client.call_remote_box("Sum", {"a": big, "b": "0"})
            start = time.monotonic()
            assert await proxy.stop(signal.SIGTERM) == 0
            assert time.monotonic() - start < 3 * TIME
        assert proxy.err[-1] == "asyncio-amp proxy: stopped"
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_proxy_keeps_forwarding_when_its_output_is_closed() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -n 2` once it has its lines
    try:
        async with served() as (_, port), proxied(port, stdout=write_end) as (proxy, listen):
            os.close(write_end)
            write_end = -1
            for i in range(5):
                result = await run_cli("call", f"{HOST}:{listen}", "Sum", f"a={i}", "b=1")
                assert (result.status, result.out) == (0, f"total: {i + 1}\n"), result.err
            await proxy.line(r"the output was closed")
            assert await proxy.stop(signal.SIGTERM) == 0
        assert not any("Traceback" in line for line in proxy.err), proxy.err
        said = [line for line in proxy.err if "output was closed" in line]
        assert len(said) == 1
        assert "still forwarding" in said[0]
    finally:
        if write_end >= 0:
            os.close(write_end)


def _peak_rss_kib(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert found
    return int(found.group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_proxy_bounds_the_log_of_a_huge_box_and_keeps_forwarding() -> None:
    received = 0
    total = 0

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(1 << 20):
            received += len(data)
        writer.close()

    value = b"\xff\xff" + b"v" * 65_535  # the largest value AMP allows
    head = b"\x00\x08_command\x00\x04Huge"
    pair = b"\x00\x01k" + value
    server = await asyncio.start_server(target, HOST, 0)
    async with server, proxied(port_of(server)) as (proxy, listen):
        before = _peak_rss_kib(proxy.process.pid)
        _, writer = await asyncio.open_connection(HOST, listen)
        writer.write(head)
        total += len(head)
        for _ in range(1000):  # 64 MiB in one box, not finished yet
            writer.write(pair)
            total += len(pair)
            await writer.drain()
        await proxy.line(r"#1 C->S box too big to show", stream="out")
        tail = b"\x00\x00" + amp.encode_box({b"_command": b"Sum", b"_ask": b"1", b"a": b"1"})
        writer.write(tail)
        total += len(tail)
        await writer.drain()
        await proxy.line(r"#1 C->S call Sum tag=1 a=1$", stream="out")
        grown = _peak_rss_kib(proxy.process.pid) - before
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await proxy.line(r"#1 closed", stream="out")
    assert received == total
    assert grown < 24 * 1024, f"the proxy grew by {grown} KiB"
    shown = [line for line in proxy.out if "Huge" in line]
    assert shown and "too big to show" in shown[-1]


async def test_proxy_sigterm_with_open_connections_is_quiet_and_quick() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # and never reads

    server = await asyncio.start_server(deaf, HOST, 0)
    async with server, proxied(port_of(server)) as (proxy, listen):
        clients = [await asyncio.open_connection(HOST, listen) for _ in range(3)]
        for _, writer in clients:
            writer.write(amp.encode_box({b"_command": b"X", b"a": b"b" * 60_000}) * 200)
        for number in (1, 2, 3):
            await proxy.line(rf"#{number} open", stream="out")
        await asyncio.sleep(0.2 * TIME)  # the proxy is stuck writing to the deaf target
        start = time.monotonic()
        assert await proxy.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 3 * TIME
        for _, writer in clients + [(None, w) for w in accepted]:
            writer.transport.abort()
        for _, writer in clients + [(None, w) for w in accepted]:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert not any("Traceback" in line or "Exception" in line for line in proxy.err), proxy.err
    assert proxy.err[-1] == "asyncio-amp proxy: stopped"


# decode: a stream, not a file held whole


def _box(number: int) -> bytes:
    return amp.encode_box({b"_ask": str(number).encode(), b"_command": b"Sum", b"a": b"1"})


async def test_decode_prints_each_box_as_it_completes() -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI, "decode", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=TESTS,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(_box(1) + _box(2)[:5])
        await process.stdin.drain()
        async with asyncio.timeout(LONG):  # the input is still open
            first = await process.stdout.readuntil(b"  a: 1\n")
        assert first.startswith(b"box 1 at byte 0 (32 bytes): call Sum, tag 1\n")
        process.stdin.write(_box(2)[5:])
        process.stdin.close()
        async with asyncio.timeout(LONG):
            rest, err = await process.communicate()
        assert process.returncode == 0, err
        assert rest.startswith(b"\nbox 2 at byte 32 (32 bytes): call Sum, tag 2\n")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_decode_into_a_pipe_closed_early_stops_at_once_and_quietly(
    tmp_path: pathlib.Path,
) -> None:
    capture = tmp_path / "big.bin"
    capture.write_bytes(b"".join(_box(n) for n in range(1, 201)) * 2000)  # 15 MB
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *CLI, "decode", str(capture), stdin=subprocess.DEVNULL, stdout=write_end,
        stderr=subprocess.PIPE, cwd=TESTS,
    )  # fmt: skip
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as head:
            first = head.read(100)  # like head -c 100: the pipe closes
        assert first.startswith(b"box 1 at byte 0")
        async with asyncio.timeout(LONG):
            _, err = await process.communicate()
        assert (process.returncode, err) == (0, b"")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


_PEAK = (
    "import resource, sys\n"
    "from asyncio_amp.cli import main\n"
    "status = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(f'peak {peak}', file=sys.stderr)\n"
    "sys.exit(status)\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB")
async def test_decode_memory_is_bounded_whatever_the_box(tmp_path: pathlib.Path) -> None:
    # One box of a million tiny pairs: 5 MB on the wire, far more as Python objects.
    stream = b"\x00\x08_command\x00\x04Many" + b"\x00\x01k\x00\x00" * 1_000_000 + b"\x00\x00"
    capture = tmp_path / "many.bin"
    capture.write_bytes(stream + _box(1))
    baseline = await run_cli("decode", "/dev/null", command=[sys.executable, "-c", _PEAK])
    result = await run_cli("decode", str(capture), command=[sys.executable, "-c", _PEAK])
    assert result.status == 0, result.err
    out = result.out.splitlines()
    assert out[0].startswith(f"box 1 at byte 0 ({len(stream)} bytes): call (no answer) Many")
    assert "too big to show" in out[0]
    assert "box 2 at byte" in result.out

    def peak(text: str) -> int:
        found = re.search(r"peak (\d+)", text)
        assert found, text
        return int(found.group(1))

    assert peak(result.err) - peak(baseline.err) < 32 * 1024


def test_box_scanner_keeps_at_most_its_limit() -> None:
    from asyncio_amp.cli import _output

    shown = []
    scanner = _output.BoxScanner(show_limit=1000)
    scanner.feed(b"\x00\x08_command\x00\x01A")
    for _ in range(10_000):
        shown += scanner.feed(b"\x00\x01k\x00\x02vv")
        assert len(scanner._items) < 300
        assert len(scanner._buffer) < 10
    shown += scanner.feed(b"\x00\x00")
    assert scanner.end() is None
    # Said once when it went over the limit, then once whole.
    notice, box = shown
    assert (notice.complete, notice.too_big, notice.number, notice.offset) == (False, True, 1, 0)
    assert box.complete and box.too_big and box.length == 13 + 10_000 * 7 + 2
    assert box.keys == 10_001
    assert box.items == [(b"_command", b"A")]  # the keys that say what it is stay


# decode --hex


async def test_decode_hex_of_xxd_plain_with_a_short_last_line() -> None:
    box = amp.encode_box({b"_command": b"Sum", b"a": b"13456", b"b": b"ab"})
    assert len(box) == 34
    xxd_p = "\n".join(box.hex()[i : i + 60] for i in range(0, len(box) * 2, 60)) + "\n"
    assert xxd_p.splitlines()[-1] == "61620000"
    result = await run_cli("decode", "--hex", stdin=xxd_p.encode())
    assert result.status == 0, result.err
    assert result.out.splitlines()[0] == "box 1 at byte 0 (34 bytes): call (no answer) Sum"


def hexdump_c_squeezed(data: bytes) -> str:
    """``hexdump -C``: a line the same as the one before is shown once, then ``*``."""
    lines = []
    previous = None
    starred = False
    for offset in range(0, len(data), 16):
        chunk = data[offset : offset + 16]
        if chunk == previous:
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = chunk, False
        left = " ".join(f"{c:02x}" for c in chunk[:8])
        right = " ".join(f"{c:02x}" for c in chunk[8:])
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{offset:08x}  {left:<23}  {right:<23}  |{text}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines) + "\n"


def _repetitive_stream() -> bytes:
    return amp.encode_box({b"_command": b"Z", b"zeros": bytes(200)}) + amp.encode_box(
        {b"_command": b"Y", b"ends": b"\x00" * 47}
    )


async def test_decode_hex_of_hexdump_c_with_repeated_lines() -> None:
    data = _repetitive_stream()
    dump = hexdump_c_squeezed(data)
    assert "\n*\n" in dump
    result = await run_cli("decode", "--hex", "--json", stdin=dump.encode())
    assert result.status == 0, result.err
    expected = await run_cli("decode", "--json", stdin=data)
    assert result.out == expected.out
    assert len(result.out.splitlines()) == 2


async def test_decode_hex_of_real_hexdump_c_with_repeated_lines(tmp_path: pathlib.Path) -> None:
    if shutil.which("hexdump") is None:
        pytest.skip("hexdump is not installed")
    capture = tmp_path / "zeros.bin"
    capture.write_bytes(_repetitive_stream())
    dumped = await run_cli("-C", str(capture), command=["hexdump"])
    assert "*" in dumped.out.splitlines()
    result = await run_cli("decode", "--hex", stdin=dumped.out.encode())
    expected = await run_cli("decode", str(capture))
    assert (result.status, result.out) == (0, expected.out), result.err


async def test_decode_without_hex_suggests_it_for_hex_text() -> None:
    result = await run_cli("decode", stdin=_box(1).hex().encode() + b"\n")
    assert result.status == 1
    assert one_line(result.err)
    assert "looks like a hex dump: try --hex" in result.err


# call, serve and proxy: one line for every mistake


async def test_call_non_utf8_value_is_a_usage_error_before_connecting() -> None:
    dead = free_port()
    for extra in (["--commands", "cli_app"], []):
        result = await run_cli(
            "call", f"{HOST}:{dead}", "Note", os.fsdecode(b"text=caf\xe9"), *extra
        )
        assert result.status == 2, result.err
        assert one_line(result.err)
        assert "text=" in result.err and "not UTF-8" in result.err


async def test_unknown_hosts_are_reported_by_the_resolver() -> None:
    called = await run_cli("call", "nosuch.invalid:7000", "Sum")
    served_ = await run_cli("serve", "cli_app:Calculator", "--host", "nosuch.invalid")
    listened = await run_cli("proxy", "nosuch.invalid:0", f"{HOST}:7000")
    for result in (called, served_, listened):
        assert result.status == 3
        assert one_line(result.err), result.err
        assert "cannot resolve host 'nosuch.invalid': " in result.err
        assert "Unknown error" not in result.err
    async with background("proxy", f"{HOST}:0", "nosuch.invalid:7000") as proxy:
        found = await proxy.line(r"listening on 127\.0\.0\.1:(\d+), forwarding to")
        result = await run_cli("call", f"{HOST}:{found.group(1)}", "Sum")
        assert result.status == 5
        await proxy.line(r"#1 from .*: cannot resolve host 'nosuch.invalid': ", stream="out")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "cli_app:Calculator", "--port", "70000"], "--port"),
        (["serve", "cli_app:Calculator", "--port", "-1"], "--port"),
        (["serve", "cli_app:Calculator", "--grace", "-1"], "--grace"),
        (["call", "127.0.0.1:1", "Sum", "--timeout", "-1"], "--timeout"),
        (["call", "127.0.0.1:1", "Sum", "--timeout", "nan"], "--timeout"),
    ],
)
async def test_out_of_range_numbers_are_usage_errors(args: list[str], message: str) -> None:
    result = await run_cli(*args)
    assert result.status == 2, result.err
    assert "Traceback" not in result.err
    assert message in result.err


async def test_untyped_call_the_server_cannot_decode_hints_at_commands() -> None:
    async with served() as (_, port):
        bad = await run_cli("call", f"{HOST}:{port}", "Sum", "a=x", "b=1")
    assert bad.status == 1
    assert one_line(bad.err)
    assert "UNKNOWN: Unknown Error" in bad.err and "--commands" in bad.err


async def test_serve_verbose_shows_sent_boxes_like_received_ones() -> None:
    async with served("-v") as (server, port):
        result = await run_cli("call", f"{HOST}:{port}", "Sum", "a=13", "b=81")
        assert result.status == 0
        await server.line(r"DEBUG < \S+ \{b'_ask': b'1', b'_command': b'Sum'")
        await server.line(r"DEBUG > \S+ \{b'_answer': b'1', b'total': b'94'\}$")


async def test_serve_reports_a_listening_error_in_one_line(tmp_path: pathlib.Path) -> None:
    result = await run_cli(
        "serve", "cli_app:Calculator", "--unix", str(tmp_path / "no such dir" / "app.sock")
    )
    assert result.status == 3
    assert one_line(result.err), result.err
    assert "cannot listen on" in result.err


async def test_proxy_on_uvloop_logs_through_its_writer() -> None:
    pytest.importorskip("uvloop")
    async with served() as (_, port), proxied(port, "--uvloop") as (proxy, listen):
        result = await run_cli("call", f"{HOST}:{listen}", "Sum", "a=1", "b=2")
        assert (result.status, result.out) == (0, "total: 3\n")
        await proxy.line(r"#1 S->C answer tag=1 Sum [\d.]+ ms total=3$", stream="out")
        assert await proxy.stop(signal.SIGTERM) == 0
    assert proxy.err[-1] == "asyncio-amp proxy: stopped"
