"""Registrations that replace another, and the jobs the old one held.

Every way a worker registers again, and what becomes of its jobs:

- **The same connection sends READY again** (same identity and worker id):
  the registration is updated in place (credit, queues, tasks, weights);
  its leases stay, nothing is requeued, no attempt is counted.
- **The same worker on a new connection** (its socket was replaced after
  the broker went silent to it: same worker id, host and pid, a new
  identity): the jobs it offers back (``Ready.holding``) move to the new
  connection under their leases; the old connection's other jobs were in
  flight to a socket that is gone and go back to their queue uncounted.
- **Another process under the same worker id and host** (a worker named
  by hand, restarted): the old process is gone; its jobs are taken back
  as for any lost worker (the attempt counts for those it may have started).
  The same id on another host is another worker: both stay.
- **A broker restart.** The log says which jobs were held, by which worker
  and under which lease; the broker keeps each one held for the *reclaim
  window* (:attr:`Rejoins.window`) instead of requeueing it. A worker that
  registers again and offers a job back under the lease the log holds it
  under, with the worker id the log names, gets it re-attached (a running
  one keeps running, its timeout counted from its logged start; one the
  log has as not started but the worker says runs is logged as started;
  an unstarted one whose queue was paused meanwhile is refused).
  Jobs of that worker it did not offer back (it finished them and their
  outcome was lost with the old broker, or they never reached it) go back
  to their queue uncounted at once; the jobs of a holder that never comes
  back, when the window ends. A lease of an earlier epoch is thus accepted
  only through this reclaim, or as the outcome that ends the very try the
  log holds the job under (the fence every outcome goes through).

Every offered job that is not kept is listed in the
:class:`~corral.broker.protocol.Registered` answer, so the worker drops it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from corral.broker import protocol as p
from corral.broker.records import Returned
from corral.broker.state import Job
from corral.broker.workers import WorkerConn

if TYPE_CHECKING:
    from corral.broker.dispatch import Dispatcher

log = structlog.get_logger()

#: Seconds the reclaim window outlasts the liveness window: the longest a
#: worker that lost its broker waits between two connects
#: (``workers.runtime.RECONNECT_MAX``, 5 s, jittered by up to 20%), so a
#: worker still backing off when the broker comes back makes it in time.
RECLAIM_GRACE = 6.0


class Unclaimed:
    """The jobs the log says were held when the broker started, each with
    its lease and holder (worker id), until their holder reclaims them, a
    lease end takes them (an outcome, a cancel), or the window ends."""

    def __init__(self) -> None:
        #: job id -> (lease, worker id).
        self.jobs: dict[str, tuple[int, str]] = {}
        self.by_worker: dict[str, set[str]] = {}
        #: Monotonic end of the window (0.0: nothing held).
        self.until = 0.0

    def __len__(self) -> int:
        return len(self.jobs)

    def hold(self, jobs: Iterable[Job], until: float) -> None:
        for job in jobs:
            self.jobs[job.id] = (job.lease, job.worker)
            self.by_worker.setdefault(job.worker, set()).add(job.id)
        self.until = until if self.jobs else 0.0

    def take(self, job_id: str, lease: int, worker_id: str) -> bool:
        """Reclaim ``job_id`` for ``worker_id`` under ``lease``: True if it
        is held for that very worker and lease (it is no longer unclaimed)."""
        if self.jobs.get(job_id) != (lease, worker_id):
            return False
        self.discard(job_id)
        return True

    def discard(self, job_id: str) -> None:
        entry = self.jobs.pop(job_id, None)
        if entry is not None:
            mine = self.by_worker.get(entry[1])
            if mine is not None:
                mine.discard(job_id)
                if not mine:
                    del self.by_worker[entry[1]]
        if not self.jobs:
            self.until = 0.0

    def left_by(self, worker_id: str) -> list[tuple[str, int]]:
        """Take out the jobs still held for ``worker_id``: (job id, lease)."""
        out = [(job_id, self.jobs[job_id][0]) for job_id in self.by_worker.get(worker_id, ())]
        for job_id, _ in out:
            self.discard(job_id)
        return out

    def due(self, mono: float) -> list[tuple[str, int]]:
        """Once the window ended: take out every job still held."""
        if not self.jobs or mono < self.until:
            return []
        out = [(job_id, lease) for job_id, (lease, _) in self.jobs.items()]
        self.jobs.clear()
        self.by_worker.clear()
        self.until = 0.0
        return out

    def shift(self, seconds: float) -> None:
        if self.jobs:
            self.until += seconds


class Rejoins:
    """The registration rules of the module docstring, for ``dispatcher``."""

    def __init__(self, dispatcher: Dispatcher, liveness_window: float) -> None:
        self.d = dispatcher
        self.state = dispatcher.state
        self.window = liveness_window + RECLAIM_GRACE
        self.unclaimed = Unclaimed()

    # ------------------------------------------------------------ restart

    def hold_recovered(self, jobs: list[Job], mono: float) -> None:
        """After a replay: ``jobs`` were held by workers when the broker
        stopped; keep them for their holders for the reclaim window."""
        self.unclaimed.hold(jobs, mono + self.window)

    def expire(self, now: float, mono: float) -> None:
        """The window ended: what no holder reclaimed goes back, uncounted."""
        self._give_back(self.unclaimed.due(mono), "its holder did not come back")

    def _give_back(self, jobs: list[tuple[str, int]], why: str) -> None:
        back = 0
        for job_id, lease in jobs:
            job = self.state.holding(job_id, lease)
            if job is not None and job_id not in self.d.holders:
                self.d.journal.record(Returned(job_id, lease))
                back += 1
        if back:
            self.d.stats["redelivered"] += back
            self.d.poke()
            log.info("broker.held_jobs_requeued", jobs=back, reason=why)

    # ------------------------------------------------------- registration

    def register(self, identity: bytes, msg: p.Ready, now: float, mono: float) -> None:
        """Apply one READY (see the module docstring)."""
        d = self.d
        conn = d.workers.get(identity)
        if conn is not None and conn.worker_id == msg.worker_id:
            d.workers.update(conn, msg)
            previous: list[WorkerConn] = []
        else:
            if conn is not None:  # another worker took this identity
                d.lose(conn, now, mono, "registered again")
            conn = d.add_worker(identity, msg, mono)
            previous = [
                c
                for c in d.workers
                if c is not conn and c.worker_id == msg.worker_id and c.host == msg.host
            ]
        refused = [
            p.Lease(h.job_id, h.lease)
            for h in msg.holding
            if not self._keep(conn, h, previous, now, mono)
        ]
        for old in previous:
            if old.pid == msg.pid:  # the same process, on a new socket
                d.lose(old, now, mono, "reconnected", charged=[])
            else:
                d.lose(old, now, mono, f"replaced by pid {msg.pid}")
        self._give_back(self.unclaimed.left_by(msg.worker_id), "its holder no longer has them")
        if msg.holding:
            d.send(identity, p.Registered(refused), mono)
            log.info(
                "broker.jobs_offered_back",
                worker=msg.worker_id,
                offered=len(msg.holding),
                refused=len(refused),
            )

    def _keep(
        self, conn: WorkerConn, held: p.Holding, previous: list[WorkerConn], now: float, mono: float
    ) -> bool:
        """Keep an offered job with ``conn`` if it is this worker's under
        that lease; False: refused."""
        job = self.state.holding(held.job_id, held.lease)
        if job is None:
            return False
        d = self.d
        if conn.leases.get(job.id) != held.lease:
            if not held.running and job.status == "queued" and job.queue in self.state.paused:
                return False  # paused meanwhile: it must not start (it goes back)
            owner = d.workers.get(d.holders.get(job.id, b""))
            if owner is not None and owner in previous and owner.pid == conn.pid:
                owner.release(job.id)
            elif owner is not None or not self.unclaimed.take(job.id, held.lease, conn.worker_id):
                return False
            conn.leases[job.id] = held.lease
            d.holders[job.id] = conn.identity
            if job.status == "running":
                conn.started.add(job.id)
                d.arm_deadline(job, now, mono)
        if held.running and job.status == "queued":
            d.start(conn, job, now, mono)
        return True
