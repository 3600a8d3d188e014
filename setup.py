"""
Build the optional compiled accelerator, src/asyncio_amp/_speedups.c (the rest: pyproject.toml).

The extension is optional: without a C compiler (or with ASYNCIO_AMP_NO_EXTENSIONS=1 set
at build time) the package installs without it, and asyncio_amp runs its pure-Python
codec, which behaves the same (asyncio_amp.ACCELERATED says which one is in use).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns and goes on when the extension cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, or a broken toolchain
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        print(
            f"warning: asyncio_amp's compiled accelerator was not built ({exc}); "
            "the pure-Python codec will be used",
            file=sys.stderr,
        )


extensions = []
if not os.environ.get("ASYNCIO_AMP_NO_EXTENSIONS"):
    extensions.append(
        Extension("asyncio_amp._speedups", ["src/asyncio_amp/_speedups.c"], optional=True)
    )

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
