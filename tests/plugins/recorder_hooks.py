"""Hooks for tests/test_hooks.py: ``corral_hooks()`` gives a hook that
raises at every point (it must not matter) and one that writes a JSON line
per call to the file ``$CORRAL_TEST_HOOKS_FILE``; ``headers_hooks()`` adds
a header to every job a client enqueues; ``slow_hooks()`` is slow to see
``hooks.quick`` end; ``hang_hooks()`` never returns from some."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import corral
from corral.hooks import Enqueuing, JobEnd


class Broken(corral.Hooks):
    """Raises at every point."""

    def before_enqueue(self, job: Enqueuing) -> None:
        raise RuntimeError("hook bug before_enqueue")

    def before_job(self, ctx: corral.JobContext) -> None:
        raise RuntimeError("hook bug before_job")

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        raise RuntimeError("hook bug on_failure")

    def on_retry(self, ctx: corral.JobContext, error: BaseException) -> None:
        raise RuntimeError("hook bug on_retry")

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        raise RuntimeError("hook bug after_job")

    def close(self) -> None:
        raise RuntimeError("hook bug close")


class Recorder(corral.Hooks):
    """One JSON line per call, appended to ``path``."""

    def __init__(self, path: str, label: str = "top") -> None:
        self.path = path
        self.label = label

    def _write(self, point: str, ctx: corral.JobContext | None, **fields: Any) -> None:
        line: dict[str, Any] = {"point": point, "label": self.label, "pid": os.getpid()}
        if ctx is not None:
            line.update(job_id=ctx.job_id, task=ctx.task, attempt=ctx.attempt)
            line.update(headers=ctx.headers)
        line.update(fields)
        with open(self.path, "a") as out:
            out.write(json.dumps(line) + "\n")

    def before_job(self, ctx: corral.JobContext) -> None:
        self._write("before_job", ctx)

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        self._write("on_failure", ctx, error=type(error).__name__)

    def on_retry(self, ctx: corral.JobContext, error: BaseException) -> None:
        self._write("on_retry", ctx, error=type(error).__name__)

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        self._write(
            "after_job", ctx, outcome=end.outcome, result=end.result, error_type=end.error_type
        )

    def close(self) -> None:
        self._write("close", None)


def corral_hooks() -> list[corral.Hooks]:
    return [Broken(), Recorder(os.environ["CORRAL_TEST_HOOKS_FILE"])]


def pool_hooks() -> corral.Hooks:
    return Recorder(os.environ["CORRAL_TEST_HOOKS_FILE"], label="pool")


class Stamp(corral.Hooks):
    def before_enqueue(self, job: Enqueuing) -> None:
        job.headers["stamped-by"] = f"{job.task}:{job.job_id}"


def headers_hooks() -> corral.Hooks:
    return Stamp()


def raising() -> corral.Hooks:
    raise RuntimeError("SENTRY_DSN is not set")


def wrong() -> object:
    return 42


def wrong_text() -> object:
    return "Sentry"


class Slow(corral.Hooks):
    """Takes longer than ``hooks.quick``'s timeout to see its job end (an
    exporter flushing over a slow network): the job's outcome stands."""

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        if ctx.task == "hooks.quick":
            time.sleep(2.0)


def slow_hooks() -> corral.Hooks:
    return Slow()


class Hang(corral.Hooks):
    """Never returns: from after_job for ``hooks.hang_after``, and from
    before_job for the first try of ``hooks.hang_before`` (an exporter
    stuck on a network call without a timeout)."""

    def before_job(self, ctx: corral.JobContext) -> None:
        if ctx.task == "hooks.hang_before" and ctx.attempt == 1:
            threading.Event().wait()

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        if ctx.task == "hooks.hang_after":
            threading.Event().wait()


def hang_hooks() -> corral.Hooks:
    return Hang()


class Exit(corral.Hooks):
    """``sys.exit(5)`` from before_job on the first try of ``hooks.quick``."""

    def before_job(self, ctx: corral.JobContext) -> None:
        if ctx.task == "hooks.quick" and ctx.attempt == 1:
            raise SystemExit(5)


def exit_hooks() -> corral.Hooks:
    return Exit()
