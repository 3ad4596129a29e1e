"""The one declaration of a job's options, and of a job as a client asks for it.

Every layer reuses these structs instead of copying their fields:

- ``corral.Job`` (the client's spec) subclasses :class:`JobOptions`;
- the wire's ``Enqueue``/``EnqueueFlow`` carry :class:`JobSpec`;
- the log's ``JobCreated`` subclasses :class:`JobSpec`, and ``JobSnapshot``
  holds a ``JobCreated``; a chain step, a group member, a chord callback
  and an ``on_success``/``on_failure`` callback are each a :class:`JobSpec`.

So an option added to :class:`JobOptions` goes through enqueue, flows,
compaction and replay with no other change; only what it *means* needs
code. The structs are ``array_like`` msgpack: a new field gets a default
and goes last (the wire protocol and the log format versions say when an
old reader cannot follow). Leaf module: msgspec only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

import msgspec

#: msgpack encoding of ``None``: an absent payload or result.
NIL = msgspec.Raw(b"\xc0")
#: The largest finite float.
FLOAT_MAX = sys.float_info.max
#: A float field a peer sends: any finite number. NaN and the infinities
#: fail these bounds when a frame is decoded (constructing a struct in
#: Python checks nothing).
Finite = Annotated[float, msgspec.Meta(ge=-FLOAT_MAX, le=FLOAT_MAX)]
#: An absolute time a peer sends: a datetime with its zone (msgpack's
#: timestamp, or ISO 8601 with an offset); one without a zone is refused.
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


class JobOptions(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """What a user can set on a job, beside its task and payload.

    Times are seconds (``delay``, ``timeout``, ``result_ttl``,
    ``unique_for``) or epoch seconds (``run_at``); ``expires`` is seconds
    or an aware datetime. ``None`` means "not set": the task's registered
    option applies, else the broker's default.
    """

    #: The queue to put the job on; None: ``"default"``.
    queue: str | None = None
    #: Higher runs first among the queue's ready jobs (a signed 32-bit int).
    priority: int = 0
    #: Run no earlier than this many seconds after the enqueue (wins over run_at).
    delay: Finite | None = None
    #: Run no earlier than this epoch time.
    run_at: Finite | None = None
    #: Tries before the job fails (errors and lost workers count; Retry does not).
    max_attempts: int | None = None
    #: Seconds one attempt may run before it is ended and retried.
    timeout: Finite | None = None
    #: At most one active job holds a key; an enqueue with a held key returns the holder's id.
    unique_key: str | None = None
    #: Seconds a succeeded job's result is kept.
    result_ttl: Finite | None = None
    #: Seconds a key stays held after its job ended.
    unique_for: Finite | None = None
    #: Times a handler may raise ``corral.Retry`` before the job fails
    #: (counted apart from max_attempts).
    max_retries: int | None = None
    #: A job not started by then never runs: it ends ``cancelled``, reason
    #: ``expired``. Seconds after the job is due (its creation, or its
    #: ``delay``/``run_at``), or an absolute time (an aware datetime).
    expires: Finite | AwareTime | None = None
    #: The key the task's ``key_concurrency``/``key_rate`` count by (a
    #: customer id, say); None: only the task's own limits apply.
    limit_key: str | None = None
    #: The job's metadata: text keys and values that travel with it from
    #: the enqueue to the handler (``ctx.headers``), e.g. a trace context
    #: (W3C ``traceparent``). None: none. See :data:`MAX_HEADERS`.
    headers: dict[str, str] | None = None


#: The option names, in declaration order.
OPTION_NAMES: tuple[str, ...] = JobOptions.__struct_fields__


class JobSpec(JobOptions, frozen=True):
    """A job as a client asks for it. ``id`` is chosen by the client, so a
    resent enqueue is idempotent; ``payload`` is msgpack the broker never
    decodes. ``on_success``/``on_failure`` are jobs created when this one
    succeeds (with its result as their ``prev_result``) or fails (with a
    map of its error)."""

    id: str
    task: str
    payload: msgspec.Raw = NIL
    on_success: JobSpec | None = None
    on_failure: JobSpec | None = None


def options_of(spec: JobOptions) -> dict[str, object]:
    """The options of ``spec`` (any :class:`JobOptions`) as keyword arguments."""
    return {name: getattr(spec, name) for name in OPTION_NAMES}


class InvalidJob(ValueError):
    """A job spec the broker refuses; the message says which field and why."""


#: The longest duration an option may give: 100 years, in seconds.
MAX_SECONDS = 100 * 365.25 * 86400
#: The latest ``run_at``: 9999-12-31T23:59:59Z, the last time every
#: platform's clock functions can show.
MAX_EPOCH = 253_402_300_799.0
_SPAN = f"above 0 and at most {MAX_SECONDS:.0f} seconds (100 years)"
#: At most this many headers per job, each key at most MAX_HEADER_KEY and
#: each value at most MAX_HEADER_VALUE characters (a W3C traceparent is 55,
#: a baggage header at most 8192).
MAX_HEADERS = 64
MAX_HEADER_KEY = 200
MAX_HEADER_VALUE = 8192

#: Number options: the test each must pass when set, and what to say if not.
_NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "delay": (lambda v: 0 <= v <= MAX_SECONDS, f"must be {_SPAN}"),
    "run_at": (lambda v: 0 <= v <= MAX_EPOCH, "must be epoch seconds between 1970 and 9999"),
    "timeout": (lambda v: 0 < v <= MAX_SECONDS, f"must be a positive number of seconds, {_SPAN}"),
    "result_ttl": (lambda v: 0 <= v <= MAX_SECONDS, f"must be {_SPAN}"),
    "unique_for": (lambda v: 0 <= v <= MAX_SECONDS, f"must be {_SPAN}"),
    "max_attempts": (lambda v: 1 <= v < 2**31, "must be at least 1 and fit in 32 bits"),
    "max_retries": (lambda v: 0 <= v < 2**31, "must be at least 0 and fit in 32 bits"),
}


#: The longest task or queue name the broker takes.
MAX_NAME = 200


def queue_problem(queue: str) -> str | None:
    """Why ``queue`` cannot name a queue (a job's, or one paused), or None."""
    if not queue or len(queue) > MAX_NAME:
        return f"queue: must be a non-empty name of at most {MAX_NAME} characters"
    return None


def validate_spec(spec: JobSpec, max_payload: int | None = None) -> None:
    """Refuse a spec the broker cannot take (callbacks included): a payload
    over ``max_payload`` bytes of msgpack among the rest; the error names
    the field. Raises InvalidJob."""
    if max_payload is not None and len(spec.payload) > max_payload:
        raise InvalidJob(
            f"payload: {len(spec.payload)} bytes of msgpack (job {spec.id!r}) is over the "
            f"broker's max_payload of {max_payload} bytes; pass a reference to the data "
            "(a path, a URL, a key) instead, or raise broker.max_payload"
        )
    if not spec.task or len(spec.task) > 200:
        raise InvalidJob("task: must be a non-empty name of at most 200 characters")
    if spec.queue is not None and (problem := queue_problem(spec.queue)):
        raise InvalidJob(problem)
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
    _validate_limit_options(spec)
    if not -(2**31) <= spec.priority < 2**31:
        raise InvalidJob(f"priority: must fit in 32 bits, got {spec.priority}")
    _validate_headers(spec.headers)
    for callback in (spec.on_success, spec.on_failure):
        if callback is not None:
            validate_spec(callback, max_payload)


def _validate_limit_options(spec: JobSpec) -> None:
    """``expires`` and ``limit_key``; raises InvalidJob."""
    expires = spec.expires
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise InvalidJob("expires: an absolute time must carry its zone (UTC, or an offset)")
        if spec.run_at is not None and expires.timestamp() <= spec.run_at:
            due = datetime.fromtimestamp(spec.run_at, UTC).isoformat()
            raise InvalidJob(
                f"expires: {expires.isoformat()} is not after its run_at ({due}): the job would "
                "lapse before it is due and never run; give a later time, or seconds "
                "(counted from when the job is due)"
            )
    elif expires is not None and not (math.isfinite(expires) and 0 < expires <= MAX_SECONDS):
        raise InvalidJob(
            f"expires: must be a positive number of seconds, {_SPAN}, or an absolute time; "
            f"got {expires}"
        )
    if spec.limit_key is not None and not 0 < len(spec.limit_key) <= 200:
        raise InvalidJob("limit_key: must be a non-empty string of at most 200 characters")


def expires_at(expires: float | datetime | None, due: float) -> float | None:
    """The epoch time a job with option ``expires`` lapses, if it does:
    ``due`` (epoch seconds: when the job was first due) plus ``expires``
    seconds, or the absolute time ``expires`` names."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires.timestamp()
    return due + expires


def _validate_headers(headers: dict[str, str] | None) -> None:
    if not headers:
        return
    if len(headers) > MAX_HEADERS:
        raise InvalidJob(f"headers: at most {MAX_HEADERS} entries, got {len(headers)}")
    for key, value in headers.items():
        if not key or len(key) > MAX_HEADER_KEY:
            raise InvalidJob(
                f"headers: a key must be a non-empty string of at most {MAX_HEADER_KEY} "
                f"characters, got {key[:40]!r}"
            )
        if len(value) > MAX_HEADER_VALUE:
            raise InvalidJob(
                f"headers[{key!r}]: at most {MAX_HEADER_VALUE} characters, got {len(value)}"
            )


def ids_of(spec: JobSpec) -> list[str]:
    """The ids of ``spec`` and of the callbacks it carries, nested."""
    ids = [spec.id]
    for callback in (spec.on_success, spec.on_failure):
        if callback is not None:
            ids.extend(ids_of(callback))
    return ids


def with_callback(specs: list[JobSpec], callback: JobSpec | None) -> list[JobSpec]:
    """A flow's jobs: its steps (or members), then its callback if it has one."""
    return [*specs, *([callback] if callback is not None else [])]


def validate_flow(
    flow_id: str,
    specs: list[JobSpec],
    callback: JobSpec | None,
    result_ttl: float | None = None,
) -> None:
    """Refuse a chain or group whose ids clash: the flow's id must be a
    non-empty string of at most 64 characters, and it and every member's
    (and the callback's) id must differ; its ``result_ttl`` is seconds
    within 100 years. Raises InvalidJob."""
    if not flow_id or len(flow_id) > 64:
        raise InvalidJob("flow_id: must be a non-empty string of at most 64 characters")
    if result_ttl is not None and not (
        math.isfinite(result_ttl) and 0 <= result_ttl <= MAX_SECONDS
    ):
        raise InvalidJob(f"result_ttl: must be {_SPAN}, got {result_ttl}")
    ids = [flow_id] + [i for spec in with_callback(specs, callback) for i in ids_of(spec)]
    seen: set[str] = set()
    for job_id in ids:
        if job_id in seen:
            raise InvalidJob(f"id: {job_id!r} is used twice in one flow; each needs its own id")
        seen.add(job_id)
