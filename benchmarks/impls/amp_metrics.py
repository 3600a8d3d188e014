"""
asyncio-amp with Prometheus metrics on both sides: one ``asyncio_amp.prometheus.Metrics``
in a registry of its own, counting every call, byte and connection.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

import asyncio_amp
from asyncio_amp.prometheus import Metrics

from . import amp

__all__ = ["client", "inproc", "serve"]

_metrics = Metrics(CollectorRegistry())


def _middleware() -> list[asyncio_amp.Middleware]:
    return [_metrics]


amp.middleware = _middleware
client, inproc, serve = amp.client, amp.inproc, amp.serve
