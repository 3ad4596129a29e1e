"""The clients' sans-I/O core: every client operation, written once.

Each operation of :class:`ClientCore` is a :class:`Step`: the request to send
and how to read its reply (the value, or the next step of a long poll). The
core does no I/O, so it is tested with canned replies; :mod:`corral.client`
drives its steps over a socket, blocking or awaited. The job specs an
operation takes (:class:`Job`, with their ids, made so that a resent
enqueue is idempotent at the broker) are :mod:`corral.clientjobs`'s; the
pages it gives (:class:`JobPage`) are here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, Unpack, cast, overload

import msgspec

from corral.broker import protocol as p
from corral.broker.protocol import TERMINAL
from corral.clientjobs import (
    AnyJob,
    EnqueueOptions,
    Job,
    PayloadT,
    expires_value,
    job_spec,
    new_job_id,
)
from corral.errors import (
    BrokerError,
    CorralError,
    DiskFull,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from corral.hooks import HookSet

if TYPE_CHECKING:
    from corral.workers.registry import Task

__all__ = [
    "AnyJob",
    "ClientCore",
    "Job",
    "JobPage",
    "Plan",
    "Step",
    "expires_value",
    "new_job_id",
]

#: Longest single long-poll; longer waits are made of several.
MAX_WAIT_SLICE = 30.0

T = TypeVar("T")


class JobPage(list[p.JobInfo]):
    """A page of ``jobs()``; pass ``cursor`` to get the next (None: the last)."""

    cursor: str | None = None


# ---------------------------------------------------------------- the operations


#: Requests a client sends again when no answer came in time: the broker
#: answers a repeat as it answered the first (an enqueue carries its job ids,
#: a flow its flow id, and neither is created twice), so a reply lost on the
#: way (a broker restart, a network drop) costs a resend, never a duplicate.
#: Cancel, retry, delete, purge and the like are not resent: a repeat would
#: answer differently.
RESENDABLE = (
    p.Enqueue,
    p.EnqueueEach,
    p.EnqueueFlow,
    p.GetJob,
    p.GetResult,
    p.GetFlow,
    p.ListJobs,
    p.GetStatus,
    p.Ping,
)
#: Seconds without an answer before a resendable request goes again; each
#: resend waits twice as long as the one before, up to RESEND_INTERVAL_MAX.
RESEND_INTERVAL = 1.0
RESEND_INTERVAL_MAX = 8.0


def resend_every(request: p.ClientRequest, wait: float, resent: int = 0) -> float | None:
    """Seconds from a send of ``request`` (its long-poll ``wait`` included)
    to the next one, after ``resent`` resends; None if it is sent once. The
    interval doubles: a broker that is slow rather than gone (a flood before
    this request) reads every copy in turn, and each copy delays what the
    client asks next, so copies sent every second would pile up."""
    if not isinstance(request, RESENDABLE):
        return None
    return wait + min(RESEND_INTERVAL * 2.0**resent, RESEND_INTERVAL_MAX)


class Step(msgspec.Struct, Generic[T]):
    """One request of an operation, and what its reply makes of it: the
    operation's value, or the next step (a long poll that goes on)."""

    request: p.ClientRequest
    #: Turns the (non-error) reply into the value or the next step.
    read: Callable[[Any], Plan[T]]
    #: Seconds the broker may hold the request (a long poll), on top of the
    #: client's timeout.
    wait: float = 0.0

    def answer(self, reply: p.ClientReply) -> Plan[T]:
        """The value or the next step for ``reply``; an error reply raises."""
        if type(reply) is p.ErrorReply:
            raise broker_error(reply)
        return self.read(reply)


#: What an operation returns: its value at once when it needs no request,
#: else its first :class:`Step`.
Plan: TypeAlias = "T | Step[T]"


def broker_error(reply: p.ErrorReply) -> CorralError:
    """The exception for an error reply: JobNotFound, DiskFull or BrokerError."""
    if reply.code == "not_found":
        return JobNotFound(reply.message)
    if reply.code == "disk_full":
        return DiskFull(reply.message)
    return BrokerError(reply.code, reply.message)


class UnsendableValue(ValueError):
    """A value of a request msgpack cannot carry; the message names its field."""


#: Requests up to this many bytes go to any broker (the least
#: broker.max_message_size it takes: corral.config.schema.MIN_MESSAGE);
#: a larger one is checked against the broker's own limit first.
BIG_REQUEST = 16 * 2**10


def check_broker_limit(size: int, limit: int) -> None:
    """Raise RequestTooLarge if a request of ``size`` bytes is over the
    broker's ``limit`` (0: the broker did not say), which would drop it
    with the connection, unanswered."""
    if limit and size > limit:
        raise RequestTooLarge(
            f"the request is {size} bytes, over the broker's max_message_size of {limit} "
            "(this client's config says more; nothing was sent); send fewer jobs per "
            "enqueue_many or smaller payloads"
        )


def encode_request(request: p.ClientRequest, max_message_size: int) -> bytes:
    """Encode a request, refusing one the broker would drop unanswered.
    Raises RequestTooLarge, or UnsendableValue (a ValueError) for a value msgpack cannot carry
    (a whole number past 64 bits, text with a lone surrogate), naming its
    field."""
    try:
        body = p.encode(request)
    except (OverflowError, UnicodeEncodeError) as exc:
        where = _unsendable(request, type(request).__name__) or type(request).__name__
        what = (
            "a whole number past 64 bits (-2**63 to 2**64 - 1) cannot be sent; the broker "
            "takes counts of at most 32 bits"
            if isinstance(exc, OverflowError)
            else "text that is not valid UTF-8 (a lone surrogate) cannot be sent"
        )
        raise UnsendableValue(f"{where}: {what}") from None
    if len(body) > max_message_size:
        raise RequestTooLarge(
            f"the request is {len(body)} bytes, over the broker's max_message_size of "
            f"{max_message_size}; send fewer jobs per enqueue_many or smaller payloads"
        )
    return body


def _unsendable(value: Any, path: str) -> str | None:
    """The path of the first value in ``value`` msgpack cannot carry (an int
    past 64 bits, a str that is not UTF-8); None: none."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return path
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    items: Iterable[tuple[str, Any]] = ()
    if isinstance(value, msgspec.Struct):
        items = ((f"{path}.{f}", getattr(value, f)) for f in value.__struct_fields__)
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, Mapping):
        # a key and its value, both named by the key
        items = ((f"{path}[{k!r}]", x) for k, v in value.items() for x in (k, v))
    return next((found for sub, v in items if (found := _unsendable(v, sub))), None)


def decode_reply(frame: bytes) -> p.ClientReply:
    """Decode a reply: its frames joined (a status reply comes in three, see
    :func:`corral.broker.protocol.status_reply_frames`). ProtocolError if
    it is not one."""
    reply: p.ClientReply = p.decode(p.client_reply_decoder, frame)
    return reply


class ClientCore:
    """Every client operation, as the request to send and how to read its
    reply; no sockets. Each public method here is a method of both
    :class:`Client` and :class:`AsyncClient`, and its docstring is theirs.

    Every operation may also raise BrokerUnavailable (no answer within the
    client's ``timeout`` seconds, plus a long poll's wait) and BrokerError
    (the broker refused the request; ``code`` says why, e.g. ``invalid``).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, hooks: HookSet | None = None
    ) -> None:
        #: Monotonic seconds, for result()'s deadline.
        self.clock = clock
        #: Their ``before_enqueue`` runs for every job spec made here.
        self.hooks = hooks if hooks is not None else HookSet()
        self._req = itertools.count(1)

    # --- enqueueing

    # For a type checker: a task function with no payload takes none; one
    # with a payload must be given one of its type; a task name takes anything.
    @overload
    def enqueue(
        self,
        task: Task[..., None, Any],
        payload: None = None,
        **options: Unpack[EnqueueOptions],
    ) -> Plan[str]: ...
    @overload
    def enqueue(
        self, task: Task[..., PayloadT, Any], payload: PayloadT, **options: Unpack[EnqueueOptions]
    ) -> Plan[str]: ...
    @overload
    def enqueue(
        self, task: str, payload: Any = None, **options: Unpack[EnqueueOptions]
    ) -> Plan[str]: ...

    # One keyword per job option is the public interface, so PLR0913 does not apply.
    def enqueue(  # noqa: PLR0913
        self,
        task: str | Task[..., Any, Any],
        payload: Any = None,
        *,
        queue: str | None = None,
        priority: int = 0,
        delay: float | None = None,
        run_at: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        unique_key: str | None = None,
        result_ttl: float | None = None,
        unique_for: float | None = None,
        max_retries: int | None = None,
        expires: float | datetime | None = None,
        limit_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        on_success: AnyJob | None = None,
        on_failure: AnyJob | None = None,
    ) -> Plan[str]:
        """Enqueue one job; return its id once the broker has logged it.

        ``task`` is a task's name or its ``@corral.task`` function: then the
        job takes the task's name, and its queue, ``max_attempts``,
        ``timeout``, ``result_ttl`` and ``max_retries`` where not given here,
        and a type checker checks ``payload`` against the handler's payload
        annotation. ``payload`` is any msgpack-able value. The options are
        those of :class:`Job`: ``delay``, ``timeout``, ``result_ttl`` and
        ``unique_for`` are seconds, ``run_at`` is epoch seconds,
        ``max_retries`` bounds the handler's ``corral.Retry`` requests,
        ``headers`` is the job's metadata (text keys and values the handler
        reads as ``ctx.headers``; hooks may add to it), and None leaves the
        task's (else the broker's) default. ``queue`` None is the task's
        queue, else ``"default"``; a higher ``priority`` runs first.
        ``expires`` (seconds after the job is due, or a datetime; a naive one
        is local time): a job not started by then never runs and ends
        ``cancelled``, reason ``expired``. ``limit_key`` is what the task's
        ``key_concurrency`` and ``key_rate`` count by.

        Returns the job id: a new 32-hex-digit str, or ``id`` if given (an
        ``id`` the broker has makes this a no-op), or the holder's id while
        another job holds ``unique_key``. Raises TypeError for a
        payload msgpack cannot encode or a task that is neither,
        PayloadInvalid (a ValueError naming the field) for a payload the
        task function's handler would refuse, RequestTooLarge (each: nothing
        sent), DiskFull (not accepted), BrokerError ``invalid`` for a bad
        option, BrokerUnavailable.
        """
        job = Job(
            cast(Any, task),  # (the overloads above have checked it against the payload)
            payload,
            queue=queue,
            max_attempts=max_attempts,
            timeout=timeout,
            result_ttl=result_ttl,
            max_retries=max_retries,
            priority=priority,
            delay=delay,
            run_at=run_at,
            unique_key=unique_key,
            unique_for=unique_for,
            expires=expires,
            limit_key=limit_key,
            headers=dict(headers) if headers is not None else None,
            id=id,
            on_success=on_success,
            on_failure=on_failure,
        )
        return Step(p.Enqueue(next(self._req), [job_spec(job, self.hooks)]), _first_id)

    def enqueue_many(self, jobs: Iterable[AnyJob]) -> Plan[list[str]]:
        """Enqueue several :class:`Job` in one durable batch (all or none).

        Returns their ids (32-hex-digit strs), in order, as ``enqueue``
        would; an empty batch returns [] without a request. Raises as
        ``enqueue`` does.
        """
        specs = [job_spec(job, self.hooks) for job in jobs]
        if not specs:
            return []
        return Step(p.Enqueue(next(self._req), specs), _ids)

    def enqueue_chain(
        self, jobs: Iterable[AnyJob], *, result_ttl: float | None = None
    ) -> Plan[str]:
        """Run jobs one after another, each handler getting the previous
        one's result as ``ctx.prev_result``; a failure stops the chain.
        ``result_ttl``: seconds the chain is kept once finished (None: as
        long as its longest-kept job).

        Returns the chain's id (32 hex digits), for ``chain()`` and
        ``result()``. Raises ValueError for no jobs, and as ``enqueue``.
        """
        return self._flow("chain", jobs, None, result_ttl)

    def enqueue_group(
        self,
        jobs: Iterable[AnyJob],
        callback: AnyJob | None = None,
        *,
        result_ttl: float | None = None,
    ) -> Plan[str]:
        """Run jobs in parallel; with ``callback`` (a chord), run it once all
        succeeded, with the list of their results as ``ctx.prev_result``.
        ``result_ttl``: seconds the group is kept once finished (None: as
        long as its longest-kept job).

        Returns the group's id (32 hex digits), for ``group()`` and
        ``result()``. Raises ValueError for no jobs, and as ``enqueue``.
        """
        return self._flow("group", jobs, callback, result_ttl)

    def _flow(
        self, kind: str, jobs: Iterable[AnyJob], callback: AnyJob | None, result_ttl: float | None
    ) -> Plan[str]:
        specs = [job_spec(job, self.hooks) for job in jobs]
        if not specs:
            raise ValueError(f"a {kind} needs at least one job")
        spec = job_spec(callback, self.hooks) if callback is not None else None
        msg = p.EnqueueFlow(next(self._req), new_job_id(), kind, specs, spec, result_ttl=result_ttl)
        return Step(msg, _first_id)

    # --- reading

    def job(self, job_id: str) -> Plan[p.JobInfo]:
        """One job's info: a ``corral.JobInfo`` with ``status``, ``attempts``,
        ``tries``, ``error``, and times as epoch seconds (``created_at``,
        ``next_run_at``, ...). Raises JobNotFound for an unknown or expired
        id, BrokerUnavailable.
        """
        return Step(p.GetJob(next(self._req), job_id), _job_info)

    def result(self, job_id: str, timeout: float | None = None) -> Plan[Any]:
        """Wait for a job to end and return its result, decoded from msgpack.

        For a chain id: the last job's result; for a group id: the list of
        its jobs' results, in order. ``timeout`` is seconds to wait (0: do
        not wait; None: for ever, in long polls of at most 30 s). Raises
        JobFailed (``.error`` is the last try's), JobCancelled,
        ResultTimeout when ``timeout`` passes first, JobNotFound,
        BrokerUnavailable.
        """
        deadline = None if timeout is None else self.clock() + timeout
        return self._poll(job_id, deadline)

    def _poll(self, job_id: str, deadline: float | None) -> Step[Any]:
        """One long poll, at most MAX_WAIT_SLICE, never past ``deadline``;
        its reply is the outcome, or the next poll while time is left."""
        left = MAX_WAIT_SLICE if deadline is None else max(0.0, deadline - self.clock())
        wait = min(left, MAX_WAIT_SLICE)

        def read(reply: p.ResultReply) -> Plan[Any]:
            if reply.status in TERMINAL or (deadline is not None and self.clock() >= deadline):
                return _outcome(reply)
            return self._poll(job_id, deadline)

        return Step(p.GetResult(next(self._req), job_id, wait), read, wait)

    def status(self) -> Plan[p.StatusInfo]:
        """The broker's status: a ``StatusInfo`` with job counts per queue and
        status, the workers, supervisors, paused queues and counters.
        Raises BrokerUnavailable."""
        return Step(p.GetStatus(next(self._req)), _status_info)

    def ping(self) -> Plan[str]:
        """A round trip to the broker; returns its id (a str). Raises
        BrokerUnavailable when it does not answer within ``timeout``."""
        return Step(p.Ping(next(self._req)), _broker_id)

    def chain(self, chain_id: str) -> Plan[p.FlowInfo]:
        """A chain's info: a ``FlowInfo`` with its status, its job ids in
        order and their statuses, and ``failed_step`` if it stopped.
        Raises JobNotFound for an unknown id, BrokerUnavailable."""
        return Step(p.GetFlow(next(self._req), chain_id), _flow_info)

    def group(self, group_id: str) -> Plan[p.FlowInfo]:
        """A group's info: a ``FlowInfo`` with its status, its job ids and
        their statuses, and its ``callback`` job id if it is a chord.
        Raises JobNotFound for an unknown id, BrokerUnavailable."""
        return Step(p.GetFlow(next(self._req), group_id), _flow_info)

    def jobs(
        self,
        queue: str | None = None,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        cursor: str | None = None,
        newest: bool = False,
    ) -> Plan[JobPage]:
        """Jobs in creation order (``newest``: newest first), filtered by
        queue, status and task.

        Returns a :class:`JobPage`, a list of at most ``limit`` (1 to 10,000)
        ``JobInfo``; pass its ``.cursor`` as ``cursor`` for the next page
        (None: this was the last), with the same ``newest``; a ``limit``
        over 10,000 gives 10,000. Raises BrokerError ``invalid`` for an
        unknown status, a ``limit`` below 1 or a bad cursor,
        BrokerUnavailable.
        """
        msg = p.ListJobs(next(self._req), queue, status, task, limit, cursor, newest=newest)
        return Step(msg, _page)

    # --- management

    def cancel(self, job_id: str) -> Plan[bool]:
        """Cancel a job, or what has not ended of a chain or group: a queued
        or scheduled job never runs; a running one's handler sees
        ``ctx.cancelled`` and its result is discarded.

        Returns True if something was cancelled, False if it had already
        ended. Raises JobNotFound for an unknown id, BrokerUnavailable.
        """
        return Step(p.Cancel(next(self._req), job_id), _any_counted)

    def retry(self, job_id: str) -> Plan[str]:
        """Put a failed or cancelled job back, with a fresh budget of
        attempts. Returns its id. Raises JobNotFound, BrokerError
        ``invalid`` if the job has not ended that way (or another job holds
        its unique_key), DiskFull if the broker's disk is full (nothing
        retried), BrokerUnavailable.
        """
        return Step(p.RetryJobs(next(self._req), job_id), _first_id)

    def retry_failed(self, queue: str | None = None) -> Plan[list[str]]:
        """Put every failed job (of ``queue``; None: of all queues) back.
        Returns their ids. Raises DiskFull if the broker's disk is full
        (nothing retried), BrokerUnavailable."""
        return Step(p.RetryJobs(next(self._req), None, all_failed=True, queue=queue), _ids)

    def delete(self, job_id: str) -> Plan[None]:
        """Remove a finished job and its result; returns None. Raises
        JobNotFound, BrokerError ``invalid`` if the job has not ended
        (cancel it first), BrokerUnavailable."""
        return Step(p.Delete(next(self._req), job_id), _none)

    def purge(self, queue: str) -> Plan[int]:
        """Remove a queue's ``queued`` jobs (not the scheduled or running
        ones). Returns how many. Raises BrokerUnavailable."""
        return Step(p.Purge(next(self._req), queue), _count)

    def pause(self, queue: str) -> Plan[None]:
        """Stop handing out the queue's jobs (enqueueing goes on); lasts
        across broker restarts. Returns None. Raises BrokerUnavailable."""
        return Step(p.Pause(next(self._req), queue, True), _none)

    def resume(self, queue: str) -> Plan[None]:
        """Hand out a paused queue's jobs again. Returns None. Raises
        BrokerUnavailable."""
        return Step(p.Pause(next(self._req), queue, False), _none)

    # --- supervisors

    def report_supervisor(self, info: p.SupervisorInfo) -> Plan[int]:
        """A supervisor's periodic report (supervisors do this). Returns
        how many jobs are queued, for its STATUS line. Raises
        BrokerUnavailable."""
        return Step(p.SupervisorReport(next(self._req), info), _count)

    def worker_exited(
        self,
        host: str,
        pid: int,
        reason: str,
        identities: Iterable[str] = (),
        charged: Iterable[str] | None = None,
    ) -> Plan[int]:
        """Tell the broker worker process ``pid`` on ``host`` is gone
        (supervisors do this), so its jobs go back at once. ``identities``
        are the socket identities (hex) it connected with, which name it
        exactly; without them the broker matches host and pid. ``charged``
        names the jobs the process died for (a hard-timeout kill): only
        those count an attempt, its other jobs go back uncounted; None: the
        cause is unknown, and every job it had started counts. Returns how
        many worker registrations it dropped. Raises BrokerUnavailable."""
        msg = p.WorkerExited(
            next(self._req),
            host,
            pid,
            reason,
            identities=list(identities),
            charged=list(charged) if charged is not None else None,
        )
        return Step(msg, _count)


# The reply readers: each takes the reply its request gets.


def _first_id(reply: p.EnqueueOk | p.Ack) -> str:
    return reply.ids[0]


def _ids(reply: p.EnqueueOk | p.Ack) -> list[str]:
    return reply.ids


def _count(reply: p.Ack) -> int:
    return reply.count


def _any_counted(reply: p.Ack) -> bool:
    return reply.count > 0


def _none(reply: p.Ack) -> None:
    return None


def _job_info(reply: p.JobReply) -> p.JobInfo:
    return reply.job


def _flow_info(reply: p.FlowReply) -> p.FlowInfo:
    return reply.flow


def _status_info(reply: p.StatusReply) -> p.StatusInfo:
    return reply.status


def _broker_id(reply: p.Pong) -> str:
    return reply.broker_id


def _page(reply: p.JobList) -> JobPage:
    page = JobPage(reply.jobs)
    page.cursor = reply.cursor
    return page


def _outcome(reply: p.ResultReply) -> Any:
    """The result of an ended job, or the error its end (or the wait) means."""
    if reply.status == "succeeded":
        return msgspec.msgpack.decode(reply.result)
    if reply.status == "failed":
        raise JobFailed(reply.job_id, reply.error)
    if reply.status == "cancelled":
        error = reply.error
        if error is not None and error.type == p.EXPIRED_ERROR:
            raise JobCancelled(reply.job_id, p.EXPIRED, error.message)
        raise JobCancelled(reply.job_id)
    raise ResultTimeout(f"job {reply.job_id} is still {reply.status}")
