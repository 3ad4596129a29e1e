"""When finished jobs are forgotten: each finished job's expiry time.

A finished job is forgotten after its TTL (``Policy.ttl_end``), and never
before its ``unique_for`` window ends (it holds its key until then). A job
removed before its time (deleted, purged) takes its entry with it, so the
queue holds the finished jobs there are, never the history. Pure; time
comes in as ``now`` (epoch seconds).
"""

from __future__ import annotations

from corral.broker.deadlines import Deadlines
from corral.broker.job import Job
from corral.broker.policy import Policy
from corral.broker.protocol import TERMINAL


class ExpiryQueue:
    """See the module docstring. ``jobs`` is the job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job], policy: Policy) -> None:
        self._jobs = jobs
        self._policy = policy
        #: job id -> when it is forgotten (epoch seconds).
        self._due: Deadlines[str, None] = Deadlines()

    def __len__(self) -> int:
        return len(self._due)

    @property
    def heap_size(self) -> int:
        """Entries held, stale ones included (see :class:`Deadlines`)."""
        return self._due.heap_size

    def add(self, job: Job) -> None:
        """``job`` ended: schedule its forgetting."""
        self._due.set(job.id, self.expires_at(job), None)

    def discard(self, job_id: str) -> None:
        """``job_id`` is gone: nothing to forget any more."""
        self._due.discard(job_id)

    def expires_at(self, job: Job) -> float:
        """When a finished job is forgotten (epoch seconds)."""
        ended = job.ended_at or job.created_at
        held_until = ended + (job.unique_for or 0.0) if job.unique_key else ended
        return max(self._policy.ttl_end(job, ended), held_until)

    def due(self, now: float) -> list[str]:
        """The finished jobs past their TTL at ``now``, each once. A job
        whose TTL grew since it ended (its task registered with a longer
        one) is scheduled again for then; one that is not finished any more
        (retried by hand) is left to its next end."""
        due = []
        while (entry := self._due.pop_due(now)) is not None:
            job = self._jobs.get(entry[0])
            if job is None or job.status not in TERMINAL:
                continue
            expires_at = self.expires_at(job)
            if expires_at > now:
                self._due.set(job.id, expires_at, None)
            else:
                due.append(job.id)
        return due
