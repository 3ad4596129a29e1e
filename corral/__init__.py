"""corral: a durable job queue with its own process supervisor.

The public names: ``task`` (and the ``Task`` it makes), ``JobContext``,
``Client``, ``AsyncClient``, ``Job``, ``JobInfo``, ``Hooks`` and the errors
below ``CorralError``.

Each is imported on first use (PEP 562), so ``import corral`` stays cheap
and loads neither zmq nor asyncio: a worker's plugin module that only says
``@corral.task`` pays for the registry alone, and ``corral.broker.state``
can be imported without the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.asyncclient import AsyncClient
    from corral.broker.protocol import FlowInfo, JobInfo, StatusInfo, TryInfo
    from corral.client import Client
    from corral.clientjobs import Job
    from corral.context import JobContext
    from corral.errors import (
        BrokerError,
        BrokerUnavailable,
        ConfigError,
        CorralError,
        DiskFull,
        Fail,
        HookTimeout,
        JobCancelled,
        JobFailed,
        JobNotFound,
        RequestTooLarge,
        ResultTimeout,
        Retry,
        SoftTimeout,
    )
    from corral.hooks import Hooks
    from corral.workers.registry import Task, task

__version__ = "0.1.0"

#: Each public name, and the module it comes from.
_HOMES = {
    "AsyncClient": "corral.asyncclient",
    "BrokerError": "corral.errors",
    "BrokerUnavailable": "corral.errors",
    "Client": "corral.client",
    "ConfigError": "corral.errors",
    "CorralError": "corral.errors",
    "DiskFull": "corral.errors",
    "Fail": "corral.errors",
    "FlowInfo": "corral.broker.protocol",
    "HookTimeout": "corral.errors",
    "Hooks": "corral.hooks",
    "Job": "corral.clientjobs",
    "JobCancelled": "corral.errors",
    "JobContext": "corral.context",
    "JobFailed": "corral.errors",
    "JobInfo": "corral.broker.protocol",
    "JobNotFound": "corral.errors",
    "RequestTooLarge": "corral.errors",
    "ResultTimeout": "corral.errors",
    "Retry": "corral.errors",
    "SoftTimeout": "corral.errors",
    "StatusInfo": "corral.broker.protocol",
    "Task": "corral.workers.registry",
    "TryInfo": "corral.broker.protocol",
    "task": "corral.workers.registry",
}

__all__ = [
    "AsyncClient",
    "BrokerError",
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "CorralError",
    "DiskFull",
    "Fail",
    "FlowInfo",
    "HookTimeout",
    "Hooks",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "RequestTooLarge",
    "ResultTimeout",
    "Retry",
    "SoftTimeout",
    "StatusInfo",
    "Task",
    "TryInfo",
    "task",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use, then keep it as a module global."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
