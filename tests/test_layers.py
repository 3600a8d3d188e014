"""The sans-I/O core imports no I/O, and the modules import each other in one direction."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).parent.parent / "src" / "asyncio_amp"
SANS_IO = ["_errors", "_wire", "_arguments", "_commands", "_connection", "_flow"]
FORBIDDEN = {"asyncio", "socket", "ssl", "threading", "selectors"}
# Who may import whom, inside the package (STYLE.md).
ALLOWED = {
    "_errors": set(),
    "_wire": {"_errors"},
    "_arguments": {"_errors", "_wire"},
    "_commands": {"_arguments", "_wire", "_errors"},
    "_connection": {"_wire", "_errors"},
    "_flow": set(),
    "_switch": {"_commands", "_arguments", "_wire", "_errors"},
    "_tls": {"_switch", "_commands", "_arguments", "_wire", "_errors"},
    "_protocol": {
        "_tls",
        "_switch",
        "_commands",
        "_arguments",
        "_connection",
        "_flow",
        "_wire",
        "_errors",
    },
    "_server": {
        "_tls",
        "_switch",
        "_protocol",
        "_commands",
        "_arguments",
        "_connection",
        "_flow",
        "_wire",
        "_errors",
    },
    "_network": {
        "_tls",
        "_switch",
        "_server",
        "_protocol",
        "_commands",
        "_arguments",
        "_connection",
        "_flow",
        "_wire",
        "_errors",
    },
    "_cli_output": {"_wire", "_errors"},
    "_cli": {
        "_cli_output",
        "_network",
        "_tls",
        "_switch",
        "_server",
        "_protocol",
        "_commands",
        "_arguments",
        "_connection",
        "_flow",
        "_wire",
        "_errors",
    },
    "__main__": {"_cli"},
}


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """Return (top-level external modules, package-internal modules) a module imports."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    external: set[str] = set()
    internal: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                internal.add((node.module or "").split(".")[0])
            else:
                external.add((node.module or "").split(".")[0])
    return external, internal


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_modules_import_no_io(module: str) -> None:
    external, _ = imports_of(module)
    assert not external & FORBIDDEN


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_import_direction(module: str) -> None:
    external, internal = imports_of(module)
    assert internal <= ALLOWED[module]
    assert "asyncio_amp" not in external


def test_every_module_is_checked() -> None:
    modules = {p.stem for p in SRC.glob("_*.py") if p.stem != "__init__"}
    assert modules == set(ALLOWED)
