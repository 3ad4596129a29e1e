"""When finished jobs are forgotten: a heap of (expiry time, seq, job id).

A finished job is forgotten after its TTL (``Policy.ttl_end``), and never
before its ``unique_for`` window ends (it holds its key until then).
Entries are checked lazily: a job requeued and ended again, or removed, leaves
an entry that is skipped. Pure; time comes in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import heapq

from corral.broker.job import Job
from corral.broker.policy import Policy
from corral.broker.protocol import TERMINAL


class ExpiryQueue:
    """See the module docstring. ``jobs`` is the job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job], policy: Policy) -> None:
        self._jobs = jobs
        self._policy = policy
        self._heap: list[tuple[float, int, str]] = []

    def add(self, job: Job) -> None:
        """``job`` ended: schedule its forgetting."""
        heapq.heappush(self._heap, (self.expires_at(job), job.seq, job.id))

    def expires_at(self, job: Job) -> float:
        """When a finished job is forgotten (epoch seconds)."""
        ended = job.ended_at or job.created_at
        held_until = ended + (job.unique_for or 0.0) if job.unique_key else ended
        return max(self._policy.ttl_end(job, ended), held_until)

    def due(self, now: float) -> list[str]:
        """The finished jobs past their TTL at ``now``, each once."""
        due: dict[str, None] = {}  # a job requeued and ended again has two entries
        while self._heap and self._heap[0][0] <= now:
            _, _, job_id = heapq.heappop(self._heap)
            job = self._jobs.get(job_id)
            if job is None or job.status not in TERMINAL or self.expires_at(job) > now:
                continue
            due[job_id] = None
        return list(due)
