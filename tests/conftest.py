"""
Test configuration: async tests run on a fresh event loop in debug mode.

Every ``async def`` test runs under ``asyncio.Runner`` with ``debug=True``,
bounded by ``TEST_TIMEOUT``: once on the standard asyncio loop and, when uvloop is
installed, once more on uvloop (``test_x[asyncio]``, ``test_x[uvloop]``). Set
``AMP_TEST_TIME_SCALE`` to stretch every time bound on a slow machine.
"""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from helpers import LOOP_KINDS, TIME, loop_factory

TEST_TIMEOUT = 60 * TIME


def pytest_report_header() -> str:
    return f"event loops: {', '.join(LOOP_KINDS)}; time scale: {TIME}"


@pytest.fixture(autouse=True)
def amp_loop(request: pytest.FixtureRequest) -> str:
    """The kind of event loop an async test runs on."""
    kind: str = getattr(request, "param", "asyncio")
    return kind


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_loop_only: run this async test on the standard asyncio loop only"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function):
        only = metafunc.definition.get_closest_marker("asyncio_loop_only")
        metafunc.parametrize("amp_loop", ["asyncio"] if only else LOOP_KINDS, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}

    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await pyfuncitem.obj(**kwargs)

    kind = pyfuncitem.funcargs["amp_loop"]
    with asyncio.Runner(debug=True, loop_factory=lambda: loop_factory(kind)) as runner:
        runner.run(bounded())
    return True
