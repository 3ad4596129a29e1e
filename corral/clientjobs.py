"""The job specs a client sends (:class:`Job`) and how each becomes the
wire's ``JobSpec``: its id made here (so a resent enqueue is idempotent at
the broker), the options a task function gives it, its payload encoded
(and checked against a task function's payload type), the headers the
client's hooks add (those the broker would refuse dropped, and within the
call's :data:`call_budget`), ``expires`` in its wire form. No I/O."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Unpack, overload

import msgspec

from corral.broker import protocol as p
from corral.broker.jobspec import (
    MAX_HEADER_KEY,
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    JobOptions,
    JobSpec,
    options_of,
)
from corral.hooks import CallBudget, Enqueuing, HookSet

if TYPE_CHECKING:
    from corral.workers.registry import Task

if TYPE_CHECKING:  # (a TypeVar's default is in typing from Python 3.13 on)
    from typing_extensions import TypeVar as _TypeVar

    #: The payload type of the task given to ``enqueue`` or ``Job``; a
    #: ``Job`` of a task name (or a bare ``Job`` annotation) is ``Job[Any]``.
    PayloadT = _TypeVar("PayloadT", default=Any)
else:
    PayloadT = TypeVar("PayloadT")


class _JobExtras(JobOptions, frozen=True, kw_only=True):
    """The keyword-only fields of :class:`Job` beside the options."""

    #: A job id of your choosing (at most 64 characters); an enqueue with an
    #: id the broker has is a no-op that returns it. None: a new id.
    id: str | None = None
    #: Jobs created when this one succeeds (its result as their
    #: ``ctx.prev_result``) or fails (a dict with the error as prev_result).
    on_success: AnyJob | None = None
    on_failure: AnyJob | None = None


class AnyJob(_JobExtras, frozen=True):
    """A job spec of any task and payload: what the enqueue methods take.
    Make one with :class:`Job` (this base is not generic, so that a type
    checker infers each ``Job``'s payload type from its own arguments, not
    from the list it is in)."""

    task: Any
    payload: Any = None


class Job(AnyJob, Generic[PayloadT], frozen=True):
    """A job spec for ``enqueue_many``, chains and groups:
    ``Job(task, payload=None, **options)``. ``task`` is a task's name, or
    its ``@corral.task`` function, as for ``enqueue``: then the job takes
    the task's name and options, a type checker checks ``payload``, and the
    client checks it as the worker will. The options are those of
    :class:`corral.broker.jobspec.JobOptions` (``queue``, ``priority``,
    ``delay``, ``run_at``, ``max_attempts``, ``timeout``, ``unique_key``,
    ``result_ttl``, ``unique_for``, ``max_retries``, ``expires``,
    ``limit_key``, ``headers``), plus ``id``, ``on_success`` and
    ``on_failure``."""

    task: str | Task[..., PayloadT, Any]
    # A payload of the task's type (None for none): a type checker holds a
    # @corral.task's payload to it (with a name, anything goes).
    payload: PayloadT = None  # type: ignore[assignment]

    if TYPE_CHECKING:  # how a type checker sees the constructor: as enqueue's

        @overload
        def __init__(
            self: Job[None],
            task: Task[..., None, Any],
            payload: None = None,
            **options: Unpack[EnqueueOptions],
        ) -> None: ...
        @overload
        def __init__(
            self,
            task: Task[..., PayloadT, Any],
            payload: PayloadT,
            **options: Unpack[EnqueueOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: Job[Any], task: str, payload: Any = None, **options: Unpack[EnqueueOptions]
        ) -> None: ...
        def __init__(self, task: Any, payload: Any = None, **options: Any) -> None: ...


class EnqueueOptions(TypedDict, total=False):
    """The keyword options of ``enqueue`` (see ``ClientCore.enqueue``), for
    its typed overloads."""

    queue: str | None
    priority: int
    delay: float | None
    run_at: float | None
    max_attempts: int | None
    timeout: float | None
    unique_key: str | None
    result_ttl: float | None
    unique_for: float | None
    max_retries: int | None
    expires: float | datetime | None
    limit_key: str | None
    headers: Mapping[str, str] | None
    id: str | None
    on_success: AnyJob | None
    on_failure: AnyJob | None


#: The time left to the client call being made in this thread (or asyncio
#: task), set by the client around the call's job specs: the hooks'
#: ``before_enqueue`` runs within it. None: unbounded (a spec made outside a
#: client call).
call_budget: ContextVar[CallBudget | None] = ContextVar("corral_call_budget", default=None)


def new_job_id() -> str:
    """A 32-hex-digit id that sorts by creation time (48-bit ms + 80 random bits)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


#: The options a job of a task function takes from its decorator, where not given.
_TASK_OPTIONS = ("queue", "max_attempts", "timeout", "result_ttl", "max_retries")


def job_spec(job: AnyJob, hooks: HookSet) -> JobSpec:
    """The wire spec of ``job`` (and of its callbacks): every option as
    given (a task function's where not given), the payload encoded (and
    checked against a task function's payload type), a new id unless the
    job has one, and the headers the hooks' ``before_enqueue`` added."""
    job_id = job.id or new_job_id()
    payload = _encode_payload(job.payload)
    if not isinstance(job.task, str):  # a @corral.task function: its name and options
        definition = _task_definition(job.task)
        job = msgspec.structs.replace(
            job,
            task=definition.name,
            **{
                option: getattr(definition, option)
                for option in _TASK_OPTIONS
                if getattr(job, option) is None
            },
        )
        _check_payload(definition, payload)
    options = options_of(job)
    options["expires"] = expires_value(job.expires)
    if hooks:
        options["headers"] = _hooked_headers(hooks, job, job_id)
    return JobSpec(
        job_id,
        str(job.task),
        payload,
        on_success=job_spec(job.on_success, hooks) if job.on_success is not None else None,
        on_failure=job_spec(job.on_failure, hooks) if job.on_failure is not None else None,
        **options,  # type: ignore[arg-type]
    )


def expires_value(value: Any) -> float | datetime | None:
    """The wire form of an ``expires`` option: seconds as a float, or an
    aware datetime. Takes seconds (a number or a ``timedelta``), a datetime
    (naive: local time), or text (JSON jobs, the CLI): a duration like
    ``"5m"`` or an ISO 8601 time (without a zone: UTC). Raises TypeError or
    ValueError naming the option."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.astimezone()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return _expires_text(value)
    raise TypeError(
        f"expires: expected seconds, a datetime or a timedelta, not {type(value).__name__}"
    )


def _expires_text(text: str) -> float | datetime:
    from corral.config.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f'expires: {text!r} is neither a duration ("30s", "5m", "2h") nor an '
            "ISO 8601 time (2030-01-01T09:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _hooked_headers(hooks: HookSet, job: AnyJob, job_id: str) -> dict[str, str] | None:
    """``job``'s headers once the hooks' ``before_enqueue`` has seen the
    job. An entry a hook made or changed that the broker would refuse the
    job for (not text to text, a key empty or over ``MAX_HEADER_KEY``
    characters, a value over ``MAX_HEADER_VALUE``, past ``MAX_HEADERS``
    entries) is dropped and logged (``hook.bad_header``), so a hook cannot
    make an enqueue fail; the caller's own entries go as given (a bad one
    is the caller's to fix: the broker names it)."""
    given = dict(job.headers or {})
    enqueuing = Enqueuing(job.task, job_id, job.queue, job.payload, dict(given))
    hooks.before_enqueue(enqueuing, call_budget.get())
    hooked: Any = enqueuing.headers
    if not isinstance(hooked, Mapping):  # replaced, not added to: the caller's go
        _warn_bad_header(job.task, "*", f"headers must stay a mapping, not {type(hooked)}")
        hooked = given
    headers: dict[str, str] = {}
    for key, value in hooked.items():
        why = None
        if key not in given or given[key] != value:
            why = _bad_header(key, value, len(headers))
        if why is None:
            headers[key] = value
            continue
        _warn_bad_header(job.task, repr(key)[:80], why)
    return headers or None


def _warn_bad_header(task: str, key: str, why: str) -> None:
    import structlog  # only now: a client's import of corral stays light

    structlog.get_logger().warning("hook.bad_header", task=task, key=key, why=why, hint="dropped")


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bad_header(key: object, value: object, count: int) -> str | None:
    """Why the broker would refuse a job for header ``key: value`` after
    ``count`` others, or None."""
    if not isinstance(key, str) or not isinstance(value, str):
        return "a header is text to text: use str"
    if not _utf8(key) or not _utf8(value):
        return "a header is valid UTF-8 text (a lone surrogate is not)"
    if not 0 < len(key) <= MAX_HEADER_KEY:
        return f"a key must be a non-empty string of at most {MAX_HEADER_KEY} characters"
    if len(value) > MAX_HEADER_VALUE:
        return f"a value may be at most {MAX_HEADER_VALUE} characters, not {len(value)}"
    if count >= MAX_HEADERS:
        return f"a job may carry at most {MAX_HEADERS} headers"
    return None


def _encode_payload(payload: Any) -> msgspec.Raw:
    if isinstance(payload, msgspec.Raw):
        return payload
    try:
        return p.encode_value(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"payload cannot be encoded as msgpack: {exc}") from None


def _check_payload(definition: Any, payload: msgspec.Raw) -> None:
    """Refuse, as the worker would, a payload the task's handler cannot take
    (PayloadInvalid, a ValueError naming the task and the field)."""
    if not definition.takes_payload:
        return
    from corral.workers.registry import PayloadInvalid

    try:
        definition.decode_payload(bytes(payload))
    except PayloadInvalid as exc:
        raise PayloadInvalid(
            f"task {definition.name}: {exc} (its handler's payload type); nothing was enqueued"
        ) from None


def _task_definition(fn: object) -> Any:
    """The definition (a ``TaskDef``) of a ``@corral.task`` function.
    Raises TypeError for anything else."""
    from corral.workers.registry import ATTRIBUTE

    definition = getattr(fn, ATTRIBUTE, None)
    if definition is None:
        raise TypeError(f"enqueue takes a task name or a @corral.task function, not {fn!r}")
    return definition
