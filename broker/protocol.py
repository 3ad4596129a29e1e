"""Every message on corral's wire, one tagged union per direction.

Each message is a single ZeroMQ frame holding one msgpack array (the structs
are ``array_like``): its first element is the tag, the rest the fields in
declaration order. Every message carries the protocol version ``v``. Job
payloads and results travel as :class:`msgspec.Raw`, so the broker relays
user data without decoding it. New fields must get defaults and go last.

Every float a peer sends is :data:`Finite`: NaN and the infinities fail at
decode time, and :func:`decode` names the field (one NaN ``wait`` once
broke every other client's long poll).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from corral.broker import wirepath
from corral.broker.jobspec import FLOAT_MAX, NIL, Finite, JobSpec

PROTOCOL_VERSION = 3

#: A job's status strings (the public contract), in life-cycle order.
STATUSES = ("queued", "scheduled", "running", "retrying", "succeeded", "failed", "cancelled")
#: The statuses a job never leaves (but by a retry by hand).
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: The reason (JobInfo.reason) of a job cancelled because its ``expires``
#: passed before it started, and the type of the error it keeps.
EXPIRED = "expired"
EXPIRED_ERROR = "JobExpired"


class Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="op", tag=str.lower):
    """Base of every wire message."""


# --------------------------------------------------------------- shared parts


class ErrorInfo(msgspec.Struct, frozen=True):
    """What went wrong in one try of a job."""

    type: str
    message: str
    traceback: str = ""


class TryInfo(msgspec.Struct, frozen=True):
    """One attempt at running a job."""

    attempt: int
    worker: str
    host: str
    pid: int
    started_at: float
    ended_at: float | None = None
    error: ErrorInfo | None = None


class JobInfo(msgspec.Struct, frozen=True):
    """A job's info as the broker reports it (``corral.JobInfo``)."""

    id: str
    task: str
    queue: str
    status: str
    attempts: int
    max_attempts: int
    priority: int
    created_at: float
    next_run_at: float | None
    started_at: float | None
    ended_at: float | None
    error: ErrorInfo | None
    tries: list[TryInfo]
    timeout: float | None = None
    unique_key: str | None = None
    progress: float | None = None
    progress_note: str = ""
    enqueued_at: float = 0.0
    #: The worker whose prefetch buffer holds the job, while it is queued
    #: there and not started.
    reserved_by: str | None = None
    #: Why a cancelled job was cancelled, where the broker knows:
    #: ``"expired"`` (not started by its ``expires`` time).
    reason: str | None = None
    #: The job's ``limit_key`` option.
    limit_key: str | None = None
    #: What keeps a ready job waiting: a limit of its task or its key
    #: (``"task 'crm.sync' at its concurrency (4 running)"``); None: none.
    waiting_for: str | None = None
    #: When the job lapses unstarted (its ``expires``), epoch seconds.
    expires_at: float | None = None
    #: The job's metadata (its ``headers`` option, hooks' additions included).
    headers: dict[str, str] | None = None


class FlowInfo(msgspec.Struct, frozen=True):
    """A chain's or group's info: its status, its jobs in order with their
    statuses, where a chain stopped, and a group's callback."""

    id: str
    kind: str
    status: str
    jobs: list[str]
    statuses: dict[str, str]
    created_at: float
    failed_step: int | None = None
    callback: str | None = None


class WorkerInfo(msgspec.Struct, frozen=True):
    """A connected worker as status reports it."""

    worker_id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    credit: int
    #: Jobs whose handler runs on the worker now.
    running: list[str]
    tasks: list[str]
    last_seen_ago: float
    processed: int = 0
    failed: int = 0
    #: Jobs leased into its prefetch buffer and not started (still queued).
    reserved: list[str] = []


class ProcessInfo(msgspec.Struct, frozen=True):
    """One worker process as its supervisor sees it."""

    pool: str
    index: int
    pid: int
    rss: int
    jobs: list[str]
    uptime: Finite
    retiring: str = ""
    #: The worker's socket identity now (hex), as its status pipe last said.
    identity: str = ""
    #: The supervisor vouches the process is alive (a status line, or its CPU
    #: time growing while it runs a job, within the liveness window): the
    #: broker keeps it for a bounded time even if it hears nothing from it.
    vouched: bool = False
    #: User and system CPU time of the process so far (seconds).
    cpu: Finite = 0.0


class PoolInfo(msgspec.Struct, frozen=True):
    """A supervisor's pool: ``failed`` is true while it backs off after
    crashing too often; ``state`` says so in words ("ok", "backing off
    until 12:00:00", "scaled to 0")."""

    name: str
    queues: list[str]
    processes: int
    restarts: int
    failed: bool
    state: str = "ok"


class SupervisorInfo(msgspec.Struct, frozen=True):
    """A supervisor's pools and processes, as it last reported them."""

    supervisor_id: str
    host: str
    pid: int
    pools: list[PoolInfo]
    workers: list[ProcessInfo]
    reported_ago: Finite = 0.0
    #: How the last reload went: "" (none), "ok at <time>" or
    #: "failed at <time>: <why>".
    reload: str = ""


class UnroutableInfo(msgspec.Struct, frozen=True):
    """Ready jobs of ``task`` on ``queue`` that no connected worker takes
    (none listens to the queue, or none registered the task): they wait,
    uncounted. ``since`` is the enqueue time (epoch seconds) of the oldest."""

    queue: str
    task: str
    count: int
    since: float


class ScheduleInfo(msgspec.Struct, frozen=True):
    """A schedule of the broker's config: when it runs next (epoch seconds;
    None: not planned) and the due time it last fired for."""

    name: str
    task: str
    queue: str
    cron: str | None
    every: float | None
    timezone: str
    next_run_at: float | None
    last_fired: float | None = None


class LimitInfo(msgspec.Struct, frozen=True):
    """A task's concurrency and rate limits as the broker enforces them (the
    strictest its connected workers registered), and where it stands:
    ``running`` jobs leased (from dispatch to their end, prefetched ones
    included), ``window_starts`` within the current rate window, ``waiting``
    ready jobs held back by a limit now, ``keys`` limit keys with jobs
    leased or held back (or starts in their window), ``keys_waiting`` of
    them with jobs held back."""

    task: str
    concurrency: int | None
    rate: str | None
    key_concurrency: int | None
    key_rate: str | None
    running: int
    waiting: int
    window_starts: int = 0
    keys: int = 0
    keys_waiting: int = 0


class StatusInfo(msgspec.Struct, frozen=True):
    """What ``corral status`` shows: counts per queue and status, the
    connected workers, and the broker's counters."""

    queues: dict[str, dict[str, int]]
    workers: list[WorkerInfo]
    stats: dict[str, int]
    broker_id: str = ""
    supervisors: list[SupervisorInfo] = []
    paused: list[str] = []
    tasks: dict[str, dict[str, int]] = {}
    rates: dict[str, float] = {}
    registered_tasks: list[str] = []
    unroutable: list[UnroutableInfo] = []
    #: Per queue with ready jobs: seconds its oldest ready job has waited.
    latency: dict[str, float] = {}
    schedules: list[ScheduleInfo] = []
    #: The tasks with a concurrency or rate limit (see LimitInfo).
    limits: list[LimitInfo] = []


# ---------------------------------------------------- client -> broker requests


class Enqueue(Msg, frozen=True):
    req: int
    jobs: list[JobSpec]
    v: int = PROTOCOL_VERSION


class EnqueueEach(Msg, frozen=True):
    """Several independent enqueues in one message (an AsyncClient joins
    those made at once): each job is taken or refused on its own, as if it
    came alone in an :class:`Enqueue`, in order. Answered by one
    :class:`EachReply`, or one ErrorReply when none was looked at (a full
    disk, an unreadable request)."""

    req: int
    jobs: list[JobSpec]
    v: int = PROTOCOL_VERSION


class GetJob(Msg, frozen=True):
    req: int
    job_id: str
    v: int = PROTOCOL_VERSION


class GetResult(Msg, frozen=True):
    """Ask for a job's outcome; with ``wait`` > 0 the broker holds the request
    until the job ends or ``wait`` seconds pass (a long poll)."""

    req: int
    job_id: str
    wait: Finite = 0.0
    v: int = PROTOCOL_VERSION


class GetStatus(Msg, frozen=True):
    req: int
    v: int = PROTOCOL_VERSION


class Ping(Msg, frozen=True):
    req: int
    v: int = PROTOCOL_VERSION


class WorkerExited(Msg, frozen=True):
    """From a supervisor: it reaped the worker process ``pid`` on ``host``,
    so the jobs it held can be handed out at once, without waiting for the
    heartbeat window. ``identities`` (hex) are the socket identities the
    process connected with: the broker drops exactly those registrations
    (two hosts may share a name and a pid); with none, it matches host and
    pid."""

    req: int
    host: str
    pid: int
    reason: str
    v: int = PROTOCOL_VERSION
    identities: list[str] = []
    #: The jobs the process died for (a hard-timeout kill): only these are
    #: charged an attempt. None: the cause is unknown (a crash), and every
    #: job it had started is.
    charged: list[str] | None = None


class SupervisorReport(Msg, frozen=True):
    """A supervisor's periodic report; the reply tells it the broker lives."""

    req: int
    info: SupervisorInfo
    v: int = PROTOCOL_VERSION


class Cancel(Msg, frozen=True):
    req: int
    job_id: str
    v: int = PROTOCOL_VERSION


class RetryJobs(Msg, frozen=True):
    """Put failed or cancelled jobs back: one by id, or every failed one
    (of ``queue``, if given)."""

    req: int
    job_id: str | None = None
    all_failed: bool = False
    queue: str | None = None
    v: int = PROTOCOL_VERSION


class Delete(Msg, frozen=True):
    req: int
    job_id: str
    v: int = PROTOCOL_VERSION


class Purge(Msg, frozen=True):
    req: int
    queue: str
    v: int = PROTOCOL_VERSION


class Pause(Msg, frozen=True):
    req: int
    queue: str
    paused: bool = True
    v: int = PROTOCOL_VERSION


class ListJobs(Msg, frozen=True):
    """Jobs in creation order (``newest``: newest first), filtered, after
    ``cursor`` (from a previous page)."""

    req: int
    queue: str | None = None
    status: str | None = None
    task: str | None = None
    limit: int = 100
    cursor: str | None = None
    v: int = PROTOCOL_VERSION
    newest: bool = False


class EnqueueFlow(Msg, frozen=True):
    """A chain (``kind`` "chain") or a group ("group", with an optional
    ``callback``: a chord). All ids are chosen by the client."""

    req: int
    flow_id: str
    kind: str
    jobs: list[JobSpec]
    callback: JobSpec | None = None
    v: int = PROTOCOL_VERSION
    #: Seconds the flow is kept once finished; None: as long as its jobs.
    result_ttl: Finite | None = None


class GetFlow(Msg, frozen=True):
    req: int
    flow_id: str
    v: int = PROTOCOL_VERSION


ClientRequest = (
    Enqueue
    | EnqueueEach
    | GetJob
    | GetResult
    | GetStatus
    | Ping
    | WorkerExited
    | SupervisorReport
    | Cancel
    | RetryJobs
    | Delete
    | Purge
    | Pause
    | ListJobs
    | EnqueueFlow
    | GetFlow
)


# ------------------------------------------------------ broker -> client replies


class EnqueueOk(Msg, frozen=True):
    req: int
    ids: list[str]
    v: int = PROTOCOL_VERSION


class EachReply(Msg, frozen=True):
    """The answer to an :class:`EnqueueEach`: per job, in order, what a
    one-job Enqueue of it would have been answered (an EnqueueOk with its
    id, or an ErrorReply), each with ``req`` 0."""

    req: int
    replies: list[EnqueueOk | ErrorReply]
    v: int = PROTOCOL_VERSION


class JobReply(Msg, frozen=True):
    req: int
    job: JobInfo
    v: int = PROTOCOL_VERSION


class ResultReply(Msg, frozen=True):
    """A job's outcome. ``status`` is the job's status when the reply was made:
    a non-terminal status means the wait ran out first."""

    req: int
    job_id: str
    status: str
    result: msgspec.Raw = NIL
    error: ErrorInfo | None = None
    v: int = PROTOCOL_VERSION


class StatusReply(Msg, frozen=True):
    req: int
    status: StatusInfo
    v: int = PROTOCOL_VERSION


class EncodedStatusReply(Msg, frozen=True, tag="statusreply"):
    """A :class:`StatusReply` whose status is already encoded: the broker
    encodes one status per pass and shares it between the pass's replies
    (a status with a thousand supervisors takes milliseconds to encode;
    see :func:`status_reply_frames`). The same bytes on the wire, once a
    reply's frames are joined; never decoded as such."""

    req: int
    status: msgspec.Raw
    v: int = PROTOCOL_VERSION


class Pong(Msg, frozen=True):
    """The answer to a Ping: the broker's id, and its ``max_message_size``
    in bytes (0: not said), which a client checks a large request against
    (one over it would be dropped with the connection, unanswered)."""

    req: int
    broker_id: str = ""
    v: int = PROTOCOL_VERSION
    max_message_size: int = 0


class Ack(Msg, frozen=True):
    req: int
    count: int = 0
    ids: list[str] = []
    v: int = PROTOCOL_VERSION


class FlowReply(Msg, frozen=True):
    req: int
    flow: FlowInfo
    v: int = PROTOCOL_VERSION


class JobList(Msg, frozen=True):
    req: int
    jobs: list[JobInfo]
    cursor: str | None = None
    v: int = PROTOCOL_VERSION


class ErrorReply(Msg, frozen=True):
    """A request that could not be done. ``code`` is one of ``not_found``,
    ``invalid``, ``disk_full``, ``version``, ``internal``."""

    req: int
    code: str
    message: str
    v: int = PROTOCOL_VERSION


ClientReply = (
    EnqueueOk
    | EachReply
    | JobReply
    | ResultReply
    | StatusReply
    | Pong
    | Ack
    | JobList
    | FlowReply
    | ErrorReply
)


# ------------------------------------------------------ worker -> broker reports


#: A concurrency limit: at least 1.
Limit = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
#: A rate as a task declares it ("100/m"): see :func:`parse_rate`.
RateText = Annotated[str, msgspec.Meta(max_length=40)]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")
_RATE_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}


def parse_rate(text: str) -> tuple[int, float]:
    """``(starts, period in seconds)`` of a rate: ``"100/m"``, ``"10/s"``,
    ``"1000/h"``, ``"5/d"``, or with a multiple, ``"3/10s"``. Raises
    ValueError naming the text and the form expected."""
    match = _RATE.match(text.lower())
    unit = _RATE_UNITS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ValueError(
            f'invalid rate {text!r}: expected starts per period, like "100/m", "10/s", '
            '"1000/h" or "3/10s"'
        )
    count, multiple = int(match.group(1)), float(match.group(2) or 1)
    if not 1 <= count < 2**31 or not 0 < multiple * unit <= 366 * 86400:
        raise ValueError(f"invalid rate {text!r}: at least 1 start, and a period of at most a year")
    return count, multiple * unit


class TaskInfo(msgspec.Struct, frozen=True, array_like=True):
    """A task a worker can run, with its defaults and its limits: the
    broker holds at most ``concurrency`` jobs of it leased at once and
    starts at most ``rate`` per period (see :func:`parse_rate`); with a
    job's ``limit_key``, the same per key (``key_concurrency``,
    ``key_rate``)."""

    name: str
    max_attempts: int | None = None
    timeout: Finite | None = None
    retry_backoff: Finite | None = None
    retry_backoff_max: Finite | None = None
    result_ttl: Finite | None = None
    max_retries: int | None = None
    #: The queue @corral.task declared: where a job of the task goes when
    #: enqueued without one.
    queue: str | None = None
    concurrency: Limit | None = None
    rate: RateText | None = None
    key_concurrency: Limit | None = None
    key_rate: RateText | None = None


#: The most jobs a worker may hold at once, or run at once: a READY over it
#: is refused (a worker cannot take the whole queue in one delivery).
MAX_CREDIT = 100_000
#: A READY's credit or concurrency.
Credit = Annotated[int, msgspec.Meta(ge=0, le=MAX_CREDIT)]


class Holding(msgspec.Struct, frozen=True, array_like=True):
    """A job a worker holds as it registers (again): leased to it under
    ``lease``, and ``running`` (its handler began) or waiting in its buffer."""

    job_id: str
    lease: int
    running: bool = False


class Ready(Msg, frozen=True):
    """A worker (re)registers: its queues, how many jobs it can hold at once
    (credit, the jobs it holds included), and how many it runs at once
    (concurrency), each at most :data:`MAX_CREDIT`. ``holding`` offers back
    the jobs it holds (after a broker restart or a reconnect): the broker
    keeps each one with this worker under its lease, or refuses it in its
    :class:`Registered` answer. A worker starts none of its buffered jobs
    until that answer."""

    worker_id: str
    queues: list[str]
    credit: Credit
    concurrency: Credit
    tasks: list[TaskInfo]
    host: str
    pid: int
    v: int = PROTOCOL_VERSION
    queue_weights: dict[str, int] = {}
    holding: list[Holding] = []
    #: A supervisor watches the process and reports it: until its first
    #: report can come, the broker counts the worker as vouched for.
    supervised: bool = False


class Outcome(msgspec.Struct, frozen=True, array_like=True):
    """How one leased job ended. ``kind`` is ``ok`` (result set), ``error``
    (retry if attempts remain), ``fail`` (no more attempts), ``retry``
    (try again after ``delay`` without counting a failure) or
    ``interrupted`` (the worker stopped before the handler finished, at a
    shutdown: queued again, not counted)."""

    job_id: str
    lease: int
    kind: str
    result: msgspec.Raw = NIL
    error: ErrorInfo | None = None
    delay: Finite | None = None
    started_at: Finite | None = None
    ended_at: Finite | None = None


class Lease(msgspec.Struct, frozen=True, array_like=True):
    job_id: str
    lease: int


class Progress(msgspec.Struct, frozen=True, array_like=True):
    job_id: str
    lease: int
    fraction: Finite
    note: str = ""


class Report(Msg, frozen=True):
    """Jobs that started and jobs that ended since the last report. Every
    ended job gives its credit back. ``resent``: sent before, and again as
    the worker registers again (it may have been lost with a broker that
    died); an outcome in it that the broker has already taken is no late
    result."""

    started: list[Lease]
    done: list[Outcome]
    v: int = PROTOCOL_VERSION
    progress: list[Progress] = []
    resent: bool = False


class Return(Msg, frozen=True):
    """Leased jobs handed back unstarted (a shutdown, a cancel, a Withdraw):
    no attempt is counted. ``ref`` answers the Withdraw of that number (0:
    none); the answer lists only the jobs that had not started."""

    leases: list[Lease]
    v: int = PROTOCOL_VERSION
    ref: int = 0


class WorkerHeartbeat(Msg, frozen=True):
    v: int = PROTOCOL_VERSION


class Drain(Msg, frozen=True):
    """The worker takes no more jobs (it is shutting down or recycling); it
    keeps its leases until it reports them."""

    v: int = PROTOCOL_VERSION


class Bye(Msg, frozen=True):
    """The worker is leaving; it holds no jobs."""

    v: int = PROTOCOL_VERSION


WorkerReport = Ready | Report | Return | WorkerHeartbeat | Drain | Bye


# ---------------------------------------------------- broker -> worker commands


class Delivery(msgspec.Struct, frozen=True, array_like=True):
    job_id: str
    lease: int
    task: str
    payload: msgspec.Raw
    attempt: int
    max_attempts: int
    queue: str
    enqueued_at: float
    timeout: float | None = None
    prev_result: msgspec.Raw = NIL
    #: The job's priority: the worker's buffer starts higher ones first.
    priority: int = 0
    #: The job's metadata (``JobOptions.headers``), for ``ctx.headers``.
    headers: dict[str, str] | None = None


class Deliver(Msg, frozen=True):
    """Jobs leased to the worker. ``max_message_size``: the broker's
    ``broker.max_message_size`` in bytes (0: not said), which the worker's
    reports and results are cut to fit: a worker host's config may say
    another, and a report over the broker's limit is dropped with the
    worker's connection, its jobs' fates unheard."""

    jobs: list[Delivery]
    v: int = PROTOCOL_VERSION
    max_message_size: int = 0


class BrokerHeartbeat(Msg, frozen=True):
    broker_id: str = ""
    v: int = PROTOCOL_VERSION


class Reregister(Msg, frozen=True):
    """The broker does not know this worker (it restarted, or declared the
    worker dead): send Ready again. ``broker_id``: the asking broker's (one
    per broker process), so the worker resends its recent reports once to
    each new broker (see :meth:`corral.workers.reports.SentReports.due`)."""

    broker_id: str = ""
    v: int = PROTOCOL_VERSION


class Farewell(Msg, frozen=True):
    """The answer to a worker's :class:`Bye`, sent after the pass's commit:
    everything the worker said before its Bye (its last outcomes) is in the
    log and synced (a pass that reads a Bye commits at once, whatever
    the fsync policy). A leaving worker waits for it (a
    bounded time), so its last outcomes are never lost with a broker that
    dies as it leaves: without it, it sends its recent reports again to
    the next broker, then Bye again."""

    v: int = PROTOCOL_VERSION


class Registered(Msg, frozen=True):
    """The answer to a READY that offered jobs back (``Ready.holding``):
    the offered jobs listed in ``refused`` are not this worker's (their
    lease ended, or the broker never logged it): a buffered one is dropped
    unstarted, a running one's handler sees ctx.cancelled and its result is
    fenced. The others stay with the worker under their leases."""

    refused: list[Lease] = []
    v: int = PROTOCOL_VERSION


class CancelJob(Msg, frozen=True):
    """The job was cancelled (or purged). Still in the worker's buffer: it
    is dropped unstarted and handed back with a Return. Running: its
    handler sees ctx.cancelled and whatever it returns is discarded."""

    job_id: str
    lease: int
    v: int = PROTOCOL_VERSION


class Withdraw(Msg, frozen=True):
    """Hand these leased jobs back if they have not started (a pause, a job
    of higher priority, an idle worker elsewhere). The worker answers with
    a Return of the same ``ref``, listing the jobs it handed back."""

    leases: list[Lease]
    ref: int
    v: int = PROTOCOL_VERSION


class Refused(Msg, frozen=True):
    """A worker message the broker could not decode: ``refused_op`` is its
    tag when one could be read ("" if not), ``reason`` what was wrong (at most
    :data:`REFUSAL_CHARS` characters). A refused ``ready`` means the worker
    can never register: it logs why and exits (:data:`EXIT_REFUSED
    <corral.workers.runtime.EXIT_REFUSED>`). The tag and these two fields
    stay as they are in every protocol version, so a worker of another
    version still reads them (:func:`refusal`). Added without a version
    change: a worker that predates it logs it as a malformed frame."""

    refused_op: str
    reason: str
    v: int = PROTOCOL_VERSION


#: The longest reason a Refused carries.
REFUSAL_CHARS = 1000


WorkerCommand = (
    Deliver | BrokerHeartbeat | Reregister | Registered | CancelJob | Withdraw | Refused | Farewell
)


# ------------------------------------------------------------------ codecs


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol. ``req`` is the
    request number it carried, when one could be read (0: none), so that
    the client's call is answered with the error rather than timing out."""

    def __init__(self, message: str, req: int = 0) -> None:
        super().__init__(message)
        self.req = req


#: How msgspec prints the bound of :data:`Finite` that NaN and infinities
#: fail (with a minus sign for the lower one).
_BOUND = repr(FLOAT_MAX)


def _req_of(frame: bytes) -> int:
    """The request number of a frame that did not validate: the second
    element of its array, if that is a non-negative int (else 0)."""
    req = wirepath.head(frame)[1]
    return req if req is not None and 0 <= req < 2**63 else 0


_encoder = msgspec.msgpack.Encoder()
client_request_decoder = msgspec.msgpack.Decoder(ClientRequest)
client_reply_decoder = msgspec.msgpack.Decoder(ClientReply)
worker_report_decoder = msgspec.msgpack.Decoder(WorkerReport)
worker_command_decoder = msgspec.msgpack.Decoder(WorkerCommand)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def status_reply_frames(req: int, status: bytes) -> tuple[bytes, bytes, bytes]:
    """A status reply to request ``req`` as three frames whose concatenation
    is the msgpack of the :class:`StatusReply` (a client joins a reply's
    frames before decoding it). The middle frame is ``status`` (an encoded
    :class:`StatusInfo`) itself: every reply of a pass shares that one
    buffer, sent without a copy, however many clients ask and however long
    their replies wait in the socket's queues."""
    whole = _encoder.encode(EncodedStatusReply(req, msgspec.Raw(b"")))
    tail = len(_encoder.encode(PROTOCOL_VERSION))
    return whole[:-tail], status, whole[-tail:]


def encode_struct(value: msgspec.Struct) -> bytes:
    """Encode a part of a message (a ``StatusInfo``) on its own."""
    return _encoder.encode(value)


def decode(decoder: msgspec.msgpack.Decoder[Any], frame: bytes) -> Any:
    """Decode one frame, raising ProtocolError for anything malformed: bad
    msgpack, a wrong shape, absurd nesting, or another protocol version."""
    try:
        msg = decoder.decode(frame)
    except msgspec.ValidationError as exc:
        reason = wirepath.explain(decoder.type, frame, str(exc), _BOUND)
        raise ProtocolError(reason, _req_of(frame)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(str(exc)) from None
    except RecursionError:
        raise ProtocolError("message nested too deeply") from None
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {msg.v} is not supported (this side speaks {PROTOCOL_VERSION})",
            getattr(msg, "req", 0),
        )
    return msg


def refusal(frame: bytes) -> Refused | None:
    """The :class:`Refused` a frame holds, whatever protocol version sent
    it (only its tag, ``refused_op`` and ``reason`` are read); None if it holds
    none."""
    try:
        items = _refusal_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    if len(items) < 3 or items[0] != "refused":
        return None
    op, reason = items[1], items[2]
    if not isinstance(op, str) or not isinstance(reason, str):
        return None
    return Refused(op, reason[:REFUSAL_CHARS])


#: Reads a frame's array shallowly: nested elements stay undecoded.
_refusal_decoder = msgspec.msgpack.Decoder(list[str | int | msgspec.Raw])


def encode_value(value: Any) -> msgspec.Raw:
    """Encode a Python value (a payload or a result) as raw msgpack."""
    return msgspec.Raw(_encoder.encode(value))
