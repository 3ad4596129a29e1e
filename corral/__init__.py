"""corral: a durable job queue with its own process supervisor.

The public names: ``task``, ``JobContext``, ``Client``, ``AsyncClient``,
``Job``, ``JobInfo`` and the errors below ``CorralError``.
"""

from corral.broker.protocol import FlowInfo, JobInfo, StatusInfo, TryInfo
from corral.client import AsyncClient, Client, Job
from corral.context import JobContext
from corral.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    CorralError,
    DiskFull,
    Fail,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestTooLarge,
    ResultTimeout,
    Retry,
    SoftTimeout,
)
from corral.workers.registry import task

__version__ = "0.1.0"

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
    "TryInfo",
    "task",
]
