"""structlog set-up, done once per process after fork: JSON lines when not on
a terminal (or when asked), readable lines otherwise; every line carries the
process's role and pid, and inside a job its job_id, task and attempt. And
the worker's lines per job, a built-in hook (:class:`JobLines`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from corral.hooks import Hooks, JobEnd

if TYPE_CHECKING:
    from corral.context import JobContext

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: The level of a worker's lines per job (see :func:`job_line`); None: off.
_job_level: int | None = logging.INFO

#: The bound logger the lines per job go through, and the structlog
#: configuration it was built from (see :func:`_job_logger`).
_job_log: tuple[tuple[Any, ...], Any] | None = None


def configure(role: str, level: str = "info", fmt: str = "auto", jobs: str = "info") -> None:
    """Configure structlog for this process, as ``role`` (broker, worker ...);
    ``jobs`` is the level of the lines per job ("debug", "info" or "off")."""
    global _job_level
    _job_level = LEVELS.get(jobs)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, pid=os.getpid())
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=json_line)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            iso_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # One write per line (message and newline together): the daemon's
        # processes share one stderr, and print() writes the newline apart,
        # so another process's line could land inside this one.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


#: The last whole second stamped, and its text up to the seconds.
_second: tuple[int, str] = (-1, "")


def iso_timestamp(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the line's ``timestamp``, UTC in ISO 8601 with
    microseconds (``2026-12-01T00:09:17.661043Z``), as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes it but always with the
    fraction. The text up to the seconds is made once a second: the
    TimeStamper's datetime and isoformat were an eighth of a worker's
    Python time in a drain (py-spy; two lines a job): 2.55 µs a line, this
    0.97."""
    global _second
    now = time.time()
    whole = int(now)
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    event["timestamp"] = f"{second[1]}.{int((now - whole) * 1e6):06d}Z"
    return event


_encoder = msgspec.json.Encoder(enc_hook=repr)


def json_line(event: dict[str, Any], **_: Any) -> str:
    """One log line's JSON, by msgspec (a structlog ``JSONRenderer``
    serializer: structlog's own advice for speed is a native encoder, and
    ``json.dumps`` was a third of a worker's cost per job at two lines a
    job). Compact, UTF-8 kept as is; a value msgspec has no form for is its
    ``repr()``, as ``JSONRenderer``'s default does. What msgspec refuses
    whole (a key that is not a string or number, a lone surrogate, an int
    past 64 bits) goes through ``json.dumps`` instead, and a field neither
    can render is its ``repr()``: a line is never lost to its content, nor
    is the call that logs it."""
    try:
        return _encoder.encode(event).decode()
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        pass
    try:
        return json.dumps(event, default=repr)
    except (TypeError, ValueError, OverflowError, RecursionError):
        plain = (str, int, float, bool, type(None))
        return json.dumps(
            {str(k): v if isinstance(v, plain) else repr(v) for k, v in event.items()}
        )


def job_line(event: str, *, failed: bool = False, **fields: Any) -> None:
    """Log one line about a job (``job.received``, ``job.succeeded`` ...) at
    the level ``[log] jobs`` sets (a ``failed`` try at warning or above),
    unless it is "off" or below the log's level."""
    if _job_level is not None:
        level = max(_job_level, logging.WARNING) if failed else _job_level
        _job_logger().log(level, event, **fields)


def _job_logger() -> Any:
    """The bound logger for :func:`job_line`, built once per structlog
    configuration: ``structlog.get_logger().log(...)`` would build a new
    bound logger on every call (a context, a ``WriteLogger`` and its lock:
    about a sixth of a line's cost, two lines per job), and caching every
    logger on first use would keep module-level loggers on a configuration
    replaced since (``configure`` again, ``reset_defaults`` between tests).
    The configuration is compared by identity on each call; ``capture_logs``
    changes the processors list in place, which the logger shares."""
    global _job_log
    config = structlog.get_config()
    cached = _job_log
    if cached is not None:  # compared one by one: two lines per job
        key = cached[0]
        if (
            key[0] is config["processors"]
            and key[1] is config["wrapper_class"]
            and key[2] is config["context_class"]
            and key[3] is config["logger_factory"]
        ):
            return cached[1]
    key = (
        config["processors"],
        config["wrapper_class"],
        config["context_class"],
        config["logger_factory"],
    )
    logger = structlog.get_logger().bind()
    _job_log = (key, logger)
    return logger


class JobLines(Hooks):
    """The worker's lines per job, as a hook: ``job.received`` before the
    handler, then ``job.succeeded``, ``job.errored``, ``job.failed`` or
    ``job.retry_asked`` with its ``seconds`` (and the ``error``)."""

    def before_job(self, ctx: JobContext) -> None:
        job_line(
            "job.received", job_id=ctx.job_id, task=ctx.task, attempt=ctx.attempt, queue=ctx.queue
        )

    def after_job(self, ctx: JobContext, end: JobEnd) -> None:
        fields: dict[str, Any] = {"seconds": round(end.seconds, 6)}
        if end.error is not None:
            fields["error"] = f"{end.error_type}: {end.error_message[:200]}"
        job_line(
            f"job.{end.outcome}",
            failed=end.outcome in ("errored", "failed"),
            job_id=ctx.job_id,
            task=ctx.task,
            attempt=ctx.attempt,
            **fields,
        )
