"""What dispatch does about the ``expires`` job option, and the gate each
dispatch pass hands jobs out through.

A job whose ``expires`` deadline (see :mod:`corral.broker.expiring`) came
before it started is cancelled, reason ``expired``: by the tick, at its
deadline, even when no worker asks (queued, scheduled, retrying, or
reserved in a worker's prefetch buffer, which is told to drop it); by a
dispatch pass that meets it first; and, for a job that was running at its
deadline (it runs on), when a try of it ends without ending it (its retry
would start past the deadline). The cancel is a logged ``Cancelled``
record with the reason, so a replay sees the same; like a cancel by hand
it makes no ``on_failure`` callback, and stops its chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from corral.broker.expiring import EXPIRED, deadline, lapsed
from corral.broker.limits import Limiter
from corral.broker.protocol import TERMINAL
from corral.broker.records import Cancelled
from corral.broker.state import Job

if TYPE_CHECKING:
    from corral.broker.dispatch import Dispatcher

log = structlog.get_logger()


class Lapses:
    """Cancels the jobs that expired unstarted, for ``dispatcher``;
    ``on_ended`` is told each one (its waiters, its flow)."""

    def __init__(self, dispatcher: Dispatcher, on_ended: Callable[[Job, float], None]) -> None:
        self.d = dispatcher
        self.state = dispatcher.state
        self._on_ended = on_ended
        #: Jobs that were running at their deadline: a try of theirs that
        #: ends without ending them ends them (expired).
        self._running: set[str] = set()

    def expire_due(self, now: float) -> None:
        """Cancel the jobs whose deadline came by ``now`` and that have not
        started; note those running (see the module docstring)."""
        for job in list(self.state.expiring.due(now)):
            if job.status == "running":
                self._running.add(job.id)
            else:
                self.expire(job, now)
        for job_id in list(self._running):
            held = self.state.jobs.get(job_id)
            if held is None or held.status in TERMINAL:
                self._running.discard(job_id)
            elif held.status != "running":
                self._running.discard(job_id)
                self.expire(held, now)

    def expire(self, job: Job, now: float) -> None:
        """``job`` lapsed unstarted: it ends ``cancelled``, reason
        ``expired``; a worker holding it unstarted is told to drop it."""
        lease = job.lease
        self.d.journal.record(Cancelled(job.id, now, EXPIRED))
        self.d.revoke(job.id, lease)
        stats = self.d.stats
        stats["jobs_cancelled"] += 1
        stats["jobs_expired"] += 1
        self.d.poke()
        log.debug("broker.job_expired", job_id=job.id, task=job.task, deadline=deadline(job))
        self._on_ended(job, now)


class PassGate:
    """One dispatch pass's :class:`~corral.broker.balance.Gate`: a job
    past its ``expires`` is kept (in ``lapsed``) to be cancelled, any other
    goes as the limits admit it."""

    def __init__(self, limits: Limiter, now: float, mono: float) -> None:
        self.limits = limits
        self.blocked = limits.blocked
        self.paced = limits.paced
        self.now = now
        self.mono = mono
        #: Popped jobs found past their expires, to cancel.
        self.lapsed: list[Job] = []

    def admit(self, job: Job) -> bool:
        if job.tpl.expires is not None and lapsed(job, self.now):
            self.lapsed.append(job)
            return False
        return self.limits.admit(job, self.mono)

    def admits(self, job: Job) -> bool:
        return self.limits.admits(job)
