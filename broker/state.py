"""The broker's job state, pure: no sockets, no files, no clocks.

Every change to a job goes through :meth:`JobState.apply` with a log record,
both live (log first, then apply) and on replay, so the two can never
disagree. Decisions that need a clock or randomness (when to retry, what a
try's outcome means) are made by the ``decide_*`` methods, which return the
record to log; time always comes in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import Any

import msgspec

from corral.broker import checkpoint
from corral.broker.awaited import AwaitedIds
from corral.broker.checkpoint import ColdBatch, Loaded
from corral.broker.coldjobs import ColdJobs, ColdRef, JobTable
from corral.broker.expiring import EXPIRED, ExpiringJobs, expired_error
from corral.broker.expiry import ExpiryQueue
from corral.broker.flowbook import FlowBook
from corral.broker.framing import FORMAT_VERSION, HEADER_SIZE, segment_seed
from corral.broker.job import (
    ACTIVE,
    BLOB_HEAD,
    DEFAULT_QUEUE,
    JOB_OVERHEAD_BYTES,
    PRISTINE,
    SNAPSHOT_STATE,
    WAITING,
    Defaults,
    Job,
    JobLife,
    TaskDefaults,
    Templates,
    blob_of,
    priority_runs,
    runs_of,
    touched,
)
from corral.broker.jobspec import NIL, InvalidJob, JobSpec, validate_spec, with_callback
from corral.broker.policy import Policy
from corral.broker.protocol import STATUSES, TERMINAL
from corral.broker.ready import ReadyQueues
from corral.broker.records import (
    BrokerStarted,
    Cancelled,
    ClockStepped,
    ErrorRec,
    Finished,
    FlowCreated,
    FlowRemoved,
    FollowedUp,
    JobCreated,
    JobsCreated,
    JobSnapshot,
    Leased,
    LeasedMany,
    MemberEnded,
    ProgressNoted,
    QueuePaused,
    Record,
    Removed,
    Requeued,
    Returned,
    ScheduleFired,
    Started,
    TaskForgotten,
    TaskRegistered,
    TryRec,
)
from corral.broker.segindex import describe_batch, remove_indexes
from corral.broker.seqindex import SeqIndex
from corral.broker.timers import Timers
from corral.broker.unique import UniqueKeys

__all__ = [
    "ACTIVE",
    "MAX_TRIES",
    "STATUSES",
    "TERMINAL",
    "WAITING",
    "Defaults",
    "InvalidJob",
    "Job",
    "JobState",
    "TaskDefaults",
    "validate_spec",
]


#: The tries a job keeps: its first and its latest (a job polling with
#: corral.Retry, or interrupted by shutdowns, runs without bound).
MAX_TRIES = 100


def members(flow: FlowCreated) -> list[JobSpec]:
    """A flow's jobs: its steps, and its callback if it has one."""
    return with_callback(flow.steps, flow.callback)


class JobState:
    """All jobs, the ready heaps per queue, the timer heap of waiting jobs,
    and counts per queue and status."""

    def __init__(self, defaults: Defaults | None = None) -> None:
        self.policy = Policy(defaults)
        self.defaults = self.policy.defaults
        #: Every job by id; jobs a restart took from a checkpoint stay cold
        #: (no object) until something needs them (see broker/coldjobs.py).
        self.jobs = JobTable()
        #: task name -> its registered options (shared with the policy).
        self.tasks = self.policy.tasks
        #: (queue, task, status) -> jobs; a count that falls to 0 is dropped.
        self.counts: Counter[tuple[str, str, str]] = Counter()
        #: (queue, task) -> jobs reserved by a worker and not started (still
        #: queued); a count that falls to 0 is dropped.
        self.reserved: Counter[tuple[str, str]] = Counter()
        self.paused: set[str] = set()
        #: schedule name -> the due time it last fired for.
        self.last_fired: dict[str, float] = {}
        #: chains and groups by id.
        #: Jobs (by id) and groups (by flow id) whose follow-ups were made.
        self.followed: set[str] = set()
        self.flowbook = FlowBook(self.jobs, self.followed)
        self.flows = self.flowbook.flows
        #: Unique keys and the jobs that hold them.
        self.unique = UniqueKeys(self.jobs, self.flowbook)
        #: The ids callbacks yet to be made will take.
        self.awaited = AwaitedIds()
        self.live_bytes = 0
        #: The longest blob a pristine job was added with (bytes): a bound on
        #: their payloads that start-up checks read instead of every job.
        self.largest_blob = 0
        #: How many times a broker has started on this log.
        self.epoch = 0
        #: The sum of the wall-clock steps logged (seconds; see ClockStepped).
        self.wall_steps = 0.0
        #: The latest wall time (epoch seconds) the broker's own records
        #: prove its clock reached (a start, a try's end, a cancel, a
        #: requeue), moved by each step logged since, as the clock was: a
        #: clock now behind it went back while no broker ran (0: none seen).
        self.latest_at = 0.0
        self._next_seq = 1
        #: The ready heaps, by queue and task.
        self.ready = ReadyQueues(self.jobs)
        #: The shared templates of pristine jobs (see :class:`Job`).
        self.templates = Templates()
        #: Every job in creation order (paging, compaction).
        self.index = SeqIndex(self.jobs)
        #: Scheduled and retrying jobs by when they are due.
        self.timers = Timers(self.jobs)
        #: When finished jobs are forgotten.
        self.expiry = ExpiryQueue(self.jobs, self.policy)
        #: When jobs with ``expires`` lapse unstarted.
        self.expiring = ExpiringJobs(self.jobs)
        self._rng = random.Random()
        #: How each record type changes the state.
        self._changes: dict[type, Callable[[Any], None]] = {
            JobCreated: self._apply_created,
            JobsCreated: self._apply_created_many,
            Leased: self._apply_leased,
            LeasedMany: self._apply_leased_many,
            Started: self._apply_started,
            Finished: self._apply_finished,
            Returned: self._apply_returned,
            Removed: self._apply_removed,
            JobSnapshot: self._apply_snapshot,
            Cancelled: self._apply_cancelled,
            Requeued: self._apply_requeued,
            QueuePaused: self._apply_paused,
            FlowCreated: self._apply_flow,
            ScheduleFired: self._apply_fired,
            ProgressNoted: self._apply_progress,
            BrokerStarted: self._apply_broker_started,
            FollowedUp: self._apply_followed_up,
            TaskRegistered: self._apply_task,
            TaskForgotten: self._apply_task_forgotten,
            MemberEnded: self.flowbook.apply_ended,
            FlowRemoved: self._apply_flow_removed,
            ClockStepped: self._apply_clock_stepped,
            ColdRef: self._apply_cold,
        }
        self.index.warm = self.ready.warm = self._warm_batch
        #: The number the next cold batch takes, and the cold batches'
        #: keeper (see attach_cold).
        self._cold_numbers = 0
        self._cold: ColdJobs | None = None

    # ------------------------------------------------------------ apply

    def apply(self, record: Record) -> None:
        """Change the state as ``record`` says. Deterministic: no clock.
        Raises TypeError for a record type it does not know."""
        try:
            change = self._changes[type(record)]
        except KeyError:
            raise TypeError(f"no state change for record {type(record).__name__}") from None
        change(record)

    def _apply_broker_started(self, rec: BrokerStarted) -> None:
        self.epoch = max(self.epoch, rec.epoch)
        self.latest_at = max(self.latest_at, rec.at)

    def _apply_clock_stepped(self, rec: ClockStepped) -> None:
        """The wall clock stepped: what was due by the clock before the step
        is due (as it was live: promotion is not logged); a wait asked for as
        an interval (a retry's backoff, a ``delay``, an ``expires`` in
        seconds) keeps its length, so its run_at (or deadline) moves with
        the clock; an explicit ``run_at`` names a wall time and stays."""
        if rec.at:
            self.promote_due(rec.at - rec.delta)
        self.wall_steps += rec.delta
        if self.latest_at:
            self.latest_at += rec.delta
        self.expiring.stepped(rec.delta)
        waiting = [job for job in touched(self.jobs.warm_values()) if job.status in WAITING]
        for job in waiting:
            delayed = job.status == "scheduled" and job.tpl.delay
            if (job.status == "retrying" or delayed) and job.run_at is not None:
                job.run_at += rec.delta
        self.timers.rebuild(waiting)

    def _apply_followed_up(self, rec: FollowedUp) -> None:
        for created in rec.created:
            self._apply_created(created)
        if rec.parent in self.jobs or rec.parent in self.flows:
            self.followed.add(rec.parent)

    def _apply_task(self, rec: TaskRegistered) -> None:
        self.tasks[rec.name] = rec.options

    def _apply_task_forgotten(self, rec: TaskForgotten) -> None:
        self.tasks.pop(rec.name, None)

    def _apply_removed(self, rec: Removed) -> None:
        self._remove(rec.id)

    def _apply_flow(self, rec: FlowCreated) -> None:
        if rec.id not in self.flows:
            self.flowbook.add(rec)
            self.unique.reserve(rec)
            self.awaited.add(rec.id, members(rec))

    def _apply_flow_removed(self, rec: FlowRemoved) -> None:
        flow = self.flows.get(rec.id)
        if flow is not None:
            self.unique.unreserve(flow)
            self.awaited.drop(flow.id, members(flow))
        self.flowbook.remove(rec.id)
        self.followed.discard(rec.id)

    def _ended(self, job: Job) -> None:
        """``job`` reached a terminal status: its flow keeps how it ended."""
        if job.flow is not None:
            ended_at = job.ended_at if job.ended_at is not None else 0.0
            self.flowbook.member_ended(job.flow, job.id, job.step, job.status, job.result, ended_at)

    def _apply_paused(self, rec: QueuePaused) -> None:
        (self.paused.add if rec.paused else self.paused.discard)(rec.queue)

    def _apply_fired(self, rec: ScheduleFired) -> None:
        previous = self.last_fired.get(rec.name, rec.due_at)
        self.last_fired[rec.name] = max(previous, rec.due_at)

    def _apply_progress(self, rec: ProgressNoted) -> None:
        job = self.jobs.get(rec.id)
        if job is not None:
            job.progress, job.progress_note = rec.fraction, rec.note

    def _apply_created(self, rec: JobCreated) -> None:
        if rec.id in self.jobs:
            return
        if rec.run_at is None:
            tpl = self.templates.of(rec)
            if tpl is not None:  # a pristine job: a shared template and a blob
                self._add_pristine(tpl, [rec.id], [blob_of(rec)], [(rec.priority, 0, 1)])
                return
        status = "scheduled" if rec.run_at is not None else "queued"
        self._add(Job.of(rec, JobLife(status, run_at=rec.run_at)))

    def _apply_created_many(self, rec: JobsCreated) -> None:
        self._add_pristine(self.templates.intern(rec.template), rec.ids, rec.blobs, rec.runs)

    def _add_pristine(
        self,
        tpl: JobCreated,
        ids: list[str],
        blobs: list[bytes],
        runs: list[tuple[int, int, int]] | None,
    ) -> None:
        """Add pristine jobs of one template, in creation order: the batch
        form of :meth:`_add` (no callbacks, unique key or schedule to see to).
        ``runs``: their runs of one priority, or None to read them off the
        blobs.

        Live, a batch is made of ids no job had (decide_create), but a log
        that a repair lost a record of (a Removed) can revive a job whose id
        a later batch reused: the job that exists stays, as for one
        JobCreated (and the first of an id repeated within the batch). No
        cold job is looked for among the ids (a lookup by hash per id would
        cost a replay more than the cold batches save): cold jobs come from
        indexes of logs the broker wrote, where ids are new, and a repair
        removes every index and checkpoint."""
        if len(ids) != len(blobs):
            raise ValueError(f"a batch of {len(ids)} job ids has {len(blobs)} blobs")
        new = list(map(Job, ids, repeat(tpl), blobs, repeat(PRISTINE)))  # at C speed
        # One lookup per id, at C speed: setdefault gives back the job that
        # holds the id, and jobs compare by identity (the list compare too).
        held = list(map(partial(dict.setdefault, self.jobs), ids, new))
        if held != new:
            fresh = [i for i, (h, n) in enumerate(zip(held, new, strict=True)) if h is n]
            new, blobs, runs = [new[i] for i in fresh], [blobs[i] for i in fresh], None
            if not new:
                return
        self.index.extend(new)
        self._next_seq = max(self._next_seq, new[-1].seq + 1)
        queue = tpl.queue or DEFAULT_QUEUE
        self.counts[queue, tpl.task, "queued"] += len(new)
        sizes = list(map(len, blobs))
        self.live_bytes += (JOB_OVERHEAD_BYTES - BLOB_HEAD.size) * len(new) + sum(sizes)
        self.largest_blob = max(self.largest_blob, max(sizes))
        self.ready.add_new(new, runs or priority_runs(blobs))
        self.expiring.add_batch(tpl, new)

    def _apply_cold(self, ref: ColdRef) -> None:
        """A batch of pristine jobs an index described, left cold: counted
        and placed as :meth:`_add_pristine` would, with no object per job.
        A batch older than a job indexed already (never so in a log the
        broker wrote) is read back and applied at once instead."""
        cold = self.jobs.cold = self.jobs.cold or self._cold
        if cold is None:
            raise ValueError("a cold batch with no index attached")
        batch = ref.batch
        if batch.first_seq <= self.index.last_seq():
            self._apply_created_many(cold.read(ref.number, batch))
            return
        cold.register(ref)
        self._next_seq = max(self._next_seq, batch.last_seq + 1)
        self.counts[batch.queue, batch.task, "queued"] += batch.count
        head = JOB_OVERHEAD_BYTES - BLOB_HEAD.size
        self.live_bytes += head * batch.count + batch.blob_bytes
        self.largest_blob = max(self.largest_blob, batch.largest_blob)
        self.index.add_cold(ref.number, batch.first_seq, batch.last_seq)
        seqs = (batch.first_seq, batch.last_seq, batch.count)
        runs = self.ready.add_cold(ref.number, batch.queue, batch.task, batch.runs, seqs)
        cold.runs[ref.number] = runs
        if not all(run.placed for run in runs):
            self._warm_batch(ref.number)
            self.ready.place_unplaced(batch.queue, batch.task, runs)

    def attach_cold(
        self, loaded: Loaded, segment: Path, seed: int, index: Path
    ) -> dict[int, ColdRef]:
        """Before a replay reads ``segment`` (CRC ``seed``): take the cold
        batches of ``loaded``, read from the index file ``index`` (a
        compacted base's checkpoint, or a sealed segment's index); returns
        the stand-ins the replay is to yield for their frames (by frame
        offset)."""
        if self._cold is None:
            self._cold = ColdJobs(self._materialise)
        # (the table lets go of it whenever no batch is cold: a later
        # segment's batches take it up again)
        self.jobs.cold = self._cold
        first = self._cold_numbers
        self._cold_numbers += len(loaded.batches)
        self.jobs.cold.add_source(loaded, segment, seed, index, first)
        return {b.offset: ColdRef(first + i, b) for i, b in enumerate(loaded.batches)}

    def replayed(self) -> None:
        """The replay is over: the segments cold batches are read from close
        once none is cold (see ColdJobs.replayed)."""
        if self._cold is not None:
            self._cold.replayed()

    def _warm_batch(self, number: int) -> None:
        """Warm cold batch ``number`` if it is still cold (see ColdJobs.warm)."""
        cold = self.jobs.cold
        if cold is not None and number in cold.batches:
            cold.warm(number)
            if not cold.batches:
                self.jobs.cold = None

    def _materialise(self, rec: JobsCreated, number: int) -> list[Job]:
        """A cold batch, read back: its jobs join the table and the index
        (they were counted and placed when it was registered)."""
        tpl = self.templates.intern(rec.template)
        new = list(map(Job, rec.ids, repeat(tpl), rec.blobs, repeat(PRISTINE)))
        dict.update(self.jobs, zip(rec.ids, new, strict=True))
        self.index.warmed(number, new)
        return new

    def _apply_snapshot(self, rec: JobSnapshot) -> None:
        """A whole job from compaction: its creation record and its state."""
        if self.jobs.cold is not None:
            self.jobs.cold.warm_id(rec.job.id)
        self._add(Job.of(rec.job, JobLife.of_snapshot(rec)))

    def _add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.index.add(job)
        self.awaited.add(job.id, [job.tpl])
        self._next_seq = max(self._next_seq, job.seq + 1)
        self.counts[job.queue, job.task, job.status] += 1
        if job.reserved:
            self.reserved[job.queue, job.task] += 1
        self.live_bytes += job.size()
        self.unique.claim(job)
        self._place(job)
        self.expiring.add(job)

    def _apply_leased(self, rec: Leased) -> None:
        self._lease(rec.id, rec.lease, rec.worker)

    def _apply_leased_many(self, rec: LeasedMany) -> None:
        for i, job_id in enumerate(rec.ids):
            self._lease(job_id, rec.first_lease + i, rec.worker)

    def _lease(self, job_id: str, lease: int, worker: str) -> None:
        """Reserved for a worker: still ``queued`` (in its prefetch buffer),
        off the ready heap, no attempt counted yet."""
        job = self.jobs.get(job_id)
        if job is None or job.status in TERMINAL:
            return
        if job.lease:  # a lease the broker lost track of: the newer one holds
            self._unlease(job)
        if job.status != "queued":  # due and promoted: promotion is not logged
            if job.status in WAITING:
                self.timers.left()
            self._set_status(job, "queued")
        job.lease = lease
        job.worker = worker
        self.reserved[job.queue, job.task] += 1

    def _apply_started(self, rec: Started) -> None:
        job = self.holding(rec.id, rec.lease)
        if job is None or job.status != "queued":
            return
        self._start(job, TryRec(rec.attempt, rec.worker, rec.host, rec.pid, started_at=rec.at))

    def _start(self, job: Job, try_: TryRec) -> None:
        """A reserved job's handler began: it is running, the try counts
        (until it ends uncounted), and ``try_.attempt`` is its run number."""
        self._unreserve(job)
        job.attempts += 1
        job.runs = try_.attempt
        job.tries.append(try_)
        if len(job.tries) > MAX_TRIES:
            del job.tries[1]  # the first stays: it says when the job started
        self._set_status(job, "running")

    def _apply_finished(self, rec: Finished) -> None:
        self.latest_at = max(self.latest_at, rec.at)
        job = self.holding(rec.id, rec.lease)
        if job is None:
            return
        if job.status == "queued":  # ended without a start on record: it started
            at = rec.started_at if rec.started_at is not None else rec.at
            self._start(job, TryRec(job.runs + 1, job.worker, "", 0, started_at=at))
        if job.tries:
            last = job.tries[-1]
            started = rec.started_at if rec.started_at is not None else last.started_at
            job.tries[-1] = msgspec.structs.replace(
                last, started_at=started, ended_at=rec.at, error=rec.error
            )
        if not rec.counted:
            job.attempts -= 1
        if rec.retried:
            job.retries += 1
        job.lease = 0
        job.worker = ""
        job.error = rec.error
        if rec.status in TERMINAL:
            self.live_bytes -= job.size()
            job.result = rec.result
            job.ended_at = rec.at
            self.live_bytes += job.size()
        job.run_at = rec.next_run_at if rec.status in WAITING else job.run_at
        self._set_status(job, rec.status)
        self._place(job)
        if rec.status in TERMINAL:
            self._ended(job)

    def _apply_returned(self, rec: Returned) -> None:
        job = self.holding(rec.id, rec.lease)
        if job is None:
            return
        self._unlease(job)

    def _unlease(self, job: Job) -> None:
        """Put a held job back as queued, as if it had never been leased: a
        reserved one as it was, a running one with its try dropped and its
        attempt not counted."""
        if job.status == "running":
            job.attempts -= 1
            job.runs -= 1
            if job.tries:
                job.tries.pop()
        else:
            self._unreserve(job)
        job.lease = 0
        job.worker = ""
        self._set_status(job, "queued")
        self._place(job)

    def _apply_cancelled(self, rec: Cancelled) -> None:
        self.latest_at = max(self.latest_at, rec.at)
        job = self.jobs.get(rec.id)
        if job is None or job.status in TERMINAL:
            return
        if job.reserved:
            self._unreserve(job)
        if job.in_ready and job.is_ready:
            self.ready.left(job)
        if job.status in WAITING:
            self.timers.left()
        if job.status == "running" and job.tries and job.tries[-1].ended_at is None:
            error = ErrorRec("Cancelled", "the job was cancelled while running")
            job.tries[-1] = msgspec.structs.replace(job.tries[-1], ended_at=rec.at, error=error)
        job.lease = 0
        job.worker = ""
        job.ended_at = rec.at
        if rec.reason == EXPIRED:
            job.error = expired_error(job)
        self._set_status(job, "cancelled")
        self._place(job)
        self._ended(job)

    def _apply_requeued(self, rec: Requeued) -> None:
        self.latest_at = max(self.latest_at, rec.at)
        job = self.jobs.get(rec.id)
        if job is None or job.status not in ("failed", "cancelled"):
            return
        self.live_bytes -= job.size()
        job.attempts = 0  # a fresh budget; the run numbers go on
        job.retries = 0
        job.error = None
        job.ended_at = None
        job.result = None
        self.live_bytes += job.size()
        self._set_status(job, "queued")
        self.unique.claim(job)
        self._place(job)
        self.expiring.add(job)
        if job.flow is not None:
            self.flowbook.member_reopened(job.flow, job.id)
            flow = self.flows.get(job.flow)
            if flow is not None:  # it goes on: its later jobs hold their keys again
                self.unique.reserve(flow)

    def _set_status(self, job: Job, status: str) -> None:
        counts = self.counts
        queue, task = job.queue, job.task
        key = (queue, task, job.status)
        left = counts[key] - 1
        if left:
            counts[key] = left
        else:
            del counts[key]
        job.status = status
        counts[queue, task, status] += 1

    def _unreserve(self, job: Job) -> None:
        """One reserved job of its (queue, task) fewer (none: no key)."""
        key = (job.queue, job.task)
        left = self.reserved[key] - 1
        if left:
            self.reserved[key] = left
        else:
            del self.reserved[key]

    def _place(self, job: Job) -> None:
        """Put a job on the heap its status calls for."""
        if job.status == "queued":
            self.ready.add(job)
        elif job.status in WAITING:
            self.timers.push(job)
        elif job.status in TERMINAL:
            self.expiry.add(job)
            self.expiring.left(job)

    def _remove(self, job_id: str) -> Job | None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.index.removed(job)
            self.followed.discard(job_id)
            self.awaited.drop(job_id, [job.tpl])
            if job.in_ready and job.is_ready:
                self.ready.left(job)
            if job.status in WAITING:
                self.timers.left()
            if job.status in ACTIVE:
                self.expiring.left(job)
            if job.flow is not None:
                self.flowbook.touched.add(job.flow)
            key = (job.queue, job.task, job.status)
            left = self.counts[key] - 1
            if left:
                self.counts[key] = left
            else:
                del self.counts[key]
            if job.reserved:
                self._unreserve(job)
            self.live_bytes -= job.size()
            self.unique.release(job)
            self.expiry.discard(job_id)
        return job

    # ------------------------------------------------------- recovery, time

    def recovery_records(self) -> list[Returned]:
        """After replay: jobs that workers held when the broker stopped
        (reserved or running) go back to their queue, an interrupted try not
        counted. The broker logs these records, so a later replay sees the
        same."""
        lived = touched(self.jobs.warm_values())
        return [Returned(job.id, job.lease) for job in lived if job.lease]

    def held_jobs(self, lived: list[Job] | None = None) -> list[Job]:
        """After replay: the jobs workers held when the broker stopped
        (reserved or running), each with its lease and worker. ``lived``:
        the jobs that are not pristine, if the caller has them already."""
        return [
            job
            for job in (touched(self.jobs.warm_values()) if lived is None else lived)
            if job.lease
        ]

    def recover(self) -> int:
        """Apply :meth:`recovery_records` without logging them; returns how many."""
        records = self.recovery_records()
        for record in records:
            self.apply(record)
        return len(records)

    def promote_due(self, now: float) -> int:
        """Move scheduled and retrying jobs whose time has come to their queue."""
        promoted = 0
        for job in self.timers.due(now):
            self._set_status(job, "queued")
            self._place(job)
            promoted += 1
        return promoted

    def next_wakeup(self) -> float | None:
        """When the earliest waiting job is due, if any."""
        return self.timers.next_due()

    def expired(self, now: float) -> list[str]:
        """The finished jobs past their TTL, to be removed (the broker logs a
        Removed for each, so that a replay never revives one whose id a
        newer job has taken since)."""
        return self.expiry.due(now)

    def expire(self, now: float) -> list[str]:
        """Remove :meth:`expired` jobs without logging; returns their ids."""
        gone = self.expired(now)
        for job_id in gone:
            self._remove(job_id)
        return gone

    # --------------------------------------------------------- dispatching

    def pop_ready(self, queue: str) -> Job | None:
        """The next ready job of ``queue``, taken off its heap (see
        :meth:`ReadyQueues.pop`; the caller leases it or calls :meth:`push_back`)."""
        return self.ready.pop(queue)

    def push_back(self, job: Job) -> None:
        """Undo :meth:`pop_ready` for a job that could not be sent."""
        self._place(job)

    # ------------------------------------------------------------ decisions

    def holding(self, job_id: str, lease: int) -> Job | None:
        """The job if a worker holds it under ``lease`` (reserved or
        running): the fence every report from a worker goes through (a
        stale lease gets None; every end of a lease zeroes it). A held job
        is never cold, so the table's own lookup serves (no warming)."""
        job = dict.get(self.jobs, job_id)
        if job is None or not lease or job.lease != lease:
            return None
        return job

    @property
    def next_seq(self) -> int:
        """The creation number the next job will take (jobs made so far + 1)."""
        return self._next_seq

    def take_seq(self) -> int:
        """The next creation number."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def holder_of(self, unique_key: str | None, now: float) -> str | None:
        """The id of the job that holds ``unique_key`` now (see UniqueKeys)."""
        return self.unique.holder_of(unique_key, now)

    def decide_create(
        self,
        spec: JobSpec,
        now: float,
        *,
        validated: bool = False,
        flow: str | None = None,
        step: int = 0,
        prev_result: msgspec.Raw = NIL,
    ) -> JobCreated | None:
        """The record that creates ``spec`` now, or None when a job with that
        id exists (a resent enqueue, or a follow-up created before). The
        record keeps every option of the spec, with the queue resolved and
        ``delay`` folded into ``run_at`` (epoch seconds; None: due now).
        ``delay`` is kept too: a step of the wall clock moves such a run_at.
        ``flow``/``step`` place it in a chain or group, and ``prev_result``
        is what its handler gets as ``ctx.prev_result``. Raises InvalidJob
        for a spec it refuses (unless the caller ``validated`` it already).
        The caller checks :meth:`holder_of` for unique keys first."""
        if spec.id in self.jobs:
            return None
        if not validated:
            validate_spec(spec)
        run_at = spec.run_at
        if spec.delay is not None and spec.delay > 0:
            run_at = now + spec.delay
        if run_at is not None and run_at <= now:
            run_at = None
        fields = msgspec.structs.asdict(spec)
        fields.update(
            queue=spec.queue or self._task_queue(spec.task),
            run_at=run_at,
            payload=msgspec.Raw(bytes(spec.payload)),  # not a view of the request's frame
        )
        return JobCreated(
            **fields,
            seq=self.take_seq(),
            created_at=now,
            flow=flow,
            step=step,
            prev_result=prev_result,
            task_options=self.tasks.get(spec.task),
        )

    def batched(self, created: list[JobCreated]) -> list[Record]:
        """``created`` (creation records made now, in order) as records to
        log: each run of plain jobs of one template as one ``JobsCreated``
        (see :class:`~corral.broker.job.Job`), any other job as it is."""
        out: list[Record] = []
        run: list[JobCreated] = []
        tpl: JobCreated | None = None
        size = 0
        for rec in created:
            this = self.templates.of(rec)
            weight = len(rec.payload) + len(rec.id)
            if run and (this is not tpl or _batch_full(len(run), size + weight)):
                out.append(_many(tpl, run) if len(run) > 1 else run[0])
                run, size = [], 0
            if this is None:
                out.append(rec)
                continue
            tpl = this
            run.append(rec)
            size += weight
        if run:
            out.append(_many(tpl, run) if len(run) > 1 else run[0])
        return out

    def _task_queue(self, task: str) -> str:
        """The queue the task declared (as its workers registered it), else
        ``"default"``."""
        options = self.tasks.get(task)
        return options.queue if options is not None and options.queue else DEFAULT_QUEUE

    def max_attempts(self, job: Job) -> int:
        """The job's attempt budget (the job's, else its task's, else the broker's)."""
        return self.policy.max_attempts(job)

    def timeout(self, job: Job) -> float | None:
        """Seconds one attempt may run, or None (the job's, else its task's)."""
        return self.policy.timeout(job)

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> Iterator[Record]:
        """What compaction writes: see :func:`snapshot`."""
        return snapshot(self)


def checkpoint_frames(
    state: JobState, base: Path, generation: int, seq: int, size: int, sealed: bool = True
) -> dict[int, ColdRef] | None:
    """What a replay asks before it reads segment ``seq`` (file ``base``,
    ``size`` bytes) of log ``generation`` (see :meth:`Log.replay
    <corral.broker.log.Log.replay>`): the frames to leave cold, by offset,
    with ``state`` ready for them (see :func:`index_frames` for a sealed
    segment, and :func:`chunk_frames` for one without a whole index or
    still being written, ``sealed`` False); None to replay it in full."""
    if sealed:
        frames = index_frames(state, base, generation, seq, size)
        if frames is not None:
            return frames
    return chunk_frames(state, base, generation, seq)[0]


def index_frames(
    state: JobState, base: Path, generation: int, seq: int, size: int
) -> dict[int, ColdRef] | None:
    """The frames of sealed segment ``seq`` (file ``base``, ``size``
    bytes) of log ``generation`` to leave cold, by offset, from its
    checkpoint (a compacted base's, see broker/checkpoint.py) or its whole
    index (see broker/segindex.py) if it has a valid one, with ``state``
    ready for them (empty: a valid index that names none); None if it has
    neither. Checkpoints of other bases, and indexes of segments before
    the base, are removed."""
    directory = base.parent
    seed = segment_seed(FORMAT_VERSION, generation, seq)
    if seq == _first_segment(directory, seq):
        checkpoint.remove_others(directory, keep=seq)
        remove_indexes(directory, below=seq)  # of segments no longer in the log
        loaded = checkpoint.load(directory, generation, seq, base)
        if loaded is not None and loaded.batches:
            return state.attach_cold(loaded, base, seed, checkpoint.ckpt_path(directory, seq))
    index = checkpoint.idx_path(directory, seq)
    loaded = checkpoint.load(directory, generation, seq, base, index)
    if loaded is None:
        return None
    if not loaded.batches:
        return {}  # indexed: nothing in it may be cold
    return state.attach_cold(loaded, base, seed, index)


def chunk_frames(
    state: JobState, segment: Path, generation: int, seq: int
) -> tuple[dict[int, ColdRef] | None, int]:
    """The frames of segment ``seq`` (file ``segment``) of log
    ``generation`` that its valid chunk indexes (see broker/segindex.py)
    leave cold, by offset (None: it has none), with ``state`` ready for
    them; and how far valid chunks cover it back to back from its start
    (its header's end if none does). A chunk that cannot be used is
    removed (a later one is written in its place)."""
    directory = segment.parent
    seed = segment_seed(FORMAT_VERSION, generation, seq)
    frames: dict[int, ColdRef] | None = None
    covered = HEADER_SIZE
    for start, end, path in checkpoint.chunks_of(directory, seq):
        loaded = checkpoint.load_chunk(generation, seq, segment, start, end, path)
        if loaded is None:
            path.unlink(missing_ok=True)
            continue
        if start == covered:
            covered = end
        frames = {} if frames is None else frames
        if loaded.batches:
            frames.update(state.attach_cold(loaded, segment, seed, path))
    return frames, covered


def _first_segment(directory: Path, seq: int) -> int:
    """``seq`` if it is the log's first segment (the base a replay starts
    at: no segment ``seq - 1`` is left), else 0."""
    return seq if not (directory / f"{seq - 1:020d}.seg").exists() else 0


class CheckpointBatches:
    """What a restart checkpoint of a base names (see broker/checkpoint.py):
    its ``JobsCreated`` frames, told by :func:`write_base`'s ``on_frame``.
    A batch of jobs with ``expires`` is left out (each such job is watched
    one by one, so it is no cheaper cold)."""

    def __init__(self) -> None:
        self.found: list[tuple[ColdBatch, list[str]]] = []

    def on_frame(self, record: Record, offset: int, length: int) -> None:
        if not isinstance(record, JobsCreated) or record.template.expires is not None:
            return
        self.found.append((describe_batch(record, offset, length), list(record.ids)))


def snapshot(state: JobState) -> Iterator[Record]:
    """Every live job as one record, in creation order, after the paused
    queues, the schedules' last fires, the sum of the wall-clock steps, the
    starts so far with the latest time the log proved (after the steps, on
    whose clock it is) and the flows that still have jobs."""
    for name, options in sorted(state.tasks.items()):
        yield TaskRegistered(name, options)
    for queue in sorted(state.paused):
        yield QueuePaused(queue, True)
    for name, due_at in sorted(state.last_fired.items()):
        yield ScheduleFired(name, due_at)
    if state.wall_steps:  # before the jobs, whose run_at it has moved already
        yield ClockStepped(state.wall_steps, 0.0)
    if state.epoch:
        yield BrokerStarted(state.epoch, state.latest_at)
    for record in state.flowbook.snapshot():
        yield record
        if isinstance(record, FlowCreated) and record.id in state.followed:
            yield FollowedUp(record.id, [])
    yield from _job_records(state)


def _job_records(state: JobState) -> Iterator[Record]:
    """Every job in creation order: runs of pristine jobs of one template
    as ``JobsCreated`` records, any other job as a ``JobSnapshot``."""
    batch: list[Job] = []
    size = 0
    for job in state.index:
        blob = job.blob
        if job.pristine and blob is not None:
            weight = len(blob) + len(job.id)
            if batch and (batch[0].tpl is not job.tpl or _batch_full(len(batch), size + weight)):
                yield _created_many(batch)
                batch, size = [], 0
            batch.append(job)
            size += weight
            continue
        if batch:
            yield _created_many(batch)
            batch, size = [], 0
        # A held job keeps its lease, so that a Started or Finished record
        # logged after the snapshot still applies on replay.
        fields = {name: getattr(job, name) for name in SNAPSHOT_STATE}
        fields["tries"] = list(job.tries)
        if job.result is None:
            fields["result"] = NIL
        yield JobSnapshot(job.created, **fields)
        if job.id in state.followed:
            yield FollowedUp(job.id, [])
    if batch:
        yield _created_many(batch)


#: At most this many jobs, and about this many bytes of ids and payloads,
#: per ``JobsCreated`` record (a record may be at most
#: :data:`~corral.broker.framing.MAX_RECORD`; a job alone over the byte
#: bound is a batch of one).
BATCH_JOBS = 512
BATCH_BYTES = 4 * 2**20


def _batch_full(jobs: int, size: int) -> bool:
    """A batch of ``jobs`` jobs can take no more, or not one that would bring
    its ids and payloads to ``size`` bytes."""
    return jobs >= BATCH_JOBS or size > BATCH_BYTES


def _many(tpl: JobCreated | None, records: list[JobCreated]) -> JobsCreated:
    """Creation records of plain jobs of template ``tpl`` as one record."""
    assert tpl is not None
    return JobsCreated(
        tpl,
        [rec.id for rec in records],
        [blob_of(rec) for rec in records],
        runs_of([rec.priority for rec in records]),
    )


def _created_many(jobs: list[Job]) -> JobsCreated:
    """Pristine jobs of one template as one record."""
    return JobsCreated(
        jobs[0].tpl,
        [job.id for job in jobs],
        [job.blob or b"" for job in jobs],
        runs_of([job.priority for job in jobs]),
    )
