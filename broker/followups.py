"""Follow-ups: making the jobs a finished job brings about (a chain's next
step, a chord's callback, ``on_success``/``on_failure`` callbacks; which
ones is :func:`corral.broker.flows.followups`), now or once the disk has
room again.

Follow-ups are new jobs, so like an enqueue they are not made while the log
is full (:attr:`Log.full <corral.broker.log.Log.full>`): its reserve is kept
for records about jobs that exist. The parent's end is logged as usual; its
follow-ups are held (in memory, logged) and made on the first pass after
space returns. They are made exactly once, across restarts too, because
the ``FollowedUp`` record, never memory, says whether they were made: after
a restart :meth:`FollowUps.catch_up` makes (or holds again) those of every
ended job that has none. A parent whose follow-ups are held is not
forgotten at its TTL before they are made (:meth:`FollowUps.owes`).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from corral.broker import flows
from corral.broker.dispatch import Dispatcher
from corral.broker.job import touched
from corral.broker.journal import Journal
from corral.broker.state import TERMINAL, Job

log = structlog.get_logger()

#: Called once a job's follow-ups are made (its flow may have ended).
Made = Callable[[Job, float], None]


class FollowUps:
    """See the module docstring."""

    def __init__(self, journal: Journal, dispatcher: Dispatcher, on_made: Made) -> None:
        self.journal = journal
        self.state = journal.state
        self.stats = journal.stats
        self.dispatcher = dispatcher
        self._on_made = on_made
        #: Ids of ended jobs whose follow-ups wait for disk space, oldest first.
        self._held: dict[str, None] = {}

    def owes(self, job_id: str) -> bool:
        """``job_id``'s follow-ups are held for want of disk space."""
        return job_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def job_ended(self, job: Job, now: float) -> int:
        """``job`` reached a terminal status: make its follow-ups, or hold
        them if the log is full. Returns how many jobs were made."""
        return self._settle(job, now, notify=True)

    def catch_up(self, now: float, lived: list[Job] | None = None) -> int:
        """After replay: the follow-ups of every ended job that has no
        FollowedUp record (the broker stopped between a result and it).
        ``lived``: the jobs that are not pristine, if the caller has them
        already. Returns how many jobs were made."""
        made = 0
        # a pristine job has not ended
        for job in touched(self.state.jobs.warm_values()) if lived is None else lived:
            if job.status in TERMINAL:
                made += self._settle(job, now, notify=False)
        return made

    def retry(self, now: float) -> int:
        """Make the held follow-ups if the log has room again. Returns how
        many jobs were made."""
        if not self._held or self.journal.log.full:
            return 0
        held, self._held = list(self._held), {}
        made = 0
        for job_id in held:
            job = self.state.jobs.get(job_id)
            if job is None or job.status not in TERMINAL:
                continue  # retried by hand since: its next end makes them
            made += self.job_ended(job, now)
        log.info("broker.followups_resumed", parents=len(held), jobs=made)
        return made

    def _hold(self, job: Job) -> None:
        if job.id in self._held:
            return
        self._held[job.id] = None
        self.stats["followups_held_disk_full"] += 1
        log.warning(
            "broker.followups_held",
            job_id=job.id,
            reason="the disk is full: new jobs are refused",
            hint="they are made once space returns; free space or raise broker.disk_reserve",
        )

    def _settle(self, job: Job, now: float, *, notify: bool) -> int:
        """Make or hold ``job``'s follow-ups; with ``notify``, tell the
        broker once they are made. Returns how many jobs were made."""
        owed = flows.followups(self.state, job, now)
        if self.journal.log.full and any(f.created for f in owed):
            self._hold(job)
            return 0
        for followed in owed:
            self.journal.record(followed)
            self.dispatcher.poke()
        if notify:
            self._on_made(job, now)
        return sum(len(f.created) for f in owed)
