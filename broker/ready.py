"""The ready heaps: one per queue, of the jobs that can be handed out now.

An entry is ``(-priority, seq, job id)``: higher priority first, then
creation order. Entries are removed lazily: a job that left the ready state
(leased, cancelled, removed, or replaced by a newer job of the same id)
leaves an entry that is skipped when it reaches the top. Pure data: the
job state places jobs here, dispatch takes them.
"""

from __future__ import annotations

import heapq

from corral.broker.job import Job


def is_ready(job: Job) -> bool:
    """Queued and held by no worker."""
    return job.status == "queued" and not job.lease


class ReadyQueues:
    """See the module docstring. ``jobs`` is the job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        self._heaps: dict[str, list[tuple[int, int, str]]] = {}

    def add(self, job: Job) -> None:
        """Make a ready job available (once: a job on its heap stays there)."""
        if not job.in_ready and is_ready(job):
            job.in_ready = True
            heap = self._heaps.setdefault(job.queue, [])
            heapq.heappush(heap, (-job.priority, job.seq, job.id))

    def pop(self, queue: str) -> Job | None:
        """The highest-priority, oldest ready job of ``queue``, taken off its
        heap (the caller leases it or puts it back with :meth:`add`)."""
        heap = self._heaps.get(queue)
        while heap:
            _, seq, job_id = heapq.heappop(heap)
            job = self._jobs.get(job_id)
            if job is None or job.seq != seq:  # left by a removed job of that id
                continue
            job.in_ready = False
            if is_ready(job):
                return job
        return None

    def peek(self, queue: str) -> Job | None:
        """The job :meth:`pop` would return, left on its heap."""
        heap = self._heaps.get(queue)
        while heap:
            _, seq, job_id = heap[0]
            job = self._jobs.get(job_id)
            if job is not None and job.seq == seq and is_ready(job):
                return job
            heapq.heappop(heap)
            if job is not None and job.seq == seq:
                job.in_ready = False
        return None

    def has(self, queue: str) -> bool:
        return self.peek(queue) is not None

    def queues(self) -> list[str]:
        """The queues whose heap has entries (maybe only stale ones)."""
        return [queue for queue, heap in self._heaps.items() if heap]
