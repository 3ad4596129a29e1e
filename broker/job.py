"""One job as the broker holds it, and the defaults its options fall back on.

A :class:`Job` is its creation record (``JobCreated``: what was asked,
never changed) plus what has happened to it since (status, attempts,
tries, result, lease). Pure data: :mod:`corral.broker.state` changes it.
"""

from __future__ import annotations

import itertools
import operator
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from corral.broker.jobspec import NIL, OPTION_NAMES, JobSpec
from corral.broker.records import ErrorRec, JobCreated, JobSnapshot, TaskOptions, TryRec

#: Statuses of a job that has not ended.
ACTIVE = frozenset({"queued", "scheduled", "running", "retrying"})
WAITING = frozenset({"scheduled", "retrying"})
#: Rough per-job overhead in the log, for the compaction trigger.
JOB_OVERHEAD_BYTES = 160
#: The queue of a job enqueued without one.
DEFAULT_QUEUE = "default"


@dataclass(frozen=True)
class Defaults:
    """Broker-wide defaults for what neither the job nor its task sets."""

    max_attempts: int = 5
    result_ttl: float = 86400.0
    failed_ttl: float = 30 * 86400.0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 600.0
    #: Retry requests a job may make before it fails (Sidekiq's default).
    max_retries: int = 25


#: A task's options as its workers registered them (see TaskOptions).
TaskDefaults = TaskOptions


#: The fields of a job's state that a snapshot copies (all but ``job``).
SNAPSHOT_STATE = JobSnapshot.__struct_fields__[1:]
#: A pristine job's blob starts with its creation number, time and priority:
#: int64 ``seq``, float64 ``created_at`` and int32 ``priority``,
#: little-endian; the payload follows. (Priority is the job's own, not its
#: template's, so jobs that each have their own priority share a template.)
BLOB_HEAD = struct.Struct("<qdi")
_HEAD_SIZE = BLOB_HEAD.size


class JobLife:
    """What has happened to a job since its creation: the mutable half of a
    :class:`Job`, made the first time anything happens to it. The field
    names are :class:`~corral.broker.records.JobSnapshot`'s."""

    __slots__ = (
        "attempts",
        "ended_at",
        "error",
        "in_ready",
        "lease",
        "progress",
        "progress_note",
        "result",
        "retries",
        "run_at",
        "runs",
        "status",
        "tries",
        "worker",
    )

    def __init__(
        self, status: str = "queued", run_at: float | None = None, *, in_ready: bool = False
    ) -> None:
        self.status = status
        self.attempts = 0
        self.tries: list[TryRec] = []
        #: When a scheduled or retrying job is due (epoch seconds).
        self.run_at = run_at
        self.result: msgspec.Raw | None = None
        self.error: ErrorRec | None = None
        self.ended_at: float | None = None
        self.lease = 0
        self.worker = ""
        self.progress: float | None = None
        self.progress_note = ""
        #: Times a handler began it (the run number of its last try).
        self.runs = 0
        #: Times its handler asked for a retry (``corral.Retry``).
        self.retries = 0
        #: An entry for this job is on its queue's ready structure.
        self.in_ready = in_ready

    @classmethod
    def of_snapshot(cls, rec: JobSnapshot) -> JobLife:
        """The life a compaction snapshot wrote."""
        life = cls()
        for name in SNAPSHOT_STATE:
            setattr(life, name, getattr(rec, name))
        life.tries = list(rec.tries)
        return life


#: The life every pristine job holds (queued, on its ready lane, nothing
#: happened): one shared object, never changed (its ``tries`` is an empty
#: tuple, so an append fails loudly). A job's ``_life`` is never None, so
#: its fields are read through ``operator.attrgetter`` at C speed.
PRISTINE = JobLife(in_ready=True)
PRISTINE.tries = ()  # type: ignore[assignment]


def _life_field(name: str) -> property:
    """A property reading ``name`` from the job's life (the shared pristine
    one while nothing happened), at C speed, and writing it to the job's own
    life (made on the first write)."""

    def set_(self: Job, value: Any) -> None:
        life = self._life
        if life is PRISTINE:
            life = self._life = JobLife(in_ready=True)
        setattr(life, name, value)

    return property(
        operator.attrgetter(f"_life.{name}"), set_, doc=f"The job's {name} (see :class:`JobLife`)."
    )


def _created_field(name: str) -> property:
    """A read-only property of the creation record's (or template's) field
    ``name``, at C speed."""
    return property(operator.attrgetter(f"tpl.{name}"), doc=f"The job's {name}, as created.")


class Job(msgspec.Struct, gc=False, eq=False):
    """One job: its creation record (what was asked, never changed), and
    what has happened to it since (a :class:`JobLife`, read through
    properties of the same names as :class:`~corral.broker.records.JobSnapshot`'s).

    Memory: a million queued jobs must fit in a few hundred MiB, so a
    *pristine* job (queued, nothing happened yet, no chain, callback, unique
    key or schedule) holds only its id, a template shared by every job with
    the same task and options (a ``JobCreated`` whose id, seq, created_at, priority and
    payload are blank: see :class:`Templates`), and one bytes blob: its seq
    created_at and priority (:data:`BLOB_HEAD`) followed by its payload. Its life is
    made the first time anything happens to it. Any other job keeps its whole
    creation record as ``tpl`` (``blob`` is None).

    A msgspec ``Struct`` (positional ``Job(id, tpl, blob, life)``), not a
    class with ``__init__``: a replay makes a million at C speed, about a
    third of the time, and ``gc=False`` keeps them out of the cyclic
    collector (16 bytes less each). A job references no object that
    references it back (its template, blob and life do not), so it is never
    part of a cycle. ``eq=False``: jobs compare, and hash, by identity."""

    id: str
    #: The creation record, or (with a blob) the shared template.
    tpl: JobCreated
    blob: bytes | None
    #: What happened to it: :data:`PRISTINE` (shared) until anything did.
    _life: JobLife

    @classmethod
    def of(cls, created: JobCreated, life: JobLife) -> Job:
        """A job that keeps its whole creation record."""
        return cls(created.id, created, None, life)

    @property
    def created(self) -> JobCreated:
        """The creation record (rebuilt from the template and blob for a
        pristine job: about a microsecond)."""
        blob = self.blob
        if blob is None:
            return self.tpl
        seq, created_at, priority = BLOB_HEAD.unpack_from(blob)
        return msgspec.structs.replace(
            self.tpl,
            priority=priority,
            id=self.id,
            seq=seq,
            created_at=created_at,
            payload=msgspec.Raw(blob[_HEAD_SIZE:]),
        )

    @property
    def pristine(self) -> bool:
        """Nothing happened to it since its creation."""
        return self._life is PRISTINE

    status = _life_field("status")
    attempts = _life_field("attempts")
    tries = _life_field("tries")
    run_at = _life_field("run_at")
    result = _life_field("result")
    error = _life_field("error")
    ended_at = _life_field("ended_at")
    lease = _life_field("lease")
    worker = _life_field("worker")
    progress = _life_field("progress")
    progress_note = _life_field("progress_note")
    runs = _life_field("runs")
    retries = _life_field("retries")
    in_ready = _life_field("in_ready")

    # What was asked and kept as is: read from the creation record or
    # template at C speed (declared for the type checker as what they are).
    if TYPE_CHECKING:

        @property
        def task(self) -> str: ...

        @property
        def max_attempts(self) -> int | None: ...

        @property
        def timeout(self) -> float | None: ...

        @property
        def unique_key(self) -> str | None: ...

        @property
        def unique_for(self) -> float | None: ...

        @property
        def max_retries(self) -> int | None: ...

        @property
        def result_ttl(self) -> float | None: ...

        @property
        def limit_key(self) -> str | None: ...

        @property
        def headers(self) -> dict[str, str] | None: ...

        @property
        def flow(self) -> str | None: ...

        @property
        def step(self) -> int: ...

        @property
        def prev_result(self) -> msgspec.Raw: ...

        @property
        def on_success(self) -> JobSpec | None: ...

        @property
        def on_failure(self) -> JobSpec | None: ...

        @property
        def task_options(self) -> TaskOptions | None: ...

    else:
        task = _created_field("task")
        max_attempts = _created_field("max_attempts")
        timeout = _created_field("timeout")
        unique_key = _created_field("unique_key")
        unique_for = _created_field("unique_for")
        max_retries = _created_field("max_retries")
        result_ttl = _created_field("result_ttl")
        limit_key = _created_field("limit_key")
        headers = _created_field("headers")
        flow = _created_field("flow")
        step = _created_field("step")
        prev_result = _created_field("prev_result")
        on_success = _created_field("on_success")
        on_failure = _created_field("on_failure")
        task_options = _created_field("task_options")

    # What was asked, read through the creation record or template.
    @property
    def seq(self) -> int:
        blob = self.blob
        return self.tpl.seq if blob is None else BLOB_HEAD.unpack_from(blob)[0]

    @property
    def created_at(self) -> float:
        blob = self.blob
        return self.tpl.created_at if blob is None else BLOB_HEAD.unpack_from(blob)[1]

    @property
    def payload(self) -> msgspec.Raw:
        blob = self.blob
        return self.tpl.payload if blob is None else msgspec.Raw(blob[_HEAD_SIZE:])

    @property
    def payload_size(self) -> int:
        blob = self.blob
        return len(self.tpl.payload) if blob is None else len(blob) - _HEAD_SIZE

    @property
    def queue(self) -> str:
        return self.tpl.queue or DEFAULT_QUEUE

    @property
    def priority(self) -> int:
        blob = self.blob
        return self.tpl.priority if blob is None else BLOB_HEAD.unpack_from(blob)[2]

    @property
    def is_ready(self) -> bool:
        """Queued and held by no worker."""
        life = self._life
        return life.status == "queued" and not life.lease

    @property
    def reserved(self) -> bool:
        """Leased into a worker's prefetch buffer and not started."""
        life = self._life
        return life.status == "queued" and life.lease != 0

    @property
    def next_run_at(self) -> float | None:
        life = self._life
        return life.run_at if life.status in WAITING else None

    def size(self) -> int:
        """Bytes the job takes in the log, roughly (for the compaction trigger)."""
        life = self._life
        result = len(life.result) if life.result is not None else 0
        return JOB_OVERHEAD_BYTES + self.payload_size + result


def touched(jobs: Iterable[Job]) -> list[Job]:
    """The jobs of ``jobs`` that are not pristine (something happened to
    them): a pass over a million jobs that skips the pristine ones at the
    cost of one attribute read each, at C speed, for the start-up checks."""
    every = jobs if isinstance(jobs, list) else list(jobs)
    return list(itertools.compress(every, map(operator.is_not, map(_LIFE, every), _PRISTINES)))


#: A job's life (:data:`PRISTINE` while nothing happened to it).
_LIFE = operator.attrgetter("_life")
#: As many PRISTINEs as :func:`touched` needs.
_PRISTINES = itertools.repeat(PRISTINE)


_UNUSED = 3


class Templates:
    """Shared templates of pristine jobs: one ``JobCreated`` (blank id, seq,
    created_at and payload) per distinct task and options, so a million
    jobs of a few kinds hold a few templates. Only plain jobs qualify (see
    :func:`plain`); the table is capped, and a job that would need a new
    template past the cap keeps its whole record instead."""

    def __init__(self, cap: int = 10_000) -> None:
        self.cap = cap
        self._by_key: dict[tuple[Any, ...], JobCreated] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def of(self, rec: JobCreated) -> JobCreated | None:
        """The shared template for ``rec``, or None if ``rec`` is not plain
        or the table is full."""
        if not plain(rec):
            return None
        key = _key(rec)
        tpl = self._by_key.get(key)
        if tpl is None:
            if len(self._by_key) >= self.cap and not self.prune():
                return None
            tpl = self._by_key[key] = blank(rec)
        return tpl

    def intern(self, tpl: JobCreated) -> JobCreated:
        """``tpl`` (a template read from the log), or the equal one already held."""
        key = _key(tpl)
        held = self._by_key.get(key)
        if held is None:
            if len(self._by_key) >= self.cap and not self.prune():
                return tpl
            held = self._by_key[key] = tpl
        return held

    def prune(self) -> int:
        """Drop the templates no job uses any more (the table's own
        reference is the only one left); returns how many went. O(table):
        run when the table is full, so a stream of one-off kinds of jobs
        makes room for new ones instead of leaving every later job its
        whole record."""
        # Unused, a template is referred to by the dict, the loop variable
        # and getrefcount's argument only.
        unused = {id(tpl) for tpl in self._by_key.values() if sys.getrefcount(tpl) <= _UNUSED}
        gone = [key for key, tpl in self._by_key.items() if id(tpl) in unused]
        for key in gone:
            del self._by_key[key]
        return len(gone)


def plain(rec: JobCreated) -> bool:
    """A job that can be pristine: due now, in no flow, with no callbacks,
    unique key, limit key, headers or previous result (what makes a job
    unlike its siblings: a template holds none of them, and a limit key is
    most often one per customer)."""
    return (
        rec.run_at is None
        and rec.flow is None
        and rec.unique_key is None
        and rec.limit_key is None
        and not rec.headers
        and rec.on_success is None
        and rec.on_failure is None
        and (rec.prev_result is NIL or rec.prev_result == NIL)
    )


def blank(rec: JobCreated) -> JobCreated:
    """``rec`` with its own id, seq, created_at, priority and payload blanked: a template."""
    return msgspec.structs.replace(
        rec, id="", seq=0, created_at=0.0, priority=0, payload=NIL, prev_result=NIL
    )


def blob_of(rec: JobCreated) -> bytes:
    """A pristine job's blob: :data:`BLOB_HEAD` then the payload."""
    return BLOB_HEAD.pack(rec.seq, rec.created_at, rec.priority) + bytes(rec.payload)


#: A blob's priority bytes (int32 after seq and created_at), as a slice.
_PRIORITY_BYTES = operator.itemgetter(slice(_HEAD_SIZE - 4, _HEAD_SIZE))
_INT32 = struct.Struct("<i")


def runs_of(priorities: list[int]) -> list[tuple[int, int, int]]:
    """The runs of equal values in ``priorities``, in order, as
    ``(priority, start, end)`` index ranges that cover it."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(priorities) + 1):
        if i == len(priorities) or priorities[i] != priorities[start]:
            runs.append((priorities[start], start, i))
            start = i
    return runs


def priority_runs(blobs: list[bytes]) -> list[tuple[int, int, int]]:
    """The runs of one priority in a batch of pristine jobs' blobs, in
    order: ``(priority, start, end)`` index ranges that cover ``blobs``.
    A batch of one priority (the usual case) is told at C speed, by the
    set of its blobs' priority bytes, without unpacking a number per job."""
    if not blobs:
        return []
    heads = list(map(_PRIORITY_BYTES, blobs))
    if len(set(heads)) == 1:
        return [(_INT32.unpack(heads[0])[0], 0, len(blobs))]
    return runs_of([_INT32.unpack(head)[0] for head in heads])


def _key(rec: JobCreated) -> tuple[Any, ...]:
    """What templates are told apart by: every option of a plain job (but
    its priority, which each job keeps in its blob), so an option added to
    JobOptions is told apart with no change here."""
    return (rec.task, _TEMPLATE_OPTIONS(rec), rec.step, rec.task_options)


#: The options a template holds for its jobs: all but the priority, and the
#: headers (a plain job has none: None or an empty map, which is unhashable).
_TEMPLATE_OPTIONS = operator.attrgetter(
    *(n for n in OPTION_NAMES if n not in ("priority", "headers"))
)
