"""The records of corral's durable log, versioned apart from the wire protocol.

A record says what happened to a job; replaying every record in order
rebuilds the broker's job state (``corral.broker.state``). Each record type
has a one-byte code that the log writes in the frame, so a record body is
decoded with the one typed decoder for its code. Bodies are msgpack arrays:
new fields must get defaults and go last; a code is never reused.
"""

from __future__ import annotations

import msgspec

from corral.broker.jobspec import NIL, JobOptions, JobSpec

#: Bump when records are added or change in a way old code cannot read
#: (a newer corral reads every older version: see framing.MIN_RECORDS_VERSION).
#: Version 5 added the job options ``expires`` and ``limit_key``: they sit
#: in ``JobCreated`` before its own fields (see :func:`decode_record`).
#: Version 6 added ``LeasedMany``.
LOG_FORMAT_VERSION = 6


class Record(msgspec.Struct, frozen=True, array_like=True):
    """Base of every log record."""


class ErrorRec(msgspec.Struct, frozen=True, array_like=True):
    type: str
    message: str
    traceback: str = ""


class TryRec(msgspec.Struct, frozen=True, array_like=True):
    attempt: int
    worker: str
    host: str
    pid: int
    started_at: float
    ended_at: float | None = None
    error: ErrorRec | None = None


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A task's options as its workers registered them (``@corral.task``):
    what a job of the task falls back on for an option it does not set.
    ``queue`` is where a job of the task goes when enqueued without one."""

    max_attempts: int | None = None
    timeout: float | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    result_ttl: float | None = None
    max_retries: int | None = None
    queue: str | None = None


class JobCreated(JobSpec, Record, frozen=True, kw_only=True):
    """A job was accepted: its spec as the broker resolved it (``queue``
    set, ``delay`` folded into ``run_at``, and kept to say that run_at is
    an interval from ``created_at``), its creation number ``seq``
    (jobs are ordered by it), and where it stands in a chain or group."""

    seq: int
    created_at: float
    flow: str | None = None
    step: int = 0
    prev_result: msgspec.Raw = NIL
    #: The task's registered options when the job was created: the job
    #: keeps them, so a rolling reload that changes them never changes a
    #: job already under way. None: the task was not registered yet.
    task_options: TaskOptions | None = None


class JobsCreated(Record, frozen=True):
    """Jobs accepted together that share every option but their priority
    (an enqueue of many jobs, or compaction writing queued jobs nothing has
    happened to yet): one ``template`` (a ``JobCreated`` whose id, seq,
    created_at, priority and payload are blank) and, per job, its id and a
    blob: little-endian, its seq (int64), its created_at (float64) and its
    priority (int32), then its payload's msgpack. The broker keeps such a
    job as the template and the blob, and a replay adds a batch without
    decoding a record per job.

    ``runs`` gives the batch's runs of one priority as ``(priority, start,
    end)`` index ranges (see :func:`~corral.broker.job.priority_runs`), so
    that a replay need not read every blob's priority; None in a record
    written before it was added (the replay then reads them)."""

    template: JobCreated
    ids: list[str]
    blobs: list[bytes]
    runs: list[tuple[int, int, int]] | None = None


class Leased(Record, frozen=True):
    """A job was sent to a worker under lease token ``lease``: reserved for
    it (still ``queued``, in its prefetch buffer) until it starts."""

    id: str
    lease: int
    attempt: int
    worker: str
    host: str
    pid: int
    at: float


class LeasedMany(Record, frozen=True):
    """Jobs sent to one worker in one delivery, each as a :class:`Leased`
    says: job ``ids[i]`` under lease token ``first_lease + i`` (the tokens
    of a delivery are consecutive). Its try number is not written: it is
    the job's runs so far plus one, as the state knows it."""

    ids: list[str]
    first_lease: int
    worker: str
    host: str
    pid: int
    at: float


class Started(Record, frozen=True):
    """The worker holding ``lease`` began running the job: it is ``running``
    from ``at`` (epoch seconds), and try ``attempt`` counts."""

    id: str
    lease: int
    attempt: int
    worker: str
    host: str
    pid: int
    at: float


class Finished(Record, frozen=True):
    """A leased try ended. ``status`` is the job's status after it: terminal,
    ``retrying`` (with ``next_run_at``) or ``queued`` (redelivered at once).
    ``counted`` is False when the try does not count as an attempt."""

    id: str
    lease: int
    at: float
    status: str
    result: msgspec.Raw = NIL
    error: ErrorRec | None = None
    next_run_at: float | None = None
    started_at: float | None = None
    counted: bool = True
    #: The handler asked for this retry (counts against max_retries).
    retried: bool = False


class Returned(Record, frozen=True):
    """A leased job was handed back unstarted; its attempt is not counted."""

    id: str
    lease: int


class Removed(Record, frozen=True):
    """A job was deleted."""

    id: str


class Cancelled(Record, frozen=True):
    """A job was cancelled: it will not run (again). ``reason`` is ""
    (by hand) or ``"expired"`` (not started by its ``expires`` time)."""

    id: str
    at: float
    reason: str = ""


class Requeued(Record, frozen=True):
    """A failed or cancelled job was put back by hand, with a fresh budget
    of attempts (its tries are kept)."""

    id: str
    at: float


class QueuePaused(Record, frozen=True):
    queue: str
    paused: bool


class FlowCreated(Record, frozen=True):
    """A chain (steps run one after another, each getting the previous
    result) or a group (all at once; ``callback`` gets every result)."""

    id: str
    kind: str
    steps: list[JobSpec]
    created_at: float
    callback: JobSpec | None = None
    #: Seconds the flow is kept once it finished (None: as long as the
    #: longest TTL of its jobs).
    result_ttl: float | None = None


class ScheduleFired(Record, frozen=True):
    """A schedule fired for its due time ``due_at`` (logged after the job it
    created, whose id derives from the two, so a repeat is deduplicated)."""

    name: str
    due_at: float


class FollowedUp(Record, frozen=True):
    """What ``parent`` brought about when it ended, created in one record:
    its ``on_success``/``on_failure`` job and a chain's next step (``parent``
    is the job's id), or a group's callback (``parent`` is the group's id).
    The record is the fact that the follow-ups were made: replay never
    infers a missing one from its absence, so one that expired or was
    deleted is never made again. ``created`` may be empty (the jobs existed
    already)."""

    parent: str
    created: list[JobCreated]


class TaskRegistered(Record, frozen=True):
    """A worker registered ``name`` with ``options`` different from what the
    broker knew: logged, so the task's queue and defaults hold across a
    restart before any worker registers again."""

    name: str
    options: TaskOptions


class TaskForgotten(Record, frozen=True):
    """The broker forgets task ``name``'s registered options: its table of
    tasks was full, and no connected worker serves ``name`` (see
    :mod:`corral.broker.registrations`)."""

    name: str


class MemberEnded(Record, frozen=True):
    """Member ``id`` of flow ``flow`` ended with ``status`` (and ``result``,
    kept where the flow needs it). Written only by compaction: live, a
    member's end is derived from the record that ended it."""

    flow: str
    id: str
    status: str
    result: msgspec.Raw = NIL
    #: When it ended (epoch seconds): a flow's own result_ttl counts from
    #: its last member's end, across restarts.
    ended_at: float = 0.0


class FlowRemoved(Record, frozen=True):
    """A finished flow none of whose jobs is left is forgotten."""

    id: str


class BrokerStarted(Record, frozen=True):
    """A broker started on this log, as its ``epoch``-th start (counting
    from 1). Lease tokens carry the epoch in their high bits, so a token
    never repeats across restarts, whatever the wall clock does."""

    epoch: int
    at: float


class ClockStepped(Record, frozen=True):
    """The wall clock stepped by ``delta`` seconds (negative: backward)
    against the monotonic clock, as the broker saw at ``at`` (epoch
    seconds, after the step; 0.0: the sum of earlier steps, as compaction
    writes it). Waits asked for as intervals keep their length: the
    ``run_at`` of retrying jobs and of jobs scheduled by a ``delay`` moves
    by ``delta``, and so does the clock ``every`` schedules run on."""

    delta: float
    at: float


class ProgressNoted(Record, frozen=True):
    id: str
    fraction: float
    note: str
    at: float


class JobSnapshot(Record, frozen=True):
    """A whole job as compaction rewrites it: its creation record, then
    everything that has happened to it since (the fields of the broker's
    job state of the same names)."""

    job: JobCreated
    status: str
    attempts: int
    tries: list[TryRec]
    run_at: float | None = None
    result: msgspec.Raw = NIL
    error: ErrorRec | None = None
    ended_at: float | None = None
    lease: int = 0
    worker: str = ""
    progress: float | None = None
    progress_note: str = ""
    runs: int = 0
    retries: int = 0


#: Record codes as written in each frame. Never reuse a code.
RECORD_TYPES: dict[int, type[Record]] = {
    1: JobCreated,
    2: Leased,
    3: Finished,
    4: Returned,
    5: Removed,
    6: JobSnapshot,
    7: Cancelled,
    8: Requeued,
    9: QueuePaused,
    10: ProgressNoted,
    11: ScheduleFired,
    12: FlowCreated,
    13: Started,
    14: BrokerStarted,
    15: FollowedUp,
    16: TaskRegistered,
    17: MemberEnded,
    18: FlowRemoved,
    19: ClockStepped,
    20: JobsCreated,
    21: TaskForgotten,
    # 22 is taken by the log's own sync mark (framing.MARK_CODE), which is no record
    23: LeasedMany,
}
RECORD_CODES: dict[type[Record], int] = {cls: code for code, cls in RECORD_TYPES.items()}


class RecordError(ValueError):
    """A record body that cannot be decoded."""


_encoder = msgspec.msgpack.Encoder()
_decoders = {code: msgspec.msgpack.Decoder(cls) for code, cls in RECORD_TYPES.items()}


def encode_record(record: Record) -> tuple[int, bytes]:
    """Return the record's type code and msgpack body."""
    return RECORD_CODES[type(record)], _encoder.encode(record)


_BAD_BODY = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def decode_record(code: int, body: bytes | memoryview) -> Record:
    """Decode a body written by :func:`encode_record`, by this corral or an
    older one (see :func:`upgrade_body`). Raises RecordError."""
    decoder = _decoders.get(code)
    if decoder is None:
        raise RecordError(f"unknown record type {code}")
    try:
        return decoder.decode(body)
    except _BAD_BODY as exc:
        error = exc
    if code in _HOLDS_JOB_CREATED:
        try:
            return decoder.decode(upgrade_body(code, body))
        except _BAD_BODY:
            pass
    raise RecordError(f"bad record of type {code}: {error}") from None


# -- records written before the last job options were added --------------------------
#
# A JobCreated is an array: JobSpec's own fields, then the job options, then
# JobCreated's own fields (seq, created_at, ...). An option added to JobOptions
# goes after the options there, so it lands before ``seq``: an older record's
# array lacks it in the middle, not at the end. Such a record never decodes as
# the current layout (its ``created_at``, a float, would be read as a later
# option, a string), and the segments of an older log may be appended to by
# this corral, so a record's layout is told by trying, not by its segment's
# version: one that fails is read again with the missing options put in as nil.

#: JobOptions fields of a JobCreated by the records version that wrote it,
#: for the versions whose layout differs from the current one.
_OPTIONS_WRITTEN = {4: 10}  # records versions 3 and 4: up to max_retries
#: Where the options start in a JobCreated array: id, task, payload,
#: on_success, on_failure.
_OPTIONS_AT = 5
#: The record types that hold a JobCreated: itself, a snapshot's ``job``, a
#: follow-up's ``created`` and a batch's ``template``.
_HOLDS_JOB_CREATED = frozenset({1, 6, 15, 20})
_NIL = msgspec.msgpack.encode(None)
_items = msgspec.msgpack.Decoder(list[msgspec.Raw])


def upgrade_body(code: int, body: bytes | memoryview) -> bytes:
    """The body of a record of type ``code`` written with an older
    JobCreated layout, rewritten in the current one (the options it did not
    have are nil). Raises a msgspec error for a body that is not an array."""
    items = _items.decode(body)
    if code == 1:
        return _upgrade_created(body, items)
    if code == 15:  # FollowedUp: parent, [JobCreated, ...]
        created = [_upgrade_created(raw, _items.decode(raw)) for raw in _items.decode(items[1])]
        items[1] = msgspec.Raw(_encoder.encode([msgspec.Raw(c) for c in created]))
    else:  # JobSnapshot (job first) and JobsCreated (template first)
        items[0] = msgspec.Raw(_upgrade_created(items[0], _items.decode(items[0])))
    return _encoder.encode(items)


def _upgrade_created(body: bytes | memoryview | msgspec.Raw, items: list[msgspec.Raw]) -> bytes:
    current = len(JobOptions.__struct_fields__)
    written = _OPTIONS_WRITTEN[4]
    own_fields = len(JobCreated.__struct_fields__) - _OPTIONS_AT - current
    if len(items) > _OPTIONS_AT + written + own_fields:
        return bytes(body)  # not an older layout: as it is
    end = _OPTIONS_AT + written
    padded = [*items[:end], *[msgspec.Raw(_NIL)] * (current - written), *items[end:]]
    return _encoder.encode(padded)


def is_known_code(code: int) -> bool:
    return code in _decoders
