"""Tasks whose worker cannot get their reports out: a worker of another
build, as the broker sees it, or a bug in the worker's own code. For
tests/test_wedge.py.

Each task marks its job, on the attempts up to its payload (an int), and
the worker process's encoder (patched as this plugin is imported) then:

- ``wedge.refused``: sends the report carrying the job's outcome with a
  protocol version the broker does not speak (the broker refuses it);
- ``wedge.unencodable``: fails to encode that report (msgspec.EncodeError);
- ``wedge.handler_dies``: the handler thread's own bookkeeping after the
  handler (``Worker._end``) raises.
"""

from __future__ import annotations

from typing import Any

import msgspec

import corral
from corral.broker import protocol as p
from corral.workers import runtime

#: job id -> how its report fails, in this worker process.
_marked: dict[str, str] = {}


def _mark(ctx: corral.JobContext, how: str, until_attempt: int) -> str:
    if ctx.attempt <= until_attempt:
        _marked[ctx.job_id] = how
    return "done"


@corral.task(name="wedge.refused")
def refused(ctx: corral.JobContext, until_attempt: int) -> str:
    return _mark(ctx, "refused", until_attempt)


@corral.task(name="wedge.unencodable")
def unencodable(ctx: corral.JobContext, until_attempt: int) -> str:
    return _mark(ctx, "unencodable", until_attempt)


@corral.task(name="wedge.handler_dies")
def handler_dies(ctx: corral.JobContext, until_attempt: int) -> str:
    return _mark(ctx, "handler_dies", until_attempt)


def _how(msg: Any) -> str:
    if isinstance(msg, p.Report):
        for outcome in msg.done:
            if outcome.job_id in _marked:
                return _marked[outcome.job_id]
    return ""


_encode = p.encode


def _encode_marked(msg: Any) -> bytes:
    how = _how(msg)
    if how == "unencodable":
        raise msgspec.EncodeError("wedge_tasks: this report cannot be encoded")
    if how == "refused":
        return _encode(msgspec.structs.replace(msg, v=p.PROTOCOL_VERSION + 1))
    return _encode(msg)


_end = runtime.Worker._end


def _end_marked(self: runtime.Worker, execution: Any, outcome: Any) -> None:
    if _marked.get(execution.d.job_id) == "handler_dies":
        raise RuntimeError("wedge_tasks: the handler thread's bookkeeping failed")
    _end(self, execution, outcome)


p.encode = _encode_marked
runtime.Worker._end = _end_marked  # type: ignore[method-assign]
