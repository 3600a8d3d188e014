"""The sans-I/O core imports no I/O, and the modules import each other in one direction."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).parent.parent / "src" / "asyncio_amp"
SANS_IO = ["_errors", "_wire", "_arguments", "_commands", "_connection", "_flow"]
FORBIDDEN = {"asyncio", "socket", "ssl", "threading", "selectors"}
# The sans-I/O core, which the asyncio layer builds on.
CORE = {"_commands", "_arguments", "_connection", "_flow", "_wire", "_errors"}
# StartTLS and protocol switching, which the protocol delegates to.
UPGRADES = {"_tls", "_switch"}
# The private modules below the command-line tool.
CLI_BELOW = (
    CORE
    | UPGRADES
    | {
        "_pipes",
        "_network",
        "_server",
        "_protocol",
        "_fds",
        "_locators",
        "_keepalive",
        "_middleware",
        "_observe",
    }
)
# Who may import whom, inside the package (STYLE.md). Modules of a subpackage are
# named with a dot: "cli.call".
ALLOWED = {
    "_errors": set(),
    # _speedups is the optional compiled accelerator (C, importing nothing; test_speedups).
    "_wire": {"_errors", "_speedups"},
    "_arguments": {"_errors", "_wire"},
    "_commands": {"_arguments", "_wire", "_errors"},
    "_connection": {"_wire", "_errors"},
    "_flow": set(),
    "_locators": {"_commands", "_arguments", "_connection", "_wire", "_errors"},
    # Descriptor passing is I/O (sockets, the event loop); the sans-I/O
    # DescriptorExchange it drives is in _arguments.
    "_fds": {"_arguments", "_connection", "_wire", "_errors"},
    "_switch": {"_commands", "_arguments", "_wire", "_errors"},
    "_tls": {"_switch", "_commands", "_arguments", "_wire", "_errors"},
    "_keepalive": {"_commands", "_arguments", "_wire", "_errors"},
    # Middleware and the chain that runs it, which the protocol delegates to.
    "_middleware": CORE | {"_locators"},
    # What a connection tells its observers besides calls (for metrics).
    "_observe": {"_errors"},
    "_protocol": CORE | UPGRADES | {"_fds", "_locators", "_keepalive", "_middleware", "_observe"},
    # The optional integrations sit on top of the middleware; nothing in the
    # package imports them but the command-line tool, when asked to.
    "otel": {"_middleware", "_errors"},
    "prometheus": {"_middleware", "_observe", "_commands", "_errors"},
    "_server": CORE | UPGRADES | {"_protocol", "_fds", "_locators", "_middleware"},
    "_network": CORE | UPGRADES | {"_server", "_protocol", "_fds", "_locators", "_middleware"},
    "_pipes": CORE
    | UPGRADES
    | {"_network", "_server", "_protocol", "_fds", "_locators", "_middleware"},
    "_client": CORE
    | UPGRADES
    | {"_network", "_server", "_protocol", "_fds", "_locators", "_middleware", "_keepalive"},
    # The process pool uses the protocol through its public API.
    "pool._errors": {"_errors"},
    "pool._options": CORE | UPGRADES | {"_protocol", "_fds", "_locators"},
    "pool._child": CORE | UPGRADES | {"_protocol", "_fds", "_locators"},
    # (pool._calls and pool._worker name each other's and pool._pool's types
    # for the type checker only.)
    "pool._calls": CORE | {"pool._worker"},
    "pool._worker": CORE
    | UPGRADES
    | {"_protocol", "_fds", "_locators", "_middleware", "pool._child", "pool._calls", "pool._pool"},
    # Worker supervision: sizing, failed starts, idle shrink (pool._pool's type only).
    "pool._supervisor": CORE
    | UPGRADES
    | {
        "_protocol",
        "_fds",
        "_locators",
        "_middleware",
        "pool._errors",
        "pool._worker",
        "pool._child",
        "pool._calls",
        "pool._pool",
    },
    "pool._pool": CORE
    | UPGRADES
    | {
        "_protocol",
        "_fds",
        "_locators",
        "_middleware",
        "pool._errors",
        "pool._supervisor",
        "pool._worker",
        "pool._child",
        "pool._calls",
        "pool._options",
    },
    "pool": {"pool._errors", "pool._pool"},
    "pool.__main__": {"pool._child"},
    # The command-line tool sits on top: it may import any private module, and
    # nothing but __main__ imports it.
    "cli._output": {"_wire", "_errors"},
    "cli._common": {"_wire", "_errors"},
    "cli.call": CLI_BELOW | {"cli._common", "cli._output"},
    "cli._worker": CLI_BELOW,
    "cli.serve": CLI_BELOW | {"cli._common", "cli._output", "cli._worker", "prometheus"},
    "cli._supervisor": CLI_BELOW | {"cli._common", "cli._output", "cli._worker", "cli.serve"},
    "cli.decode": CLI_BELOW | {"cli._common", "cli._output"},
    "cli.proxy": CLI_BELOW | {"cli._common", "cli._output"},
    "cli.ping": CLI_BELOW | {"cli._common", "cli._output"},
    "cli": CLI_BELOW
    | {
        "cli._common",
        "cli._output",
        "cli.call",
        "cli.serve",
        "cli.decode",
        "cli.proxy",
        "cli.ping",
        "cli._worker",
        "cli._supervisor",
    },
    "__main__": {"cli"},
}


def source_of(module: str) -> pathlib.Path:
    """The file of a module named as in ALLOWED: "_wire", "cli", "cli.call"."""
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """Return (top-level external modules, package-internal modules) a module imports."""
    tree = ast.parse(source_of(module).read_text())
    # The package a relative import starts from: "" for the top level.
    parts = module.split(".")
    package = parts if source_of(module).name == "__init__.py" else parts[:-1]
    external: set[str] = set()
    internal: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module is None:  # from . import a, b: modules of that package
                    names = [[*base, alias.name] for alias in node.names]
                else:
                    names = [[*base, *node.module.split(".")]]
                for name in names:
                    # A module of a subpackage ("cli.call"), or a top-level one ("_wire").
                    internal.add(".".join(name[:2] if (SRC / name[0]).is_dir() else name[:1]))
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
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    for package in (p.parent for p in SRC.glob("*/__init__.py")):
        modules.add(package.name)
        modules.update(
            f"{package.name}.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"
        )
    assert modules == set(ALLOWED)


# The optional integrations, and the third-party packages that only they import.
INTEGRATIONS = {"otel": "opentelemetry", "prometheus": "prometheus_client"}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_only_the_integrations_import_their_packages(module: str) -> None:
    external, internal = imports_of(module)
    for integration, package in INTEGRATIONS.items():
        if module != integration:
            assert package not in external
        if not module.startswith("cli"):
            assert integration not in internal


def test_importing_the_package_imports_no_integration() -> None:
    # In a fresh interpreter: the package, its command-line tool and every
    # private module load without opentelemetry or prometheus_client.
    # (Entry points run when imported: the worker's would wait for its parent.)
    modules = [
        f"asyncio_amp.{name}"
        for name in ALLOWED
        if name not in INTEGRATIONS and not name.endswith("__main__")
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted(INTEGRATIONS.values())!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
