"""Unique keys: at most one active job holds a key; an enqueue with a key
that is held returns the holder's id. A finished job keeps its key for its
``unique_for`` seconds. Pure; time comes in as ``now`` (epoch seconds)."""

from __future__ import annotations

from corral.broker.job import ACTIVE, Job


class UniqueKeys:
    """key -> the id of the newest job that holds it. ``jobs`` is the job
    state's table (read only)."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        self.holders: dict[str, str] = {}

    def claim(self, job: Job) -> None:
        """``job`` holds its key unless another, active job does (in whatever
        order jobs are added: live, replayed or from snapshots)."""
        if not job.unique_key:
            return
        current = self._jobs.get(self.holders.get(job.unique_key, ""))
        free = current is None or current is job or current.status not in ACTIVE
        newer_active = job.status in ACTIVE and current is not None and current.seq < job.seq
        if free or newer_active:
            self.holders[job.unique_key] = job.id

    def release(self, job: Job) -> None:
        """``job`` is gone: its key is free."""
        if job.unique_key and self.holders.get(job.unique_key) == job.id:
            del self.holders[job.unique_key]

    def holder_of(self, key: str | None, now: float) -> str | None:
        """The id of the job that holds ``key`` now: one still active, or
        one that ended less than its ``unique_for`` ago."""
        job = self._jobs.get(self.holders.get(key, "")) if key else None
        if job is None:
            return None
        if job.status in ACTIVE:
            return job.id
        if job.unique_for and job.ended_at is not None and now < job.ended_at + job.unique_for:
            return job.id
        return None
