"""Limits and backpressure: memory stays bounded against floods and slow peers, nothing is lost."""

from __future__ import annotations

import asyncio
import contextvars
import pathlib
import socket
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

import asyncio_amp as amp
from asyncio_amp import encode_box
from helpers import (
    HOST,
    LONG,
    TIME,
    accepted,
    accepting_server,
    client,
    eventually,
    raw_connection,
    running_server,
)

ANSWER_SIZE = 60_000


class Big(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("data", amp.Bytes())]


class Slow(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("n", amp.Integer())]


class Huge(amp.Command):
    arguments = [("size", amp.Integer())]
    response = [("data", amp.BigBytes())]


class Server(amp.AMPProtocol):
    running = 0
    most_running = 0
    release: asyncio.Event | None = None

    @Big.responder
    def big(self, n: int) -> dict[str, bytes]:
        return {"data": bytes([n % 256]) * ANSWER_SIZE}

    @Slow.responder
    async def slow(self, n: int) -> dict[str, int]:
        cls = type(self)
        cls.running += 1
        cls.most_running = max(cls.most_running, cls.running)
        try:
            if cls.release is not None:
                await cls.release.wait()
            else:
                await asyncio.sleep(0)
        finally:
            cls.running -= 1
        return {"n": n}

    @Huge.responder
    def huge(self, size: int) -> dict[str, bytes]:
        return {"data": b"h" * size}


@pytest.fixture(autouse=True)
def fresh_counters() -> Iterator[None]:
    Server.running = Server.most_running = 0
    Server.release = None
    yield
    Server.release = None


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


def ask(tag: int, command: bytes, **values: int) -> bytes:
    box = {b"_ask": b"%x" % tag, b"_command": command}
    box.update({key.encode(): b"%d" % value for key, value in values.items()})
    return encode_box(box)


async def read_answers(
    reader: asyncio.StreamReader, count: int, decoder: amp.BoxDecoder | None = None
) -> list[amp.Box]:
    decoder = decoder or amp.BoxDecoder()
    boxes: list[amp.Box] = []
    async with asyncio.timeout(LONG * 3):
        while len(boxes) < count:
            data = await reader.read(1 << 20)
            assert data, f"closed after {len(boxes)} of {count} answers"
            boxes += decoder.receive_data(data)
    return boxes


async def settle(predicate: Callable[[], object], what: str) -> None:
    """Poll (bounded in time) until ``predicate()`` is true: there is no event to wait on."""
    for _ in range(int(LONG / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_peer_that_never_reads_answers_is_held_back(traced: None) -> None:
    calls = 800  # answers would take 800 * 60 kB = 48 MB if nothing held them back
    async with (
        running_server(Server, max_responders=20) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 65536
        )
        before, _ = tracemalloc.get_traced_memory()
        writer.write(b"".join(ask(i + 1, b"Big", n=i) for i in range(calls)))
        await settle(lambda: protocols and protocols[0]._reading_paused, "reading paused")
        server = protocols[0]
        # Let the server do all it can; it must stay stopped.
        await asyncio.sleep(0.2)
        assert server._reading_paused
        assert server._writing_paused
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 16 * 1024 * 1024, f"{held} bytes held for a peer that does not read"
        # Now the peer reads: every answer comes, in order, none lost.
        answers = await read_answers(reader, calls)
        assert [a[b"_answer"] for a in answers] == [b"%x" % (i + 1) for i in range(calls)]
        assert all(a[b"data"] == bytes([i % 256]) * ANSWER_SIZE for i, a in enumerate(answers))
        assert not server._reading_paused
        assert server._flow.working == 0


async def test_a_flood_of_pipelined_calls_runs_at_most_max_responders(traced: None) -> None:
    calls = 5000
    Server.release = asyncio.Event()
    async with (
        running_server(Server, max_responders=50) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        before, _ = tracemalloc.get_traced_memory()
        writer.write(b"".join(ask(i + 1, b"Slow", n=i) for i in range(calls)))
        await settle(lambda: Server.running == 50, "50 responders running")
        await asyncio.sleep(0.2)
        server = protocols[0]
        assert server._reading_paused
        assert Server.running == 50
        # What is held: at most one read's worth of calls, not the whole flood.
        assert len(server._flow.deferred) < calls
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 8 * 1024 * 1024
        # Memory is measured: the 5,000 answers need not be traced too, which
        # made them take most of the 30 seconds they may on a loaded machine.
        tracemalloc.stop()
        Server.release.set()
        answers = await read_answers(reader, calls)
        assert sorted(int(a[b"n"]) for a in answers) == list(range(calls))
        assert Server.most_running == 50


async def test_a_slow_reader_of_a_large_answer(traced: None) -> None:
    size = 10_000_000
    async with (
        running_server(Server) as (_, port, protocols),
        raw_connection(port) as (reader, writer),
    ):
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        writer.write(ask(1, b"Huge", size=size))
        for i in range(2, 12):
            writer.write(ask(i, b"Big", n=i))
        await settle(lambda: protocols and protocols[0]._writing_paused, "writing paused")
        # Read slowly, a little at a time, for a while.
        decoder = amp.BoxDecoder()
        early: list[amp.Box] = []
        for _ in range(20):
            early += decoder.receive_data(await reader.read(16384))
            await asyncio.sleep(0.005)
        _, peak = tracemalloc.get_traced_memory()
        assert peak - before < 3 * size, f"peak {peak - before} for a {size}-byte answer"
        answers = early + await read_answers(reader, 11 - len(early), decoder)
        assert [a[b"_answer"] for a in answers] == [b"%x" % i for i in range(1, 12)]
        assert amp.BigBytes().from_box(b"data", answers[0]) == b"h" * size


async def test_calls_wait_for_max_pending_calls_and_keep_order() -> None:
    async with running_server(Server) as (_, port, _):
        proto = await amp.connect(HOST, port, max_pending_calls=5)
        async with proto:
            calls = [proto.call_remote(Slow, n=i) for i in range(100)]
            assert len(proto._pending) == 5
            assert len(proto._waiting) == 95
            async with asyncio.timeout(LONG):
                results = await asyncio.gather(*calls)
            assert [r["n"] for r in results] == list(range(100))


async def test_a_waiting_call_can_be_cancelled_before_it_is_sent() -> None:
    Server.release = asyncio.Event()
    async with running_server(Server) as (_, port, _):
        proto = await amp.connect(HOST, port, max_pending_calls=1)
        async with proto:
            first = proto.call_remote(Slow, n=1)
            second = proto.call_remote(Slow, n=2)
            third = proto.call_remote(Slow, n=3)
            second.cancel()
            assert [held[0] for held in proto._waiting if not held[0].done()] == [third]
            Server.release.set()
            async with asyncio.timeout(LONG):
                assert await first == {"n": 1}
                assert await third == {"n": 3}
            # The cancelled call never took a tag: the third call was sent with tag 2.
            assert proto._conn._tag_counter == 2


async def test_a_cancelled_sent_call_gives_its_place_back() -> None:
    # The peer never answers the first call; once it is cancelled (a timeout), the
    # next call takes its place, and the late answer to it is dropped.
    Server.release = asyncio.Event()
    try:
        async with running_server(Server) as (_, port, _):
            proto = await amp.connect(HOST, port, max_pending_calls=1)
            async with proto:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await proto.call_remote(Slow, n=1)
                second = proto.call_remote(Slow, n=2)
                third = proto.call_remote(Slow, n=3)
                await settle(lambda: b"2" in proto._pending, "the second call sent")
                # The second call went out in the first one's place (tag 2); the
                # third waits for a place.
                assert list(proto._pending) == [b"2"]
                assert [held[0] for held in proto._waiting] == [third]
                Server.release.set()
                async with asyncio.timeout(LONG):
                    assert await second == {"n": 2}
                    assert await third == {"n": 3}
                    # The first call's answer came too, and was dropped.
                    assert await proto.call_remote(Slow, n=4) == {"n": 4}
                assert not proto.closed
    finally:
        Server.release = None


async def test_many_cancelled_calls_give_their_places_back() -> None:
    Server.release = asyncio.Event()
    try:
        async with running_server(Server) as (_, port, _):
            proto = await amp.connect(HOST, port, max_pending_calls=10)
            async with proto:
                stuck = [proto.call_remote(Slow, n=i) for i in range(10)]
                waiting = [proto.call_remote(Slow, n=i) for i in range(10, 30)]
                for call in stuck:
                    call.cancel()
                await settle(lambda: len(proto._waiting) == 10, "ten waiting calls sent")
                # The ten places were taken back at once: the next ten calls went
                # out (tags 11 to 20), and the last ten wait their turn.
                assert list(proto._pending) == [b"%x" % i for i in range(11, 21)]
                assert [held[0] for held in proto._waiting] == waiting[10:]
                Server.release.set()
                async with asyncio.timeout(LONG):
                    results = await asyncio.gather(*waiting)
                assert [r["n"] for r in results] == list(range(10, 30))
                assert not proto.closed
    finally:
        Server.release = None


async def test_limits_are_keywords_and_attributes() -> None:
    proto = amp.AMPProtocol(max_box_size=100, max_keys=3, max_responders=2, max_pending_calls=4)
    assert (proto.max_box_size, proto.max_keys) == (100, 3)
    assert (proto.max_responders, proto.max_pending_calls) == (2, 4)
    proto.max_keys = 5
    assert proto.max_keys == 5
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="positive int"):
            amp.AMPProtocol(max_responders=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="positive int"):
            proto.max_box_size = bad  # type: ignore[assignment]


class Pair(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]


async def test_serve_and_connect_set_limits() -> None:
    async with running_server(Server, max_keys=3) as (_, port, protocols):
        proto = await amp.connect(HOST, port, max_pending_calls=7)
        async with proto:
            assert proto.max_pending_calls == 7
            assert await proto.call_remote(Slow, n=1) == {"n": 1}  # 3 keys: accepted
            assert protocols[0].max_keys == 3
            with pytest.raises(amp.ConnectionLostError):
                async with asyncio.timeout(LONG):
                    await proto.call_remote(Pair, a=1, b=2)  # 4 keys: refused
    with pytest.raises(ValueError, match="max_responders"):
        await amp.serve(Server, HOST, 0, max_responders=0)


# Calls in both directions at the limits, responders that end in cancellation,
# waits that spin: regressions found by an adversarial review.


class Work(amp.Command):
    arguments = [("n", amp.Integer()), ("data", amp.Bytes())]
    response = [("n", amp.Integer()), ("data", amp.Bytes())]


class Lookup(amp.Command):
    arguments = [("n", amp.Integer()), ("data", amp.Bytes())]
    response = [("n", amp.Integer()), ("data", amp.Bytes())]


class CallsBack(amp.AMPProtocol):
    """Answers Work by calling Lookup on the peer; answers Lookup at once."""

    size = 0

    @Work.responder
    async def work(self, n: int, data: bytes) -> dict[str, Any]:
        answer = await self.call_remote(Lookup, n=n, data=b"l" * type(self).size)
        return {"n": answer["n"], "data": b"w" * type(self).size}

    @Lookup.responder
    def lookup(self, n: int, data: bytes) -> dict[str, Any]:
        return {"n": n + 1, "data": b"a" * len(data)}


class CallsBackBig(CallsBack):
    size = 60_000


@pytest.mark.parametrize("calls", [99, 100, 300])
async def test_responders_that_call_back_the_peer_over_max_responders(calls: int) -> None:
    # The server's responders wait for the client's answers: at the limit, the
    # server must still read those answers.
    async with (
        running_server(CallsBack) as (_, port, _protocols),
        client(port, CallsBack) as proto,
    ):
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(
                *(proto.call_remote(Work, n=i, data=b"") for i in range(calls))
            )
        assert [a["n"] for a in answers] == [i + 1 for i in range(calls)]


@pytest.mark.parametrize("max_responders", [1, 100])
async def test_both_sides_call_each_other_at_their_limits_with_big_values(
    max_responders: int,
) -> None:
    # Both sides answer Work by calling the other's Lookup, 60 kB each way, with
    # small transport buffers: 300 calls each way, 1,200 boxes in all.
    calls = 300
    async with running_server(CallsBackBig, max_responders=max_responders) as (
        _,
        port,
        protocols,
    ):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST, port, protocol_factory=CallsBackBig, max_responders=max_responders
            )
        try:
            server_side = await only(protocols)
            for side in (proto, server_side):
                assert side.transport is not None
                side.transport.set_write_buffer_limits(high=16 * 1024)
            async with asyncio.timeout(3 * LONG):
                mine = [proto.call_remote(Work, n=i, data=b"x" * 60_000) for i in range(calls)]
                theirs = [
                    server_side.call_remote(Work, n=i, data=b"y" * 60_000) for i in range(calls)
                ]
                answers = await asyncio.gather(*mine, *theirs)
            assert [a["n"] for a in answers] == [i + 1 for i in range(calls)] * 2
            assert all(a["data"] == b"w" * 60_000 for a in answers)
            for side in (proto, server_side):
                assert side._flow.working == 0
                assert side._flow.lending == 0
                assert not side._reading_paused
        finally:
            proto.close()
            async with asyncio.timeout(LONG):
                await proto.wait_closed()


async def only(protocols: list[amp.AMPProtocol]) -> amp.AMPProtocol:
    await settle(lambda: len(protocols) == 1, "one connection")
    return protocols[0]


class Nested(amp.Command):
    arguments = [("depth", amp.Integer())]
    response = [("depth", amp.Integer())]


class NestedServer(amp.AMPProtocol):
    """Answers Nested(depth) by calling Nested(depth - 1) on the peer, down to 0."""

    @Nested.responder
    async def nested(self, depth: int) -> dict[str, int]:
        if depth == 0:
            await asyncio.sleep(0)
            return {"depth": 0}
        answer = await self.call_remote(Nested, depth=depth - 1)
        return {"depth": answer["depth"] + 1}


async def test_nested_calls_in_both_directions_with_one_responder_each() -> None:
    # Each level of nesting waits on the other side; with one place a side,
    # a responder that waits on the peer must lend its place.
    async with (
        running_server(NestedServer, max_responders=1, max_pending_calls=1) as (_, port, _p),
    ):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST, port, protocol_factory=NestedServer, max_responders=1, max_pending_calls=1
            )
        try:
            async with asyncio.timeout(LONG):
                answers = await asyncio.gather(
                    *(proto.call_remote(Nested, depth=d) for d in (5, 4, 3, 6, 1, 0))
                )
            assert [a["depth"] for a in answers] == [5, 4, 3, 6, 1, 0]
        finally:
            proto.close()
            async with asyncio.timeout(LONG):
                await proto.wait_closed()


class Sleep(amp.Command):
    arguments = [("seconds", amp.Float())]
    response: ClassVar[list[tuple[str, amp.Argument[Any]]]] = []


class Sleeper(amp.AMPProtocol):
    @Sleep.responder
    async def sleep(self, seconds: float) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return {}


@pytest.mark.parametrize("max_pending_calls", [1, 1000])
async def test_calls_waiting_for_max_pending_calls_leave_the_cpu_idle(
    max_pending_calls: int,
) -> None:
    # Waiting for a place is waiting: the loop must not spin meanwhile.
    wait = 0.5 * TIME
    async with (
        running_server(Sleeper) as (_, port, _protocols),
        client(port) as proto,
    ):
        proto.max_pending_calls = max_pending_calls
        calls = [proto.call_remote(Sleep, seconds=wait) for _ in range(max_pending_calls + 1)]
        await asyncio.sleep(0.05 * TIME)  # the first calls are sent, the last one waits
        assert proto._waiting
        cpu, wall = time.process_time(), time.monotonic()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*calls)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert wall >= wait  # the last call waited for the first ones
        assert cpu < 0.2 * wall, f"{cpu:.2f} s of CPU in {wall:.2f} s of waiting"


request_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_id", default=None)


class Remember(amp.Command):
    arguments = [("n", amp.Integer())]
    response = [("seen", amp.Integer())]


class Sum(amp.Command):
    arguments = [("a", amp.Integer()), ("b", amp.Integer())]
    response = [("total", amp.Integer())]


class ContextServer(amp.AMPProtocol):
    gate: asyncio.Event | None = None

    @Remember.responder
    async def remember(self, n: int) -> dict[str, int]:
        seen = request_id.get()
        request_id.set(n)
        assert self.gate is not None
        await self.gate.wait()
        return {"seen": -1 if seen is None else seen}

    @Sum.responder
    def sum(self, a: int, b: int) -> dict[str, int]:
        seen = request_id.get()
        request_id.set(a)
        return {"total": -1 if seen is None else seen}


@pytest.mark.parametrize("max_responders", [1, 2, 100])
async def test_no_request_sees_the_context_of_another(max_responders: int) -> None:
    ContextServer.gate = asyncio.Event()
    async with (
        running_server(ContextServer, max_responders=max_responders) as (_, port, _p),
        client(port) as proto,
    ):
        calls = [proto.call_remote(Remember, n=i) for i in range(6)]
        sums = [proto.call_remote(Sum, a=i, b=0) for i in range(3)]
        await asyncio.sleep(0.05 * TIME)
        ContextServer.gate.set()
        async with asyncio.timeout(LONG):
            answers = await asyncio.gather(*calls)
            totals = await asyncio.gather(*sums)
        assert [a["seen"] for a in answers] == [-1] * 6
        # Plain responders run in a fresh context too, whether they waited or not.
        assert [t["total"] for t in totals] == [-1] * 3


class Bulk(amp.Command):
    arguments = [("data", amp.Bytes())]
    response: ClassVar[list[tuple[str, amp.Argument[Any]]]] = []


async def test_a_burst_of_calls_stops_at_the_transports_high_water_mark() -> None:
    # 2,000 calls of 60 kB in one turn to a peer that does not read.
    async with accepting_server(Silent) as (port, peers):
        async with asyncio.timeout(LONG):
            proto = await amp.connect(HOST, port)
        try:
            await accepted(peers)
            assert proto.transport is not None
            high = proto.transport.get_write_buffer_limits()[1]
            payload = b"p" * 60_000
            calls = [proto.call_remote(Bulk, data=payload) for _ in range(2000)]
            for _ in range(5):
                await asyncio.sleep(0)
            buffered = proto.transport.get_write_buffer_size()
            assert buffered <= high + 2 * 65_536 + 2 * len(payload), buffered
            assert proto._writing_paused
            # What was not written waits as the calls' parts, which hold the
            # callers' own bytes rather than copies.
            assert proto._waiting
            assert all(held[2][-2] is payload for held in proto._waiting), "copied"
            for call in calls:
                call.cancel()
        finally:
            proto.transport.abort()  # type: ignore[union-attr]
            async with asyncio.timeout(LONG):
                await proto.wait_closed()


class Silent:
    """An accepted connection that never reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        writer.transport.pause_reading()


async def test_waiting_for_a_place_again_and_again_watches_each_call_once() -> None:
    # One call stays pending while others come and go at max_pending_calls: each
    # time calls wait for a place, the sent calls are watched for cancellation,
    # but a call that stays is watched once, not once per wait.
    Server.release = asyncio.Event()
    async with (
        running_server(Server) as (_, port, _protocols),
        client(port) as proto,
    ):
        proto.max_pending_calls = 2
        slow = proto.call_remote(Slow, n=-1)  # waits for Server.release
        for i in range(30):
            fast = [proto.call_remote(Big, n=i) for _ in range(3)]  # one waits for a place
            async with asyncio.timeout(LONG):
                await asyncio.gather(*fast)
        callbacks = slow._callbacks  # type: ignore[attr-defined]
        assert len(callbacks) <= 2, callbacks
        Server.release.set()
        async with asyncio.timeout(LONG):
            assert await slow == {"n": -1}


class SlowNested(NestedServer):
    """NestedServer whose deepest level waits long enough for the peer to be killed."""

    @Nested.responder
    async def nested(self, depth: int) -> dict[str, int]:
        if depth == 0:
            await asyncio.sleep(LONG)
            return {"depth": 0}
        answer = await self.call_remote(Nested, depth=depth - 1)
        return {"depth": answer["depth"] + 1}


async def test_a_peer_killed_with_calls_nested_both_ways_at_the_limits() -> None:
    # The peer is a real process with one responder and one pending call; we have
    # the same limits. Calls nest both ways, some wait for a place or to be sent,
    # and the peer is killed: every call ends, and every responder of ours ends.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(pathlib.Path(__file__).with_name("nested_child.py")),
        stdout=asyncio.subprocess.PIPE,
        cwd=pathlib.Path(__file__).parent,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(LONG):
            word, port = (await child.stdout.readline()).decode().split()
        assert word == "port"
        async with asyncio.timeout(LONG):
            proto = await amp.connect(
                HOST,
                int(port),
                protocol_factory=SlowNested,
                max_responders=1,
                max_pending_calls=1,
            )
        calls = [proto.call_remote(Nested, depth=d) for d in (3, 2, 4, 1)]
        # Wait until the chains are deep in both directions: our responders run,
        # and calls of ours wait for a place.
        await eventually(lambda: bool(proto._tasks) and bool(proto._waiting), "nested calls")
        await asyncio.sleep(0.1 * TIME)
        child.kill()
        async with asyncio.timeout(LONG):
            results = await asyncio.gather(*calls, return_exceptions=True)
            await proto.wait_closed()
            await eventually(lambda: not proto._tasks, "our responders ended")
        assert all(isinstance(r, amp.ConnectionLostError) for r in results), results
        assert not proto._pending
        assert not proto._waiting
        assert not proto._waiting_nested
        assert not proto._flow.deferred
    finally:
        if child.returncode is None:
            child.kill()
        async with asyncio.timeout(LONG):
            await child.wait()
