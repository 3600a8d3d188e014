"""The public namespace: one __all__, made of the modules' __all__, every name documented."""

from __future__ import annotations

import importlib
import importlib.resources

import asyncio_amp

MODULES = [
    "_errors",
    "_wire",
    "_arguments",
    "_commands",
    "_connection",
    "_switch",
    "_tls",
    "_middleware",
    "_protocol",
    "_server",
    "_network",
    "_pipes",
    "_client",
]


def test_all_is_the_union_of_the_modules_all() -> None:
    names = {"__version__"}
    for module in MODULES:
        names.update(importlib.import_module(f"asyncio_amp.{module}").__all__)
    assert set(asyncio_amp.__all__) == names
    assert len(asyncio_amp.__all__) == len(set(asyncio_amp.__all__))


def test_every_public_name_is_exported_and_documented() -> None:
    for name in asyncio_amp.__all__:
        value = getattr(asyncio_amp, name)
        if name in {"__version__", "Box", "ACCELERATED"}:
            continue  # values, documented where they are defined
        assert value.__doc__, f"{name} has no docstring"
        assert value.__module__.startswith("asyncio_amp"), name


def test_version() -> None:
    assert asyncio_amp.__version__.count(".") == 2


def test_py_typed_is_shipped() -> None:
    assert asyncio_amp.__file__ is not None
    assert (importlib.resources.files("asyncio_amp") / "py.typed").is_file()
