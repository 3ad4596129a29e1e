"""Unique keys: at most one active job holds a key; an enqueue with a key
that is held returns the holder's id. A finished job keeps its key for its
``unique_for`` seconds. A flow's member made later (a chain's next step,
a chord's callback) holds its key from the flow's creation while it is
pending (see FlowBook.pending): an enqueue with that key meanwhile gets
the member's id. Pure; time comes in as ``now`` (epoch seconds)."""

from __future__ import annotations

from corral.broker.flowbook import FlowBook
from corral.broker.job import ACTIVE, Job
from corral.broker.records import FlowCreated


class UniqueKeys:
    """key -> the id of the newest job that holds it. ``jobs`` is the job
    state's table and ``book`` its flows (both read only)."""

    def __init__(self, jobs: dict[str, Job], book: FlowBook) -> None:
        self._jobs = jobs
        self._book = book
        self.holders: dict[str, str] = {}
        #: key -> the id of a flow's member made later, which holds it
        #: while it is pending.
        self.reserved: dict[str, str] = {}

    def reserve(self, flow: FlowCreated) -> None:
        """The members ``flow`` makes later hold their keys from now."""
        for _, spec in FlowBook.made_later(flow):
            if spec.unique_key:
                self.reserved[spec.unique_key] = spec.id

    def unreserve(self, flow: FlowCreated) -> None:
        """``flow`` is forgotten: its members' reservations go with it."""
        for _, spec in FlowBook.made_later(flow):
            if spec.unique_key and self.reserved.get(spec.unique_key) == spec.id:
                del self.reserved[spec.unique_key]

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
        if not key:
            return None
        job = self._jobs.get(self.holders.get(key, ""))
        if job is not None:
            if job.status in ACTIVE:
                return job.id
            if job.unique_for and job.ended_at is not None and now < job.ended_at + job.unique_for:
                return job.id
        member = self.reserved.get(key)
        if member is not None and self._book.pending(member) is not None:
            return member
        return None
