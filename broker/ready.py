"""The ready heaps: the jobs that can be handed out now, by queue and task.

One heap per (queue, task), so a worker is offered only the tasks it
registered (routing by task) without scanning past the others. An entry is
``(-priority, seq, job id)``: higher priority first, then creation order;
across a queue's tasks the same order holds. Entries are removed lazily: a
job that left the ready state (leased, cancelled, removed, or replaced by a
newer job of the same id) leaves an entry that is skipped when it reaches
the top. Pure data: the job state places jobs here, dispatch takes them.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection

from corral.broker.job import Job

Entry = tuple[int, int, str]


def is_ready(job: Job) -> bool:
    """Queued and held by no worker."""
    return job.status == "queued" and not job.lease


class ReadyQueues:
    """See the module docstring. ``jobs`` is the job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        #: queue -> task -> heap.
        self._heaps: dict[str, dict[str, list[Entry]]] = {}

    def add(self, job: Job) -> None:
        """Make a ready job available (once: a job on its heap stays there)."""
        if not job.in_ready and is_ready(job):
            job.in_ready = True
            heap = self._heaps.setdefault(job.queue, {}).setdefault(job.task, [])
            heapq.heappush(heap, (-job.priority, job.seq, job.id))

    def pop(self, queue: str, tasks: Collection[str] | None = None) -> Job | None:
        """The highest-priority, oldest ready job of ``queue`` (of one of
        ``tasks``, if given), taken off its heap (the caller leases it or
        puts it back with :meth:`add`)."""
        best = self._best(queue, tasks)
        if best is None:
            return None
        heap = self._heaps[queue][best.task]
        heapq.heappop(heap)
        best.in_ready = False
        return best

    def peek(self, queue: str, tasks: Collection[str] | None = None) -> Job | None:
        """The job :meth:`pop` would return, left on its heap."""
        return self._best(queue, tasks)

    def has(self, queue: str) -> bool:
        return self._best(queue, None) is not None

    def _best(self, queue: str, tasks: Collection[str] | None) -> Job | None:
        by_task = self._heaps.get(queue)
        if not by_task:
            return None
        best: Job | None = None
        names = by_task if tasks is None else [t for t in tasks if t in by_task]
        for task in names:
            top = self._top(by_task[task])
            if top is not None and (
                best is None or (-top.priority, top.seq) < (-best.priority, best.seq)
            ):
                best = top
        return best

    def _top(self, heap: list[Entry]) -> Job | None:
        """The live job at the top of ``heap``, stale entries dropped."""
        while heap:
            _, seq, job_id = heap[0]
            job = self._jobs.get(job_id)
            if job is not None and job.seq == seq and is_ready(job):
                return job
            heapq.heappop(heap)
            if job is not None and job.seq == seq:
                job.in_ready = False
        return None

    def pairs(self) -> list[tuple[str, str]]:
        """The (queue, task) pairs whose heap has entries (maybe only stale)."""
        return [(q, t) for q, by_task in self._heaps.items() for t, heap in by_task.items() if heap]

    def top(self, queue: str, task: str) -> Job | None:
        """The next ready job of ``task`` on ``queue``, left on its heap."""
        heap = self._heaps.get(queue, {}).get(task)
        return self._top(heap) if heap else None
