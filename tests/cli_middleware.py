"""A middleware for the command-line tests: ``--middleware cli_middleware:Deny``."""

from __future__ import annotations

from typing import Any

import asyncio_amp as amp


class Deny(amp.Middleware):
    """Refuse Divide as if it divided by zero; let every other call through."""

    async def incoming(self, call: amp.Call, call_next: amp.CallNext) -> dict[str, Any]:
        if call.name == "Divide":
            raise ZeroDivisionError("refused by the middleware")
        return await call_next(call)


#: Not a Middleware, for the error message.
not_middleware = object()
