"""Running one delivered job: decode its payload, call its handler (plain,
on a thread, or as a coroutine), and turn what happened into an Outcome.

The sync and asyncio paths share :meth:`Execution.prepare` and
:meth:`Execution.complete`; only the call in between differs.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from corral.broker import protocol as p
from corral.broker.jobspec import NIL
from corral.context import JobContext
from corral.errors import Fail, Retry
from corral.workers.registry import PayloadInvalid, Registry, TaskDef

log = structlog.get_logger()


class Execution:
    """One try of one job, from delivery to outcome."""

    def __init__(self, delivery: p.Delivery, registry: Registry, worker_id: str) -> None:
        self.d = delivery
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
        )
        self._registry = registry
        self._worker_id = worker_id

    def prepare(self) -> tuple[Any, ...] | p.Outcome:
        """The handler's arguments, or the outcome if it cannot run."""
        d, definition = self.d, self.definition
        if definition is None:
            known = ", ".join(self._registry.names()) or "nothing"
            return self.outcome(
                "error",
                error=p.ErrorInfo(
                    "UnknownTask",
                    f"task {d.task!r} is not registered in worker {self._worker_id} "
                    f"(it knows: {known}); add its module to the pool's plugins",
                ),
            )
        try:
            payload = definition.decode_payload(d.payload) if definition.takes_payload else None
        except PayloadInvalid as exc:
            return self.outcome("fail", error=p.ErrorInfo("ValidationError", str(exc)))
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

    def run(self, call: Callable[[tuple[Any, ...]], Any]) -> p.Outcome:
        """prepare, ``call``, complete: the sync path."""
        args = self.prepare()
        if isinstance(args, p.Outcome):
            return args
        try:
            value = call(args)
        except BaseException as exc:  # a handler's error is the job's error
            return self.complete(error=exc)
        return self.complete(value=value)

    async def run_async(self) -> p.Outcome:
        args = self.prepare()
        if isinstance(args, p.Outcome):
            return args
        try:
            value = await self.call_async(args)
        except BaseException as exc:  # a handler's error is the job's error
            return self.complete(error=exc)
        return self.complete(value=value)

    def complete(self, value: Any = None, error: BaseException | None = None) -> p.Outcome:
        """The outcome of the call: its result, or what its exception means."""
        if isinstance(error, Retry):
            return self.outcome("retry", delay=error.delay, error=p.ErrorInfo("Retry", str(error)))
        if isinstance(error, Fail):
            return self.outcome("fail", error=error_info(error))
        if error is not None:
            log.warning("worker.job_error", error=f"{type(error).__name__}: {error}")
            return self.outcome("error", error=error_info(error))
        try:
            result = p.encode_value(value)
        except (TypeError, ValueError, OverflowError) as exc:
            return self.outcome(
                "fail",
                error=p.ErrorInfo(
                    "ResultNotSerializable",
                    f"the handler returned a {type(value).__name__} "
                    f"that msgpack cannot hold: {exc}",
                ),
            )
        return self.outcome("ok", result=result)

    def outcome(
        self,
        kind: str,
        *,
        result: msgspec.Raw = NIL,
        error: p.ErrorInfo | None = None,
        delay: float | None = None,
    ) -> p.Outcome:
        d = self.d
        return p.Outcome(d.job_id, d.lease, kind, result, error, delay, self.started, time.time())


def error_info(exc: BaseException) -> p.ErrorInfo:
    return p.ErrorInfo(type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)))
