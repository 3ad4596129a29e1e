"""Jobs that expire unstarted: the ``expires`` job option, by deadline.

A job with ``expires`` that has not started by its deadline never runs: it
ends ``cancelled``, reason ``expired`` (a ``Cancelled`` record with that
reason, so a replay sees the same). The deadline is the absolute time the
option names, or, for seconds, that long after the job was first due (its
creation, or the time its ``delay``/``run_at`` named), as Sidekiq counts
``expires_in`` of a scheduled job. It holds for every start: a job running
at its deadline runs on, but a retry due after it never starts.

Steps of the wall clock (:meth:`ExpiringJobs.stepped`): a deadline asked
for as seconds keeps its length, as a ``delay`` does, once its window has
begun (the job is due) or while it waits for a ``delay`` (whose end moves
with the clock); one that names a wall time stays: an absolute
``expires``, and seconds after an explicit ``run_at`` not yet come. The
job's ``expires`` is moved by the step (its creation record, or for a
pristine job a copy of its template), so the deadline, the log's
snapshots and every check read the moved one; the ``ClockStepped`` record
makes a replay do the same.

:class:`ExpiringJobs` is the heap of those deadlines, fed by the job state
as jobs are added (live and on replay, so a restart needs no pass over the
jobs to find them). Entries are removed lazily: one whose job ended, was
removed, or was replaced by a newer job of the same id is skipped when it
comes due, and once such entries are more than the timers' ``SWEEP_AFTER`` and more
than the live ones the heap is rebuilt without them (a million jobs with a
year's ``expires`` that end at once do not hold a million entries for a
year). Pure; time comes in as ``now`` (epoch seconds). The broker's
dispatcher acts on what comes due (it holds the leases a cancel revokes).
"""

from __future__ import annotations

import heapq
from datetime import UTC, datetime

import msgspec

from corral.broker.job import ACTIVE, Job
from corral.broker.jobspec import expires_at
from corral.broker.protocol import EXPIRED, EXPIRED_ERROR
from corral.broker.records import ErrorRec, JobCreated
from corral.broker.timers import JobHeap


def deadline(job: Job) -> float | None:
    """The epoch time ``job`` lapses unstarted, or None if it never does."""
    tpl = job.tpl
    if tpl.expires is None:
        return None
    due = tpl.run_at if job.blob is None and tpl.run_at is not None else job.created_at
    return expires_at(tpl.expires, due)


def lapsed(job: Job, now: float) -> bool:
    """``job`` has an ``expires`` whose deadline is ``now`` or past."""
    when = deadline(job)
    return when is not None and when <= now


__all__ = ["EXPIRED", "EXPIRED_ERROR", "ExpiringJobs", "deadline", "expired_error", "lapsed"]


def expired_error(job: Job) -> ErrorRec:
    """The error an expired job keeps: when it lapsed, in UTC."""
    when = deadline(job)
    at = datetime.fromtimestamp(when, UTC).isoformat() if when is not None else "its deadline"
    return ErrorRec(EXPIRED_ERROR, f"expired: not started by {at} (the job's expires option)")


def reason_of(job: Job) -> str | None:
    """Why a cancelled job was cancelled, where the broker knows: ``"expired"``."""
    error = job.error
    if job.status == "cancelled" and error is not None and error.type == EXPIRED_ERROR:
        return EXPIRED
    return None


class ExpiringJobs(JobHeap):
    """The deadlines of jobs with ``expires``; see the module docstring.
    ``jobs`` is the job state's table (read only)."""

    def add(self, job: Job) -> None:
        """Watch ``job`` if it has an ``expires`` and has not ended."""
        when = deadline(job)
        if when is not None and job.status in ACTIVE:
            heapq.heappush(self._heap, (when, job.seq, job.id))

    def add_batch(self, tpl: JobCreated, jobs: list[Job]) -> None:
        """Watch pristine ``jobs`` of template ``tpl`` (nothing to do, at
        the cost of one check, when the template has no ``expires``)."""
        if tpl.expires is not None:
            for job in jobs:
                self.add(job)

    def stepped(self, delta: float) -> None:
        """The wall clock stepped by ``delta`` seconds (negative: back):
        move each deadline asked for as seconds whose window has begun or
        waits on a ``delay`` by ``delta`` (see the module docstring). O(jobs
        that are not cold), once per step: a cold job (see
        broker/coldjobs.py) is pristine, queued, and of a batch with no
        ``expires`` (none with one is left cold), so a step changes nothing
        of it, and it is not warmed."""
        copies: dict[int, JobCreated] = {}  # a shared template: one moved copy
        moved = False
        warm = dict.values(self._jobs)
        for job in warm:
            tpl = job.tpl
            expires = tpl.expires
            if expires is None or isinstance(expires, datetime):
                continue
            status = job.status
            if status not in ACTIVE or (status == "scheduled" and not tpl.delay):
                continue  # ended, or due at a wall time yet to come
            if job.blob is None:  # the job's own creation record
                job.tpl = msgspec.structs.replace(tpl, expires=expires + delta)
            else:
                copy = copies.get(id(tpl))
                if copy is None:
                    copy = copies[id(tpl)] = msgspec.structs.replace(tpl, expires=expires + delta)
                job.tpl = copy
            moved = True
        if moved:
            self._heap = [
                (when, job.seq, job.id)
                for job in warm
                if job.status in ACTIVE and (when := deadline(job)) is not None
            ]
            heapq.heapify(self._heap)
            self._stale = 0

    def left(self, job: Job) -> None:
        """``job`` ended or was removed: its entry, if it has one, is stale."""
        if job.tpl.expires is not None:
            self._went_stale()

    def _current(self, entry: tuple[float, int, str]) -> bool:
        """The job has not ended (running ones included: the caller decides)."""
        job = self._jobs.get(entry[2])
        return job is not None and job.seq == entry[1] and job.status in ACTIVE
