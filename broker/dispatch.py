"""Dispatch: the worker side of the broker.

Owns the connected workers (:class:`~corral.broker.workers.WorkerTable`),
their credit and leases, which worker holds which job, the lease deadlines
of started jobs, the heartbeats both ways, and the outcomes workers report.
It hands jobs to workers with credit (a job is leased only once its send
succeeded) and takes back the jobs of a worker that left, died or went
silent. What a registration that replaces another does with the held jobs,
and how workers reclaim the jobs they held across a broker restart, is
:mod:`corral.broker.rejoin`; the tasks' concurrency and rate limits, which
hold jobs back at dispatch, are :mod:`corral.broker.limits`; what becomes
of a job whose ``expires`` passed before it started (cancelled, reason
``expired``) is :mod:`corral.broker.lapses`. No sockets: messages leave through a
:class:`WorkerLink`, and time comes in as ``now`` (epoch seconds) and
``mono`` (monotonic seconds).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from corral.broker import balance, views, wirepath
from corral.broker import protocol as p
from corral.broker.deadlines import Deadlines
from corral.broker.expiring import lapsed
from corral.broker.journal import Journal, WorkerLink
from corral.broker.lapses import Lapses, PassGate
from corral.broker.limits import Limiter
from corral.broker.logbudget import LogBudget
from corral.broker.protocol import STATUSES, TERMINAL
from corral.broker.records import (
    BrokerStarted,
    ErrorRec,
    Finished,
    Leased,
    LeasedMany,
    ProgressNoted,
    Returned,
    Started,
)
from corral.broker.registrations import MAX_TASKS_PER_WORKER, RegisteredTasks
from corral.broker.rejoin import Rejoins
from corral.broker.state import Job
from corral.broker.withdraws import PendingWithdraws
from corral.broker.workers import WorkerConn, WorkerTable

log = structlog.get_logger()

_STAT_KEYS = {status: f"jobs_{status}" for status in STATUSES}
#: The outcome kinds a worker may report.
_KINDS = frozenset({"ok", "error", "fail", "retry", "interrupted"})
#: Called when a job reaches a terminal status: (job, now).
Ended = Callable[[Job, float], None]


class Dispatcher:
    """Workers, credit, leases, lease deadlines, heartbeats, outcomes."""

    def __init__(
        self,
        journal: Journal,
        *,
        heartbeat_interval: float,
        liveness_window: float,
        broker_id: str,
        on_ended: Ended,
        max_message_size: int = 0,
    ) -> None:
        self.journal = journal
        #: broker.max_message_size, told to workers with each delivery.
        self.max_message_size = max_message_size
        self.state = journal.state
        self.stats = journal.stats
        self.workers = WorkerTable(liveness_window)
        self.registrations = RegisteredTasks(journal)
        self.rates = views.Rates()
        self.heartbeat_interval = heartbeat_interval
        self.broker_id = broker_id
        self.link: WorkerLink = _Unlinked()
        #: Workers whose Bye this pass read: each gets a Farewell once the
        #: pass's records are committed (:meth:`bid_farewells`).
        self.farewells: list[bytes] = []
        self._on_ended = on_ended
        #: job id -> identity of the worker holding its lease.
        self.holders: dict[str, bytes] = {}
        #: job id -> (monotonic deadline, lease) of started jobs with a
        #: timeout; each goes when its try ends, however it ends.
        self.deadlines: Deadlines[str, int] = Deadlines()
        #: job id -> its first deadline, for tries past their timeout whose
        #: handler returned and whose result is not here yet.
        self._ended_unheard: dict[str, float] = {}
        #: The last lease token given: the broker's epoch in the high bits
        #: (see :meth:`start_leases`), a counter in the low 32.
        self._lease_seq = 0
        self.liveness_window = liveness_window
        self._given = itertools.count(1)
        self._withdraws = PendingWithdraws()
        self._next_heartbeat = 0.0
        self._dirty = True
        #: A lower bound of the priorities of the jobs in the workers'
        #: leases (None: they hold none), lowered by each lease given, and
        #: worked out again at the next dispatch once ``_floor_stale`` (a
        #: registration may take back held jobs; each heartbeat tightens it).
        self._floor: int | None = None
        self._floor_stale = False
        self.rejoins = Rejoins(self, liveness_window)
        #: Workers coming and going: lines any peer of the worker endpoint can cause.
        self.log_budget = LogBudget(self.stats)
        #: The Refused answers to frames that could not be decoded.
        self.refusal_budget = LogBudget(self.stats, counter="refusals_suppressed")
        self.limits = Limiter(self.state, self._leased_ids)
        journal.observers.append(self.limits.observe)
        self.lapses = Lapses(self, on_ended)

    def leased_ids(self) -> list[str]:
        """The jobs leased now: held by a worker, or waiting for their
        holder to reclaim them after a restart."""
        return [*self.holders, *self.rejoins.unclaimed.jobs]

    _leased_ids = leased_ids

    @property
    def reclaim_window(self) -> float:
        """Seconds the jobs held at a restart wait for their holders."""
        return self.rejoins.window

    def hold_recovered(self, jobs: list[Job], mono: float) -> None:
        """After a replay: keep the jobs workers held for them to reclaim
        (see :mod:`corral.broker.rejoin`)."""
        self.rejoins.hold_recovered(jobs, mono)

    def start_leases(self, epoch: int) -> None:
        """Give lease tokens of ``epoch`` (this start's number, logged and
        synced): ``epoch << 32`` plus a counter, so no token repeats across
        restarts. The core bumps the epoch again before the counter wraps."""
        self._lease_seq = epoch << 32

    @property
    def lease_counter(self) -> int:
        """Leases given in this epoch (the low 32 bits of the last token)."""
        return self._lease_seq & 0xFFFFFFFF

    # ------------------------------------------------------------ messages

    def poke(self) -> None:
        """Something changed that may let a job go out: dispatch this pass."""
        self._dirty = True

    @property
    def wants_pass(self) -> bool:
        """A dispatch is owed and some worker has credit."""
        return (self._dirty or self.limits.changed) and bool(self.workers.hungry())

    def on_message(self, identity: bytes, msg: Any, now: float, mono: float) -> None:
        """One decoded message from a worker."""
        conn = self.workers.seen(identity, mono)
        match msg:
            case p.Ready():
                self._register(identity, msg, now, mono)
            case p.Report():
                self._report(conn, msg, now, mono)
            case p.Return():
                self._returned(conn, msg)
            case p.Drain():
                if conn is not None:
                    conn.capacity = 0
            case p.Bye():
                if conn is not None:
                    self.lose(conn, now, mono, "left")
                # answered after the pass's commit (see bid_farewells)
                self.farewells.append(identity)
            case p.WorkerHeartbeat():
                pass
        # (a resent report is the worker registering again already: no more)
        resent = isinstance(msg, p.Report) and msg.resent
        if conn is None and not resent and not isinstance(msg, p.Ready | p.Bye | p.Drain):
            self.send(identity, p.Reregister(self.broker_id), mono)

    def _register(self, identity: bytes, msg: p.Ready, now: float, mono: float) -> None:
        if len(msg.tasks) > MAX_TASKS_PER_WORKER:
            log.warning(
                "broker.too_many_tasks",
                worker=msg.worker_id,
                tasks=len(msg.tasks),
                kept=MAX_TASKS_PER_WORKER,
                hint=f"a worker may register at most {MAX_TASKS_PER_WORKER} tasks: it gets "
                "jobs of the first ones only; split its tasks over more pools",
            )
            msg = msgspec.structs.replace(msg, tasks=msg.tasks[:MAX_TASKS_PER_WORKER])
        self.rejoins.register(identity, msg, now, mono)
        self._floor_stale = True  # it may have taken back jobs it held
        self.registrations.register(
            msg.worker_id, msg.tasks[:MAX_TASKS_PER_WORKER], self.workers.serving
        )
        self.limits.declare(identity, msg.worker_id, msg.tasks, now, mono)
        self._dirty = True
        fields = self.log_budget.allow(mono)
        if fields is not None:
            log.info(
                "broker.worker_ready",
                worker=msg.worker_id,
                host=msg.host,
                pid=msg.pid,
                queues=msg.queues,
                credit=msg.credit,
                **fields,
            )

    def add_worker(self, identity: bytes, msg: p.Ready, mono: float) -> WorkerConn:
        """A new registration, holding nothing yet."""
        conn = WorkerConn.from_ready(identity, msg, mono)
        self.workers.add(conn)
        return conn

    def arm_deadline(self, job: Job, now: float, mono: float) -> None:
        """Arm the timeout of a running ``job`` reclaimed by a worker, from
        its logged start (one already armed stays)."""
        timeout = self.state.timeout(job)
        if timeout is None or job.id in self.deadlines:
            return
        started = job.tries[-1].started_at if job.tries else now
        self.deadlines.set(job.id, mono + max(0.0, timeout - (now - started)), job.lease)

    def _report(self, conn: WorkerConn | None, msg: p.Report, now: float, mono: float) -> None:
        # A try whose outcome comes in the same report (a worker batches its
        # reports) ends just below: no deadline is armed for it.
        ending = (
            {(o.job_id, o.lease) for o in msg.done if o.kind in _KINDS}
            if msg.started and msg.done
            else frozenset()
        )
        for lease in msg.started:
            job = self.state.holding(lease.job_id, lease.lease)
            if conn is not None and job is not None:
                self.start(conn, job, now, mono, arm=(lease.job_id, lease.lease) not in ending)
        for outcome in msg.done:
            self._finish(conn, outcome, now, mono, msg.resent)
        for note in msg.progress:
            job = self.state.holding(note.job_id, note.lease)
            if job is not None:
                self.journal.record(ProgressNoted(job.id, note.fraction, note.note[:500], now))

    def start(self, conn: WorkerConn, job: Job, at: float, mono: float, arm: bool = True) -> None:
        """The worker ``conn`` began running its reserved ``job``: log it
        (the job is running, the try counts) and arm its deadline (unless
        ``arm`` is False: its outcome is being taken now)."""
        if job.status != "queued":
            return  # a start reported twice
        lease = job.lease
        self.journal.record(
            Started(job.id, lease, job.runs + 1, conn.worker_id, conn.host, conn.pid, at)
        )
        conn.started.add(job.id)
        if not arm:
            return
        timeout = self.state.timeout(job)
        if timeout is not None:
            self.deadlines.set(job.id, mono + timeout, lease)

    def _finish(
        self,
        conn: WorkerConn | None,
        outcome: p.Outcome,
        now: float,
        mono: float,
        resent: bool = False,
    ) -> None:
        holder = self.workers.get(self.holders.get(outcome.job_id, b""))
        for c in (conn, holder if holder is not conn else None):
            if c is not None and c.leases.get(outcome.job_id) == outcome.lease:
                c.release(outcome.job_id)
                self._dirty = True
        job = self.state.holding(outcome.job_id, outcome.lease)
        if job is None:
            if resent:  # most often taken before the resend
                self.stats["resent_ignored"] += 1
                return
            self.stats["late_results"] += 1
            log.debug("broker.late_result", job_id=outcome.job_id, lease=outcome.lease)
            return
        if outcome.kind not in _KINDS:
            self.malformed(f"unknown outcome kind {outcome.kind!r}")
            return
        if job.status == "queued":  # an outcome with no start reported: it started
            by = conn or holder
            if by is not None:
                at = outcome.started_at if outcome.started_at is not None else now
                self.start(by, job, at, mono)
        error = None
        if outcome.error is not None:
            error = ErrorRec(outcome.error.type, outcome.error.message, outcome.error.traceback)
        record = self.state.policy.decide_finish(
            job,
            outcome.kind,
            now,
            result=outcome.result,
            error=error,
            delay=outcome.delay,
            started_at=outcome.started_at,
        )
        self._settle(job, record, now, mono, conn)

    def _settle(
        self,
        job: Job,
        record: Finished,
        now: float,
        mono: float,
        conn: WorkerConn | None = None,
    ) -> None:
        """Log a try's end (a Finished record), count it, and end the job if
        the try ended it."""
        self._released(job.id)
        self.journal.record(record)
        self._count_outcome(conn, record, mono)
        self._dirty = True
        if record.status in TERMINAL:
            self._on_ended(job, now)
        elif lapsed(job, now):  # a retry past the job's expires never starts
            self.lapses.expire(job, now)

    def _count_outcome(self, conn: WorkerConn | None, record: Finished, mono: float) -> None:
        """Count a try's end: by the status it led to, and as processed or
        failed (see :func:`views.outcome_of`)."""
        self.stats[_STAT_KEYS[record.status]] += 1
        outcome = views.outcome_of(record)
        if outcome is not None:
            self.rates.add(mono, outcome)
            if conn is not None:
                conn.count(outcome)

    def _returned(self, conn: WorkerConn | None, msg: p.Return) -> None:
        if conn is not None and msg.ref:
            self._withdraws.answered(msg.ref, conn.identity)
        for lease in msg.leases:
            # Only the worker holding the job under this very lease gives it
            # back: a stale or foreign Return releases nothing.
            if conn is None or conn.leases.get(lease.job_id) != lease.lease:
                continue
            conn.release(lease.job_id)
            job = self.state.holding(lease.job_id, lease.lease)
            if job is not None:
                self._released(job.id)
                self.journal.record(Returned(job.id, lease.lease))
                self._dirty = True

    # ------------------------------------------------------------ withdraw

    def withdraw_queue(self, queue: str, mono: float, done: Callable[[], None]) -> None:
        """Ask every worker for its unstarted jobs of ``queue`` back (a
        pause); call ``done`` once each asked worker has answered, left, or
        the liveness window passed: from then on none of them starts."""
        ref = self._withdraws.next_ref()
        asked = set()
        for conn in self.workers:
            jobs = [
                j for j in balance.unstarted(conn, self.state, withdrawing=True) if j.queue == queue
            ]
            if jobs and self._withdraw(conn, jobs, mono, ref):
                asked.add(conn.identity)
        self._withdraws.expect(ref, asked, mono + self.liveness_window, done)

    def _withdraw(self, conn: WorkerConn, jobs: list[Job], mono: float, ref: int = 0) -> bool:
        leases = [p.Lease(job.id, job.lease) for job in jobs]
        ref = ref or self._withdraws.next_ref()
        if not self.send(conn.identity, p.Withdraw(leases, ref), mono):
            conn.withdrawing.difference_update(job.id for job in jobs)
            return False
        conn.withdrawing.update(job.id for job in jobs)
        self.stats["withdrawn_asked"] += len(jobs)
        return True

    def lose(
        self,
        conn: WorkerConn,
        now: float,
        mono: float,
        reason: str,
        charged: list[str] | None = None,
    ) -> int:
        """Requeue every job a gone worker held; the attempt counts for the
        jobs it may have started (see WorkerConn.counted_on_loss). Returns
        how many jobs went back to their queue."""
        self.workers.remove(conn.identity)
        self.limits.forget(conn.identity)
        self._withdraws.gone(conn.identity)
        # A worker that says Bye holds nothing: what it still had leased was
        # in flight to it and never started.
        if reason == "left":
            counted: set[str] = set()
        elif charged is not None:  # the process died for these jobs only
            counted = set(charged)
        else:
            counted = conn.counted_on_loss()
        requeued = 0
        held = bool(conn.leases)
        for job_id, lease in list(conn.leases.items()):
            job = self.state.holding(job_id, lease)
            if job is not None:
                self._released(job_id)
                requeued += self._take_back(conn, job, job_id in counted, reason, now, mono)
        self.stats["workers_lost"] += reason not in ("left", "reconnected")
        self.stats["redelivered"] += requeued
        self._dirty = True
        fields = self.log_budget.allow(mono) if not held else {}
        if fields is not None:  # a worker gone with jobs is always said
            log_fn = log.info if reason == "left" else log.warning
            log_fn(
                "broker.worker_gone",
                worker=conn.worker_id,
                pid=conn.pid,
                reason=reason,
                requeued=requeued,
                **fields,
            )
        return requeued

    def _take_back(
        self, conn: WorkerConn, job: Job, charge: bool, reason: str, now: float, mono: float
    ) -> int:
        """A gone worker's job goes back: charged a try (``WorkerLost``) or
        not. Returns 1 if it goes back to its queue, 0 if the try ended it."""
        if not charge:
            self.journal.record(Returned(job.id, job.lease))
            return 1
        self.start(conn, job, now, mono)  # it may have started unannounced
        error = ErrorRec(
            "WorkerLost",
            f"worker {conn.worker_id} (pid {conn.pid} on {conn.host}) {reason} "
            "while running the job",
        )
        finished = self.state.policy.decide_finish(job, "lost", now, error=error)
        self._settle(job, finished, now, mono)
        return 0 if finished.status in TERMINAL else 1

    def process_exited(
        self,
        host: str,
        pid: int,
        reason: str,
        now: float,
        mono: float,
        identities: list[str] | None = None,
        charged: list[str] | None = None,
    ) -> int:
        """A supervisor reaped a worker process: its registrations go at
        once, not after the heartbeat window. They are the ``identities``
        (hex) it connected with, or without those, the ones of ``pid`` on
        ``host``. Returns how many registrations were dropped."""
        if identities:
            gone = [c for c in self.workers if c.identity.hex() in identities]
        else:
            gone = [c for c in self.workers if c.host == host and c.pid == pid]
        for conn in gone:
            self.lose(conn, now, mono, f"exited ({reason})", charged)
        return len(gone)

    def revoke(self, job_id: str, lease: int) -> None:
        """The job was cancelled under ``lease``: tell the worker holding it,
        if any (its handler sees ``ctx.cancelled``; its result is fenced)."""
        holder = self.holders.get(job_id)
        self._released(job_id)
        if holder is not None and lease:
            self.send(holder, p.CancelJob(job_id, lease), None)

    def _released(self, job_id: str) -> None:
        """The lease on ``job_id`` ends (an outcome, a timeout, a return, a
        lost worker, a cancel): forget its holder and its deadline."""
        self.holders.pop(job_id, None)
        self.deadlines.discard(job_id)
        self._ended_unheard.pop(job_id, None)
        self.rejoins.unclaimed.discard(job_id)

    # ---------------------------------------------------------------- tick

    def heartbeat(self, now: float, mono: float) -> None:
        """Once per heartbeat interval: drop silent workers (their jobs go
        back), heartbeat the others, and retry a dispatch a full socket
        refused."""
        if mono >= self._next_heartbeat:
            self._next_heartbeat = mono + self.heartbeat_interval
            self._dirty = True  # retry any dispatch a full socket refused
            self._floor_stale = True  # tightened: jobs of low priority may have ended
            for conn in self.workers.silent(mono):
                # if it still runs them, its handlers see ctx.cancelled
                for job_id, lease in conn.leases.items():
                    self.send(conn.identity, p.CancelJob(job_id, lease), None)
                self.lose(conn, now, mono, "went silent")
            for conn in self.workers:
                self.send(conn.identity, p.BrokerHeartbeat(self.broker_id), mono)

    def _result_in_flight(self, job_id: str, due: float, mono: float) -> bool:
        """The job's try is past its timeout, but its holder's supervisor,
        vouching for the process, said since the job started that it no
        longer runs it: its handler returned, and the result waits in a
        worker whose socket thread is starved (the next handler holds the
        GIL). Wait for it, a bounded time (ten liveness windows)."""
        holder = self.workers.get(self.holders.get(job_id, b""))
        if holder is None or holder.vouched_until <= mono or job_id in holder.reported_running:
            return False
        timeout = self.state.timeout(self.state.jobs[job_id]) or 0.0
        if holder.reported_at <= self._ended_unheard.get(job_id, due) - timeout:
            return False  # the report predates the start: it says nothing of this try
        first = self._ended_unheard.setdefault(job_id, due)
        return mono < first + 10 * self.workers.liveness_window

    def stalled(self, seconds: float) -> None:
        """The broker's loop did not run for ``seconds``: what it could not
        see in that time is not held against anyone. Workers get their
        liveness window back, and tries their timeout back, by as much: a
        worker's results and heartbeats from that time are still unread."""
        self.workers.excuse(seconds)
        self.deadlines.shift(seconds)
        self._ended_unheard = {job: at + seconds for job, at in self._ended_unheard.items()}
        self._withdraws.excuse(seconds)
        self.rejoins.unclaimed.shift(seconds)
        log.warning(
            "broker.stalled",
            seconds=round(seconds, 3),
            hint="the broker did not run (stopped, or overloaded): no worker or job is "
            "charged for that time",
        )

    def next_wakeup(self) -> float:
        """The monotonic time of the next heartbeat, lease deadline or rate
        window opening."""
        wake = self._next_heartbeat
        for due in (
            self.deadlines.next_due(),
            self.rejoins.unclaimed.until or None,
            self.limits.next_wakeup(),
        ):
            if due is not None:
                wake = min(wake, due)
        return wake

    def expire_deadlines(self, now: float, mono: float) -> None:
        """End the tries that ran past their timeout (retried or failed);
        the worker's late result is fenced. Cancel the jobs whose
        ``expires`` passed unstarted; open the rate windows due."""
        self._withdraws.expire(mono)
        self.rejoins.expire(now, mono)
        self.lapses.expire_due(now)
        if self.limits.tick(mono):
            self._dirty = True
        while (entry := self.deadlines.pop_due(mono)) is not None:
            job_id, due, lease = entry
            job = self.state.holding(job_id, lease)
            if job is None:
                self._ended_unheard.pop(job_id, None)
                continue
            if self._result_in_flight(job_id, due, mono):
                self.deadlines.set(job_id, mono + self.heartbeat_interval, lease)
                continue
            self._ended_unheard.pop(job_id, None)
            timeout = self.state.timeout(job)
            error = ErrorRec("TimeoutError", f"the job ran past its timeout of {timeout}s")
            record = self.state.policy.decide_finish(job, "error", now, error=error)
            self.stats["timeouts"] += 1
            holder = self.holders.get(job.id)
            self._settle(job, record, now, mono)
            if holder is not None:  # its handler may still run: it sees ctx.cancelled
                self.send(holder, p.CancelJob(job_id, lease), mono)
            log.warning("broker.job_timeout", job_id=job_id, timeout=timeout, next=record.status)

    # ------------------------------------------------------------ dispatch

    def dispatch(self, now: float, mono: float) -> None:
        """If anything changed: send ready jobs to the workers with credit,
        fairly and within the tasks' limits, then ask back the reserved jobs
        an idle worker or a job of higher priority should have (see
        :mod:`corral.broker.balance`). A ready job found past its
        ``expires`` is cancelled instead."""
        if not (self._dirty or self.limits.changed):
            return
        self._dirty = False
        self.limits.wake(mono)
        gate = PassGate(self.limits, now, mono)
        workers = list(self.workers)
        planned = balance.plan_deliveries(workers, self.state, gate)
        leased = [(conn, jobs, self._lease(conn, jobs, now)) for conn, jobs in planned.items()]
        if leased:
            # The leases go to the log file before any delivery leaves (one
            # write, no fsync: nothing is acknowledged): a broker killed right
            # after a send still knows what its workers run (broker/rejoin.py).
            self.journal.log.commit(mono, durable=False)
        for conn, jobs, deliveries in leased:
            self._deliver(conn, jobs, deliveries, mono)
        for job in gate.lapsed:
            self.lapses.expire(job, now)
        # Most dispatches could take nothing back (no idle worker, no ready
        # job outranks a held one): skip the plan, which sorts every
        # worker's reserved jobs.
        if balance.may_withdraw(workers, self.state, self._held_floor()):
            for conn, jobs in balance.plan_withdrawals(workers, self.state, gate).items():
                self._withdraw(conn, jobs, mono)

    def _held_floor(self) -> int | None:
        """A lower bound of the priorities of the jobs in the workers'
        leases; None: they hold none. Exact once stale (see ``_floor``)."""
        if self._floor_stale:
            self._floor_stale = False
            jobs = self.state.jobs
            held = (jobs.get(job_id) for c in self.workers for job_id in c.leases)
            self._floor = min((job.priority for job in held if job is not None), default=None)
        return self._floor

    def _lease(self, conn: WorkerConn, jobs: list[Job], now: float) -> list[p.Delivery]:
        """Lease ``jobs`` to ``conn`` under consecutive tokens, in one
        record (a Leased for one job, a LeasedMany for more); their
        deliveries, to send once the record is in the log file."""
        if self.lease_counter + len(jobs) >= 2**32:  # the counter would wrap: a new epoch
            epoch = self.state.epoch + 1
            self.journal.record(BrokerStarted(epoch, now))
            self.journal.log.sync()
            self.start_leases(epoch)
        first = self._lease_seq + 1
        deliveries = []
        state = self.state
        for job in jobs:
            self._lease_seq += 1
            deliveries.append(
                p.Delivery(
                    job.id,
                    self._lease_seq,
                    job.task,
                    job.payload,
                    job.runs + 1,
                    state.max_attempts(job),
                    job.queue,
                    job.created_at,
                    state.timeout(job),
                    job.prev_result,
                    job.priority,
                    job.headers,
                )
            )
        if len(jobs) == 1:
            job = jobs[0]
            record: Leased | LeasedMany = Leased(
                job.id, first, job.runs + 1, conn.worker_id, conn.host, conn.pid, now
            )
        else:
            ids = [job.id for job in jobs]
            record = LeasedMany(ids, first, conn.worker_id, conn.host, conn.pid, now)
        self.journal.record(record)
        floor = self._floor
        for lease, job in enumerate(jobs, first):
            conn.leases[job.id] = lease
            self.holders[job.id] = conn.identity
            if floor is None or job.priority < floor:
                floor = job.priority
        self._floor = floor
        return deliveries

    def _deliver(
        self, conn: WorkerConn, jobs: list[Job], deliveries: list[p.Delivery], mono: float
    ) -> None:
        """Send leased jobs; those that cannot go out (a full or gone peer)
        are returned at once, uncounted, and their limits' slots freed."""
        deliver = p.Deliver(deliveries, max_message_size=self.max_message_size)
        if self.send(conn.identity, deliver, mono):
            conn.given = next(self._given)
            self.stats["delivered"] += len(jobs)
            return
        for job, delivery in zip(jobs, deliveries, strict=True):
            conn.release(job.id)
            self._released(job.id)
            self.limits.unadmit(job)
            self.journal.record(Returned(job.id, delivery.lease))

    # -------------------------------------------------------------- helpers

    def bid_farewells(self) -> None:
        """Answer this pass's Byes (call after the pass's commit: what each
        worker said before its Bye is then in the log)."""
        if not self.farewells:  # (every pass asks: most read no Bye)
            return
        farewells, self.farewells = self.farewells, []
        for identity in farewells:
            self.send(identity, p.Farewell(), None)

    def send(self, identity: bytes, msg: p.Msg, mono: float | None) -> bool:
        """Send ``msg`` to a worker now; False if it could not go out."""
        if not self.link.send(identity, p.encode(msg)):
            return False
        conn = self.workers.get(identity)
        if conn is not None and mono is not None:
            conn.last_sent = mono
        return True

    def malformed(self, reason: str) -> None:
        count_malformed(self.stats, "worker", reason)

    def refuse(
        self, identity: bytes, body: bytes | None, reason: str, now: float, mono: float
    ) -> None:
        """Answer a frame that could not be decoded with a Refused naming
        its op (when readable) and why, so its worker is not left retrying
        for ever (a registered worker exits, naming the jobs to charge);
        within :attr:`refusal_budget`, whoever sends. A registered worker
        past the budget is dropped instead, its jobs taken back (those it
        may have started charged a try): told nothing, it would hold them
        for ever while what it said of them was lost."""
        if self.refusal_budget.allow(mono) is None:
            conn = self.workers.get(identity)
            if conn is not None:
                self.lose(conn, now, mono, f"sent a message that could not be read ({reason})")
            return
        op = wirepath.head(body)[0] if body is not None else None
        op = op[:40] if op is not None else ""
        self.link.send(identity, p.encode(p.Refused(op, reason[: p.REFUSAL_CHARS])))


def count_malformed(stats: Any, side: str, reason: str) -> None:
    """Count a frame that could not be read, and log it (rate-limited)."""
    stats["malformed_frames"] += 1
    n = stats["malformed_frames"]
    if n <= 20 or n % 1000 == 0:
        log.warning("broker.malformed_frame", side=side, reason=reason[:200], total=n)


class _Unlinked:
    """The link before the broker has bound its worker socket: nothing goes out."""

    def send(self, identity: bytes, body: bytes) -> bool:
        return False
