"""
The implementations the benchmarks compare, each in its own module.

Every module offers the same three entry points, which ``_child.py`` calls in a
fresh process:

* ``serve(workload, params, loop)``: listen on 127.0.0.1, port 0, announce the
  port with :func:`common.announce_port`, then answer ``Sum``, ``Echo`` and
  ``BigEcho`` until the process is stopped. For ``idle`` it reports the memory
  taken by the idle connections instead (see :func:`common.idle_report`).
* ``client(workload, port, params, loop)``: drive one network workload against a
  server and return the measurement.
* ``inproc(workload, params, loop)``: the ``codec`` and ``inproc`` workloads.
"""

from __future__ import annotations

# Implementation name -> (module under impls/, event loop or None when the module has its own).
IMPLS: dict[str, tuple[str, str | None]] = {
    "twisted": ("twisted_amp", None),
    "raw": ("raw", "asyncio"),
    "raw-uvloop": ("raw", "uvloop"),
    "amp": ("amp", "asyncio"),
    "amp-uvloop": ("amp", "uvloop"),
    # asyncio-amp with its compiled accelerator turned off (ASYNCIO_AMP_NO_EXTENSIONS=1).
    "amp-pure": ("amp", "asyncio"),
    "amp-uvloop-pure": ("amp", "uvloop"),
    # Variants run only when named (--impl): asyncio-amp with tracing or metrics on.
    "amp-otel": ("amp_otel", "asyncio"),
    "amp-metrics": ("amp_metrics", "asyncio"),
}

# The implementations whose processes run with ASYNCIO_AMP_NO_EXTENSIONS=1 (the
# others run without it, whatever the caller's environment says).
PURE = frozenset({"amp-pure", "amp-uvloop-pure"})


def child_env(impl: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment of a measured process of ``impl``: no debug modes, the right codec."""
    env = {k: v for k, v in environ.items() if k not in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE")}
    env.pop("ASYNCIO_AMP_NO_EXTENSIONS", None)
    if impl in PURE:
        env["ASYNCIO_AMP_NO_EXTENSIONS"] = "1"
    return env
