"""Running one delivered job: decode its payload, call its handler (plain,
on a thread, or as a coroutine), and turn what happened into an Outcome.

The sync and asyncio paths share :meth:`Execution.prepare` and
:meth:`Execution.complete`; only the call in between differs. The hooks
(:mod:`corral.hooks`) run at both ends: ``before_job`` in ``prepare``, and
the end hooks (``on_failure``, ``on_retry``, ``after_job``) in
:meth:`Execution.finish`, which the worker calls once it has handed the
outcome over for reporting: a hook slow to see a job end (an exporter
flushing over a slow network) never delays its outcome, holds its limits'
slots or makes it run past its timeout. The per-job log lines are one of
them.

A hook that raises one of :data:`corral.hooks.EXITS` (``sys.exit``,
KeyboardInterrupt) asks the worker to stop: ``before_job``'s ends the try
with that error (the job is tried again), an end hook's leaves the outcome
as it was; either is kept in :attr:`Execution.exit` for the worker, which
drains and exits (see :meth:`corral.workers.runtime.Worker.hook_exit`).
"""

from __future__ import annotations

import asyncio
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from corral.broker import protocol as p
from corral.broker.jobspec import MAX_SECONDS, NIL
from corral.context import JobContext
from corral.errors import Fail, Retry, SoftTimeout
from corral.hooks import EXITS, HookSet, JobEnd, Outcome
from corral.logs import JobLines
from corral.workers.registry import PayloadInvalid, Registry, ResultInvalid, TaskDef, UnknownTask

log = structlog.get_logger()

#: Room a report needs around one outcome's result (ids, lease, error,
#: times, framing), in bytes: a result may use max_message_size minus this,
#: or minus a quarter of it when that is less (a small max_message_size;
#: an outcome's fields are about 100 bytes, and a report that still does not
#: fit is split or its outcome failed, see :mod:`corral.workers.reports`).
REPORT_OVERHEAD = 64 * 1024


def report_overhead(max_message_size: int) -> int:
    """The room kept beside a result under ``max_message_size`` (bytes)."""
    return min(REPORT_OVERHEAD, max_message_size // 4)


#: Longest error message and traceback kept, in characters.
MAX_MESSAGE_CHARS = 8 * 1024
MAX_TRACEBACK_CHARS = 32 * 1024
#: The longest progress note sent (the broker keeps as much: corral.broker.dispatch).
MAX_NOTE_CHARS = 500


#: What hooks call each outcome kind (``error``: the broker retries it if
#: attempts remain, else it fails).
_OUTCOMES: dict[str, Outcome] = {
    "ok": "succeeded",
    "error": "errored",
    "fail": "failed",
    "retry": "retry_asked",
}


def builtin_hooks() -> HookSet:
    """The hooks every worker runs: its lines per job."""
    return HookSet([JobLines()])


class Execution:
    """One try of one job, from delivery to outcome."""

    def __init__(
        self,
        delivery: p.Delivery,
        registry: Registry,
        worker_id: str,
        max_message_size: int = 16 * 2**20,
        hooks: HookSet | None = None,
    ) -> None:
        self.d = delivery
        #: The largest result that fits a report the broker accepts, in bytes.
        self._overhead = report_overhead(max_message_size)
        self.max_result = max(0, max_message_size - self._overhead)
        self.definition: TaskDef | None = registry.get(delivery.task)
        self.started = time.time()
        self.ctx = JobContext(
            delivery.job_id,
            delivery.attempt,
            delivery.task,
            delivery.queue,
            delivery.enqueued_at,
            delivery.max_attempts,
            delivery.lease,
            delivery.prev_result,
            delivery.headers or {},
        )
        self._registry = registry
        self._worker_id = worker_id
        self._hooks = hooks if hooks is not None else builtin_hooks()
        #: How the try ended, for the end hooks (see :meth:`finish`).
        self._end: JobEnd | None = None
        #: What a hook raised to stop the process (see the module's doc).
        self.exit: BaseException | None = None

    def prepare(self) -> tuple[Any, ...] | p.Outcome:
        """The handler's arguments, or the outcome if it cannot run. The
        hooks' ``before_job`` runs first."""
        d, definition = self.d, self.definition
        self._hooks.before_job(self.ctx)
        if definition is None:
            known = ", ".join(self._registry.names()) or "nothing"
            unknown = UnknownTask(
                f"task {d.task!r} is not registered in worker {self._worker_id} "
                f"(it knows: {known}); add its module to the pool's plugins"
            )
            return self.outcome(
                "error", error=p.ErrorInfo("UnknownTask", str(unknown)), exc=unknown
            )
        try:
            payload = definition.decode_payload(d.payload) if definition.takes_payload else None
        except PayloadInvalid as exc:
            return self.outcome("fail", error=p.ErrorInfo("ValidationError", str(exc)), exc=exc)
        return definition.args(self.ctx, payload)

    def call_sync(self, args: tuple[Any, ...], loop: asyncio.AbstractEventLoop | None) -> Any:
        assert self.definition is not None
        value = self.definition.fn(*args)
        if self.definition.is_async:
            assert loop is not None
            value = loop.run_until_complete(value)
        return value

    async def call_async(self, args: tuple[Any, ...]) -> Any:
        assert self.definition is not None
        if self.definition.is_async:
            return await self.definition.fn(*args)
        return await asyncio.to_thread(self.definition.fn, *args)

    def _prepared(self) -> tuple[Any, ...] | p.Outcome:
        """:meth:`prepare`, with a hook's exit (kept) as the try's error."""
        try:
            return self.prepare()
        except EXITS as exc:
            self.exit = exc
            return self.complete(error=exc)

    def run(self, call: Callable[[tuple[Any, ...]], Any]) -> p.Outcome:
        """prepare, ``call``, complete: the sync path (then :meth:`finish`)."""
        args = self._prepared()
        if isinstance(args, p.Outcome):
            return args
        try:
            value = call(args)
        except BaseException as exc:  # a handler's error is the job's error
            return self.complete(error=exc)
        return self.complete(value=value)

    async def run_async(self) -> p.Outcome:
        args = self._prepared()
        if isinstance(args, p.Outcome):
            return args
        try:
            value = await self.call_async(args)
        except BaseException as exc:  # a handler's error is the job's error
            return self.complete(error=exc)
        return self.complete(value=value)

    def complete(self, value: Any = None, error: BaseException | None = None) -> p.Outcome:
        """The outcome of the call: its result, or what its exception means."""
        if isinstance(error, Retry) and not _retry_delay_ok(error.delay):
            # the broker refuses a report with such a delay (NaN, infinite) or
            # keeps a time past any clock: the handler's bug, named on the try
            error = ValueError(
                f"corral.Retry(delay={error.delay!r}): the delay must be a finite number of "
                f"seconds from 0 to {MAX_SECONDS:.0f} (100 years), or None for the backoff"
            )
        if isinstance(error, Retry):
            why = clean_text(error.reason or str(error), MAX_MESSAGE_CHARS)
            return self.outcome(
                "retry", delay=error.delay, error=p.ErrorInfo("Retry", why), exc=error
            )
        if isinstance(error, Fail):
            return self.outcome("fail", error=error_info(error), exc=error)
        if error is not None:
            return self.outcome("error", error=error_info(error), exc=error)
        try:
            result = p.encode_value(value)
        except Exception as exc:  # any value msgpack cannot hold, whatever it raises
            text = clean_text(
                f"the handler returned a {type(value).__name__} "
                f"that msgpack cannot hold: {_describe(exc)}",
                MAX_MESSAGE_CHARS,
            )
            bad = ResultInvalid(text)
            bad.__cause__ = exc
            return self.outcome("fail", error=p.ErrorInfo("ResultNotSerializable", text), exc=bad)
        if len(result) > self.max_result:
            text = (
                f"the result is {len(result)} bytes encoded, over the {self.max_result} "
                f"bytes a report can carry (broker.max_message_size less "
                f"{self._overhead}); store it elsewhere and return a reference"
            )
            return self.outcome(
                "fail", error=p.ErrorInfo("ResultTooLarge", text), exc=ResultInvalid(text)
            )
        return self.outcome("ok", result=result, value=value)

    def outcome(
        self,
        kind: str,
        *,
        result: msgspec.Raw = NIL,
        error: p.ErrorInfo | None = None,
        delay: float | None = None,
        exc: BaseException | None = None,
        value: Any = None,
    ) -> p.Outcome:
        """The outcome to report (``exc`` and ``error``: what ended the
        try; ``value``: what the handler returned, for the end hooks)."""
        d = self.d
        ended = time.time()
        outcome = p.Outcome(d.job_id, d.lease, kind, result, error, delay, self.started, ended)
        end = JobEnd(
            _OUTCOMES[kind],
            ended - self.started,
            value,
            exc,
            error.type if error is not None else "",
            error.message if error is not None else "",
        )
        self._end = end
        return outcome

    def finish(self) -> None:
        """Run the end hooks (``on_failure`` or ``on_retry``, then
        ``after_job``) for how the try ended, once; call it after the
        outcome has gone for reporting, on the thread that ran the job."""
        end, self._end = self._end, None
        if end is not None:
            try:
                self._hooks.job_ended(self.ctx, end)
            except EXITS as exc:
                self.exit = exc


def _retry_delay_ok(delay: object) -> bool:
    """Whether a Retry's delay is None or seconds the broker takes."""
    if delay is None:
        return True
    return isinstance(delay, int | float) and 0 <= delay <= MAX_SECONDS


def error_info(exc: BaseException) -> p.ErrorInfo:
    """What an exception says, always encodable: text that is not valid
    UTF-8 (lone surrogates, from ``os.fsdecode`` of odd bytes) is kept with
    its odd characters escaped, an ``str()`` that raises is named, and long
    texts are cut."""
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception as inner:
        tb = f"<the traceback could not be formatted: {_describe(inner)}>"
    return p.ErrorInfo(
        clean_text(type(exc).__name__, 200),
        clean_text(_describe(exc, with_type=False), MAX_MESSAGE_CHARS),
        clean_text(tb, MAX_TRACEBACK_CHARS, keep_end=True),
    )


def _describe(exc: BaseException, *, with_type: bool = True) -> str:
    try:
        text = str(exc)
    except Exception as inner:
        text = f"<str() of the {type(exc).__name__} raised {type(inner).__name__}>"
    return f"{type(exc).__name__}: {text}" if with_type else text


def clean_text(text: str, limit: int, *, keep_end: bool = False) -> str:
    """``text`` as valid UTF-8 (odd characters backslash-escaped), at most
    ``limit`` characters (cut in the middle of a traceback: its end is
    where the error is)."""
    if not isinstance(text, str):
        text = repr(text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    cut = f"... [{len(text) - limit} characters cut] ..."
    if keep_end:
        return text[: limit // 4] + cut + text[-(limit - limit // 4) :]
    return text[:limit] + cut


class SoftTimer:
    """Soft timeouts: SIGALRM raises SoftTimeout inside the handler running
    on the main thread (the first of a process's slots), after the task's
    ``soft_timeout`` seconds; the handler may catch it and clean up."""

    def __init__(self) -> None:
        self._job: str | None = None

    def on_alarm(self, signum: int, frame: object) -> None:
        """The SIGALRM handler."""
        if self._job is not None:
            self._job = None
            raise SoftTimeout("the job ran past its soft timeout")

    def run(
        self, execution: Execution, loop: asyncio.AbstractEventLoop | None, soft: float | None
    ) -> p.Outcome:
        """Run ``execution`` on this thread, with a soft timeout of ``soft``
        seconds if given (main thread only)."""
        try:
            if soft:
                self._job = execution.d.job_id
                signal.setitimer(signal.ITIMER_REAL, soft)
            return execution.run(lambda args: execution.call_sync(args, loop))
        except SoftTimeout as exc:  # fired outside the handler's own try
            return execution.complete(error=exc)
        finally:
            if soft:
                self._job = None
                signal.setitimer(signal.ITIMER_REAL, 0)
