"""
Run every benchmark workload on every implementation, side by side, and report.

    python benchmarks/run.py [--quick] [--json PATH] [--only WORKLOAD,...]
                             [--impl IMPL,...] [--repeat N]

Each measurement runs in fresh processes: a server and a client pinned to
different CPUs for the network workloads, one process for the in-process ones.
Repetitions are interleaved (every workload on every implementation, then the
next repetition, with the implementations' order rotated), so slow and fast
periods of a noisy machine hit every implementation alike. The output is one
table of medians with their spread and the ratios of asyncio-amp to Twisted and
to the raw floor, the targets, and a JSON file with every sample.

See README.md in this directory for what each workload measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_child.py"
sys.path.insert(0, str(HERE))

from impls import IMPLS, PURE, child_env  # noqa: E402

# Written as escapes: ruff's RUF001 would take the characters for typos of x and -.
TIMES = "\u00d7"
DIVIDE = "\u00f7"
DASH = "\u2013"

# Table columns, in this order.
IMPL_ORDER = ["twisted", "raw", "amp", "raw-uvloop", "amp-uvloop", "amp-pure", "amp-uvloop-pure"]
# The columns of asyncio-amp with its accelerator turned off run only the workloads
# that name them: the ones whose code the accelerator replaces.
COMMON = tuple(i for i in IMPL_ORDER if i not in PURE)
# Variants of asyncio-amp that run only when --impl names them, in columns after
# the others: the cost of tracing and of metrics (see impls/amp_otel.py, amp_metrics.py).
VARIANTS = ["amp-otel", "amp-metrics"]

# (ours, reference) pairs shown as ratio columns.
RATIO_PAIRS = [
    ("amp", "twisted"),
    ("amp", "raw"),
    ("amp-uvloop", "twisted"),
    ("amp-uvloop", "raw-uvloop"),
    ("amp-pure", "twisted"),
    ("amp-pure", "raw"),
    ("amp-uvloop-pure", "twisted"),
    ("amp-uvloop-pure", "raw-uvloop"),
    ("amp-otel", "amp"),
    ("amp-metrics", "amp"),
]


@dataclass(frozen=True)
class Workload:
    """One workload: how it runs and how its result becomes a number."""

    name: str
    kind: str  # "net" (server + client), "inproc" (one process), "pool" (unpinned) or "idle"
    unit: str
    higher_is_better: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    impls: tuple[str, ...] = (*COMMON, *VARIANTS)
    description: str = ""


WORKLOADS = [
    Workload(
        "seq", "net", "calls/s",
        params={"command": "sum", "conns": 1, "inflight": 1},
        impls=(*IMPL_ORDER, *VARIANTS),
        description="one Sum call at a time on one connection",
    ),
    Workload(
        "pipelined", "net", "calls/s",
        params={"command": "sum", "conns": 1, "inflight": 100},
        impls=(*IMPL_ORDER, *VARIANTS),
        description="1 connection, 100 Sum calls in flight",
    ),
    Workload(
        "conns", "net", "calls/s",
        params={"command": "sum", "conns": 16, "inflight": 10},
        impls=(*IMPL_ORDER, *VARIANTS),
        description="16 connections x 10 Sum calls in flight",
    ),
    Workload(
        "echo64k", "net", "MB/s",
        params={"command": "echo", "conns": 1, "inflight": 1, "payload": 60_000},
        description="a 60,000-byte Bytes value echoed, one call at a time",
    ),
    Workload(
        "codec", "inproc", "µs", higher_is_better=False,
        impls=("twisted", "raw", "amp", "amp-pure"),
        description="encode + parse one Sum call box, in process",
    ),
    Workload(
        "inproc", "inproc", "calls/s",
        params={"inflight": 100}, impls=(*IMPL_ORDER, *VARIANTS),
        description="Sum calls between client and server protocols joined in memory, 100 in flight",
    ),
    Workload(
        "big", "net", "MB/s",
        params={"command": "big", "conns": 1, "inflight": 1, "payload": 10_000_000},
        description="a 10 MB BigBytes value echoed, one call at a time",
    ),
    Workload(
        "idle", "idle", "B/conn", higher_is_better=False,
        description="server RSS per idle connection",
    ),
    Workload(
        "workers", "workers", "calls/s",
        params={"app": "impls.amp:Server", "command": "sum", "clients": 2, "conns": 8,
                "inflight": 10},
        impls=("amp", "amp-uvloop"),
        description="asyncio-amp serve --workers 1, then 2: Sum calls from 2 client processes "
        "(8 connections x 10 in flight each)",
    ),
    Workload(
        "workers-cpu", "workers", "calls/s",
        params={"app": "impls.amp:BusyServer", "command": "sum", "clients": 2, "conns": 8,
                "inflight": 10},
        impls=("amp", "amp-uvloop"),
        description="the same, each Sum costing the server about 70 µs of CPU in pure Python",
    ),
    Workload(
        "pool-c1", "pool", "calls/s",
        params={"workers": 2, "inflight": 100, "concurrency": 1},
        description="tiny Sum calls through a 2-worker process pool, 100 in flight, concurrency=1",
    ),
    Workload(
        "pool-c16", "pool", "calls/s",
        params={"workers": 2, "inflight": 100, "concurrency": 16},
        description="tiny Sum calls through a 2-worker process pool, 100 in flight, concurrency=16",
    ),
    Workload(
        "pool-cpu", "pool", "x ideal",
        params={"fib": 27},
        description="speed-up of a batch of fib(27) calls on all cores over 1 worker, / CPU count",
    ),
]  # fmt: skip
WORKLOAD_BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass(frozen=True)
class Row:
    """A row of the table: a workload, or a second figure taken from its results."""

    name: str
    workload: str
    unit: str
    higher_is_better: bool
    value: Callable[[dict[str, Any]], float | None]


def _rate(result: dict[str, Any]) -> float | None:
    return float(result["rate"])


def _mb_per_s(payload: int) -> Callable[[dict[str, Any]], float | None]:
    return lambda result: result["rate"] * payload / 1e6


ROWS = [
    Row("seq", "seq", "calls/s", True, _rate),
    Row("pipelined", "pipelined", "calls/s", True, _rate),
    Row("conns", "conns", "calls/s", True, _rate),
    Row("echo64k", "echo64k", "MB/s", True, _mb_per_s(60_000)),
    Row("codec", "codec", "µs/box", False, lambda r: r["box_us"]),
    Row("codec (parse_boxes)", "codec", "µs/box", False, lambda r: r.get("parse_boxes_us")),
    Row("codec (command)", "codec", "µs/call", False, lambda r: r.get("command_us")),
    Row("inproc", "inproc", "calls/s", True, _rate),
    Row("inproc (per call)", "inproc", "µs/call", False, lambda r: r["us_per_call"]),
    Row("big", "big", "MB/s", True, _mb_per_s(10_000_000)),
    Row("idle", "idle", "B/conn", False, lambda r: r["bytes_per_connection"]),
    Row("workers 1", "workers", "calls/s", True, lambda r: r["rate_1"]),
    Row("workers 2", "workers", "calls/s", True, lambda r: r["rate_2"]),
    Row(f"workers 2 {DIVIDE} 1", "workers", TIMES, True, lambda r: r["rate_2"] / r["rate_1"]),
    Row("workers-cpu 1", "workers-cpu", "calls/s", True, lambda r: r["rate_1"]),
    Row("workers-cpu 2", "workers-cpu", "calls/s", True, lambda r: r["rate_2"]),
    Row(
        f"workers-cpu 2 {DIVIDE} 1", "workers-cpu", TIMES, True,
        lambda r: r["rate_2"] / r["rate_1"],
    ),
    Row("pool-c1", "pool-c1", "calls/s", True, _rate),
    Row("pool-c16", "pool-c16", "calls/s", True, _rate),
    Row("pool-cpu", "pool-cpu", f"{TIMES} ideal", True, lambda r: r["of_ideal"]),
    Row("pool-cpu (speed-up)", "pool-cpu", TIMES, True, lambda r: r["speedup"]),
    Row("pool-cpu (vs bare)", "pool-cpu", f"{TIMES} bare", True, lambda r: r["of_bare"]),
    Row("pool-cpu (busy)", "pool-cpu", "busy", True, lambda r: r["busy"]),
]  # fmt: skip
ROW_BY_NAME = {row.name: row for row in ROWS}


@dataclass(frozen=True)
class Settings:
    repeat: int
    warmup: float
    duration: float
    idle_connections: int
    idle_repeat: int
    big_min_calls: int
    # pool-cpu: fib calls in its batch for each CPU, and rounds of batches.
    cpu_calls_per_core: int
    cpu_rounds: int


FULL = Settings(
    repeat=5,
    warmup=0.25,
    duration=0.8,
    idle_connections=10_000,
    idle_repeat=3,
    big_min_calls=3,
    cpu_calls_per_core=16,
    cpu_rounds=3,
)
QUICK = Settings(
    repeat=1, warmup=0.08, duration=0.15, idle_connections=1_000, idle_repeat=1, big_min_calls=2,
    cpu_calls_per_core=3, cpu_rounds=1,
)  # fmt: skip


# Child processes


class Child:
    """A child process whose stdout lines are read by a thread, so reads can time out."""

    def __init__(self, role: str, impl: str, workload: str, params: dict[str, Any]) -> None:
        self.role = role
        # Kept open for the life of the child and read at the end, so no context manager.
        self.stderr: TextIO = tempfile.TemporaryFile(  # noqa: SIM115
            "w+", encoding="utf-8", errors="replace"
        )
        env = child_env(impl, dict(os.environ))
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), role, impl, workload, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            cwd=str(HERE),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the first stdout line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(
                    f"{self.role} exited before printing {prefix}: {self.error_text()}"
                )
            if line.startswith(prefix + " ") or line == prefix:
                return line[len(prefix) :].strip()
        raise TimeoutError(f"{self.role} printed no {prefix} within {timeout:.0f} s")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def stop(self, timeout: float = 5) -> None:
        """End the process: wait ``timeout`` seconds for it to exit, then terminate, then kill."""
        self.close_stdin()
        try:
            self.proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        self.terminate()

    def kill(self) -> None:
        """Kill the process at once (a server, once its client has reported)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def error_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:].strip()


class Served:
    """``asyncio-amp serve --workers N``: its log lines, read by a thread, so reads can time out."""

    def __init__(self, app: str, workers: int, loop: str | None) -> None:
        argv = [sys.executable, "-m", "asyncio_amp", "serve", app, "--port", "0"]
        argv += ["--workers", str(workers), "--grace", "1"]
        if loop == "uvloop":
            argv.append("--uvloop")
        # An amp column: accelerated where built, whatever the caller's environment says.
        env = child_env("amp", dict(os.environ))
        self.log: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(HERE),
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            self.lines.put(line)
        self.lines.put(None)

    def port(self, timeout: float) -> int:
        """The port, once the supervisor says every worker listens."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"serve exited: {self.problems()}")
            found = re.search(r"serving \S+ on 127\.0\.0\.1:(\d+) with \d+ workers?", line)
            if found:
                return int(found.group(1))
        raise TimeoutError(f"serve --workers was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM), and kill it if it does not stop."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.thread.join(5)

    def problems(self) -> str:
        return "\n".join(line for line in self.log if " WARNING " in line or " ERROR " in line
                         or "Traceback" in line or "error:" in line)[-2000:]  # fmt: skip


# How long the workers workload gives its client processes to start and connect.
CLIENT_START = 1.5


def _run_workers(impl: str, workload: Workload, settings: Settings, rep: int) -> dict[str, Any]:
    """
    ``serve --workers 1`` and ``--workers 2``, one after the other (the order alternates
    with the repetition), each loaded by the same client processes: their rates added up.
    """
    loop = IMPLS[impl][1]
    # Longer than the other workloads' windows: several processes have to settle.
    warmup, duration = 2 * settings.warmup, 2 * settings.duration
    cap = max(10.0, 5 * duration)
    params: dict[str, Any] = {
        **workload.params, "warmup": warmup, "duration": duration, "min_calls": 1, "cap": cap,
        "lifetime": warmup + cap + 60, "cpu": None,
    }  # fmt: skip
    result: dict[str, Any] = {"complete": True, "errors": [], "runs": {}}
    for workers in (1, 2) if rep % 2 == 0 else (2, 1):
        served = Served(workload.params["app"], workers, loop)
        clients: list[Child] = []
        run: dict[str, Any] = {}
        try:
            port = served.port(30)
            # The load comes from client processes of the raw floor on uvloop, the
            # cheapest client here, so that the server has as much CPU as it can get.
            # Their windows open at the same moment (start_at, on the wall clock), so
            # that their rates add up; the time before it is for starting and warming up.
            params["start_at"] = time.time() + CLIENT_START + warmup
            for _ in range(workload.params["clients"]):
                clients.append(Child("client", "raw-uvloop", workload.name, params))
            for child in clients:
                child.send(f"{port}\n")
            reports = [json.loads(child.expect("RESULT", warmup + cap + 30)) for child in clients]
            starts = [r.get("window_start") or 0.0 for r in reports]
            run = {
                "rate": sum(r["rate"] for r in reports),
                "complete": all(r.get("complete") for r in reports),
                "window_start_spread": max(starts) - min(starts),
                "clients": reports,
            }
            if run["window_start_spread"] > 0.1 * duration:
                run["complete"] = False  # the rates would not add up: not counted
                result["errors"].append(
                    f"--workers {workers}: the clients' windows opened "
                    f"{run['window_start_spread']:.2f} s apart (a client started late)"
                )
            for r in reports:
                result["errors"] += list(r.get("errors") or [])
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            run = {"complete": False}
            result["errors"].append(f"--workers {workers}: {type(exc).__name__}: {exc}")
        finally:
            for child in clients:
                child.kill()
                text = child.error_text()
                if text:
                    result["errors"].append(f"client stderr: {text}")
            served.stop()
            if served.problems():
                result["errors"].append(f"serve --workers {workers}: {served.problems()}")
        result["runs"][workers] = run
        result["complete"] = result["complete"] and run.get("complete", False)
        result[f"rate_{workers}"] = run.get("rate", 0.0)
    return result


def _run_one(
    impl: str,
    workload: Workload,
    settings: Settings,
    cpus: tuple[int | None, int | None],
    rep: int = 0,
) -> dict[str, Any]:
    """Run one measurement in fresh processes and return its result (``problem`` set on failure)."""
    if workload.kind == "workers":
        result = _run_workers(impl, workload, settings, rep)
        if not result["complete"] or result["errors"]:
            result["problem"] = "; ".join(["incomplete measurement"] * (not result["complete"])
                                          + result["errors"])  # fmt: skip
        return result
    server_cpu, client_cpu = cpus
    cap = max(10.0, 5 * settings.duration)
    params: dict[str, Any] = {
        **workload.params,
        "warmup": settings.warmup,
        "duration": settings.duration,
        "min_calls": settings.big_min_calls if workload.name == "big" else 1,
        "cap": cap,
        "lifetime": settings.warmup + cap + 60,
        "idle_connections": settings.idle_connections,
        "calls": settings.cpu_calls_per_core * (os.cpu_count() or 1),
        "rounds": settings.cpu_rounds,
    }
    timeout = settings.warmup + cap + 30
    if workload.name == "pool-cpu":
        # Each round: two bare batches, two pools started, two timed batches.
        params["lifetime"] += 30 * settings.cpu_rounds
        timeout += 30 * settings.cpu_rounds
    children: list[Child] = []
    result: dict[str, Any] = {}
    stderr_texts: dict[str, str] = {}
    try:
        if workload.kind == "inproc":
            child = Child("inproc", impl, workload.name, {**params, "cpu": client_cpu})
            children.append(child)
            result = json.loads(child.expect("RESULT", timeout))
            # Its work is done and reported: skip the interpreter's teardown.
            child.kill()
        elif workload.kind == "pool":
            # Not pinned: the pool's workers inherit the affinity, and must have every CPU.
            child = Child("pool", impl, workload.name, {**params, "cpu": None})
            children.append(child)
            result = json.loads(child.expect("RESULT", timeout))
            # Its pool was closed before it reported: skip the interpreter's teardown.
            child.kill()
        else:
            server = Child("server", impl, workload.name, {**params, "cpu": server_cpu})
            children.append(server)
            client = Child("client", impl, workload.name, {**params, "cpu": client_cpu})
            children.append(client)
            port = int(server.expect("PORT", 30))
            client.send(f"{port}\n")
            if workload.kind == "idle":
                ready = client.expect("READY", timeout)
                result = json.loads(server.expect("RESULT", timeout))
                result["client"] = ready
                # The client resets its connections and exits before the server dies.
                client.stop(30)
                server.kill()
            else:
                result = json.loads(client.expect("RESULT", timeout))
                # The client closed its connections before reporting: skip the teardowns.
                server.kill()
                client.kill()
    except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
        result = {"complete": False, "errors": [f"{type(exc).__name__}: {exc}"]}
    finally:
        for child in children:
            child.terminate()
            text = child.error_text()
            if text:
                stderr_texts[child.role] = text
    if stderr_texts:
        result["stderr"] = stderr_texts
    problems = list(result.get("errors") or [])
    problems += [f"{role} stderr: {text}" for role, text in stderr_texts.items()]
    if not result.get("complete", False):
        problems.insert(0, "incomplete measurement")
    if workload.kind == "idle" and result.get("connections", 0) < settings.idle_connections:
        problems.append(
            f"only {result.get('connections', 0)} of {settings.idle_connections} idle connections"
        )
    if problems:
        result["problem"] = "; ".join(str(p) for p in problems)
    return result


# Reporting


def _machine(cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            memory = f.readline().split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE, capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "twisted": version("twisted"),
        "uvloop": version("uvloop"),
        "asyncio_amp": version("asyncio-amp"),
        "git": commit,
        "accelerated": _accelerated(),
        "pinning": {"server_cpu": cpus[0], "client_cpu": cpus[1]},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _accelerated() -> bool | None:
    """Whether the ``amp`` columns' processes use the compiled accelerator (is it built?)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import asyncio_amp; print(asyncio_amp.ACCELERATED)"],
            env=child_env("amp", dict(os.environ)), cwd=HERE, capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out == "True"


def _library_digest() -> str | None:
    # A digest of asyncio-amp's source files, to tell whether they changed during a run.
    spec = importlib.util.find_spec("asyncio_amp")
    if spec is None or spec.origin is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(spec.origin).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _load() -> str | None:
    # The 1-minute load average: other work on the machine disturbs the figures.
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return None


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    for limit, divisor, suffix in ((1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if magnitude >= limit:
            scaled = value / divisor
            return f"{scaled:.3g}{suffix}" if scaled < 1000 else f"{scaled:,.0f}{suffix}"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(ours: float | None, ref: float | None, higher_is_better: bool) -> float | None:
    """How many times better ours is than ref (> 1: better), whatever the unit's direction."""
    if not ours or not ref:
        return None
    return ours / ref if higher_is_better else ref / ours


def _summaries(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row, by_impl in samples.items():
        out[row] = {}
        for impl, values in by_impl.items():
            if values:
                out[row][impl] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
    return out


def _paired_ratio(
    paired: dict[str, dict[int, dict[str, float]]], row: Row, ours: str, ref: str
) -> float | None:
    # The median over repetitions of the ratio within each repetition.
    ratios = []
    for values in paired.get(row.name, {}).values():
        r = _ratio(values.get(ours), values.get(ref), row.higher_is_better)
        if r is not None:
            ratios.append(r)
    return statistics.median(ratios) if ratios else None


@dataclass(frozen=True)
class Target:
    """
    A goal from the issue: asyncio-amp's ratio on ``row`` to ``reference`` reaches ``threshold``.

    ``reference`` is an implementation, ``"floor"`` (the raw floor on the same event
    loop: raw for amp, raw-uvloop for amp-uvloop), another row of the same
    implementation (``"row:echo64k"``), or ``"ideal"`` (the row is a ratio to the
    ideal already: its own value is compared with ``threshold``).
    """

    name: str
    row: str
    reference: str
    threshold: float
    required_for: tuple[str, ...] = ("amp",)

    def reference_for(self, ours: str) -> str:
        if self.reference == "floor":
            return "raw-uvloop" if IMPLS[ours][1] == "uvloop" else "raw"
        return self.reference

    def ratio(self, summaries: dict[str, dict[str, Any]], ours: str) -> float | None:
        higher_is_better = ROW_BY_NAME[self.row].higher_is_better
        reference = self.reference_for(ours)
        if reference == "ideal":
            return _median(summaries, self.row, ours)
        if reference.startswith("row:"):
            ref_value = _median(summaries, reference[4:], ours)
        else:
            ref_value = _median(summaries, self.row, reference)
        return _ratio(_median(summaries, self.row, ours), ref_value, higher_is_better)


def _median(summaries: dict[str, dict[str, Any]], row: str, impl: str) -> float | None:
    entry = summaries.get(row, {}).get(impl)
    return entry["median"] if entry else None


ASYNCIO = ("amp", "amp-pure")
UVLOOP = ("amp-uvloop", "amp-uvloop-pure")
TARGETS = [
    # The second speed round's targets: the pure-Python ones hold in both modes, the
    # accelerator's (marked "accelerated") for the accelerated columns only.
    Target(f"seq ≥ 0.95{TIMES} the raw floor (same loop)", "seq", "floor", 0.95, ASYNCIO + UVLOOP),
    Target(f"pipelined ≥ 15{TIMES} Twisted", "pipelined", "twisted", 15, ASYNCIO),
    Target(f"pipelined ≥ 18{TIMES} Twisted (uvloop)", "pipelined", "twisted", 18, UVLOOP),
    Target(
        f"pipelined ≥ 20{TIMES} Twisted (uvloop, accelerated)",
        "pipelined",
        "twisted",
        20,
        ("amp-uvloop",),
    ),
    Target(f"conns ≥ 10{TIMES} Twisted", "conns", "twisted", 10, ASYNCIO),
    Target(f"conns ≥ 12{TIMES} Twisted (uvloop)", "conns", "twisted", 12, UVLOOP),
    Target(f"echo64k ≥ 0.85{TIMES} the raw floor", "echo64k", "floor", 0.85),
    Target(f"codec ≥ 3{TIMES} Twisted (speed)", "codec", "twisted", 3, ASYNCIO),
    Target(f"codec ≥ 20{TIMES} Twisted (accelerated)", "codec", "twisted", 20),
    Target(f"codec (parse_boxes) ≥ 5{TIMES} Twisted", "codec (parse_boxes)", "twisted", 5, ASYNCIO),
    Target(
        f"inproc ≥ 0.5{TIMES} the raw floor (≤ 2{TIMES} its cost per call)",
        "inproc",
        "floor",
        0.5,
        ASYNCIO,
    ),
    Target(f"inproc ≥ 13{TIMES} Twisted", "inproc", "twisted", 13, ASYNCIO),
    Target(f"inproc ≥ 25{TIMES} Twisted (accelerated)", "inproc", "twisted", 25),
    Target(f"big ≥ 0.7{TIMES} echo64k throughput", "big", "row:echo64k", 0.7),
    # Strictly lower: the ratio (Twisted's bytes / ours) must be over 1.
    Target("idle bytes/conn below Twisted's", "idle", "twisted", 1.0 + 1e-9),
    # The pool's "floor" is run_in_executor(ProcessPoolExecutor) on the same loop.
    Target(f"pool-c16 ≥ 3{TIMES} ProcessPoolExecutor", "pool-c16", "floor", 3),
    Target(f"pool-c1 ≥ 1{TIMES} ProcessPoolExecutor", "pool-c1", "floor", 1),
    Target(f"pool-cpu ≥ 0.9{TIMES} the ideal speed-up", "pool-cpu", "ideal", 0.9),
]


def _table(summaries: dict[str, dict[str, Any]], impls: list[str]) -> tuple[str, dict[str, Any]]:
    pairs = [(o, r) for o, r in RATIO_PAIRS if o in impls and r in impls]
    header = ["workload", "unit", *impls, *(f"{o} ÷ {r}" for o, r in pairs)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    ratios: dict[str, dict[str, float | None]] = {}
    for row in ROWS:
        if row.name not in summaries:
            continue
        cells = [row.name, row.unit + ("" if row.higher_is_better else " ↓")]
        for impl in impls:
            entry = summaries[row.name].get(impl)
            if entry is None:
                cells.append("n/a")
            elif entry["n"] == 1:
                cells.append(_fmt(entry["median"]))
            else:
                cells.append(
                    f"{_fmt(entry['median'])} ({_fmt(entry['min'])}{DASH}{_fmt(entry['max'])})"
                )
        ratios[row.name] = {}
        for ours, ref in pairs:
            r = _ratio(
                _median(summaries, row.name, ours),
                _median(summaries, row.name, ref),
                row.higher_is_better,
            )
            ratios[row.name][f"{ours}/{ref}"] = r
            cells.append("n/a" if r is None else f"{r:.2f}{TIMES}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), ratios


def _targets(
    summaries: dict[str, dict[str, Any]], impls: list[str]
) -> tuple[str, list[dict[str, Any]]]:
    variants = [i for i in (*ASYNCIO, *UVLOOP) if i in impls]
    lines = ["| target | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    out = []
    for target in TARGETS:
        if target.row not in summaries:
            continue
        cells = [target.name]
        for ours in variants:
            value = target.ratio(summaries, ours)
            met = None if value is None else value >= target.threshold
            required = ours in target.required_for
            out.append(
                {"target": target.name, "impl": ours, "row": target.row,
                 "reference": target.reference_for(ours), "ratio": value,
                 "threshold": target.threshold, "met": met, "required": required}
            )  # fmt: skip
            if value is None:
                cells.append("n/a")
            else:
                mark = (
                    ("met" if met else "**NOT met**")
                    if required
                    else ("(met)" if met else "(not met)")
                )
                cells.append(f"{value:.2f}{TIMES} {mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def _machine_line(machine: dict[str, Any]) -> str:
    accelerated = machine.get("accelerated")
    if accelerated is None:
        accelerator = "accelerator unknown"
    elif accelerated:
        accelerator = "accelerator built: the amp columns use it, the -pure ones do not"
    else:
        accelerator = "accelerator not built: every column is pure Python"
    pin = machine["pinning"]
    pinning = (
        f"server on CPU {pin['server_cpu']}, client on CPU {pin['client_cpu']}"
        if pin["server_cpu"] is not None
        else "not pinned (fewer than 2 CPUs)"
    )
    return (
        f"{machine['cpu_model']}, {machine['cpu_count']} CPUs ({pinning}), {machine['memory']}, "
        f"{machine['os']}; Python {machine['python']}, Twisted {machine['twisted']}, "
        f"uvloop {machine['uvloop']}, asyncio-amp {machine['asyncio_amp']} ({machine['git']}, "
        f"{accelerator}); {machine['date']}"
    )


def _without_local_paths(text: str) -> str:
    # Tracebacks and stderr name local directories; the results file should not.
    for path, name in (
        (str(HERE.parent), "<repo>"),
        (sys.prefix, "<venv>"),
        (sys.base_prefix, "<python>"),
    ):
        if len(path) > 1:
            text = text.replace(json.dumps(path)[1:-1], name)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short measurements, one repetition, 1,000 idle connections",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the JSON results "
        "(default: results/latest.json, or results/quick.json with --quick)",
    )
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOAD_BY_NAME))
    parser.add_argument(
        "--impl", help="comma-separated implementations: " + ",".join((*IMPL_ORDER, *VARIANTS))
    )
    parser.add_argument("--repeat", type=int, help="repetitions (default 5, or 1 with --quick)")
    args = parser.parse_args(argv)  # fmt: skip

    settings = QUICK if args.quick else FULL
    if args.repeat is not None:
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        settings = Settings(**{**settings.__dict__, "repeat": args.repeat})
    workloads = WORKLOADS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in WORKLOAD_BY_NAME]
        if unknown:
            parser.error(f"unknown workload(s): {', '.join(unknown)}")
        workloads = [w for w in WORKLOADS if w.name in names]
    impls = IMPL_ORDER
    if args.impl:
        names = [n.strip() for n in args.impl.split(",") if n.strip()]
        unknown = [n for n in names if n not in IMPLS]
        if unknown:
            parser.error(f"unknown implementation(s): {', '.join(unknown)}")
        impls = [i for i in (*IMPL_ORDER, *VARIANTS) if i in names]
    json_path = args.json or HERE / "results" / ("quick.json" if args.quick else "latest.json")
    notes: list[str] = []
    # Each idle process needs a descriptor per connection, and a few more; the children
    # raise their soft limit up to the hard one, which they inherit from here.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard - 100 < settings.idle_connections:
        fewer = max(100, hard - 100)
        notes.append(
            f"idle: {fewer:,} connections instead of {settings.idle_connections:,} "
            f"(the RLIMIT_NOFILE hard limit is {hard:,})"
        )
        settings = Settings(**{**settings.__dict__, "idle_connections": fewer})

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus: tuple[int | None, int | None] = (
        (available[0], available[1]) if len(available) >= 2 else (None, None)
    )
    machine = _machine(cpus)
    machine["load_average_at_start"] = _load()
    machine["library_digest_at_start"] = _library_digest()
    print(f"machine: {_machine_line(machine)}", file=sys.stderr)

    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    paired: dict[str, dict[int, dict[str, float]]] = {}
    problems: list[str] = []
    for rep in range(settings.repeat):
        for workload in workloads:
            if workload.kind == "idle" and rep >= settings.idle_repeat:
                continue
            order = [i for i in impls if i in workload.impls]
            if not order:
                continue
            shift = rep % len(order)
            order = order[shift:] + order[:shift]
            for impl in order:
                t0 = time.monotonic()
                result = _run_one(impl, workload, settings, cpus, rep)
                runs.append({"rep": rep, "workload": workload.name, "impl": impl, "result": result,
                             "wall_seconds": time.monotonic() - t0})  # fmt: skip
                shown = []
                for row in ROWS:
                    if row.workload != workload.name:
                        continue
                    value = None
                    if result.get("complete"):
                        try:
                            value = row.value(result)
                        except (KeyError, TypeError):
                            value = None
                    if value is not None:
                        samples.setdefault(row.name, {}).setdefault(impl, []).append(value)
                        paired.setdefault(row.name, {}).setdefault(rep, {})[impl] = value
                    shown.append(f"{_fmt(value)} {row.unit}")
                progress = f"[{rep + 1}/{settings.repeat} {time.monotonic() - started:5.0f}s]"
                line = f"{progress} {workload.name:9} {impl:10} " + ", ".join(shown)
                if "problem" in result:
                    line += f"  PROBLEM: {result['problem'][:300]}"
                    problems.append(f"rep {rep + 1} {workload.name} {impl}: {result['problem']}")
                print(line, file=sys.stderr, flush=True)

    summaries = _summaries(samples)
    table, ratios = _table(summaries, impls)
    targets_table, targets = _targets(summaries, impls)
    paired_ratios = {
        row.name: {
            f"{o}/{r}": _paired_ratio(paired, row, o, r)
            for o, r in RATIO_PAIRS
            if o in impls and r in impls
        }
        for row in ROWS
        if row.name in summaries
    }
    elapsed = time.monotonic() - started
    machine["load_average_at_end"] = _load()
    machine["library_digest_at_end"] = _library_digest()
    if machine["library_digest_at_end"] != machine["library_digest_at_start"]:
        notes.append("asyncio-amp's source files changed during the run: its figures mix versions")

    print()
    print(f"Machine: {_machine_line(machine)}")
    mode = "quick" if args.quick else "full"
    print(f"Mode: {mode}; {settings.repeat} repetition(s), interleaved; {settings.duration} s "
          f"per measurement after {settings.warmup} s of warm-up; idle with "
          f"{settings.idle_connections:,} connections; {elapsed:.0f} s in all; load average "
          f"{machine['load_average_at_start']} at the start, {machine['load_average_at_end']} "
          "at the end.")  # fmt: skip
    print(f"Medians (min{DASH}max). ↓: lower is better. Ratios are how many times better "
          "asyncio-amp is (> 1: faster or smaller), whatever the unit's direction.")  # fmt: skip
    for note in notes:
        print(f"Note: {note}")
    print()
    print(table)
    print()
    print(targets_table)
    if problems:
        print()
        print("Problems:")
        for p in problems:
            print(f"- {p[:1000]}")

    document = {
        "machine": machine,
        "mode": "quick" if args.quick else "full",
        "settings": settings.__dict__,
        "workloads": {
            w.name: {"description": w.description, "unit": w.unit, "params": w.params}
            for w in workloads
        },
        "implementations": impls,
        "elapsed_seconds": elapsed,
        "samples": samples,
        "medians": summaries,
        "ratios": ratios,
        "paired_ratios": paired_ratios,
        "targets": targets,
        "problems": problems,
        "notes": notes,
        "table_markdown": table,
        "targets_markdown": targets_table,
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        _without_local_paths(json.dumps(document, indent=1, ensure_ascii=False)) + "\n",
        encoding="utf-8",
    )
    print()
    print(f"JSON: {os.path.relpath(json_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
