"""The timer heap: scheduled and retrying jobs by when they are due.

Entries are ``(run_at, seq, job id)``, removed lazily: a job that left the
waiting state other than by coming due (cancelled, deleted, leased on
replay, given a new time) leaves its entry behind. The state says so
(:meth:`Timers.left`), and once stale entries are more than
:data:`SWEEP_AFTER` and more than the live ones the heap is rebuilt
without them, so cancelling a million delayed jobs does not keep a million
entries until their time. Pure; time comes in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from corral.broker.job import WAITING, Job

#: Stale entries tolerated before a rebuild is considered.
SWEEP_AFTER = 1024


class JobHeap:
    """A heap of ``(time, seq, job id)`` with lazy removal: an entry whose
    job no longer fits (:meth:`_current`, per subclass) is skipped when it
    comes up, and once stale entries are more than :data:`SWEEP_AFTER` and
    more than the live ones the heap is rebuilt without them. ``jobs`` is the
    job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        self._heap: list[tuple[float, int, str]] = []
        self._stale = 0

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return len(self._heap)

    def _current(self, entry: tuple[float, int, str]) -> bool:
        raise NotImplementedError

    def _went_stale(self) -> None:
        """One entry's job no longer fits: count it, and sweep past the bound."""
        self._stale += 1
        if self._stale > SWEEP_AFTER and 2 * self._stale > len(self._heap):
            self._heap = [entry for entry in self._heap if self._current(entry)]
            heapq.heapify(self._heap)
            self._stale = 0

    def due(self, now: float) -> Iterator[Job]:
        """Take off the jobs whose time is ``now`` or past and whose entries
        are current, each once, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._current(entry):
                yield self._jobs[entry[2]]
            elif self._stale:
                self._stale -= 1

    def next_due(self) -> float | None:
        """The earliest time of a current entry, stale entries in front dropped."""
        heap = self._heap
        while heap:
            if self._current(heap[0]):
                return heap[0][0]
            heapq.heappop(heap)
            if self._stale:
                self._stale -= 1
        return None


class Timers(JobHeap):
    """See the module docstring."""

    def push(self, job: Job) -> None:
        """``job`` waits until its ``run_at``."""
        if job.run_at is not None:
            heapq.heappush(self._heap, (job.run_at, job.seq, job.id))

    def rebuild(self, waiting: list[Job]) -> None:
        """Hold exactly ``waiting`` (every waiting job), at their run_at now
        (after their run_at moved: a step of the wall clock)."""
        self._heap = [(job.run_at, job.seq, job.id) for job in waiting if job.run_at is not None]
        heapq.heapify(self._heap)
        self._stale = 0

    def left(self) -> None:
        """A waiting job left the waiting state other than by coming due:
        its entry is stale."""
        self._went_stale()

    def _current(self, entry: tuple[float, int, str]) -> bool:
        run_at, seq, job_id = entry
        job = self._jobs.get(job_id)
        return job is not None and job.seq == seq and job.status in WAITING and job.run_at == run_at
