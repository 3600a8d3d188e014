"""
One benchmark process: a server, a client, an in-process or a pool measurement.

``run.py`` starts it; it is not meant to be run by hand, though it can be::

    python benchmarks/_child.py server amp seq '{"lifetime": 60}'

A client reads the server's port from its first line of stdin. Every role
prints its result as one ``RESULT <json>`` line (see ``impls/common.py``).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

from impls import IMPLS, common


def main(argv: list[str]) -> int:
    role, impl, workload, params_json = argv[1:5]
    params = json.loads(params_json)
    cpus = common.pin_to_cpu(params.get("cpu"))
    module_name, loop = IMPLS[impl]
    if role == "client" and workload == "idle":
        # The idle client is the same for every implementation: plain sockets.
        port = int(sys.stdin.readline())
        common.raise_nofile(params["idle_connections"] + 100)
        common.idle_client(port, params["idle_connections"], params["cap"])
        return 0
    if role == "pool":
        # The pool workloads have one module for every implementation.
        module_name = "pool"
    module = importlib.import_module(f"impls.{module_name}")
    if role == "server":
        module.serve(workload, params, loop)
        return 0
    started = time.perf_counter()
    try:
        if role == "client":
            port = int(sys.stdin.readline())
            result = module.client(workload, port, params, loop)
        elif role == "pool":
            result = module.run(impl, workload, params, loop)
        else:
            result = module.inproc(workload, params, loop)
    except Exception:
        result = {"complete": False, "errors": [traceback.format_exc(limit=8)]}
    result["cpus"] = cpus
    result["process_seconds"] = time.perf_counter() - started
    common.emit_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
