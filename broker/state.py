"""The broker's job state, pure: no sockets, no files, no clocks.

Every change to a job goes through :meth:`JobState.apply` with a log record,
both live (log first, then apply) and on replay, so the two can never
disagree. Decisions that need a clock or randomness (when to retry, what a
try's outcome means) are made by the ``decide_*`` methods, which return the
record to log; time always comes in as ``now`` (epoch seconds).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from corral.broker.jobspec import NIL, JobSpec
from corral.broker.protocol import STATUSES, TERMINAL
from corral.broker.records import (
    Cancelled,
    ErrorRec,
    Finished,
    FlowCreated,
    JobCreated,
    JobSnapshot,
    Leased,
    ProgressNoted,
    QueuePaused,
    Record,
    Removed,
    Requeued,
    Returned,
    ScheduleFired,
    TryRec,
)

__all__ = [
    "ACTIVE",
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

ACTIVE = frozenset({"queued", "scheduled", "running", "retrying"})
WAITING = frozenset({"scheduled", "retrying"})
#: Rough per-job overhead in the log, for the compaction trigger.
JOB_OVERHEAD_BYTES = 160


class InvalidJob(ValueError):
    """A job spec the broker refuses; the message says which field and why."""


@dataclass(frozen=True)
class Defaults:
    """Broker-wide defaults for what neither the job nor its task sets."""

    max_attempts: int = 5
    result_ttl: float = 86400.0
    failed_ttl: float = 30 * 86400.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0


@dataclass(frozen=True)
class TaskDefaults:
    """A task's options as its workers registered them."""

    max_attempts: int | None = None
    timeout: float | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    result_ttl: float | None = None


@dataclass(eq=False, slots=True)
class Job:
    """One job: its creation record (what was asked, never changed), and
    what has happened to it since. The second part has the same field names
    as :class:`~corral.broker.records.JobSnapshot`, which copies it."""

    created: JobCreated
    status: str = "queued"
    attempts: int = 0
    tries: list[TryRec] = field(default_factory=list)
    #: When a scheduled or retrying job is due (epoch seconds).
    run_at: float | None = None
    result: msgspec.Raw | None = None
    error: ErrorRec | None = None
    ended_at: float | None = None
    lease: int = 0
    worker: str = ""
    progress: float | None = None
    progress_note: str = ""
    #: An entry for this job is on its queue's ready heap.
    in_ready: bool = False

    # What was asked, read through the creation record.
    @property
    def id(self) -> str:
        return self.created.id

    @property
    def seq(self) -> int:
        return self.created.seq

    @property
    def task(self) -> str:
        return self.created.task

    @property
    def queue(self) -> str:
        return self.created.queue or DEFAULT_QUEUE

    @property
    def priority(self) -> int:
        return self.created.priority

    @property
    def payload(self) -> msgspec.Raw:
        return self.created.payload

    @property
    def created_at(self) -> float:
        return self.created.created_at

    @property
    def max_attempts(self) -> int | None:
        return self.created.max_attempts

    @property
    def timeout(self) -> float | None:
        return self.created.timeout

    @property
    def unique_key(self) -> str | None:
        return self.created.unique_key

    @property
    def unique_for(self) -> float | None:
        return self.created.unique_for

    @property
    def result_ttl(self) -> float | None:
        return self.created.result_ttl

    @property
    def flow(self) -> str | None:
        return self.created.flow

    @property
    def step(self) -> int:
        return self.created.step

    @property
    def prev_result(self) -> msgspec.Raw:
        return self.created.prev_result

    @property
    def on_success(self) -> JobSpec | None:
        return self.created.on_success

    @property
    def on_failure(self) -> JobSpec | None:
        return self.created.on_failure

    @property
    def next_run_at(self) -> float | None:
        return self.run_at if self.status in WAITING else None

    def size(self) -> int:
        result = len(self.result) if self.result is not None else 0
        return JOB_OVERHEAD_BYTES + len(self.payload) + result


#: The fields of a job's state that a snapshot copies (all but ``job``).
_SNAPSHOT_STATE = JobSnapshot.__struct_fields__[1:]
DEFAULT_QUEUE = "default"


class JobState:
    """All jobs, the ready heaps per queue, the timer heap of waiting jobs,
    and counts per queue and status."""

    def __init__(self, defaults: Defaults | None = None) -> None:
        self.defaults = defaults or Defaults()
        self.jobs: dict[str, Job] = {}
        self.tasks: dict[str, TaskDefaults] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.paused: set[str] = set()
        #: schedule name -> the due time it last fired for.
        self.last_fired: dict[str, float] = {}
        #: chains and groups by id.
        self.flows: dict[str, FlowCreated] = {}
        #: unique_key -> the id of the newest job that holds it.
        self.unique: dict[str, str] = {}
        self.live_bytes = 0
        self._next_seq = 1
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._waiting: list[tuple[float, int, str]] = []
        self._expiry: list[tuple[float, int, str]] = []
        self._rng = random.Random()
        #: How each record type changes the state.
        self._changes: dict[type[Record], Callable[[Any], None]] = {
            JobCreated: self._apply_created,
            Leased: self._apply_leased,
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
        }

    # ------------------------------------------------------------ apply

    def apply(self, record: Record) -> None:
        """Change the state as ``record`` says. Deterministic: no clock.
        Raises TypeError for a record type it does not know."""
        try:
            change = self._changes[type(record)]
        except KeyError:
            raise TypeError(f"no state change for record {type(record).__name__}") from None
        change(record)

    def _apply_removed(self, rec: Removed) -> None:
        self._remove(rec.id)

    def _apply_flow(self, rec: FlowCreated) -> None:
        self.flows.setdefault(rec.id, rec)

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
        status = "scheduled" if rec.run_at is not None else "queued"
        self._add(Job(rec, status=status, run_at=rec.run_at))

    def _apply_snapshot(self, rec: JobSnapshot) -> None:
        """A whole job from compaction: its creation record and its state."""
        state = {name: getattr(rec, name) for name in _SNAPSHOT_STATE}
        state["tries"] = list(rec.tries)
        self._add(Job(rec.job, **state))

    def _add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._next_seq = max(self._next_seq, job.seq + 1)
        self.counts[job.queue, job.status] += 1
        self.live_bytes += job.size()
        self._claim_key(job)
        self._place(job)

    def _apply_leased(self, rec: Leased) -> None:
        job = self.jobs.get(rec.id)
        if job is None:
            return
        if job.status == "running" and job.tries and job.tries[-1].ended_at is None:
            # The broker stopped during the previous lease; recover() dropped
            # that try then, so replay drops it here too.
            job.tries.pop()
        self._set_status(job, "running")
        job.attempts = rec.attempt
        job.lease = rec.lease
        job.worker = rec.worker
        job.tries.append(TryRec(rec.attempt, rec.worker, rec.host, rec.pid, started_at=rec.at))

    def _apply_finished(self, rec: Finished) -> None:
        job = self.holding(rec.id, rec.lease)
        if job is None:
            return
        if job.tries:
            last = job.tries[-1]
            started = rec.started_at if rec.started_at is not None else last.started_at
            job.tries[-1] = msgspec.structs.replace(
                last, started_at=started, ended_at=rec.at, error=rec.error
            )
        if not rec.counted:
            job.attempts -= 1
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

    def _apply_returned(self, rec: Returned) -> None:
        job = self.holding(rec.id, rec.lease)
        if job is None:
            return
        self._unlease(job)

    def _unlease(self, job: Job) -> None:
        """Put a running job back as queued, as if it had never been leased."""
        job.attempts -= 1
        if job.tries:
            job.tries.pop()
        job.lease = 0
        job.worker = ""
        self._set_status(job, "queued")
        self._place(job)

    def _apply_cancelled(self, rec: Cancelled) -> None:
        job = self.jobs.get(rec.id)
        if job is None or job.status in TERMINAL:
            return
        if job.status == "running" and job.tries and job.tries[-1].ended_at is None:
            error = ErrorRec("Cancelled", "the job was cancelled while running")
            job.tries[-1] = msgspec.structs.replace(job.tries[-1], ended_at=rec.at, error=error)
        job.lease = 0
        job.worker = ""
        job.ended_at = rec.at
        self._set_status(job, "cancelled")
        self._place(job)

    def _apply_requeued(self, rec: Requeued) -> None:
        job = self.jobs.get(rec.id)
        if job is None or job.status not in ("failed", "cancelled"):
            return
        self.live_bytes -= job.size()
        job.attempts = 0
        job.error = None
        job.ended_at = None
        job.result = None
        self.live_bytes += job.size()
        self._set_status(job, "queued")
        self._claim_key(job)
        self._place(job)

    def _claim_key(self, job: Job) -> None:
        """``job`` holds its unique key unless another, active job does (in
        whatever order jobs are added: live, replayed or from snapshots)."""
        if not job.unique_key:
            return
        current = self.jobs.get(self.unique.get(job.unique_key, ""))
        free = current is None or current is job or current.status not in ACTIVE
        newer_active = job.status in ACTIVE and current is not None and current.seq < job.seq
        if free or newer_active:
            self.unique[job.unique_key] = job.id

    def _set_status(self, job: Job, status: str) -> None:
        counts = self.counts
        counts[job.queue, job.status] -= 1
        job.status = status
        counts[job.queue, status] += 1

    def _place(self, job: Job) -> None:
        """Put a job on the heap its status calls for."""
        if job.status == "queued":
            if not job.in_ready:
                job.in_ready = True
                heap = self._ready.setdefault(job.queue, [])
                heapq.heappush(heap, (-job.priority, job.seq, job.id))
        elif job.status in WAITING and job.run_at is not None:
            heapq.heappush(self._waiting, (job.run_at, job.seq, job.id))
        elif job.status in TERMINAL:
            heapq.heappush(self._expiry, (self._expires_at(job), job.seq, job.id))

    def _remove(self, job_id: str) -> Job | None:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.counts[job.queue, job.status] -= 1
            self.live_bytes -= job.size()
            if job.unique_key and self.unique.get(job.unique_key) == job_id:
                del self.unique[job.unique_key]
        return job

    # ------------------------------------------------------- recovery, time

    def recovery_records(self) -> list[Returned]:
        """After replay: jobs that were running when the broker stopped go
        back to their queue, their interrupted try not counted. The broker
        logs these records, so a later replay sees the same."""
        return [
            Returned(job.id, job.lease) for job in self.jobs.values() if job.status == "running"
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
        while self._waiting and self._waiting[0][0] <= now:
            _, _, job_id = heapq.heappop(self._waiting)
            job = self.jobs.get(job_id)
            if job is None or job.status not in WAITING or job.run_at is None:
                continue
            if job.run_at > now:  # stale entry; a newer one is on the heap
                continue
            self._set_status(job, "queued")
            self._place(job)
            promoted += 1
        return promoted

    def next_wakeup(self) -> float | None:
        """When the earliest waiting job is due, if any."""
        while self._waiting:
            run_at, _, job_id = self._waiting[0]
            job = self.jobs.get(job_id)
            if job is not None and job.status in WAITING and job.run_at == run_at:
                return run_at
            heapq.heappop(self._waiting)
        return None

    def expired(self, now: float) -> list[str]:
        """The finished jobs past their TTL, to be removed (the broker logs a
        Removed for each, so that a replay never revives one whose id a
        newer job has taken since)."""
        due: dict[str, None] = {}  # a job requeued and ended again has two entries
        while self._expiry and self._expiry[0][0] <= now:
            _, _, job_id = heapq.heappop(self._expiry)
            job = self.jobs.get(job_id)
            if job is None or job.status not in TERMINAL or self._expires_at(job) > now:
                continue
            due[job_id] = None
        return list(due)

    def expire(self, now: float) -> list[str]:
        """Remove :meth:`expired` jobs without logging; returns their ids."""
        gone = self.expired(now)
        for job_id in gone:
            self._remove(job_id)
        return gone

    def _expires_at(self, job: Job) -> float:
        """When a finished job is forgotten: after its TTL, and never before
        its unique_for window ends (it holds its key until then)."""
        ended = job.ended_at or job.created_at
        held_until = ended + (job.unique_for or 0.0) if job.unique_key else ended
        return max(self._ttl_end(job, ended), held_until)

    def _ttl_end(self, job: Job, ended: float) -> float:
        if job.status == "succeeded":
            ttl = job.result_ttl
            if ttl is None:
                ttl = self._task(job).result_ttl
            return ended + (ttl if ttl is not None else self.defaults.result_ttl)
        return ended + self.defaults.failed_ttl

    # --------------------------------------------------------- dispatching

    def pop_ready(self, queue: str) -> Job | None:
        """The highest-priority, oldest queued job of ``queue``, taken off
        the heap (the caller leases it or calls :meth:`push_back`)."""
        heap = self._ready.get(queue)
        while heap:
            _, seq, job_id = heapq.heappop(heap)
            job = self.jobs.get(job_id)
            if job is None or job.seq != seq:  # left by a removed job of that id
                continue
            job.in_ready = False
            if job.status == "queued":
                return job
        return None

    def push_back(self, job: Job) -> None:
        """Undo :meth:`pop_ready` for a job that could not be sent."""
        self._place(job)

    def has_ready(self, queue: str) -> bool:
        heap = self._ready.get(queue)
        while heap:
            _, seq, job_id = heap[0]
            job = self.jobs.get(job_id)
            if job is not None and job.seq == seq and job.status == "queued":
                return True
            heapq.heappop(heap)
            if job is not None and job.seq == seq:
                job.in_ready = False
        return False

    # ------------------------------------------------------------ decisions

    def holding(self, job_id: str, lease: int) -> Job | None:
        """The job if it is running under ``lease``: the fence every report
        from a worker goes through (a stale lease gets None)."""
        job = self.jobs.get(job_id)
        if job is None or job.status != "running" or job.lease != lease:
            return None
        return job

    def take_seq(self) -> int:
        """The next creation number."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def holder_of(self, unique_key: str | None, now: float) -> str | None:
        """The id of the job that holds ``unique_key`` now: one still active,
        or one that ended less than its ``unique_for`` ago."""
        job = self.jobs.get(self.unique.get(unique_key, "")) if unique_key else None
        if job is None:
            return None
        if job.status in ACTIVE:
            return job.id
        if job.unique_for and job.ended_at is not None and now < job.ended_at + job.unique_for:
            return job.id
        return None

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
            queue=spec.queue or DEFAULT_QUEUE,
            delay=None,
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
        )

    def decide_finish(
        self,
        job: Job,
        kind: str,
        now: float,
        *,
        result: msgspec.Raw | None = None,
        error: ErrorRec | None = None,
        delay: float | None = None,
        started_at: float | None = None,
        rng: random.Random | None = None,
    ) -> Finished:
        """What a try's outcome means for the job. ``kind`` is ``ok``,
        ``error`` (retry with backoff while attempts remain), ``fail`` (no
        more attempts), ``retry`` (again after ``delay``, not counted) or
        ``lost`` (worker gone: requeue at once while attempts remain)."""
        status, next_run_at, counted = "failed", None, True
        if kind == "ok":
            status = "succeeded"
        elif kind == "retry":
            status, counted = "retrying", False
            next_run_at = now + max(0.0, delay or 0.0)
        elif kind in ("error", "lost") and job.attempts < self.max_attempts(job):
            if kind == "lost":
                status = "queued"
            else:
                status = "retrying"
                next_run_at = now + self.backoff(job, rng or self._rng)
        if kind == "retry" and next_run_at is not None and next_run_at <= now:
            status, next_run_at = "queued", None
        return Finished(
            id=job.id,
            lease=job.lease,
            at=now,
            status=status,
            result=msgspec.Raw(bytes(result)) if result is not None else NIL,
            error=error,
            next_run_at=next_run_at,
            started_at=started_at,
            counted=counted,
        )

    def max_attempts(self, job: Job) -> int:
        if job.max_attempts is not None:
            return job.max_attempts
        task = self._task(job).max_attempts
        return task if task is not None else self.defaults.max_attempts

    def timeout(self, job: Job) -> float | None:
        return job.timeout if job.timeout is not None else self._task(job).timeout

    def backoff(self, job: Job, rng: random.Random) -> float:
        """Exponential backoff with equal jitter for the attempt just made."""
        task = self._task(job)
        base = task.retry_backoff if task.retry_backoff is not None else self.defaults.retry_backoff
        cap = (
            task.retry_backoff_max
            if task.retry_backoff_max is not None
            else self.defaults.retry_backoff_max
        )
        exponent = min(max(0, job.attempts - 1), 60)  # 2**60 s is past any cap
        full = min(cap, base * (2.0**exponent))
        return full / 2 + rng.uniform(0, full / 2)

    def _task(self, job: Job) -> TaskDefaults:
        return self.tasks.get(job.task) or _NO_TASK_DEFAULTS

    # -------------------------------------------------------------- views

    def snapshot(self) -> Iterator[Record]:
        """Every live job as one record, in creation order, and the paused
        queues: what compaction writes."""
        for queue in sorted(self.paused):
            yield QueuePaused(queue, True)
        for name, due_at in sorted(self.last_fired.items()):
            yield ScheduleFired(name, due_at)
        for flow in self.flows.values():
            if any(step.id in self.jobs for step in flow.steps):
                yield flow
        for job in sorted(self.jobs.values(), key=lambda j: j.seq):
            # A running job keeps its lease, so that a Finished record logged
            # after the snapshot still applies on replay.
            state = {name: getattr(job, name) for name in _SNAPSHOT_STATE}
            state["tries"] = list(job.tries)
            if job.result is None:
                state["result"] = NIL
            yield JobSnapshot(job.created, **state)

    def list_jobs(
        self,
        queue: str | None = None,
        status: str | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs in creation order after ``cursor``, filtered; and the cursor
        for the next page (None at the end). A cursor is the creation number
        of the last job of a page, so it stays valid if that job is deleted."""
        limit = max(1, limit)
        try:
            after = int(cursor) if cursor else -1
        except ValueError:
            raise InvalidJob(f"cursor: {cursor!r} is not a cursor this broker gave out") from None
        found: list[Job] = []
        for job in sorted(self.jobs.values(), key=lambda j: j.seq):
            if job.seq <= after:
                continue
            if (queue and job.queue != queue) or (status and job.status != status):
                continue
            if task and job.task != task:
                continue
            if len(found) == limit:
                return found, str(found[-1].seq)
            found.append(job)
        return found, None

    @property
    def task_counts(self) -> Counter[tuple[str, str]]:
        """Jobs per (task, status), counted when asked."""
        return Counter((job.task, job.status) for job in self.jobs.values())

    def per_task(self) -> dict[str, dict[str, int]]:
        """Counts per task and status, counted when asked (status is rare;
        status changes are the hot path)."""
        out: dict[str, dict[str, int]] = {}
        for job in self.jobs.values():
            by_status = out.setdefault(job.task, {})
            by_status[job.status] = by_status.get(job.status, 0) + 1
        return out

    def queue_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (queue, status), n in self.counts.items():
            if n:
                out.setdefault(queue, dict.fromkeys(STATUSES, 0))[status] = n
        return out


_NO_TASK_DEFAULTS = TaskDefaults()


#: Number options: the test each must pass when set, and what to say if not.
_NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "delay": (lambda v: v >= 0, "must not be negative"),
    "run_at": (lambda v: True, ""),
    "timeout": (lambda v: v > 0, "must be a positive number of seconds"),
    "result_ttl": (lambda v: v >= 0, "must not be negative"),
    "unique_for": (lambda v: v >= 0, "must not be negative"),
    "max_attempts": (lambda v: v >= 1, "must be at least 1"),
}


def validate_spec(spec: JobSpec) -> None:
    """Refuse a spec the broker cannot take (callbacks included); the error
    names the field. Raises InvalidJob."""
    if not spec.task or len(spec.task) > 200:
        raise InvalidJob("task: must be a non-empty name of at most 200 characters")
    if spec.queue is not None and (not spec.queue or len(spec.queue) > 200):
        raise InvalidJob("queue: must be a non-empty name of at most 200 characters")
    if not spec.id or len(spec.id) > 64:
        raise InvalidJob("id: must be a non-empty string of at most 64 characters")
    for name, (ok, rule) in _NUMBER_RULES.items():
        value = getattr(spec, name)
        if value is None:
            continue
        if not math.isfinite(value):
            raise InvalidJob(f"{name}: must be a finite number, got {value}")
        if not ok(value):
            raise InvalidJob(f"{name}: {rule}, got {value}")
    if not -(2**31) <= spec.priority < 2**31:
        raise InvalidJob(f"priority: must fit in 32 bits, got {spec.priority}")
    for callback in (spec.on_success, spec.on_failure):
        if callback is not None:
            validate_spec(callback)
