"""
The optional compiled accelerator (_speedups.c): the same boxes, events and errors as the
pure-Python codec, chosen at import time, and importing nothing.

The differential checks load the compiled module directly, so they also run when
ASYNCIO_AMP_NO_EXTENSIONS=1 keeps the package on the pure-Python codec.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncio_amp
from asyncio_amp import _wire
from asyncio_amp._wire import BoxDecoder, encode_box
from fuzz_speedups import check_one, load_accelerator, random_input
from helpers import LONG

ACCEL: Any = load_accelerator()
needs_build = pytest.mark.skipif(ACCEL is None, reason="the C extension was not built here")
C_SOURCE = pathlib.Path(_wire.__file__).with_name("_speedups.c")


def accelerated_in_child(**env: str) -> str:
    """asyncio_amp.ACCELERATED and the codec's functions, in a fresh interpreter."""
    environ = {k: v for k, v in os.environ.items() if k != "ASYNCIO_AMP_NO_EXTENSIONS"}
    code = (
        "import asyncio_amp, asyncio_amp._wire as w;"
        "print(asyncio_amp.ACCELERATED, type(w.encode_box).__name__,"
        " type(w.parse_boxes).__name__, w._scan_boxes is not None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=LONG,
        check=True,
    )
    return result.stdout.strip()


def test_accelerated_says_which_codec_is_in_use() -> None:
    assert asyncio_amp.ACCELERATED is _wire.ACCELERATED
    assert asyncio_amp.ACCELERATED is (_wire._speedups is not None)
    assert isinstance(asyncio_amp.ACCELERATED, bool)


@needs_build
def test_the_accelerator_is_used_when_built() -> None:
    assert (
        accelerated_in_child() == "True builtin_function_or_method builtin_function_or_method True"
    )


def test_the_environment_variable_forces_the_pure_python_codec() -> None:
    assert accelerated_in_child(ASYNCIO_AMP_NO_EXTENSIONS="1") == "False function function False"


def test_the_compiled_code_imports_nothing() -> None:
    # The sans-I/O rule holds for the C code too: it imports no module at all (so no
    # asyncio), and calls back only the Python functions _wire gives it.
    source = C_SOURCE.read_text()
    assert "PyImport_" not in source
    assert "#include <Python.h>" in source
    assert [line for line in source.splitlines() if line.startswith("#include")] == [
        "#include <Python.h>"
    ]


@needs_build
def test_the_compiled_module_imports_no_asyncio() -> None:
    # Loaded alone, outside the package, in a fresh interpreter.
    code = (
        "import importlib.machinery, importlib.util, sys;"
        f"loader = importlib.machinery.ExtensionFileLoader('asyncio_amp._speedups', {ACCEL.__file__!r});"
        "spec = importlib.util.spec_from_loader('asyncio_amp._speedups', loader);"
        "module = importlib.util.module_from_spec(spec);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'asyncio_amp')))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=LONG, check=True
    )
    assert result.stdout.strip() == "['asyncio_amp._speedups']"


@needs_build
def test_differential_on_random_streams() -> None:
    # A bounded run of the fuzz target (tests/fuzz_speedups.py runs it for millions).
    rng = random.Random(17)
    for _ in range(3000):
        check_one(ACCEL, random_input(rng))


@needs_build
@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_differential_on_arbitrary_bytes(data: bytes) -> None:
    check_one(ACCEL, data)


@needs_build
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x01a\x00\x00\x00\x00",
        b"\x00\x01a\x00\x01b\x00\x00\x00\x01",
        b"\x01\x00",
        b"GET / HTTP/1.1\r\n",
        b"\x00\x01a\xff\xff",
        b"\x00\x01a\x00\x01b\x00\x00" * 3 + b"\x00\x02",
    ],
)
def test_differential_on_edge_cases(data: bytes) -> None:
    check_one(ACCEL, data)


@needs_build
def test_setup_is_required_and_checked() -> None:
    with pytest.raises(ValueError, match="prefixes"):
        ACCEL.setup(_wire.python_encode_box, _wire.encode_items, _wire.parse_boxes, (b"\x00",) * 2)
    with pytest.raises(TypeError):
        ACCEL.setup(1, 2, 3)


def test_limits_past_the_machine_size_are_no_limit() -> None:
    # Python ints have no size; the compiled scan must not take them for an error.
    decoder = BoxDecoder(max_box_size=10**30, max_keys=2**63)
    assert decoder.receive_data(encode_box({b"a": b"1"})) == [{b"a": b"1"}]
