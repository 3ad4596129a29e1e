"""One job as the broker holds it, and the defaults its options fall back on.

A :class:`Job` is its creation record (``JobCreated``: what was asked,
never changed) plus what has happened to it since (status, attempts,
tries, result, lease). Pure data: :mod:`corral.broker.state` changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from corral.broker.jobspec import JobSpec
from corral.broker.records import ErrorRec, JobCreated, JobSnapshot, TaskOptions, TryRec

#: Statuses of a job that has not ended.
ACTIVE = frozenset({"queued", "scheduled", "running", "retrying"})
WAITING = frozenset({"scheduled", "retrying"})
#: Rough per-job overhead in the log, for the compaction trigger.
JOB_OVERHEAD_BYTES = 160
#: The queue of a job enqueued without one.
DEFAULT_QUEUE = "default"


@dataclass(frozen=True)
class Defaults:
    """Broker-wide defaults for what neither the job nor its task sets."""

    max_attempts: int = 5
    result_ttl: float = 86400.0
    failed_ttl: float = 30 * 86400.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0
    #: Retry requests a job may make before it fails (Sidekiq's default).
    max_retries: int = 25


#: A task's options as its workers registered them (see TaskOptions).
TaskDefaults = TaskOptions


@dataclass(eq=False, slots=True)
class Job:
    """One job: its creation record (what was asked, never changed), and
    what has happened to it since. The second part has the same field names
    as :class:`~corral.broker.records.JobSnapshot`, which copies it."""

    created: JobCreated
    status: str = "queued"
    attempts: int = 0
    tries: list[TryRec] = field(default_factory=list)
    #: When a scheduled or retrying job is due (epoch seconds).
    run_at: float | None = None
    result: msgspec.Raw | None = None
    error: ErrorRec | None = None
    ended_at: float | None = None
    lease: int = 0
    worker: str = ""
    progress: float | None = None
    progress_note: str = ""
    #: Times a handler began it (the run number of its last try).
    runs: int = 0
    #: Times its handler asked for a retry (``corral.Retry``).
    retries: int = 0
    #: An entry for this job is on its queue's ready heap.
    in_ready: bool = False

    # What was asked, read through the creation record.
    @property
    def id(self) -> str:
        return self.created.id

    @property
    def seq(self) -> int:
        return self.created.seq

    @property
    def task(self) -> str:
        return self.created.task

    @property
    def queue(self) -> str:
        return self.created.queue or DEFAULT_QUEUE

    @property
    def priority(self) -> int:
        return self.created.priority

    @property
    def payload(self) -> msgspec.Raw:
        return self.created.payload

    @property
    def created_at(self) -> float:
        return self.created.created_at

    @property
    def max_attempts(self) -> int | None:
        return self.created.max_attempts

    @property
    def timeout(self) -> float | None:
        return self.created.timeout

    @property
    def unique_key(self) -> str | None:
        return self.created.unique_key

    @property
    def unique_for(self) -> float | None:
        return self.created.unique_for

    @property
    def max_retries(self) -> int | None:
        return self.created.max_retries

    @property
    def result_ttl(self) -> float | None:
        return self.created.result_ttl

    @property
    def flow(self) -> str | None:
        return self.created.flow

    @property
    def step(self) -> int:
        return self.created.step

    @property
    def prev_result(self) -> msgspec.Raw:
        return self.created.prev_result

    @property
    def on_success(self) -> JobSpec | None:
        return self.created.on_success

    @property
    def on_failure(self) -> JobSpec | None:
        return self.created.on_failure

    @property
    def reserved(self) -> bool:
        """Leased into a worker's prefetch buffer and not started."""
        return self.status == "queued" and self.lease != 0

    @property
    def next_run_at(self) -> float | None:
        return self.run_at if self.status in WAITING else None

    def size(self) -> int:
        result = len(self.result) if self.result is not None else 0
        return JOB_OVERHEAD_BYTES + len(self.payload) + result


#: The fields of a job's state that a snapshot copies (all but ``job``).
SNAPSHOT_STATE = JobSnapshot.__struct_fields__[1:]
